"""Tokenizer fidelity: the converted tokenizer gives the original's ids, for text and for whole prompts.

The original tokenises with the slow `LlamaTokenizer` of transformers 4.36 and splits prompts at their images
(`tests/original_tokenization.py` rebuilds both on SentencePiece; the first tests check that rebuild against ids
recorded with the original). Consumers other than our processor (vLLM, generic evaluation harnesses,
`tokenizer(prompt)`) tokenise a prompt whole, so the converted tokenizer must give those ids by itself.
"""

import json
import random
import shutil
from pathlib import Path

import pytest
from original_tokenization import ORIGINAL_IMAGE_TOKEN_INDEX, SlowLlamaTokenizer, tokenizer_image_token
from PIL import Image
from safetensors.torch import load_file
from sentencepiece import sentencepiece_model_pb2
from tiny import FIXTURE_NAMES, FIXTURES, REPO, tiny_config, tiny_processor
from transformers import AutoProcessor, AutoTokenizer

from dense_connector import DenseConnectorProcessor
from dense_connector.conversion import convert_tokenizer
from dense_connector.writing.tokenizer import sentencepiece_tokenizer


SOURCE = FIXTURES / "clip_dci" / "original"
DEMO_CHECKPOINT = REPO / "dense_connector" / "demo" / "checkpoint"
PLACEHOLDERS = ("<image>", "<video>")
CHAT_CASES = json.loads((FIXTURES / "chat_prompts.json").read_text())


def sentencepiece_variant(folder: Path, remove_extra_whitespaces: bool, legacy: bool | None) -> Path:
    """The fixtures' tokenizer files with the normalizer's `remove_extra_whitespaces` and the config's `legacy` set."""
    folder.mkdir(exist_ok=True)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((SOURCE / "tokenizer.model").read_bytes())
    proto.normalizer_spec.remove_extra_whitespaces = remove_extra_whitespaces
    (folder / "tokenizer.model").write_bytes(proto.SerializeToString())
    tokenizer_config = json.loads((SOURCE / "tokenizer_config.json").read_text())
    tokenizer_config.pop("legacy")
    if legacy is not None:
        tokenizer_config["legacy"] = legacy
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    shutil.copyfile(SOURCE / "special_tokens_map.json", folder / "special_tokens_map.json")
    return folder


def collapse(ids: list[int], placeholder_ids: set[int]) -> list[int]:
    """Whole-prompt ids with each placeholder id written as the original's -200 (one id per placeholder)."""
    return [ORIGINAL_IMAGE_TOKEN_INDEX if token in placeholder_ids else token for token in ids]


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer fidelity: ids of the original slow tokenizer (transformers 4.36.2, recorded)
# ----------------------------------------------------------------------------------------------------------------

TEXTS = ["A chat USER: ", "\nDescribe the picture.", " hello", "  hello  world  ", "\n\n a \n b \t c", "", " "]
# (remove_extra_whitespaces, legacy) -> ids of each text from the original `LlamaTokenizer` (use_fast=False)
SLOW_IDS = {
    (True, False): [
        [1, 472, 549, 274, 835, 889, 947, 928],
        [1, 902, 13, 394, 905, 914, 384, 929, 903, 291, 311, 908, 295, 739, 920],
        [1, 902, 655, 911, 352],
        [1, 902, 655, 911, 352, 308, 268, 464],
        [1, 902, 13, 13, 264, 902, 13, 293, 902, 12, 277],
        [1],
        [1],
    ],
    (True, None): [
        [1, 472, 549, 274, 835, 889, 947, 928],
        [1, 902, 13, 394, 905, 914, 384, 929, 903, 291, 311, 908, 295, 739, 920],
        [1, 655, 911, 352],
        [1, 655, 911, 352, 308, 268, 464],
        [1, 902, 13, 13, 264, 902, 13, 293, 902, 12, 277],
        [1],
        [1],
    ],
    (False, False): [
        [1, 472, 549, 274, 835, 889, 947, 928, 902],
        [1, 902, 13, 394, 905, 914, 384, 929, 903, 291, 311, 908, 295, 739, 920],
        [1, 902, 655, 911, 352],
        [1, 902, 902, 655, 911, 352, 902, 308, 268, 464, 902, 902],
        [1, 902, 13, 13, 264, 902, 13, 293, 902, 12, 277],
        [1],
        [1, 902, 902],
    ],
    (False, True): [
        [1, 472, 549, 274, 835, 889, 947, 928, 902],
        [1, 902, 13, 394, 905, 914, 384, 929, 903, 291, 311, 908, 295, 739, 920],
        [1, 902, 655, 911, 352],
        [1, 902, 902, 655, 911, 352, 902, 308, 268, 464, 902, 902],
        [1, 902, 13, 13, 264, 902, 13, 293, 902, 12, 277],
        [1],
        [1, 902, 902],
    ],
}


@pytest.mark.parametrize(("remove_extra_whitespaces", "legacy"), list(SLOW_IDS))
def test_converted_tokenizer_gives_the_original_slow_tokenizer_ids(remove_extra_whitespaces, legacy, tmp_path):
    tokenizer = sentencepiece_tokenizer(
        sentencepiece_variant(tmp_path / "tokenizer", remove_extra_whitespaces, legacy)
    )
    assert [tokenizer(text)["input_ids"] for text in TEXTS] == SLOW_IDS[(remove_extra_whitespaces, legacy)]


@pytest.mark.parametrize(("remove_extra_whitespaces", "legacy"), list(SLOW_IDS))
def test_reference_rebuild_gives_the_recorded_original_ids(remove_extra_whitespaces, legacy):
    """The SentencePiece rebuild of the original tokenizer, which the tests below compare with, is the original."""
    reference = SlowLlamaTokenizer(SOURCE / "tokenizer.model", legacy is not False, remove_extra_whitespaces)
    assert [reference(text) for text in TEXTS] == SLOW_IDS[(remove_extra_whitespaces, legacy)]


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_reference_rebuild_gives_the_fixtures_original_ids(name):
    meta = json.loads((FIXTURES / name / "meta.json").read_text())
    expected = load_file(FIXTURES / name / "golden.safetensors")["input_ids_original"][0].tolist()
    reference = SlowLlamaTokenizer(FIXTURES / name / "original" / "tokenizer.model", legacy=False)
    assert tokenizer_image_token(reference, meta["prompt"], reference.model.bos_id()) == expected


# ----------------------------------------------------------------------------------------------------------------
# Whole prompts: `tokenizer(prompt)` gives the ids of the original's chunk-by-chunk tokenisation
# ----------------------------------------------------------------------------------------------------------------


def converted(folder: Path):
    tokenizer = convert_tokenizer(folder, {})
    return tokenizer, {tokenizer.convert_tokens_to_ids(token) for token in PLACEHOLDERS}


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_whole_fixture_prompt_gives_the_original_ids(name, tmp_path):
    """Also once saved and loaded back, as consumers load a converted folder."""
    meta = json.loads((FIXTURES / name / "meta.json").read_text())
    expected = load_file(FIXTURES / name / "golden.safetensors")["input_ids_original"][0].tolist()
    tokenizer, placeholder_ids = converted(FIXTURES / name / "original")
    tokenizer.save_pretrained(tmp_path)
    for loaded in (tokenizer, AutoTokenizer.from_pretrained(tmp_path)):
        assert collapse(loaded(meta["prompt"])["input_ids"], placeholder_ids) == expected


SYSTEM = CHAT_CASES[0]["prompt"].split(" USER:")[0]
# What the vicuna_v1 template renders (one and two turns, text only, several images and a video in one message, an
# image in a later turn), and texts around placeholders that stress the original's per-chunk whitespace handling.
PROMPTS = [case["prompt"] for case in CHAT_CASES if case["conv_mode"] == "vicuna_v1"] + [
    f"{SYSTEM} USER: <image>\n<video>\n<image>\nCompare them. ASSISTANT:",
    f"{SYSTEM} USER: <image>\nWhat is it? ASSISTANT: A cat.</s>USER: <image>\nAnd this? ASSISTANT:",
    f"{SYSTEM} USER: Hi ASSISTANT: Hello.</s>USER: <image>\n</s> <s> ok ASSISTANT:",
    "<image>\nWhat is it?",
    "<image><image> a <image>  b  <image> \u2581c <image>",
    " x <image>\u2581 <image> \n<video>",
]


@pytest.mark.parametrize(("remove_extra_whitespaces", "legacy"), list(SLOW_IDS))
def test_whole_chat_prompts_give_the_original_ids(remove_extra_whitespaces, legacy, tmp_path):
    folder = sentencepiece_variant(tmp_path / "tokenizer", remove_extra_whitespaces, legacy)
    reference = SlowLlamaTokenizer(folder / "tokenizer.model", legacy is not False)
    tokenizer, placeholder_ids = converted(folder)
    for prompt in PROMPTS:
        expected = tokenizer_image_token(reference, prompt, reference.model.bos_id(), PLACEHOLDERS)
        assert collapse(tokenizer(prompt)["input_ids"], placeholder_ids) == expected, prompt


# Random prompts built from the pieces where the original's per-segment whitespace handling matters: runs of spaces,
# literal "▁", newlines, special tokens and placeholders next to each other and to text.
RANDOM_PIECES = [" ", "  ", "\n", "\t", "\u2581", "a", "hello", "x y", ".", "USER:", " ASSISTANT:"]
RANDOM_PIECES += ["<s>", "</s>", "<unk>", "<image>", "<video>"]


@pytest.mark.parametrize(("remove_extra_whitespaces", "legacy"), list(SLOW_IDS))
def test_whole_random_prompts_give_the_original_ids(remove_extra_whitespaces, legacy, tmp_path):
    rng = random.Random(0)
    texts = ["".join(rng.choices(RANDOM_PIECES, k=rng.randint(0, 12))) for _ in range(1000)]
    folder = sentencepiece_variant(tmp_path / "tokenizer", remove_extra_whitespaces, legacy)
    reference = SlowLlamaTokenizer(folder / "tokenizer.model", legacy is not False)
    tokenizer, placeholder_ids = converted(folder)
    bos = reference.model.bos_id()

    def original(text: str) -> list[int]:
        """The original's ids; a text that starts with a BOS string is a chat template's BOS + the original's prompt
        after it (which the original tokenises as the start of a text), so the tokenizer adds a second BOS."""
        if text.startswith("<s>"):
            return [bos] + tokenizer_image_token(reference, text[len("<s>") :], bos, PLACEHOLDERS)
        return tokenizer_image_token(reference, text, bos, PLACEHOLDERS)

    differ = [text for text in texts if collapse(tokenizer(text)["input_ids"], placeholder_ids) != original(text)]
    assert differ == []
    assert sum(text.startswith("<s>") for text in texts) > 50


def converted_processor() -> DenseConnectorProcessor:
    tokenizer, _ = converted(SOURCE)
    return DenseConnectorProcessor(image_processor=tiny_processor(tiny_config()).image_processor, tokenizer=tokenizer)


@pytest.mark.parametrize("source", ["converted", "demo"])
def test_processor_ids_equal_whole_prompt_ids(source):
    """The processor tokenises chunk by chunk between placeholders; a converted checkpoint's tokenizer, and the
    bundled demo's, give the same ids for the whole prompt."""
    processor = converted_processor() if source == "converted" else AutoProcessor.from_pretrained(DEMO_CHECKPOINT)
    tokenizer = processor.tokenizer
    for prompt in PROMPTS:
        images = [Image.new("RGB", (20, 30))] * prompt.count("<image>")
        videos = [[Image.new("RGB", (20, 30))] * 2] * prompt.count("<video>")
        ids = processor(text=prompt, images=images or None, videos=videos or None)["input_ids"][0]
        expanded = []
        for token in tokenizer(prompt)["input_ids"]:
            placeholder = {processor.image_token_id: images, processor.video_token_id: videos}.get(token)
            expanded += [token] * (ids.count(token) // len(placeholder) if placeholder else 1)
        assert ids == expanded, prompt
