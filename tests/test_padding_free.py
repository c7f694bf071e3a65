"""Padding-free batches (`DenseConnectorDataCollator(padding_free=True)`): the same loss and gradients as the padded
batch of the same records, with SDPA and eager attention, image and text-only records mixed, multi-turn records,
LoRA, activation checkpointing and AnyRes."""

import logging

import pytest
import torch
from PIL import Image
from test_training import save_tiny_checkpoint, two_logged_steps, write_dataset
from tiny import anyres_processor, tiny_config, tiny_model, tiny_processor

from dense_connector.chat_templates import CHAT_TEMPLATES
from dense_connector.training import (
    IGNORE_INDEX,
    VARLEN_SDPA,
    DenseConnectorDataCollator,
    prepare_for_training,
    use_varlen_sdpa,
)


def llava_record(turns, size=None):
    conversations = []
    for question, answer in turns:
        conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    record = {"conversations": conversations}
    if size is not None:
        record["image"] = Image.new("RGB", size, (sum(size) % 256, 90, 200))
    return record


RECORDS = [
    llava_record([("<image>\nWhat color is it?", "blue")], size=(40, 32)),
    llava_record([("What is two plus two? Answer in words, please.", "four"), ("And three?", "six, once doubled")]),
    llava_record([("<image>\nDescribe it.", "a box"), ("Where is it?", "on the left of the picture")], (32, 70)),
    llava_record([("Hi", "Hello there, how can I help you today?")]),
]


def loss_and_gradients(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_training_signal(model, padded, flat) -> None:
    loss, grads = loss_and_gradients(model, padded)
    flat_loss, flat_grads = loss_and_gradients(model, flat)
    torch.testing.assert_close(flat_loss, loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == flat_grads.keys() and grads
    for name, grad in grads.items():
        message = f"{name}: {{}}"
        torch.testing.assert_close(flat_grads[name], grad, atol=1e-5, rtol=1e-4, msg=message.format)


def collators(processor) -> tuple[DenseConnectorDataCollator, DenseConnectorDataCollator]:
    return DenseConnectorDataCollator(processor), DenseConnectorDataCollator(processor, padding_free=True)


@pytest.fixture(scope="module")
def processor():
    return tiny_processor(tiny_config(), chat_template=CHAT_TEMPLATES["vicuna_v1"])


def test_one_row_with_restarting_positions_and_masked_record_starts(processor):
    padded_collator, flat_collator = collators(processor)
    padded, flat = padded_collator(RECORDS), flat_collator(RECORDS)
    lengths = padded["attention_mask"].sum(1).tolist()
    assert "attention_mask" not in flat and flat["input_ids"].shape == (1, sum(lengths)) < padded["input_ids"].shape
    assert flat["position_ids"][0].tolist() == [i for length in lengths for i in range(length)]
    real = padded["attention_mask"].bool()
    assert flat["input_ids"][0].tolist() == padded["input_ids"][real].tolist()
    starts = torch.tensor([0, *lengths[:-1]]).cumsum(0)
    assert (flat["labels"][0, starts] == IGNORE_INDEX).all()
    expected = padded["labels"].clone()
    expected[:, 0] = IGNORE_INDEX
    assert flat["labels"][0].tolist() == expected[real].tolist()
    torch.testing.assert_close(flat["pixel_values"], padded["pixel_values"])
    with pytest.raises(ValueError, match="adds no padding"):
        DenseConnectorDataCollator(processor, padding_free=True, pad_to_multiple_of=8)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_same_loss_and_gradients_as_the_padded_batch(processor, attention, training):
    model = prepare_for_training(tiny_model(tiny_config(attn_implementation=attention)), "projector+lm")
    model.train(training)  # eval mode: the model's default cache must not switch the packed-sequence mask off
    padded_collator, flat_collator = collators(processor)
    assert_same_training_signal(model, padded_collator(RECORDS), flat_collator(RECORDS))


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_lora_with_activation_checkpointing(processor, use_reentrant):
    model = prepare_for_training(tiny_model(tiny_config()), "lora", lora_r=4, lora_alpha=8, lora_dropout=0.0)
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # LoRA's B starts at zero; make the adapters matter
            param.data.normal_(std=0.02)
    model.train()
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # its name before transformers 5.20
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    padded_collator, flat_collator = collators(processor)
    assert_same_training_signal(model, padded_collator(RECORDS), flat_collator(RECORDS))


def test_anyres_images_land_in_their_records(processor):
    config = tiny_config(
        "siglip", image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64]], attn_implementation="sdpa"
    )
    anyres = anyres_processor(config)
    anyres.chat_template = CHAT_TEMPLATES["vicuna_v1"]
    model = prepare_for_training(tiny_model(config), "projector+lm").train()
    padded_collator, flat_collator = collators(anyres)
    padded, flat = padded_collator(RECORDS), flat_collator(RECORDS)
    assert padded["pixel_values"].shape[1] == 3  # images of different tile counts, padded to the most tiles
    assert_same_training_signal(model, padded, flat)


def sdpa_query_lengths(monkeypatch) -> list[int]:
    """The query length of every SDPA call from now on (the tower's and the language model's)."""
    lengths, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def recording(query, *args, **kwargs):
        lengths.append(query.shape[-2])
        return sdpa(query, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    return lengths


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_varlen_sdpa_attends_record_by_record_with_the_same_signal(processor, monkeypatch, training):
    model = prepare_for_training(tiny_model(tiny_config(attn_implementation="sdpa")), "projector+lm")
    assert "record by record" in use_varlen_sdpa(model)
    assert model.model.language_model.config._attn_implementation == VARLEN_SDPA
    assert use_varlen_sdpa(model) is None  # already switched: only SDPA is
    model.train(training)
    padded_collator, flat_collator = collators(processor)
    padded, flat = padded_collator(RECORDS), flat_collator(RECORDS)
    lengths = sdpa_query_lengths(monkeypatch)
    assert_same_training_signal(model, padded, flat)
    records = padded["attention_mask"].sum(1).tolist()
    layers = model.config.text_config.num_hidden_layers
    row = flat["input_ids"].shape[1]
    # padded: the whole batch at once per layer; padding-free: each record by itself, never the whole row
    assert lengths.count(padded["input_ids"].shape[1]) >= layers and row not in lengths
    assert all(lengths.count(length) >= layers * records.count(length) for length in set(records))


def test_varlen_sdpa_keeps_the_whole_row_where_records_cannot_be_split(monkeypatch):
    config = tiny_config(attn_implementation="sdpa")
    model = tiny_model(config).eval()
    use_varlen_sdpa(model)
    lengths = sdpa_query_lengths(monkeypatch)
    vision = config.vision_config
    tower = (vision.image_size // vision.patch_size) ** 2 + 1  # the tower's calls (on a zero image in training)
    ids = torch.randint(3, config.text_config.vocab_size, (1, 12))
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        model(input_ids=ids, position_ids=positions, use_cache=True)  # a cache: no packed-sequence mask, one row
        assert set(lengths) - {tower} == {12}
        lengths.clear()
        model(input_ids=ids, position_ids=positions)  # training-style call: the two records
        assert set(lengths) - {tower} == {5, 7}
        lengths.clear()
        model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=positions)  # a 2D mask: one row
        assert set(lengths) - {tower} == {12}


def test_the_implementation_name_is_not_saved(tmp_path):
    model = tiny_model(tiny_config(attn_implementation="sdpa"))
    use_varlen_sdpa(model)
    model.save_pretrained(tmp_path)
    assert VARLEN_SDPA not in (tmp_path / "config.json").read_text()


def test_train_with_padding_free_runs_sdpa_by_record_and_trains_as_padded(processor, tmp_path, caplog):
    save_tiny_checkpoint(tmp_path / "base", processor)
    data = write_dataset(tmp_path / "data", 4)
    runs = {}
    for name, extra in {"padded": [], "padding-free": ["--padding_free"]}.items():
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            trainer, runs[name] = two_logged_steps(tmp_path / "base", data, tmp_path / name, extra)
        implementation = trainer.model.model.language_model.config._attn_implementation
        padding_free = bool(extra)
        assert (implementation == VARLEN_SDPA) == padding_free and ("record by record" in caplog.text) == padding_free
    assert len(runs["padded"]) == 2 and runs["padding-free"] == pytest.approx(runs["padded"], rel=1e-4)


@pytest.mark.parametrize("window", [None, 7, 4], ids=["full", "window-7", "window-4"])
def test_varlen_sdpa_splits_causal_layers_where_no_window_cuts_a_record(window, monkeypatch):
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from dense_connector.training.attention import varlen_sdpa_attention

    query, key, value = torch.randn(3, 1, 2, 12, 8).unbind(0)
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]])  # records of 5 and 7 tokens
    mask = torch.ones(12, 12, dtype=torch.bool).tril()
    mask[5:, :5] = False  # the packed-sequence mask transformers builds for the row
    if window:  # transformers' sliding window: a query sees itself and the window - 1 tokens before it
        mask &= torch.ones(12, 12, dtype=torch.bool).triu(-window + 1)
    module = SimpleNamespace(sliding_window=window, is_causal=True)
    expected, _ = sdpa_attention_forward(module, query, key, value, mask[None, None])
    lengths = sdpa_query_lengths(monkeypatch)
    output, _ = varlen_sdpa_attention(module, query, key, value, mask[None, None], position_ids=positions)
    torch.testing.assert_close(output, expected)
    assert lengths == ([12] if window == 4 else [5, 7])


def test_throughput_counts_the_records_of_a_padding_free_row(processor):
    from dense_connector.training.progress import Throughput

    padded_collator, flat_collator = collators(processor)
    counts = {}
    for name, collator in {"padded": padded_collator, "padding-free": flat_collator}.items():
        throughput = Throughput(processor.image_token_id)
        throughput.count(collator(RECORDS))
        counts[name] = throughput.counts.tolist()
    assert counts["padding-free"] == counts["padded"] and counts["padded"][2] == len(RECORDS)
