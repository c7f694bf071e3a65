"""DenseConnectorProcessor: placeholder expansion, original preprocessing and tokenisation, padding, errors."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tiny import FIXTURES, anyres_processor, tiny_config, tiny_model, tiny_processor
from transformers import AutoProcessor, LlavaImageProcessorPil

from dense_connector import DenseConnectorProcessor


def _image(width: int = 60, height: int = 40, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("tower", ["clip", "siglip"])
@pytest.mark.parametrize("connector,downsample", [("sti", 1), ("sci", 1), ("dci", 1), ("none", 1), ("dci", 2)])
def test_placeholders_match_model_features(tower, connector, downsample):
    config = tiny_config(tower, connector, image_downsample_factor=downsample)
    processor = tiny_processor(config)
    model = tiny_model(config)
    inputs = processor(images=[_image(), _image(30, 70)], text=["<image>\nA <image> B"], return_tensors="pt")
    features = model.get_image_features(inputs["pixel_values"]).pooler_output
    expected = config.num_image_tokens()
    assert [len(f) for f in features] == [expected, expected]
    assert int((inputs["input_ids"] == config.image_token_id).sum()) == 2 * expected
    model(**inputs)  # the counts agree end to end


@pytest.mark.parametrize("name", ["clip_dci", "siglip_dci"])
def test_pad_preprocessing_matches_original(name):
    """`pad` (pad to a square with the mean colour, then the tower's resize) gives the original pixels."""
    golden = load_file(FIXTURES / name / "golden.safetensors")["pixel_values"]
    size = golden.shape[-1]
    config = tiny_config("clip" if name.startswith("clip") else "siglip", image_size=size)
    config.vision_config.image_size = size
    processor = tiny_processor(config)
    pixels = processor(images=Image.open(FIXTURES / name / "image0.png"), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels, golden, atol=1e-5, rtol=0)


def test_plain_resize_without_padding():
    config = tiny_config()
    processor = tiny_processor(config)
    processor.image_processor.do_pad = False
    processor.image_processor.do_center_crop = False
    processor.image_processor.size = {"height": 32, "width": 32}
    image = _image(64, 32)
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    reference = LlavaImageProcessorPil(do_pad=False, do_center_crop=False, size={"height": 32, "width": 32})
    torch.testing.assert_close(pixels, reference(image, return_tensors="pt")["pixel_values"])
    padded = tiny_processor(config)(images=image, return_tensors="pt")["pixel_values"]
    assert not torch.allclose(pixels, padded)


def test_chunk_tokenisation_gives_each_chunk_its_own_prefix():
    """As the original: text after an image is tokenised on its own (SentencePiece dummy prefix, no second BOS)."""
    config = tiny_config()
    processor = tiny_processor(config)
    tokenizer = processor.tokenizer
    ids = processor(images=_image(), text="Look:<image>\nDescribe it.")["input_ids"][0]
    before = tokenizer("Look:")["input_ids"]
    after = tokenizer("\nDescribe it.")["input_ids"]
    assert after[0] == tokenizer.bos_token_id and tokenizer.convert_ids_to_tokens(after[1]) == "▁"
    expected = before + [config.image_token_id] * config.num_image_tokens() + after[1:]
    assert ids == expected
    assert ids.count(tokenizer.bos_token_id) == 1


def test_batch_padding_sides_and_attention_mask():
    config = tiny_config()
    processor = tiny_processor(config)
    texts = ["<image>\nShort.", "<image>\nA much longer question about the picture?"]
    for side in ("left", "right"):
        inputs = processor(
            images=[_image(), _image()], text=texts, padding=True, padding_side=side, return_tensors="pt"
        )
        mask = inputs["attention_mask"]
        assert mask.shape == inputs["input_ids"].shape
        assert (mask[0] == 0).any() and (mask[1] == 1).all()
        assert (mask[0, 0] == 0) == (side == "left")
        pad = inputs["input_ids"][0][mask[0] == 0]
        assert (pad == processor.tokenizer.pad_token_id).all()


def test_text_only_and_decode():
    processor = tiny_processor(tiny_config())
    inputs = processor(text="Tell me a joke.", return_tensors="pt")
    assert set(inputs) == {"input_ids", "attention_mask"}
    text = processor.decode(inputs["input_ids"][0], skip_special_tokens=True)
    assert text == "Tell me a joke."
    assert processor.batch_decode(inputs["input_ids"], skip_special_tokens=True) == [text]


@pytest.mark.parametrize(
    "empty", [{"images": []}, {"videos": []}, {"images": [], "videos": []}, {"images": [[], []], "videos": [[], []]}]
)
def test_empty_lists_mean_no_images_or_videos(empty):
    """What lmms-eval passes for a text-only question: `images=[]`, `videos=[]` (or one empty list per sample)."""
    processor = tiny_processor(tiny_config())
    texts = ["Tell me a joke.", "And another one, please."]
    expected = processor(text=texts, padding=True, return_tensors="pt")
    inputs = processor(text=texts, padding=True, return_tensors="pt", **empty)
    assert set(inputs) == {"input_ids", "attention_mask"}
    torch.testing.assert_close(inputs["input_ids"], expected["input_ids"])
    with pytest.raises(ValueError, match=r"1 <image> placeholder\(s\) but 0 image\(s\)"):
        processor(text="<image>\nWhat is it?", **empty)


@pytest.mark.parametrize(
    "text,num_images,message",
    [
        ("<image> and <image>", 1, r"2 <image> placeholder\(s\) but 1 image\(s\)"),
        ("no placeholder", 1, r"0 <image> placeholder\(s\) but 1 image\(s\)"),
        ("<image>", 0, r"1 <image> placeholder\(s\) but 0 image\(s\)"),
    ],
)
def test_image_placeholder_count_mismatch(text, num_images, message):
    processor = tiny_processor(tiny_config())
    images = [_image()] * num_images or None
    with pytest.raises(ValueError, match=message):
        processor(images=images, text=text)


def test_truncation_never_cuts_through_an_image():
    config = tiny_config()
    processor = tiny_processor(config)
    with pytest.raises(ValueError, match="cut through an image"):
        processor(images=_image(), text="Hello <image> world", truncation=True, max_length=10)
    ids = processor(images=_image(), text="<image> word " * 1 + "more " * 50, truncation=True, max_length=80)
    assert len(ids["input_ids"][0]) == 80


def test_save_load_round_trip(tmp_path):
    config = tiny_config("siglip", "sti", image_downsample_factor=2)
    processor = tiny_processor(config, chat_template="{{ messages[0]['content'] }}")
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, DenseConnectorProcessor)
    for name in ("patch_size", "dense_connector_type", "sti_pool_stride", "image_downsample_factor"):
        assert getattr(loaded, name) == getattr(processor, name), name
    assert loaded.chat_template == processor.chat_template
    text = "<image>\nWhat?"
    torch.testing.assert_close(
        loaded(images=_image(), text=text, return_tensors="pt")["input_ids"],
        processor(images=_image(), text=text, return_tensors="pt")["input_ids"],
    )


def test_unknown_image_backend_is_refused(tmp_path):
    tiny_processor(tiny_config()).save_pretrained(tmp_path)
    assert isinstance(AutoProcessor.from_pretrained(tmp_path).image_processor, LlavaImageProcessorPil)
    with pytest.raises(ValueError, match=r"backend='cv2' is not an image-processing backend; use one of"):
        AutoProcessor.from_pretrained(tmp_path, backend="cv2")


def test_tokenizer_without_image_token_is_rejected():
    config = tiny_config()
    tokenizer = tiny_processor(config).tokenizer.__class__.from_pretrained(FIXTURES / "clip_dci" / "original")
    with pytest.raises(ValueError, match=r"no '<image>' token; add it"):
        DenseConnectorProcessor(image_processor=LlavaImageProcessorPil(), tokenizer=tokenizer)


def test_anyres_batch_of_differently_sized_images():
    """AnyRes: each image's placeholder count follows its own size; a batch equals each image run alone."""
    pinpoints = [[32, 64], [64, 32], [64, 64], [96, 32]]
    config = tiny_config("siglip", "dci", image_grid_pinpoints=pinpoints)
    model = tiny_model(config)
    processor = anyres_processor(config)
    images = [_image(100, 30, seed=1), _image(20, 70, seed=2), _image(50, 50, seed=3)]
    texts = [f"<image>\nImage {i}?" for i in range(3)]
    batch = processor(images=images, text=texts, padding=True, padding_side="left", return_tensors="pt")
    counts = (batch["input_ids"] == config.image_token_id).sum(1).tolist()
    assert counts == [config.num_image_tokens((img.height, img.width)) for img in images]
    assert len(set(counts)) == 3, "the three shapes should need different numbers of placeholders"
    batched = model(**batch).logits
    for row, (image, text) in enumerate(zip(images, texts)):
        single = processor(images=image, text=text, return_tensors="pt")
        logits = model(**single).logits[0]
        torch.testing.assert_close(batched[row, -logits.shape[0] :], logits, atol=1e-5, rtol=1e-4)
