"""The chat templates render exactly the original conversation prompts, and the processor turns them into the
original input ids."""

import json
import re
from pathlib import Path

import pytest
from original_tokenization import tokenizer_image_token
from PIL import Image
from safetensors.torch import load_file
from tiny import FIXTURES, llama_3_tokenizer_folder, tiny_config, tiny_processor, tiny_tokenizer
from tokenizers import Tokenizer
from transformers import AutoProcessor
from transformers.utils.chat_template_utils import render_jinja_template

from dense_connector import DenseConnectorProcessor
from dense_connector.chat_templates import CHAT_TEMPLATES, LLAMA_3_SYSTEM, STOP_TOKENS, stop_token_ids
from dense_connector.conversion import convert_tokenizer
from dense_connector.writing.tokenizer import default_conv_mode
from dense_connector.writing.verify import collapse_placeholders


CASES = json.loads((FIXTURES / "chat_prompts.json").read_text())


def render(conv_mode: str, messages: list[dict], add_generation_prompt: bool = True) -> str:
    prompts, _ = render_jinja_template(
        conversations=[messages], chat_template=CHAT_TEMPLATES[conv_mode], add_generation_prompt=add_generation_prompt
    )
    return prompts[0]


def as_messages(turns: list[dict], structured: bool) -> list[dict]:
    """The fixture's turns as chat messages; `structured` moves a leading `<image>\\n` into an image item."""
    messages = []
    for turn in turns:
        text = turn["user"]
        if structured:
            items = [{"type": "text", "text": text.removeprefix("<image>\n")}]
            if text.startswith("<image>\n"):
                items.insert(0, {"type": "image"})
            messages.append({"role": "user", "content": items})
        else:
            messages.append({"role": "user", "content": text})
        if turn["assistant"] is not None:
            messages.append({"role": "assistant", "content": turn["assistant"]})
    return messages


@pytest.mark.parametrize("structured", [False, True], ids=["string_content", "typed_items"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c['conv_mode']}-{len(c['turns'])}turns" for c in CASES])
def test_templates_reproduce_original_prompts(case, structured):
    assert render(case["conv_mode"], as_messages(case["turns"], structured)) == case["prompt"]


def test_generation_prompt_ends_where_the_original_generates():
    messages = [{"role": "user", "content": "Hi"}]
    assert render("vicuna_v1", messages).endswith(" USER: Hi ASSISTANT:")
    assert render("vicuna_v1", messages, add_generation_prompt=False).endswith(" USER: Hi ")
    llama = render("llama_3", messages)
    assert llama.endswith("Hi<|eot_id|><|start_header_id|>system<|end_header_id|>\n\n")
    assert render("llama_3", messages, add_generation_prompt=False).endswith("Hi<|eot_id|>")


def test_system_message_replaces_default_and_media_lead_the_message():
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Compare."}, {"type": "image"}, {"type": "video"}, {"type": "image"}],
        },
    ]
    assert render("vicuna_v1", messages) == "Answer briefly. USER: <image>\n<video>\n<image>\nCompare. ASSISTANT:"
    llama = render("llama_3", messages)
    assert LLAMA_3_SYSTEM not in llama
    assert llama.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nAnswer briefly.<|eot_id|>")


@pytest.mark.parametrize("conv_mode", sorted(CHAT_TEMPLATES))
def test_unsupported_roles_and_items_are_refused(conv_mode):
    with pytest.raises(Exception, match="Unsupported role tool"):
        render(conv_mode, [{"role": "tool", "content": "x"}])
    with pytest.raises(Exception, match="Unsupported content type audio"):
        render(conv_mode, [{"role": "user", "content": [{"type": "audio"}]}])


def test_stop_tokens():
    tokenizer = tiny_tokenizer()
    assert STOP_TOKENS["vicuna_v1"] == [tokenizer.eos_token]
    assert stop_token_ids(tokenizer, "vicuna_v1") == [tokenizer.eos_token_id]
    with pytest.raises(ValueError, match="no \\['<\\|eot_id\\|>', '<\\|end_of_text\\|>'\\] token"):
        stop_token_ids(tokenizer, "llama_3")
    with pytest.raises(ValueError, match="Unknown conversation format"):
        stop_token_ids(tokenizer, "chatml")


def fixture_chat(name: str = "clip_dci") -> tuple[dict, list[dict]]:
    """A fixture's metadata and its conversation as chat messages."""
    meta = json.loads((FIXTURES / name / "meta.json").read_text())
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": Image.open(FIXTURES / name / "image0.png")},
                {"type": "text", "text": "Describe the picture in detail."},
            ],
        }
    ]
    return meta, messages


def test_processor_chat_template_tokenizes_like_the_plain_prompt():
    """`apply_chat_template(tokenize=True)` gives the ids of the processor on the original prompt (one BOS), and so
    does the processor on the rendered text (which starts with the template's BOS) with or without special tokens."""
    meta, messages = fixture_chat()
    processor = tiny_processor(tiny_config(), chat_template=CHAT_TEMPLATES[meta["conv_mode"]])
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert rendered == processor.tokenizer.bos_token + meta["prompt"]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    image = messages[0]["content"][0]["image"]
    direct = processor(text=meta["prompt"], images=image)
    assert inputs["input_ids"] == direct["input_ids"]
    assert processor(text=rendered, images=image)["input_ids"] == direct["input_ids"]
    assert processor(text=rendered, images=image, add_special_tokens=False)["input_ids"] == direct["input_ids"]
    assert inputs["input_ids"][0].count(processor.tokenizer.bos_token_id) == 1
    assert inputs["input_ids"][0].count(processor.image_token_id) == 64


@pytest.mark.parametrize("name", ["clip_dci", "siglip_dci"])
def test_template_with_converted_tokenizer_gives_original_input_ids(name):
    """Template + the converter's tokenizer reproduce the original `tokenizer_image_token` ids exactly.

    (The tests' `tiny_tokenizer` would not: the fixtures' SentencePiece model strips trailing spaces, which only the
    converted tokenizer reproduces, so the original has no "▁" between "USER:" and the image.)
    """
    meta, messages = fixture_chat(name)
    expected = load_file(FIXTURES / name / "golden.safetensors")["input_ids_original"][0].tolist()
    original = FIXTURES / name / "original"
    tokenizer = convert_tokenizer(original, json.loads((original / "config.json").read_text()))
    processor = DenseConnectorProcessor(
        image_processor=tiny_processor(tiny_config()).image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATES[meta["conv_mode"]],
    )
    ids = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)[0]
    first, count = ids.index(processor.image_token_id), ids.count(processor.image_token_id)
    assert ids[:first] + [-200] + ids[first + count :] == expected


LLAMA_3_CASES = [case for case in CASES if case["conv_mode"] == "llama_3"]


@pytest.mark.parametrize("case", LLAMA_3_CASES, ids=[f"{len(c['turns'])}turns" for c in LLAMA_3_CASES])
def test_llama_3_ids_start_with_two_begin_of_text_as_the_original(case, tmp_path):
    """The original's formula on the llama_3 prompt (chunks tokenised with the tokenizer's BOS, the prompt's own
    literal `<|begin_of_text|>` kept) gives two BOS; a converted Llama-3 checkpoint gives the same ids whichever way
    a prompt or chat reaches it: the prompt tokenised whole, the processor on the prompt, the chat template through
    the tokenizer or the processor, and the processor on its own rendered text."""
    folder = llama_3_tokenizer_folder(tmp_path / "original")
    original = Tokenizer.from_file(str(folder / "tokenizer.json"))
    bos = original.token_to_id("<|begin_of_text|>")
    expected = tokenizer_image_token(lambda chunk: original.encode(chunk).ids, case["prompt"], bos)
    assert expected[:2] == [bos, bos] and expected[2] != bos

    tokenizer = convert_tokenizer(folder, {})
    processor = DenseConnectorProcessor(
        image_processor=tiny_processor(tiny_config()).image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATES[default_conv_mode(tokenizer)],
    )
    processor.save_pretrained(tmp_path / "converted")
    processor = AutoProcessor.from_pretrained(tmp_path / "converted")
    tokenizer = processor.tokenizer

    def original_form(ids) -> list[int]:
        return collapse_placeholders(list(ids), processor.image_token_id)

    images = [Image.new("RGB", (20, 30))] * case["prompt"].count("<image>")
    messages = as_messages(case["turns"], structured=True)
    for item in (item for message in messages if message["role"] == "user" for item in message["content"]):
        if item["type"] == "image":
            item["image"] = images[0]
    assert original_form(tokenizer(case["prompt"])["input_ids"]) == expected
    assert original_form(processor(text=case["prompt"], images=images or None)["input_ids"][0]) == expected
    chat = as_messages(case["turns"], structured=False)
    assert (
        original_form(tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)["input_ids"])
        == expected
    )
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert original_form(inputs["input_ids"][0]) == expected
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == tokenizer.bos_token + case["prompt"]
    for add_special_tokens in (True, False):  # TRL's collators and vLLM's chat endpoint add none
        ids = processor(text=text, images=images or None, add_special_tokens=add_special_tokens)["input_ids"][0]
        assert original_form(ids) == expected
        assert original_form(tokenizer(text, add_special_tokens=False)["input_ids"]) == expected


DEMO = Path(__file__).resolve().parents[1] / "dense_connector" / "demo" / "checkpoint"


@pytest.mark.parametrize("conv_mode", sorted(CHAT_TEMPLATES))
def test_templates_mark_the_assistant_replies_for_assistant_masks(conv_mode):
    """Every template the package writes has `{% generation %}` markers (TRL's `assistant_only_loss=True` refuses a
    template without them); the demo checkpoint ships the package's template."""
    assert "generation -%}" in CHAT_TEMPLATES[conv_mode] and "endgeneration" in CHAT_TEMPLATES[conv_mode]
    assert (DEMO / "chat_template.jinja").read_text() == CHAT_TEMPLATES["vicuna_v1"]


def test_offsets_are_in_the_expanded_text_and_the_assistant_mask_covers_the_replies():
    processor = AutoProcessor.from_pretrained(DEMO)
    image = Image.open(DEMO.parent / "sample.png")
    text = "<s>USER: <image>\nHow many? ASSISTANT: 2</s>"
    inputs = processor(text=[text, "USER: Hi"], images=[image], padding=True, return_offsets_mapping=True)
    ids, offsets = inputs["input_ids"], inputs["offset_mapping"]
    count = ids[0].count(processor.image_token_id)
    expanded = text.replace("<image>", "<image>" * count)
    assert len(offsets[0]) == len(ids[0]) and len(offsets[1]) == len(ids[1])
    assert offsets[1][: ids[1].count(processor.tokenizer.pad_token_id)] == [(0, 0)] * ids[1].count(
        processor.tokenizer.pad_token_id
    )  # padded on the tokenizer's side (left), with empty spans
    for token, (start, end) in zip(ids[0], offsets[0]):
        piece = processor.tokenizer.convert_ids_to_tokens(token).replace("▁", " ")
        if re.fullmatch(r"<0x[0-9A-F]{2}>", piece):  # a byte-fallback piece (the newline) stands for its byte
            piece = chr(int(piece[3:5], 16))
        assert expanded[start:end].strip() == piece.strip(), (piece, expanded[start:end])

    messages = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "How many?"}]},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "Sure?"},
        {"role": "assistant", "content": "yes"},
    ]
    out = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    marked = [token for token, mask in zip(out["input_ids"][0], out["assistant_masks"][0]) if mask]
    assert processor.decode(marked) == "2</s> yes</s>"  # the replies and their end of turn, nothing else
    assert out["input_ids"][0].count(processor.tokenizer.bos_token_id) == 1
