"""Training labels, id for id, against the original's `preprocess_plain` / `preprocess_v1` / `preprocess_llama_3`.

The original (`dc/train/train.py`) renders a record with its conversation template, tokenises it with
`tokenizer_image_token`, and finds the replies by arithmetic on the lengths of separately tokenised pieces; when the
lengths do not add up ("tokenization mismatch") it masks the whole record. That arithmetic is re-implemented below
from its description (`../shared/SPEC.md`, "Training the original way"), on the rebuilt slow tokenizer of
`tests/original_tokenization.py`, and compared with `DenseConnectorDataCollator`, which finds the replies from the
chat template's text instead: equal wherever the original's arithmetic is self-consistent, and where it is not, ours
trains exactly the replies and their end-of-turn token.
"""

import json

import pytest
from original_tokenization import ORIGINAL_IMAGE_TOKEN_INDEX, SlowLlamaTokenizer, tokenizer_image_token
from PIL import Image
from test_tokenization import sentencepiece_variant
from tiny import REPO, llama_3_tokenizer_folder, tiny_config, tiny_processor
from transformers import AutoTokenizer

from dense_connector import DenseConnectorProcessor
from dense_connector.chat_templates import CHAT_TEMPLATES, LLAMA_3_SYSTEM, VICUNA_V1_SYSTEM
from dense_connector.conversion import convert_tokenizer
from dense_connector.training import IGNORE_INDEX, DenseConnectorDataCollator


PICTURE = Image.new("RGB", (40, 32), (200, 30, 30))
LLAMA_3_HEADER = "<|start_header_id|>{}<|end_header_id|>\n\n"


# ----------------------------------------------------------------------------------------------------------------
# The original's preprocessing, re-implemented as a reference
# ----------------------------------------------------------------------------------------------------------------


def original_turns(conversations: list[dict], has_image: bool) -> list[str]:
    """`preprocess_multimodal`: the image placeholder moved to the start of its turn, followed by a newline."""
    values = []
    for turn in conversations:
        value = turn["value"]
        if has_image and "<image>" in value:
            value = ("<image>\n" + value.replace("<image>", "").strip()).strip()
        values.append(value)
    return values


def masked(target: list[int], start: int, end: int | None = None) -> None:
    end = len(target) if end is None else end
    target[start:end] = [IGNORE_INDEX] * len(target[start:end])


class Original:
    """The original's tokenisation of one prompt (`tokenizer_image_token`, or the tokenizer itself without an image)
    and its three label functions."""

    def __init__(self, tokenize, bos_id: int, pad_id: int | None, legacy: bool = False):
        self.tokenize, self.bos_id, self.pad_id, self.legacy = tokenize, bos_id, pad_id, legacy

    def ids(self, text: str, has_image: bool) -> list[int]:
        return tokenizer_image_token(self.tokenize, text, self.bos_id) if has_image else self.tokenize(text)

    def finish(self, ids: list[int], target: list[int], cur_len: int) -> tuple[list[int], list[int], bool]:
        """The mismatch check: lengths that do not add up to the sequence mask the whole record."""
        masked(target, cur_len)
        total_len = sum(token != self.pad_id for token in ids)
        mismatch = cur_len != total_len
        if mismatch:
            masked(target, 0)
        return ids, target, mismatch

    def plain(self, conversations: list[dict]) -> tuple[list[int], list[int], bool]:
        text = "<image>" + conversations[1]["value"] + "\n"
        ids = self.ids(text, True)
        target = list(ids)
        masked(target, 0, len(self.ids("<image>", True)))
        return ids, target, False

    def v1(self, conversations: list[dict], has_image: bool) -> tuple[list[int], list[int], bool]:
        prompt = VICUNA_V1_SYSTEM + " "
        for index, value in enumerate(original_turns(conversations, has_image)):
            prompt += ("USER", "ASSISTANT")[index % 2] + ": " + value + (" ", "</s>")[index % 2]
        ids = self.ids(prompt, has_image)
        target, cur_len, sep = list(ids), 1, " ASSISTANT: "
        masked(target, 0, cur_len)
        for index, round_text in enumerate(prompt.split("</s>")):
            if round_text == "":
                break
            parts = round_text.split(sep)
            if len(parts) != 2:
                break
            round_len = len(self.ids(round_text, has_image))
            instruction_len = len(self.ids(parts[0] + sep, has_image)) - 2
            if index != 0 and not self.legacy:
                round_len -= 1
                instruction_len -= 1
            masked(target, cur_len, cur_len + instruction_len)
            cur_len += round_len
        return self.finish(ids, target, cur_len)

    def llama_3(self, conversations: list[dict], has_image: bool) -> tuple[list[int], list[int], bool]:
        eot, roles = "<|eot_id|>", (LLAMA_3_HEADER.format("user"), LLAMA_3_HEADER.format("system"))
        prompt = "<|begin_of_text|>" + LLAMA_3_HEADER.format("system") + LLAMA_3_SYSTEM + eot
        for index, value in enumerate(original_turns(conversations, has_image)):
            prompt += roles[index % 2] + value + eot
        ids = self.ids(prompt, has_image)
        rounds = prompt.split(eot)
        rounds = [eot.join(rounds[:3])] + [eot.join(rounds[i : i + 2]) for i in range(3, len(rounds), 2)]
        target, cur_len, sep = list(ids), 0, eot + roles[1]
        for round_text in rounds:
            if round_text == "":
                break
            parts = round_text.split(sep)
            if len(parts) != 2:
                break
            round_len = len(self.ids(round_text, has_image)) + 1
            instruction_len = len(self.ids(parts[0] + sep, has_image)) - 1 + 1
            masked(target, cur_len, cur_len + instruction_len)
            cur_len += round_len
        return self.finish(ids, target, cur_len)


def collapsed(processor, batch) -> tuple[list[int], list[int]]:
    """The collator's ids and labels with each image's run of placeholders written as the original's one -200."""
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    out_ids, out_labels = [], []
    for index, (token, label) in enumerate(zip(ids, labels)):
        if token == processor.image_token_id:
            assert label == IGNORE_INDEX
            if index and ids[index - 1] == processor.image_token_id:
                continue
            token = ORIGINAL_IMAGE_TOKEN_INDEX
        out_ids.append(token)
        out_labels.append(label)
    return out_ids, out_labels


# ----------------------------------------------------------------------------------------------------------------
# Records and tokenizers
# ----------------------------------------------------------------------------------------------------------------


def turns(*values: str) -> list[dict]:
    return [{"from": ("human", "gpt")[index % 2], "value": value} for index, value in enumerate(values)]


EXAMPLE_RECORDS = json.loads((REPO / "examples" / "data" / "shapes_llava.json").read_text())
IMAGE_RECORDS = [record["conversations"] for record in EXAMPLE_RECORDS] + [
    turns("<image>\nWhat is it?", "A red box."),
    turns("What is shown here?\n<image>", "A box, red and small.\nNothing else."),
    turns("<image>\nDescribe it.", "A box.", "Where?", "On a table, near the wall.", "Color?", "Red"),
]
TEXT_RECORDS = [
    turns("Hi", "Hello! How can I help?"),
    turns("Name a color.", "Red.", "Another one?", "Blue, or green."),
]
CAPTIONS = [turns("<image>\nRender a clear and concise summary of the photo.", "a red box on a white table")] + [
    turns(record[0]["value"], record[1]["value"]) for record in IMAGE_RECORDS
]


def sentencepiece_setup(tmp_path, remove_extra_whitespaces: bool):
    """A converted processor and the original's slow tokenizer on the same SentencePiece model."""
    folder = sentencepiece_variant(tmp_path, remove_extra_whitespaces, legacy=False)
    slow = SlowLlamaTokenizer(folder / "tokenizer.model", legacy=False)
    image_processor = tiny_processor(tiny_config()).image_processor
    processor = DenseConnectorProcessor(image_processor, convert_tokenizer(folder, {}), patch_size=4)
    unk = slow.model.unk_id()  # the original pads `v1` with unk
    return processor, Original(slow, slow.model.bos_id(), unk)


def llama_3_setup(tmp_path):
    folder = llama_3_tokenizer_folder(tmp_path / "llama_3")
    fast = AutoTokenizer.from_pretrained(folder)  # Llama-3 has no slow tokenizer: the original gets this one
    image_processor = tiny_processor(tiny_config()).image_processor
    processor = DenseConnectorProcessor(image_processor, convert_tokenizer(folder, {}), patch_size=4)
    return processor, Original(lambda text: fast(text)["input_ids"], fast.bos_token_id, None)


def ours(processor, template: str, conversations: list[dict], has_image: bool) -> tuple[list[int], list[int]]:
    processor.chat_template = CHAT_TEMPLATES[template]
    record = {"conversations": conversations, **({"image": PICTURE} if has_image else {})}
    return collapsed(processor, DenseConnectorDataCollator(processor)([record]))


def labelled_runs(labels: list[int]) -> list[list[int]]:
    """The runs of consecutive trained labels."""
    runs, current = [], []
    for label in labels + [IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs, current = [*runs, current], []
    return runs


def assert_trains_the_replies(processor, labels: list[int], conversations: list[dict], end_of_turn: str) -> None:
    replies = [turn["value"] for turn in conversations[1::2]]
    decoded = [processor.tokenizer.decode(run).strip() for run in labelled_runs(labels)]
    assert decoded == [(reply + end_of_turn).strip() for reply in replies]


# ----------------------------------------------------------------------------------------------------------------
# The comparisons
# ----------------------------------------------------------------------------------------------------------------


def assert_single_round_labels_are_the_originals(
    processor, preprocess, template, end_of_turn, conversations, has_image
):
    """Our ids are always the original's; our labels are its labels on single-round records, while it masks every
    multi-round record whole (its "tokenization mismatch") and ours trains each reply and its end of turn there."""
    ids, labels, mismatch = preprocess(conversations, has_image)
    our_ids, our_labels = ours(processor, template, conversations, has_image)
    assert our_ids == ids
    assert mismatch == (len(conversations) > 2)
    if mismatch:
        assert set(labels) == {IGNORE_INDEX}
    else:
        assert our_labels == labels
    assert_trains_the_replies(processor, our_labels, conversations, end_of_turn)


@pytest.mark.parametrize("tokenizer", ["llama_like", "fixtures", "llama_3"])
def test_plain_ids_and_labels_are_the_originals(tokenizer, tmp_path):
    """Stage 1: `<image>` + caption + "\\n", labels on the caption and the newline only, as `preprocess_plain`."""
    if tokenizer == "llama_3":
        processor, original = llama_3_setup(tmp_path)
    else:
        processor, original = sentencepiece_setup(tmp_path, remove_extra_whitespaces=tokenizer == "fixtures")
    for conversations in CAPTIONS:
        ids, labels, _ = original.plain(conversations)
        assert ours(processor, "plain", conversations, has_image=True) == (ids, labels)
        assert_trains_the_replies(processor, labels, conversations, "\n")


RECORDS = [(record, True) for record in IMAGE_RECORDS] + [(record, False) for record in TEXT_RECORDS]
RECORD_IDS = [f"{'image' if image else 'text'}-{len(record) // 2}turns" for record, image in RECORDS]


@pytest.mark.parametrize(("conversations", "has_image"), RECORDS, ids=RECORD_IDS)
def test_v1_labels_are_the_originals_on_a_llama_like_tokenizer(conversations, has_image, tmp_path):
    """With Llama's SentencePiece settings (`remove_extra_whitespaces` false), the ids are always the original's and
    so are the labels of every record whose lengths the original's arithmetic adds up: here the single-round ones.
    For later rounds it takes one token off each round for non-legacy tokenizers, which this vocabulary does not
    match ("USER" after "</s>" is as many tokens as at a text's start), so it masks those records whole; ours trains
    their replies."""
    processor, original = sentencepiece_setup(tmp_path, remove_extra_whitespaces=False)
    assert_single_round_labels_are_the_originals(processor, original.v1, "vicuna_v1", "</s>", conversations, has_image)


@pytest.mark.parametrize(("conversations", "has_image"), RECORDS, ids=RECORD_IDS)
def test_v1_labels_on_a_tokenizer_that_strips_trailing_spaces(conversations, has_image, tmp_path):
    """The fixtures' tokenizer drops the trailing space of `"... ASSISTANT: "`, so the original's `- 2` masks one token
    too few: it also trains the ":" before each reply. Ours trains the replies only."""
    processor, original = sentencepiece_setup(tmp_path, remove_extra_whitespaces=True)
    ids, labels, mismatch = original.v1(conversations, has_image)
    our_ids, our_labels = ours(processor, "vicuna_v1", conversations, has_image)
    assert our_ids == ids
    assert_trains_the_replies(processor, our_labels, conversations, "</s>")
    if mismatch:
        assert set(labels) == {IGNORE_INDEX} and len(conversations) > 2
        return
    extra = [index for index, (a, b) in enumerate(zip(our_labels, labels)) if a != b]
    assert [labels[index] for index in extra] == processor.tokenizer.convert_tokens_to_ids([":"])
    assert our_labels[extra[0] + 1] != IGNORE_INDEX and our_labels[extra[0]] == IGNORE_INDEX


@pytest.mark.parametrize(("conversations", "has_image"), RECORDS, ids=RECORD_IDS)
def test_llama_3_labels_are_the_originals_where_its_arithmetic_adds_up(conversations, has_image, tmp_path):
    """`preprocess_llama_3` counts the tokenizer's BOS again in every round after the first, so a multi-round
    record never adds up and is masked whole (a Llama-3 model trained so learns nothing from multi-turn data); the
    first round's arithmetic is exact. Ours equals it on single-round records and trains every reply otherwise."""
    processor, original = llama_3_setup(tmp_path)
    end_of_turn = "<|eot_id|>"
    assert_single_round_labels_are_the_originals(
        processor, original.llama_3, "llama_3", end_of_turn, conversations, has_image
    )
