"""Checks of a written folder before it is moved into place.

This module owns the verification: the folder must load with every tensor present and nothing unexpected, a
forward pass on a built-in image must give finite logits, and, when a fixture recorded from the original code is
given, the processor's ids and pixels, the last logits and the greedy ids must match it within the fixture's
tolerances.
"""

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from ..modeling_dense_connector import DenseConnectorForConditionalGeneration
from ..processing_dense_connector import DenseConnectorProcessor
from .sources import CheckpointError, read_json


ORIGINAL_IMAGE_TOKEN_INDEX = -200


def probe_image() -> Image.Image:
    """A fixed, non-square RGB image (so that padding and AnyRes paths are exercised)."""
    rows, cols = np.mgrid[0:48, 0:80]
    pixels = np.stack([rows * 5, cols * 3, (rows + cols) * 2], axis=-1) % 256
    return Image.fromarray(pixels.astype(np.uint8))


LOADING_PROBLEMS = {
    "missing_keys": "missing tensors",
    "unexpected_keys": "unexpected tensors",
    "mismatched_keys": "tensors of the wrong shape",
}


def loading_problems(info: dict) -> list[str]:
    """What a `from_pretrained(..., output_loading_info=True)` report lists, one line per kind, with the names."""
    problems = []
    for key, entries in info.items():
        if entries:
            names = sorted(entry[0] if isinstance(entry, tuple) else str(entry) for entry in entries)
            problems.append(f"{LOADING_PROBLEMS.get(key, key)}: {', '.join(names)}")
    return problems


def load_converted(
    folder: Path, dtype: torch.dtype
) -> tuple[DenseConnectorForConditionalGeneration, DenseConnectorProcessor]:
    """Load the written folder and refuse it unless every weight is present, nothing is unexpected or resized.

    The refusal does not rely on `from_pretrained` raising: it reads the loading report itself. The check runs on a
    GPU when there is one; CPUs compute float16 very slowly, so there it runs in bfloat16.
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and dtype == torch.float16:
        dtype = torch.bfloat16
    try:
        model, info = DenseConnectorForConditionalGeneration.from_pretrained(
            folder, dtype=dtype, device_map=device, output_loading_info=True
        )
    except ValueError as error:
        raise CheckpointError(f"The written folder does not load: {error}") from None
    problems = loading_problems(info)
    if problems:
        raise CheckpointError(
            f"The written folder is not a complete checkpoint of the converted model ({'; '.join(problems)}); "
            "the conversion is refused. This is a bug of the converter: please report it with the command line."
        )
    return model.eval(), DenseConnectorProcessor.from_pretrained(folder)


def run_probe(model, processor) -> str:
    """One forward pass on a built-in image and chat prompt; the logits must be finite."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown here?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[probe_image()], text=prompt, return_tensors="pt").to(model.device)
    with torch.no_grad():
        logits = model(**inputs, logits_to_keep=1).logits
    if not torch.isfinite(logits).all():
        raise CheckpointError("The converted model gives non-finite logits on the built-in probe.")
    tokens = int(inputs["input_ids"].shape[1])
    return f"forward pass on a built-in image ({tokens} positions) gives finite logits"


def collapse_placeholders(ids: list[int], placeholder: int) -> list[int]:
    """Input ids with each run of image placeholders replaced by the original's single -200."""
    collapsed = []
    for token in ids:
        if token == placeholder:
            if not collapsed or collapsed[-1] != ORIGINAL_IMAGE_TOKEN_INDEX:
                collapsed.append(ORIGINAL_IMAGE_TOKEN_INDEX)
        else:
            collapsed.append(token)
    return collapsed


def golden_pixel_values(golden: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Per-image golden pixels: `pixel_values` split by image, or `pixel_values_0`, `pixel_values_1`, ..."""
    if "pixel_values" in golden:
        return list(golden["pixel_values"])
    return [golden[f"pixel_values_{i}"].squeeze(0) for i in range(len([k for k in golden if k.startswith("pixel")]))]


def compare_with_golden(model, processor, fixture: Path) -> str:
    """Run a fixture folder's prompt and images; compare with its recorded original outputs.

    float32 conversions must meet the fixtures' tolerances (pixels 1e-5, logits 1e-4, identical greedy ids);
    half-precision ones must give the same ids and pixels and logits within what their rounding allows.
    """
    meta = read_json(fixture / "meta.json")
    if meta.get("video"):
        raise CheckpointError(f"{fixture} is a video fixture; --verify-against compares image fixtures only.")
    golden = load_file(fixture / "golden.safetensors")
    images = [Image.open(fixture / f"image{i}.png").convert("RGB") for i in range(meta.get("num_images", 1))]
    inputs = processor(images=images, text=meta["prompt"], return_tensors="pt")

    ids = collapse_placeholders(inputs["input_ids"][0].tolist(), model.config.image_token_id)
    if ids != golden["input_ids_original"][0].tolist():
        raise CheckpointError(f"The processor's input ids differ from the original's in {fixture}.")
    pixel_error = 0.0
    for ours, theirs in zip(inputs["pixel_values"], golden_pixel_values(golden)):
        ours = ours[: theirs.shape[0]] if theirs.dim() == 4 else ours
        pixel_error = max(pixel_error, (ours.float() - theirs).abs().max().item())
    inputs = inputs.to(model.device)

    vocab = golden["logits_last32"].shape[-1]
    expected_ids = golden["generated_ids"][0, 1:].tolist()
    text = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    with torch.no_grad():  # the tower runs once, for both the forward pass and generation
        images = model.get_image_features(inputs["pixel_values"], image_sizes=inputs.get("image_sizes"))
        logits = model(**text, mm_encoder_outputs={"image": images}).logits[:, -32:, :vocab].float()
        generated = model.generate(
            **text, mm_encoder_outputs={"image": images}, max_new_tokens=len(expected_ids), do_sample=False
        )
    logit_error = (logits.cpu() - golden["logits_last32"]).abs().max().item()
    new_ids = generated[0, inputs["input_ids"].shape[1] :].tolist()

    half = model.dtype != torch.float32
    logit_tolerance = 1e-4 if not half else 2e-2 * max(1.0, golden["logits_last32"].abs().max().item())
    summary = (
        f"{fixture.name}: input ids identical, pixel_values max diff {pixel_error:.2e}, last-32 logits max diff "
        f"{logit_error:.2e}, greedy ids {'identical' if new_ids == expected_ids else 'different'}"
    )
    if pixel_error > 1e-5 or logit_error > logit_tolerance or (new_ids != expected_ids and not half):
        raise CheckpointError(f"The converted model does not reproduce the original outputs: {summary}.")
    return summary


def check_folder(folder: Path, dtype: torch.dtype, verify_against: str | os.PathLike | None) -> list[str]:
    """Load the written folder strictly, run the probe (and the fixture comparison); returns what passed."""
    model, processor = load_converted(folder, dtype)
    checks = [run_probe(model, processor)]
    if verify_against is not None:
        checks.append(compare_with_golden(model, processor, Path(verify_against)))
    return checks
