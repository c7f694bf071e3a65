"""Fine-tuning: the collator's labels and truncation, the training regimes, the Trainer path, LoRA save/load/merge."""

import json
import logging

import pytest
import torch
from PIL import Image
from tiny import llama_3_tokenizer_folder, tiny_config, tiny_model, tiny_processor, tiny_tokenizer

from dense_connector import DenseConnectorProcessor
from dense_connector.chat_templates import CHAT_TEMPLATES
from dense_connector.checkpoints import UsageError
from dense_connector.conversion import convert_tokenizer
from dense_connector.training import (
    IGNORE_INDEX,
    DenseConnectorDataCollator,
    command,
    llava_to_messages,
    load_instruction_data,
    prepare_for_training,
)


CONFIG = tiny_config()  # CLIP, DCI, 64 placeholders per 32x32 image


@pytest.fixture(scope="module")
def processor():
    return tiny_processor(CONFIG, chat_template=CHAT_TEMPLATES["vicuna_v1"])


def image(color=(200, 30, 30), size=(40, 32)):
    return Image.new("RGB", size, color)


def llava_record(picture, turns):
    conversations = []
    for question, answer in turns:
        conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return {"image": picture, "conversations": conversations}


def records(count=4):
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    names = ["red", "green", "blue", "yellow"]
    return [llava_record(image(colors[i % 4]), [("<image>\nWhat color is it?", names[i % 4])]) for i in range(count)]


def test_labels_are_exactly_the_assistant_replies(processor):
    picture = image()
    messages = [
        {"role": "user", "content": "<image>\nWhat is it?"},
        {"role": "assistant", "content": "A red box."},
        {"role": "user", "content": "Where?"},
        {"role": "assistant", "content": "Home"},
    ]

    # Hand-built reference, as the original computes it: the ids of each prompt prefix (through "ASSISTANT:") are
    # masked, the reply and its "</s>" that follow are trained.
    def ids(text):
        return processor(images=[picture], text=text)["input_ids"][0]

    prompt1 = ids(processor.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True))
    through1 = ids(processor.apply_chat_template(messages[:2], tokenize=False))
    prompt2 = ids(processor.apply_chat_template(messages[:3], tokenize=False, add_generation_prompt=True))
    full = ids(processor.apply_chat_template(messages, tokenize=False))
    reply1, reply2 = through1[len(prompt1) :], full[len(prompt2) :]
    tokens = processor.tokenizer.convert_ids_to_tokens
    assert tokens(reply1) == ["▁A", "▁re", "d", "▁b", "o", "x", ".", "</s>"]
    assert tokens(reply2) == ["▁", "H", "o", "me", "</s>"]
    assert full[: len(through1)] == through1 and full[: len(prompt2)] == prompt2
    expected = [IGNORE_INDEX] * len(prompt1) + reply1 + [IGNORE_INDEX] * (len(prompt2) - len(through1)) + reply2

    collator = DenseConnectorDataCollator(processor)
    llava = llava_record(picture, [("<image>\nWhat is it?", "A red box."), ("Where?", "Home")])
    chat = {"messages": messages, "images": [picture]}
    for record in (llava, chat):
        batch = collator([record])
        assert batch["input_ids"][0].tolist() == full
        assert batch["labels"][0].tolist() == expected
        assert batch["pixel_values"].shape == (1, 3, 32, 32)


@pytest.mark.parametrize("template", ["vicuna_v1", "llama_3"])
def test_training_ids_are_the_inference_ids(template, tmp_path):
    """The prompt part of a training sequence is what `apply_chat_template(tokenize=True)` gives at inference, also
    for llama_3, whose ids start with two BOS as the original's do, and the reply is trained with its end-of-turn
    token."""
    processor = tiny_processor(CONFIG, chat_template=CHAT_TEMPLATES[template])
    if template == "llama_3":
        tokenizer = convert_tokenizer(llama_3_tokenizer_folder(tmp_path / "llama_3"), {})
        processor = DenseConnectorProcessor(
            processor.image_processor, tokenizer, chat_template=CHAT_TEMPLATES[template]
        )
    end_of_turn = {"vicuna_v1": "</s>", "llama_3": "<|eot_id|>"}[template]
    picture = image()
    question = {"role": "user", "content": [{"type": "image", "image": picture}, {"type": "text", "text": "What?"}]}
    inference = processor.apply_chat_template([question], add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"
    ][0]
    record = {"messages": [question, {"role": "assistant", "content": "A box."}]}  # the image is in the content
    batch = DenseConnectorDataCollator(processor)([record])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    assert ids[: len(inference)] == list(inference)
    assert ids.count(processor.tokenizer.bos_token_id) == {"vicuna_v1": 1, "llama_3": 2}[template]  # as the original
    assert labels[: len(inference)] == [IGNORE_INDEX] * len(inference)
    assert processor.tokenizer.decode(labels[len(inference) :]) == "A box." + end_of_turn


def test_chat_content_items_and_image_at_the_end(processor):
    collator = DenseConnectorDataCollator(processor)
    picture = image()
    items = {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A box."}]},
        ],
        "images": [picture],
    }
    # LLaVA data sometimes puts the placeholder last; the original moves it to the front.
    trailing = llava_record(picture, [("What is it?\n<image>", "A box.")])
    assert llava_to_messages(trailing["conversations"])[0]["content"] == "<image>\nWhat is it?"
    first, second = collator([items]), collator([trailing])
    assert torch.equal(first["input_ids"], second["input_ids"]) and torch.equal(first["labels"], second["labels"])


def test_padding_is_on_the_right_and_masked(processor):
    collator = DenseConnectorDataCollator(processor, pad_to_multiple_of=8)
    short = llava_record(image(), [("<image>\nColor?", "red")])
    long = llava_record(image(), [("<image>\nWhat color is the box in this picture?", "red, mostly")])
    batch = collator([short, long])
    lengths = batch["attention_mask"].sum(1).tolist()
    assert lengths[0] < lengths[1] and batch["input_ids"].shape[1] % 8 == 0
    pad = processor.tokenizer.pad_token_id
    for row, length in enumerate(lengths):
        assert batch["attention_mask"][row, :length].all() and not batch["attention_mask"][row, length:].any()
        assert (batch["input_ids"][row, length:] == pad).all()
        assert (batch["labels"][row, length:] == IGNORE_INDEX).all()
    # text-only records mix with image records
    text_only = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    mixed = collator([short, text_only])
    assert mixed["pixel_values"].shape[0] == 1 and mixed["input_ids"].shape[0] == 2


def test_anyres_batches_pad_tiles_without_changing_outputs():
    from transformers import LlavaNextImageProcessorPil

    config = tiny_config(image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64]])
    image_processor = LlavaNextImageProcessorPil(
        image_grid_pinpoints=config.image_grid_pinpoints,
        do_pad=True,
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
    )
    processor = DenseConnectorProcessor(
        image_processor=image_processor,
        tokenizer=tiny_tokenizer(),
        chat_template=CHAT_TEMPLATES["vicuna_v1"],
        patch_size=config.vision_config.patch_size,
    )
    collator = DenseConnectorDataCollator(processor)
    batch_records = [llava_record(image(size=size), [("<image>\nColor?", "red")]) for size in [(32, 32), (70, 30)]]
    assert [collator([record])["pixel_values"].shape[1] for record in batch_records] == [2, 3]  # base + tiles
    batch = collator(batch_records)
    assert batch["pixel_values"].shape == (2, 3, 3, 32, 32)
    model = tiny_model(config)
    with torch.no_grad():
        logits = model(**batch).logits
        for row, record in enumerate(batch_records):
            alone = collator([record])
            length = alone["input_ids"].shape[1]
            torch.testing.assert_close(logits[row, :length], model(**alone).logits[0], atol=1e-5, rtol=1e-5)


def test_truncation_never_cuts_image_placeholders(processor, caplog):
    record = llava_record(image(), [("<image>\nWhat color is it?", "red")])
    full = DenseConnectorDataCollator(processor)([record])
    image_start = full["input_ids"][0].tolist().index(CONFIG.image_token_id)
    image_end = image_start + 64
    reply_start = (full["labels"][0] != IGNORE_INDEX).nonzero()[0].item()

    # Cutting after the image and inside the reply keeps the record, ids and labels cut alike.
    cut = DenseConnectorDataCollator(processor, max_length=reply_start + 1)([record])
    assert torch.equal(cut["input_ids"][0], full["input_ids"][0, : reply_start + 1])
    assert torch.equal(cut["labels"][0], full["labels"][0, : reply_start + 1])

    # Cutting through the placeholders drops the record with a warning; a batch of only such records raises.
    collator = DenseConnectorDataCollator(processor, max_length=image_end - 10)
    with caplog.at_level(logging.WARNING, logger="dense_connector.training"):
        kept = collator(
            [record, {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}]
        )
    assert kept["input_ids"].shape[0] == 1 and "pixel_values" not in kept
    assert "image placeholders do not fit" in caplog.text
    with pytest.raises(ValueError, match="were dropped"):
        collator([record])
    # A record left without any assistant token (cut right before the reply) is dropped too.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dense_connector.training"), pytest.raises(ValueError):
        DenseConnectorDataCollator(processor, max_length=reply_start)([record])
    assert "no assistant reply left" in caplog.text


def test_bad_records_get_clear_errors(processor, tmp_path):
    collator = DenseConnectorDataCollator(processor, image_folder=tmp_path)
    with pytest.raises(ValueError, match="needs `conversations`"):
        collator([{"text": "hello"}])
    with pytest.raises(FileNotFoundError, match="image_folder"):
        collator([llava_record("missing.png", [("<image>\nHi", "Hello")])])
    with pytest.raises(ValueError, match="Unknown speaker"):
        collator([{"conversations": [{"from": "bot", "value": "x"}]}])
    lines = tmp_path / "data.jsonl"
    lines.write_text('{"messages": []}\n\n{"messages": []}\n')
    assert len(load_instruction_data(lines)) == 2


def test_instruction_data_reads_back_every_record(tmp_path):
    records = [llava_record("a.png", [("<image>\nWhat is ] [ here?", 'Ünïcode, "quotes"')]), {"messages": []}]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records, indent=2, ensure_ascii=False), encoding="utf-8")
    loaded = load_instruction_data(path)
    assert len(loaded) == 2 and list(loaded) == records and loaded[-1] == records[-1]
    with pytest.raises(IndexError, match="has 2 records"):
        loaded[2]


@pytest.mark.parametrize(
    "text, error",
    [
        ('{"messages": []}', "must hold a JSON list"),
        ('[{"a": 1} {"b": 2}]', "expected `,` or `]` after record 0"),
        ('[{"a": 1},', "not valid JSON in record 1"),
        ('[{"a": 1},]', "a `,` after its last record"),
        ("[1]", "Record 0 .* is not a JSON object"),
        ('[{"a": 1}] []', "text after the end"),
    ],
)
def test_bad_instruction_files_get_clear_errors(tmp_path, text, error):
    path = tmp_path / "data.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=error):
        load_instruction_data(path)


def trained_names(model):
    return {name for name, param in model.named_parameters() if param.requires_grad}


def enable_checkpointing(model, kwargs: dict) -> None:
    """Activation checkpointing under its name since transformers 5.20, or the older one."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@pytest.mark.parametrize("tune", ["projector", "projector+lm", "lora"])
@pytest.mark.parametrize("freeze_vision_tower", [True, False])
def test_regimes_train_the_right_parameters_with_and_without_checkpointing(processor, tune, freeze_vision_tower):
    batch = DenseConnectorDataCollator(processor)(records(2))

    def gradients(checkpointing: dict | None):
        model = prepare_for_training(
            tiny_model(CONFIG).train(), tune, freeze_vision_tower, lora_r=4, lora_alpha=8, lora_dropout=0.0
        )
        if tune == "lora":  # LoRA's B starts at zero; make the adapters non-trivial
            torch.manual_seed(1)
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.data.normal_(std=0.02)
        if checkpointing is not None:
            enable_checkpointing(model, checkpointing)
        model(**batch).loss.backward()
        return {name: param.grad for name, param in model.named_parameters()}

    reference = gradients(None)
    trained = {name for name, grad in reference.items() if grad is not None}
    assert trained, "nothing receives a gradient"
    assert all(reference[name].abs().sum() > 0 for name in trained)
    assert any("projector" in name for name in trained)
    assert any("vision_tower" in name for name in trained) == (not freeze_vision_tower)
    assert any("language_model" in name and "lora" not in name for name in trained) == (tune == "projector+lm")
    assert any("lora_" in name for name in trained) == (tune == "lora")
    for checkpointing in ({"use_reentrant": False}, {"use_reentrant": True}):
        grads = gradients(checkpointing)
        assert {name for name, grad in grads.items() if grad is not None} == trained
        for name in trained:
            torch.testing.assert_close(grads[name], reference[name], atol=1e-6, rtol=1e-4)


def test_unknown_regime_is_refused():
    with pytest.raises(ValueError, match="not a training regime"):
        prepare_for_training(tiny_model(CONFIG), tune="everything")


def write_dataset(folder, count=8):
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, record in enumerate(records(count)):
        name = f"{index}.png"
        record["image"].save(folder / name)
        rows.append({**record, "image": name})
    path = folder / "data.json"
    path.write_text(json.dumps(rows))
    return path


def save_tiny_checkpoint(folder, processor):
    tiny_model(CONFIG).save_pretrained(folder)
    processor.save_pretrained(folder)


def finetune_args(checkpoint, data, output, tune, steps, extra=()):
    return [
        "--model_name_or_path", str(checkpoint),
        "--data_path", str(data),
        "--image_folder", str(data.parent),
        "--tune", tune,
        "--output_dir", str(output),
        "--max_steps", str(steps),
        "--per_device_train_batch_size", "4",
        "--learning_rate", "3e-3",
        "--save_strategy", "no",
        "--report_to", "none",
        "--use_cpu",
        "--seed", "0",
        *extra,
    ]  # fmt: skip


def two_logged_steps(checkpoint, data, output, extra=()):
    """`dense-connector train` (in this process) for 2 logged steps of `projector+lm`; the Trainer and its losses."""
    extra = [*extra, "--logging_steps", "1"]
    trainer = command.train(finetune_args(checkpoint, data, output, "projector+lm", 2, extra))
    return trainer, [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def batch_loss(model, batch):
    with torch.no_grad():
        return model(**batch).loss.item()


def test_finetune_script_trains_and_saves(processor, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    save_tiny_checkpoint(tmp_path / "base", processor)
    tokenizer_config = tmp_path / "base" / "tokenizer_config.json"  # a base checkpoint that pads on the right
    tokenizer_config.write_text(json.dumps({**json.loads(tokenizer_config.read_text()), "padding_side": "right"}))
    assert AutoProcessor.from_pretrained(tmp_path / "base").tokenizer.padding_side == "right"
    data = write_dataset(tmp_path / "data")
    batch = DenseConnectorDataCollator(processor)(records(8))
    before = tiny_model(CONFIG)
    trainer = command.train(
        finetune_args(tmp_path / "base", data, tmp_path / "out", "projector+lm", 12, ["--activation_checkpointing"])
    )
    model = trainer.model.eval()
    assert batch_loss(model, batch) < 0.8 * batch_loss(before, batch)

    # frozen tower: no gradient, unchanged; projector and LM changed
    after = dict(model.named_parameters())
    for name, param in before.named_parameters():
        if name.startswith("model.vision_tower."):
            assert after[name].grad is None and torch.equal(after[name], param), name
    assert not torch.equal(after["model.connector.projector.0.weight"], before.model.connector.projector[0].weight)
    assert not torch.equal(after["lm_head.weight"], before.lm_head.weight)

    # the saved checkpoint loads through the Auto classes and gives the same logits
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "out").eval()
    saved = AutoProcessor.from_pretrained(tmp_path / "out")
    assert saved.chat_template == processor.chat_template
    assert saved.tokenizer.padding_side == "left"  # for batched generation, whatever the base checkpoint had
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, atol=0, rtol=0)


def test_lora_adapter_saves_loads_and_merges(processor, tmp_path):
    from peft import PeftModel

    save_tiny_checkpoint(tmp_path / "base", processor)
    data = write_dataset(tmp_path / "data")
    extra = ["--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0"]
    trainer = command.train(finetune_args(tmp_path / "base", data, tmp_path / "out", "lora", 4, extra))
    adapted = trainer.model.eval()
    batch = DenseConnectorDataCollator(processor)(records(2))
    with torch.no_grad():
        expected = adapted(**batch).logits
        base_logits = tiny_model(CONFIG)(**batch).logits
    assert not torch.allclose(expected, base_logits)

    adapter_config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert "projector" in adapter_config["modules_to_save"]
    loaded = PeftModel.from_pretrained(tiny_model(CONFIG), tmp_path / "out").eval()
    merged = loaded.merge_and_unload().eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(merged(**batch).logits, expected, atol=1e-5, rtol=1e-5)
    assert type(merged).__name__ == "DenseConnectorForConditionalGeneration"


def test_unusable_records_are_refused_naming_the_record_and_field(tmp_path):
    plain = DenseConnectorDataCollator(
        tiny_processor(CONFIG, chat_template=CHAT_TEMPLATES["plain"]), image_folder=tmp_path
    )
    caption = [{"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "A box."}]
    with pytest.raises(ValueError, match=r"Record id='cap-1' .* no `image`; the plain format"):
        plain([{"id": "cap-1", "conversations": caption}])
    with pytest.raises(FileNotFoundError, match=r"Record id='cap-2' .*missing.png is not found.*`image`"):
        plain([{"id": "cap-2", "image": "missing.png", "conversations": caption}])
    with pytest.raises(
        ValueError, match=r"one user turn and one caption; it has the turns \['user', 'assistant', 'user'"
    ):
        plain([{"id": "cap-3", "image": image(), "conversations": caption + caption}])
    chat = DenseConnectorDataCollator(tiny_processor(CONFIG, chat_template=CHAT_TEMPLATES["vicuna_v1"]))
    with pytest.raises(ValueError, match=r"Record \{\"conversations\".* no assistant turn \(`gpt`"):
        chat([{"conversations": caption[:1]}])
    text_only = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    assert chat([text_only])["input_ids"].shape[0] == 1  # text-only records are fine outside `plain`


def test_finetune_refuses_a_missing_folder_at_once(tmp_path, monkeypatch):
    """A mistyped folder (no ./, not owner/name) is refused before anything loads, not tried on the Hub."""
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data.json"
    data.write_text("[]")
    args = finetune_args("dense-connector-7b", data, tmp_path / "out", "projector", 1)
    with pytest.raises(UsageError, match="no such folder: dense-connector-7b"):
        command.train(args)
