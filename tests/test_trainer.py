"""The original's Trainer choices: batches of one modality, length grouping of raw records, the projector's learning
rate, and stage 1's projector-only output read back by stage 2."""

import json
import os

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_training import CONFIG, finetune_args, save_tiny_checkpoint, write_dataset
from tiny import anyres_processor, tiny_config, tiny_model, tiny_processor
from transformers.trainer_pt_utils import LengthGroupedSampler

from dense_connector.chat_templates import CHAT_TEMPLATES
from dense_connector.checkpoints import UsageError
from dense_connector.training import DenseConnectorDataCollator
from dense_connector.training import command as finetune
from dense_connector.training.command import DataError
from dense_connector.training.trainer import (
    PROJECTOR_FILE,
    ModalityLengthGroupedSampler,
    load_pretrained_projector,
    modality_grouped_indices,
    modality_lengths,
    record_lengths,
)


def text_record(index: int) -> dict:
    words = " ".join(["word"] * (index % 5))
    return {"conversations": [{"from": "human", "value": f"Say {words}"}, {"from": "gpt", "value": f"ok {index}"}]}


def mixed_dataset(folder, images: int = 8, texts: int = 6):
    """`images` image records and `texts` text-only records, interleaved, in one JSON file."""
    path = write_dataset(folder, images)
    rows = json.loads(path.read_text())
    for index in range(texts):
        rows.insert(2 * index + 1, text_record(index))
    path.write_text(json.dumps(rows))
    return path


@pytest.fixture()
def base(tmp_path):
    save_tiny_checkpoint(tmp_path / "base", tiny_processor(CONFIG, chat_template=CHAT_TEMPLATES["vicuna_v1"]))
    return tmp_path / "base"


def test_modality_lengths_are_the_originals():
    image = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}]}
    text = {"messages": [{"role": "user", "content": [{"type": "text", "text": "two words"}]}]}
    assert modality_lengths([image, text]) == [4, -2]  # "<image>\nWhat is it?" splits into 4 words
    assert record_lengths([image, text]) == [4 + 128, 2]


def anyres_collator(folder):
    config = tiny_config("siglip", image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64]])
    processor = anyres_processor(config)
    processor.chat_template = CHAT_TEMPLATES["vicuna_v1"]
    return DenseConnectorDataCollator(processor, image_folder=folder)


@pytest.mark.parametrize("anyres", [False, True], ids=["fixed", "anyres"])
def test_token_lengths_are_the_encoded_lengths_without_loading_images(anyres, tmp_path, monkeypatch):
    sizes = [(40, 32), (32, 90), (70, 70)]
    for index, size in enumerate(sizes):
        Image.new("RGB", size, (index * 60, 90, 200)).save(tmp_path / f"{index}.png")
    if anyres:
        collator = anyres_collator(tmp_path)
    else:
        processor = tiny_processor(CONFIG, CHAT_TEMPLATES["vicuna_v1"])
        collator = DenseConnectorDataCollator(processor, image_folder=tmp_path)
    turns = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a box"},
             {"from": "human", "value": "And where?"}, {"from": "gpt", "value": "top left, by the edge"}]  # fmt: skip
    records = [{"image": f"{index}.png", "conversations": turns[: 2 + 2 * (index % 2)]} for index in range(3)]
    records += [text_record(7), {"images": [Image.new("RGB", (50, 32))], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": "black"}]}]  # fmt: skip
    encoded = [len(collator.encode(record)[0]) for record in records]
    monkeypatch.setattr(collator, "load_image", None)  # lengths never decode an image
    expected = [encoded[0], encoded[1], encoded[2], -encoded[3], encoded[4]]
    assert collator.token_lengths(records) == expected
    if anyres:
        assert len(set(encoded[:3])) == 3  # the images' sizes change their placeholder counts
    many = records * 500  # 2,500 records: chunks of 1,000 in forked workers give the lengths of one process
    assert collator.token_lengths(many, workers=2) == collator.token_lengths(many, workers=1) == expected * 500
    collator.max_length = 20
    assert collator.token_lengths(records[3:4]) == [-min(encoded[3], 20)]


@pytest.mark.parametrize(("images", "texts", "step"), [(40, 23, 8), (9, 30, 4), (12, 0, 4), (5, 5, 8)])
def test_every_step_holds_one_modality_but_the_last(images, texts, step):
    lengths = [index + 1 for index in range(images)] + [-(index + 1) for index in range(texts)]
    order = modality_grouped_indices(lengths, step, generator=torch.Generator().manual_seed(0))
    assert sorted(order) == list(range(len(lengths)))
    runs = [order[start : start + step] for start in range(0, len(order), step)]
    full = (images // step) + (texts // step)
    for run in runs[:full]:
        assert len({lengths[index] > 0 for index in run}) == 1, run
    assert sum(len(run) for run in runs[full:]) == images % step + texts % step
    # the runs are shuffled: not all image runs first
    if images // step > 1 and texts // step > 1:
        orders = {tuple(modality_grouped_indices(lengths, step, torch.Generator().manual_seed(s))) for s in range(3)}
        assert len(orders) > 1


def test_group_by_modality_length_gives_batches_of_one_modality(base, tmp_path):
    data = mixed_dataset(tmp_path / "data", images=8, texts=6)
    extra = ["--group_by_modality_length", "--gradient_accumulation_steps", "2"]
    args = finetune_args(base, data, tmp_path / "out", "projector", 1, extra)
    args[args.index("--per_device_train_batch_size") + 1] = "2"
    trainer = finetune.build_trainer(*finetune.parse_options(args, "train")[:3])
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, ModalityLengthGroupedSampler) and sampler.step_size == 4
    batches = list(trainer.get_train_dataloader())
    kinds = [
        "image" if batch.get("pixel_values") is not None and len(batch["pixel_values"]) == len(batch["input_ids"])
        else "text" if batch.get("pixel_values") is None else "mixed"
        for batch in batches
    ]  # fmt: skip
    # 8 image and 6 text-only records, steps of 4: two image steps and one text step, then the 2 text records left
    assert len(batches) == 7 and kinds[:6].count("image") == 4 and kinds[:6].count("text") == 2
    assert kinds[-1] == "text"
    for first in range(0, 6, 2):  # the two batches of one optimizer step share their modality
        assert kinds[first] == kinds[first + 1]
    trainer.train()


def test_group_by_length_works_on_raw_records(base, tmp_path):
    data = mixed_dataset(tmp_path / "data", images=4, texts=4)
    trainer = finetune.train(finetune_args(base, data, tmp_path / "out", "projector", 2, ["--group_by_length"]))
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, LengthGroupedSampler)
    records = list(trainer.train_dataset)  # image paths resolved under --image_folder by the command
    exact = [len(trainer.data_collator.encode(record)[0]) for record in records]
    assert sampler.lengths == exact != record_lengths(records)  # exact token counts, not the original's words
    assert trainer.state.global_step == 2


def test_mm_projector_lr_gives_the_projector_its_own_learning_rate(base, tmp_path):
    data = write_dataset(tmp_path / "data", 4)
    extra = ["--mm_projector_lr", "1e-2", "--lr_scheduler_type", "constant"]
    trainer = finetune.train(finetune_args(base, data, tmp_path / "out", "projector+lm", 1, extra))
    names = {id(param): name for name, param in trainer.model.named_parameters()}
    rates = {}
    for group in trainer.optimizer.param_groups:
        for param in group["params"]:
            rates[names[id(param)]] = group["lr"]
    assert {rate for name, rate in rates.items() if ".connector.projector." in name} == {1e-2}
    assert {rate for name, rate in rates.items() if ".connector.projector." not in name} == {3e-3}
    assert any("language_model" in name for name in rates) and all(
        group["params"] for group in trainer.optimizer.param_groups
    )


def test_stage_1_saves_the_projector_only_and_stage_2_starts_from_it(base, tmp_path):
    data = write_dataset(tmp_path / "data", 4)
    stage1 = tmp_path / "stage1"
    extra = ["--version", "plain", "--save_projector_only"]
    trainer = finetune.train(finetune_args(base, data, stage1, "projector", 2, extra))
    assert sorted(path.name for path in stage1.iterdir()) == [PROJECTOR_FILE]  # nothing logged: no loss curve
    saved = load_file(stage1 / PROJECTOR_FILE)
    trained = trainer.model.state_dict()
    assert saved and all(name.startswith("model.connector.projector.") for name in saved)
    for name, tensor in saved.items():
        assert torch.equal(tensor, trained[name])
    assert not torch.equal(
        saved["model.connector.projector.0.weight"],
        tiny_model(CONFIG).state_dict()["model.connector.projector.0.weight"],
    )

    extra = ["--version", "v1", "--pretrained_projector", str(stage1 / PROJECTOR_FILE)]
    stage2 = finetune.build_trainer(
        *finetune.parse_options(finetune_args(base, data, tmp_path / "stage2", "projector+lm", 1, extra), "train")[:3]
    )
    for name, tensor in saved.items():
        assert torch.equal(stage2.model.state_dict()[name], tensor)
    assert stage2.processing_class.chat_template == CHAT_TEMPLATES["vicuna_v1"]


def test_projector_files_that_do_not_fit_are_refused(base, tmp_path):
    from safetensors.torch import save_file

    other = tiny_model(CONFIG)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"model.connector.projector.0.weight": torch.zeros(64, 5)}, wrong)
    with pytest.raises(ValueError, match="trained for other parts or another connector"):
        load_pretrained_projector(other, wrong)
    save_file({"model.language_model.norm.weight": torch.zeros(64)}, wrong)
    with pytest.raises(ValueError, match="holds no projector"):
        load_pretrained_projector(other, wrong)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained_projector(other, tmp_path / "missing")
    # the original's mm_projector.bin, with its key names
    original = {"model.mm_projector.0.weight": torch.ones_like(other.model.connector.projector[0].weight)}
    torch.save(original, tmp_path / "mm_projector.bin")
    load_pretrained_projector(other, tmp_path / "mm_projector.bin")
    assert torch.equal(other.model.connector.projector[0].weight, original["model.mm_projector.0.weight"])

    data = write_dataset(tmp_path / "data", 2)
    with pytest.raises(UsageError, match="--save_projector_only needs --tune projector"):
        finetune.train(finetune_args(base, data, tmp_path / "out", "projector+lm", 1, ["--save_projector_only"]))


def test_stage_2_starts_from_a_full_stage_1_folder(base, tmp_path, capsys):
    data = write_dataset(tmp_path / "data", 4)
    finetune.train(finetune_args(base, data, tmp_path / "stage1", "projector", 1, ["--version", "plain"]))
    saved = tmp_path / "stage1"
    assert (saved / "model.safetensors").is_file() and not (saved / PROJECTOR_FILE).exists()
    mixed = mixed_dataset(tmp_path / "mixed", images=2, texts=2)
    with pytest.raises(DataError, match="2 of 4 records cannot be trained on"):
        finetune.train(finetune_args(saved, mixed, tmp_path / "stage2", "projector+lm", 1))  # still the plain template
    assert "record 1: `image`: the plain format (stage 1) takes one image" in capsys.readouterr().err
    assert not (tmp_path / "stage2").exists()
    trainer = finetune.train(finetune_args(saved, mixed, tmp_path / "stage2", "projector+lm", 1, ["--version", "v1"]))
    assert trainer.state.global_step == 1
    assert trainer.processing_class.chat_template == CHAT_TEMPLATES["vicuna_v1"]


def test_version_sets_the_template_and_the_stop_tokens():
    processor, model = tiny_processor(CONFIG), tiny_model(CONFIG)
    for version in ("v1", "vicuna_v1"):
        finetune.set_conversation_format(processor, model, version)
        assert processor.chat_template == CHAT_TEMPLATES["vicuna_v1"]
        assert model.generation_config.eos_token_id == [processor.tokenizer.convert_tokens_to_ids("</s>")]
    finetune.set_conversation_format(processor, model, "plain")
    assert processor.chat_template == CHAT_TEMPLATES["plain"]
    with pytest.raises(ValueError, match=r"no \['<\|eot_id\|>', '<\|end_of_text\|>'\] token"):
        finetune.set_conversation_format(processor, model, "llama_3")  # a Vicuna tokenizer
    processor.chat_template = None
    with pytest.raises(UsageError, match="pass --version"):
        finetune.set_conversation_format(processor, model, None)


def chunk_owner(work, start, stop):
    return work, os.getpid(), start, stop


def test_map_chunks_runs_chunks_in_forked_workers_in_order():
    from dense_connector.training.parallel import map_chunks

    results = map_chunks(chunk_owner, "work", 3500, workers=2)
    assert [(start, stop) for _, _, start, stop in results] == [(0, 1000), (1000, 2000), (2000, 3000), (3000, 3500)]
    assert {work for work, *_ in results} == {"work"} and os.getpid() not in {pid for _, pid, _, _ in results}
    assert {pid for _, pid, _, _ in map_chunks(chunk_owner, "work", 3500, workers=1)} == {os.getpid()}
    assert map_chunks(chunk_owner, "work", 0) == []
