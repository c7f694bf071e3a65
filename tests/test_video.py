"""Training-free video (issue 6): `<video>` placeholders, frame sampling, per-frame max-pooling, position limit."""

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import FIXTURES, tiny_config, tiny_model, tiny_processor
from transformers import AutoModelForImageTextToText, AutoProcessor

from dense_connector.conversion import convert_checkpoint


PROMPT = "USER: <video>\nWhat happens in the video? ASSISTANT:"
FRAME_TOKENS = 64  # the tiny tower's 8x8 patch grid


def make_frames(count: int, seed: int = 0, height: int = 40, width: int = 60) -> list[Image.Image]:
    """Non-square random frames (the `pad` preprocessing matters)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(count)]


def video_tokens(inputs, config) -> int:
    return int((inputs["input_ids"] == config.video_token_id).sum())


def direct_video_features(model, frames: torch.Tensor, stride: int) -> torch.Tensor:
    """The paper's steps, done by hand: each frame alone through tower + connector + projector, the max of every
    `stride` consecutive tokens, frames concatenated in time order."""
    per_frame = []
    for frame in frames:
        features = model.get_image_features(frame[None]).pooler_output[0]
        usable = features[: len(features) // stride * stride]
        per_frame.append(usable.view(-1, stride, features.shape[-1]).amax(dim=1))
    return torch.cat(per_frame)


def test_processor_expands_video_placeholder_and_preprocesses_frames_as_images():
    config = tiny_config()
    processor = tiny_processor(config)
    frames = make_frames(6)
    inputs = processor(text=PROMPT, videos=[frames], return_tensors="pt")
    assert inputs["pixel_values_videos"].shape == (1, 6, 3, 32, 32)
    assert video_tokens(inputs, config) == 6 * FRAME_TOKENS // 2 == config.num_video_tokens(6)
    as_images = processor.image_processor(frames, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(inputs["pixel_values_videos"][0], as_images, rtol=0, atol=0)


def test_pil_list_array_and_tensor_videos_agree():
    processor = tiny_processor(tiny_config())
    frames = make_frames(4)
    array = np.stack([np.asarray(frame) for frame in frames])  # (T, H, W, C)
    results = [
        processor(text=PROMPT, videos=video, return_tensors="pt")
        for video in (frames, [frames], array, [array], torch.from_numpy(array))
    ]
    for result in results[1:]:
        torch.testing.assert_close(result["pixel_values_videos"], results[0]["pixel_values_videos"], rtol=0, atol=0)
        assert result["input_ids"].tolist() == results[0]["input_ids"].tolist()


def test_uniform_frame_sampling_picks_the_middle_of_equal_segments():
    """10 frames, 4 wanted: segments of 9/4 frames, middles 1, 3, 5, 8 (the original evaluation code's choice)."""
    config = tiny_config()
    processor = tiny_processor(config)
    frames = make_frames(10)
    expected = processor.image_processor([frames[i] for i in (1, 3, 5, 8)], return_tensors="pt")["pixel_values"]
    per_call = processor(text=PROMPT, videos=frames, num_frames=4, return_tensors="pt")
    processor.num_video_frames = 4
    by_option = processor(text=PROMPT, videos=frames, return_tensors="pt")
    for inputs in (per_call, by_option):
        torch.testing.assert_close(inputs["pixel_values_videos"][0], expected, rtol=0, atol=0)
        assert video_tokens(inputs, config) == 4 * FRAME_TOKENS // 2
    short = processor(text=PROMPT, videos=frames[:3], return_tensors="pt")  # fewer frames than asked: all kept
    assert short["pixel_values_videos"].shape[1] == 3


@pytest.mark.parametrize(
    "tower,connector,stride",
    [("clip", "dci", 2), ("siglip", "dci", 2), ("clip", "sti", 2), ("clip", "sci", 1), ("siglip", "none", 3)],
)
def test_video_features_match_direct_computation(tower, connector, stride):
    config = tiny_config(tower, connector, video_pool_stride=stride)
    model = tiny_model(config)
    processor = tiny_processor(config)
    inputs = processor(
        text=[PROMPT, PROMPT], videos=[make_frames(3, seed=1), make_frames(3, seed=2)], return_tensors="pt"
    )
    frame_tokens = config.num_image_tokens()
    assert video_tokens(inputs, config) == 2 * 3 * (frame_tokens // stride)

    with torch.no_grad():
        videos = model.get_video_features(inputs["pixel_values_videos"]).pooler_output
        expected = [direct_video_features(model, frames, stride) for frames in inputs["pixel_values_videos"]]
        placed = model(**inputs).video_hidden_states
    for video, direct in zip(videos, expected):
        assert video.shape == (3 * (frame_tokens // stride), config.text_config.hidden_size)
        torch.testing.assert_close(video, direct, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(placed, torch.cat(expected), atol=1e-5, rtol=1e-5)


def test_image_and_video_in_one_prompt():
    config = tiny_config()
    model, processor = tiny_model(config), tiny_processor(config)
    text = "USER: <image>\n<video>\nDoes the picture appear in the video? ASSISTANT:"
    inputs = processor(text=text, images=make_frames(1, seed=5)[0], videos=make_frames(2), return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    first_video = ids.index(config.video_token_id)
    assert ids.count(config.image_token_id) == FRAME_TOKENS and ids.count(config.video_token_id) == FRAME_TOKENS
    assert ids.index(config.image_token_id) + FRAME_TOKENS < first_video  # the image's run comes first, as written
    with torch.no_grad():
        outputs = model(**inputs)
    assert (
        outputs.image_hidden_states.shape[0] == FRAME_TOKENS and outputs.video_hidden_states.shape[0] == FRAME_TOKENS
    )


def test_image_only_checkpoint_answers_about_a_video(tmp_path):
    """A released-format checkpoint trained on images only (the `clip_dci` fixture, converted) takes a video through
    the Auto classes and its chat template, and generates an answer that depends on the video it was shown."""
    fixture = FIXTURES / "clip_dci"
    folder = convert_checkpoint(
        fixture / "original", tmp_path / "clip_dci", vision_tower=fixture / "vision_tower", progress=False
    )
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    answers, last_logits = [], []
    for seed in (0, 1):
        inputs = processor(text=prompt, videos=make_frames(8, seed=seed), num_frames=4, return_tensors="pt")
        assert video_tokens(inputs, model.config) == model.config.num_video_tokens(4) == 4 * 64 // 2
        with torch.no_grad():
            last_logits.append(model(**inputs).logits[0, -1])
            generated = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        answers.append(generated[0, inputs["input_ids"].shape[1] :])
    assert all(len(answer) == 6 for answer in answers)
    assert not torch.allclose(last_logits[0], last_logits[1])


def test_video_longer_than_the_language_model_is_refused_before_any_compute():
    config = tiny_config()  # max_position_embeddings = 512, 32 positions per frame
    model, processor = tiny_model(config), tiny_processor(config)
    tower_runs = []
    model.model.vision_tower.embeddings.register_forward_hook(lambda *args: tower_runs.append(1))

    too_long = processor(text=PROMPT, videos=make_frames(17), return_tensors="pt")  # 544 video positions
    with pytest.raises(ValueError, match=r"A video of 17 frames takes 544 positions.*max_position_embeddings=512"):
        model.get_video_features(too_long["pixel_values_videos"])
    with pytest.raises(ValueError, match="A video of 17 frames"):
        model.generate(**too_long, max_new_tokens=2)

    assert not tower_runs

    fits = processor(text=PROMPT, videos=make_frames(16), num_frames=8, return_tensors="pt")
    with torch.no_grad():
        model(**fits)
    assert tower_runs


def test_bad_video_inputs_get_clear_errors():
    processor = tiny_processor(tiny_config())
    with pytest.raises(ValueError, match=r"1 <video> placeholder\(s\) but 2 video\(s\)"):
        processor(text=PROMPT, videos=[make_frames(2), make_frames(2)])
    with pytest.raises(ValueError, match=r"\[3, 2\] frames after sampling.*num_frames"):
        processor(text=[PROMPT, PROMPT], videos=[make_frames(3), make_frames(2)])
    with pytest.raises(ValueError, match="`videos` must be one video"):
        processor(text=PROMPT, videos="not a video")
    with pytest.raises(ValueError, match="num_frames=0 must be a positive"):
        processor(text=PROMPT, videos=make_frames(3), num_frames=0)
