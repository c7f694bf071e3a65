"""Bad inputs, untrusted checkpoints and shipped remote code: each case works correctly or fails with one clear error.

`BAD_INPUTS` is the catalogue the table of docs/robustness.md lists (a test checks they agree): every entry is run
against a tiny CLIP-DCI model and its processor.
"""

import ast
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file, save_file
from tiny import REPO, tiny_config, tiny_model, tiny_processor
from transformers import AutoModelForImageTextToText

from dense_connector import DenseConnectorConfig


CONFIG = tiny_config("clip", "dci")
MODEL = tiny_model(CONFIG)
PROCESSOR = tiny_processor(CONFIG)
TOKENS = CONFIG.num_image_tokens()


def _image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).convert(mode)


def _run(images, text, **kwargs):
    inputs = PROCESSOR(images=images, text=text, return_tensors="pt", **kwargs)
    return MODEL(**inputs)


def _pixels(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


def _ids(num_images: int) -> torch.Tensor:
    return torch.tensor([[1] + [CONFIG.image_token_id] * TOKENS * num_images + [5]])


def _corrupt_file(tmp_path: Path) -> str:
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return str(path)


WORKS = None
# (case, what is done, the error message it must raise, or WORKS)
BAD_INPUTS = [
    ("1x1 image", lambda tmp: _run(_image(1, 1), "<image>\nHi"), WORKS),
    ("10000x50 image", lambda tmp: _run(_image(10000, 50), "<image>\nHi"), WORKS),
    ("grayscale image", lambda tmp: _run(_image(40, 30, "L"), "<image>\nHi"), WORKS),
    ("RGBA image", lambda tmp: _run(_image(40, 30, "RGBA"), "<image>\nHi"), WORKS),
    ("CMYK image", lambda tmp: _run(_image(40, 30, "CMYK"), "<image>\nHi"), WORKS),
    ("palette image", lambda tmp: _run(_image(40, 30, "P"), "<image>\nHi"), WORKS),
    ("empty text", lambda tmp: MODEL(**PROCESSOR(text="", return_tensors="pt")), WORKS),
    (
        "image and text-only samples in one batch",
        lambda tmp: _run([_image(40, 30)], ["<image>\nHi", "Just text"], padding=True),
        WORKS,
    ),
    (
        "more images than placeholders",
        lambda tmp: _run([_image(4, 4), _image(4, 4)], "<image>\nHi"),
        r"1 <image> placeholder\(s\) but 2 image\(s\)",
    ),
    ("placeholder without image", lambda tmp: _run(None, "<image>\nHi"), r"1 <image> placeholder\(s\) but 0 image"),
    (
        "images in the wrong sample",
        lambda tmp: _run([[_image(4, 4), _image(4, 4)], []], ["<image>\nA", "<image>\nB"], padding=True),
        r"Sample 0 has 1 <image> placeholder\(s\) but 2 image\(s\)",
    ),
    (
        "truncation through an image",
        lambda tmp: _run(_image(4, 4), "Hello <image> world", truncation=True, max_length=10),
        "cut through an image",
    ),
    ("corrupt image file", lambda tmp: _run(_corrupt_file(tmp), "<image>\nHi"), r"cannot identify image file"),
    ("missing image file", lambda tmp: _run(str(tmp / "nope.png"), "<image>\nHi"), r"nope\.png"),
    (
        "placeholder tokens without pixel features",
        lambda tmp: MODEL(input_ids=_ids(2), pixel_values=_pixels(1, 3, 32, 32)),
        rf"{2 * TOKENS} image placeholder tokens but the 1 image\(s\) give {TOKENS} features",
    ),
    (
        "pixel_values without a batch axis",
        lambda tmp: MODEL(input_ids=_ids(1), pixel_values=_pixels(3, 32, 32)),
        r"pixel_values must have shape \(num_images, channels, height, width\)",
    ),
    (
        "pixel_values of the wrong size",
        lambda tmp: MODEL(input_ids=_ids(1), pixel_values=_pixels(1, 3, 64, 64)),
        r"\(channels, height, width\) = \(3, 32, 32\).*got \(1, 3, 64, 64\)",
    ),
    (
        "pixel_values as integers",
        lambda tmp: MODEL(input_ids=_ids(1), pixel_values=_pixels(1, 3, 32, 32, dtype=torch.uint8)),
        r"floating-point tensor.*torch\.uint8",
    ),
    (
        "unknown connector type in a config",
        lambda tmp: DenseConnectorConfig(dense_connector_type="sparse"),
        r"dense_connector_type='sparse' is not supported",
    ),
]


@pytest.mark.parametrize("case,action,expected", BAD_INPUTS, ids=[case for case, _, _ in BAD_INPUTS])
def test_bad_input(case, action, expected, tmp_path):
    if expected is WORKS:
        out = action(tmp_path)
        if hasattr(out, "logits"):
            assert torch.isfinite(out.logits).all()
    else:
        with pytest.raises(Exception, match=expected):
            action(tmp_path)


def test_docs_list_every_bad_input():
    page = (REPO / "docs" / "robustness.md").read_text()
    missing = [case for case, _, _ in BAD_INPUTS if f"| {case} |" not in page]
    assert not missing, f"docs/robustness.md's table lacks {missing}"


def test_mixed_batch_matches_separate_runs():
    image = _image(40, 30)
    texts = ["Just text", "<image>\nHi"]
    batch = PROCESSOR(images=[image], text=texts, padding=True, padding_side="right", return_tensors="pt")
    logits = MODEL(**batch).logits
    for row, (images, text) in enumerate(((None, "Just text"), ([image], "<image>\nHi"))):
        single = PROCESSOR(images=images, text=text, return_tensors="pt")
        length = single["input_ids"].shape[1]
        torch.testing.assert_close(logits[row, :length], MODEL(**single).logits[0], atol=1e-5, rtol=1e-4)


# --- property-based: placeholder counts and image order ------------------------------------------------------


MODELS: dict = {}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.tuples(st.integers(1, 300), st.integers(1, 300)), min_size=1, max_size=3),
    words=st.lists(st.sampled_from(["a", "cat", "?", "\n", " ", "red square"]), min_size=4, max_size=8),
    connector=st.sampled_from(["sti", "sci", "dci", "none"]),
)
def test_placeholders_always_match_features_in_order(sizes, words, connector):
    config = tiny_config("siglip", connector)
    processor = tiny_processor(config)
    model = MODELS.setdefault(connector, tiny_model(config))
    images = [_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    pieces = list(words)
    for index in range(len(images)):  # spread the placeholders through the text
        pieces.insert((index * 3) % (len(pieces) + 1), "<image>")
    inputs = processor(images=images, text="".join(pieces), return_tensors="pt")
    features = model.get_image_features(inputs["pixel_values"]).pooler_output
    assert int((inputs["input_ids"] == config.image_token_id).sum()) == sum(len(f) for f in features)
    merged = model(**inputs).image_hidden_states
    one_by_one = [
        model.get_image_features(inputs["pixel_values"][i : i + 1]).pooler_output[0] for i in range(len(images))
    ]
    torch.testing.assert_close(merged, torch.cat(one_by_one), atol=1e-5, rtol=1e-4)


# --- checkpoints ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("checkpoint")
    MODEL.save_pretrained(folder)
    PROCESSOR.save_pretrained(folder)
    return folder


def _tamper(saved: Path, tmp_path: Path, change) -> Path:
    folder = tmp_path / "tampered"
    folder.mkdir()
    for file in saved.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    state = load_file(folder / "model.safetensors")
    change(state)
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_checkpoint_with_a_wrongly_shaped_tensor_is_rejected(saved, tmp_path):
    change = lambda s: s.update({"model.connector.projector.2.weight": torch.zeros(64, 3)})  # noqa: E731
    with pytest.raises((ValueError, RuntimeError), match=r"ignore_mismatched_sizes"):
        AutoModelForImageTextToText.from_pretrained(_tamper(saved, tmp_path, change))


@pytest.mark.parametrize(
    "change,kind,name",
    [
        (lambda s: s.pop("model.connector.projector.0.bias"), "missing_keys", "model.connector.projector.0.bias"),
        (lambda s: s.update(extra=torch.zeros(2)), "unexpected_keys", "extra"),
    ],
    ids=["missing", "extra"],
)
def test_checkpoint_with_missing_or_extra_tensors_is_reported(saved, tmp_path, change, kind, name):
    """As transformers does: loading info lists them (our CLI and conversion refuse such checkpoints)."""
    _, info = AutoModelForImageTextToText.from_pretrained(_tamper(saved, tmp_path, change), output_loading_info=True)
    assert info[kind] == {name}


def test_truncated_weight_file_is_an_error(saved, tmp_path):
    folder = _tamper(saved, tmp_path, lambda state: None)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(Exception, match=r"(?i)safetensor|incomplete|invalid|truncat"):
        AutoModelForImageTextToText.from_pretrained(folder)


def test_only_safetensors_are_written(saved):
    assert list(saved.glob("*.safetensors")) and not list(saved.glob("*.bin")) and not list(saved.glob("*.pt"))


# --- the code shipped for trust_remote_code ------------------------------------------------------------------

REMOTE_FILES = sorted(
    path
    for pattern in (
        "configuration_*.py",
        "connector_*.py",
        "modeling_*.py",
        "processing_*.py",
        "image_processing_*.py",
    )
    for path in (REPO / "dense_connector").glob(pattern)
)
FORBIDDEN_MODULES = {"socket", "subprocess", "pickle", "marshal", "shelve", "urllib", "http", "requests", "ftplib"}
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__", "system", "popen", "load"}


@pytest.mark.parametrize("path", REMOTE_FILES, ids=[p.name for p in REMOTE_FILES])
def test_remote_code_is_inert(path):
    """Shipped files import only transformers, torch, the standard library and each other, and run nothing."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots = {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots = set() if node.level else {node.module.split(".")[0]}
        else:
            continue
        for root in roots:
            assert root in {"transformers", "torch"} or root in sys.stdlib_module_names, f"{path.name} imports {root}"
            assert root not in FORBIDDEN_MODULES, f"{path.name} imports {root}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            assert name not in FORBIDDEN_CALLS, f"{path.name} calls {name}()"
    for node in tree.body:  # top level: imports, definitions and constants only
        allowed = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign, ast.Expr)
        if isinstance(node, ast.Try):  # feature detection: an import, or a definition when it is missing
            assert all(isinstance(n, (ast.Import, ast.ImportFrom)) for n in node.body), f"{path.name}: try runs code"
            for handler in node.handlers:
                assert ast.unparse(handler.type) == "ImportError", f"{path.name} catches {ast.unparse(handler.type)}"
                assert all(isinstance(n, ast.FunctionDef) for n in handler.body), f"{path.name}: except runs code"
            assert not (node.orelse or node.finalbody), f"{path.name}: try has else/finally"
            continue
        assert isinstance(node, allowed), f"{path.name} runs {type(node).__name__} at import"
        if isinstance(node, ast.Expr):
            assert isinstance(node.value, ast.Constant), f"{path.name} runs an expression at import"
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Call):
            pytest.fail(f"{path.name} calls {ast.unparse(node.value)} at import")


def test_remote_code_files_are_the_ones_shipped(saved):
    """`save_pretrained` ships exactly the files checked above, so what users run is what was checked."""
    assert {p.name for p in saved.glob("*.py")} == {p.name for p in REMOTE_FILES}
