"""With torchvision installed, saved and converted processors still give the original pixels.

Where torchvision is importable, transformers builds its torchvision image-processing backend by default, whose
resizing differs from the original's PIL preprocessing (by up to 1.5e-2 on `clip_dci`). This file runs in
`.venv-eval` (`make test-eval`: torch 2.14.1 + torchvision 0.29.1); `make test` has no torchvision.
"""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tiny import FIXTURE_NAMES, FIXTURES, run_without_package, tiny_config, tiny_processor
from transformers import AutoImageProcessor, AutoProcessor, LlavaImageProcessorPil, PilBackend, TorchvisionBackend
from transformers.utils import is_torchvision_available

from dense_connector import DenseConnectorProcessor
from dense_connector.conversion import convert_checkpoint


def fixture_pixels(processor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The processor's pixels for a fixture's images and prompt, and the original's (AnyRes tiles cut to theirs)."""
    meta = json.loads((FIXTURES / name / "meta.json").read_text())
    images = [Image.open(FIXTURES / name / f"image{i}.png").convert("RGB") for i in range(meta.get("num_images", 1))]
    ours = processor(images=images, text=meta["prompt"], return_tensors="pt")["pixel_values"]
    golden = load_file(FIXTURES / name / "golden.safetensors")["pixel_values"]
    return ours[:, : golden.shape[1]] if golden.dim() == 5 else ours, golden


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict:
    """Every fixture converted here, with torchvision importable; the conversion's own check compares its input
    ids, pixels, logits and greedy ids with the original's (`verify_against`)."""
    root = tmp_path_factory.mktemp("converted")
    return {
        name: convert_checkpoint(
            FIXTURES / name / "original",
            root / name,
            vision_tower=FIXTURES / name / "vision_tower",
            verify_against=FIXTURES / name,
            progress=False,
        )
        for name in FIXTURE_NAMES
    }


def test_transformers_picks_torchvision_here(tmp_path):
    """The premise of this file: here a saved Llava image processor loads with the torchvision backend."""
    assert is_torchvision_available()
    LlavaImageProcessorPil().save_pretrained(tmp_path)
    assert isinstance(AutoImageProcessor.from_pretrained(tmp_path), TorchvisionBackend)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_converted_processor_gives_the_original_pixels(converted, name):
    processor = AutoProcessor.from_pretrained(converted[name])
    assert isinstance(processor.image_processor, PilBackend)
    ours, golden = fixture_pixels(processor, name)
    torch.testing.assert_close(ours, golden, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["clip_dci", "siglip_dci"])
def test_saved_processor_gives_the_original_pixels(tmp_path, name):
    config = tiny_config("clip" if name.startswith("clip") else "siglip")
    config.vision_config.image_size = load_file(FIXTURES / name / "golden.safetensors")["pixel_values"].shape[-1]
    processor = tiny_processor(config)
    processor.save_pretrained(tmp_path)
    for loaded in (AutoProcessor.from_pretrained(tmp_path), DenseConnectorProcessor.from_pretrained(tmp_path)):
        torch.testing.assert_close(*fixture_pixels(loaded, name), atol=1e-5, rtol=0)


def test_remote_code_processor_gives_the_original_pixels(converted, tmp_path):
    """What Hub users get: the processor loaded as remote code, in a Python without this package."""
    script = f"""
import json, torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor
fixture = {str(FIXTURES / "clip_dci")!r}
processor = AutoProcessor.from_pretrained({str(converted["clip_dci"])!r}, trust_remote_code=True)
meta = json.load(open(fixture + "/meta.json"))
pixels = processor(images=Image.open(fixture + "/image0.png").convert("RGB"), text=meta["prompt"],
                   return_tensors="pt")["pixel_values"]
golden = load_file(fixture + "/golden.safetensors")["pixel_values"]
print(type(processor.image_processor).__name__, (pixels - golden).abs().max().item())
"""
    name, difference = run_without_package(script, tmp_path).stdout.split()
    assert name == "LlavaImageProcessorPil" and float(difference) <= 1e-5


def test_torchvision_backend_on_request(converted):
    """`backend="torchvision"` keeps transformers' choice, whose pixels are not the original's; the tokenizer is
    not told about image backends."""
    processor = AutoProcessor.from_pretrained(converted["clip_dci"], backend="torchvision")
    assert isinstance(processor.image_processor, TorchvisionBackend)
    assert processor.tokenizer.backend == "tokenizers"
    ours, golden = fixture_pixels(processor, "clip_dci")
    assert (ours - golden).abs().max() > 1e-3
