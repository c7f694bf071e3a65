"""TRL trains Dense Connector checkpoints unpatched: SFT (conversations, prompt-completion, assistant-only loss),
DPO and GRPO on the bundled demo checkpoint, loaded as a user loads it (remote code).

Runs in .venv with TRL added (`make test-trl`). Each trainer runs 2 steps on CPU; every output folder then loads in a
fresh process without the package and answers. TRL's SFT batch with `assistant_only_loss=True` equals
`DenseConnectorDataCollator`'s, ids and labels, for every record of `examples/data`.
"""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from dense_connector.training import DenseConnectorDataCollator, load_instruction_data, record_to_messages


REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
from tiny import run_without_package  # noqa: E402


DEMO = REPO / "dense_connector" / "demo" / "checkpoint"
DATA = REPO / "examples" / "data"
QUESTION = "How many shapes are there?"
STEPS = {"max_steps": 2, "per_device_train_batch_size": 2, "report_to": "none", "save_strategy": "no"}
STEPS |= {"logging_steps": 1, "use_cpu": True, "dataloader_num_workers": 0, "seed": 0}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> Path:
    """Where each test's trained folder goes; the last test loads them all in one fresh process."""
    return tmp_path_factory.mktemp("outputs")


def demo_model():
    return AutoModelForImageTextToText.from_pretrained(DEMO, trust_remote_code=True)


def demo_processor():
    return AutoProcessor.from_pretrained(DEMO, trust_remote_code=True)


def structured(content) -> list[dict]:
    """Message content as content items (a leading `<image>\n` becomes an image item), as datasets store it."""
    if not isinstance(content, str):
        return content
    items = [{"type": "text", "text": content.removeprefix("<image>\n")}]
    return [{"type": "image"}, *items] if content.startswith("<image>\n") else items


def chat_records() -> list[tuple[dict, list[dict], list[Image.Image]]]:
    """Every record of examples/data, as itself and as TRL conversations, with its images."""
    records = []
    for name in ("shapes_chat.jsonl", "shapes_llava.json"):
        for record in load_instruction_data(DATA / name):
            messages, refs = record_to_messages(record)
            messages = [{**message, "content": structured(message["content"])} for message in messages]
            records.append((record, messages, [Image.open(DATA / ref).convert("RGB") for ref in refs]))
    return records


def test_sft_assistant_only_batch_equals_the_package_collator():
    processor = demo_processor()
    package = DenseConnectorDataCollator(processor, image_folder=DATA)
    trl_collator = DataCollatorForVisionLanguageModeling(processor, assistant_only_loss=True)
    records = chat_records()
    assert len(records) == 12
    for record, messages, images in records:
        ours = package([record])
        theirs = trl_collator([{"messages": json.loads(json.dumps(messages)), "images": images}])
        assert ours["input_ids"][0, 0] == processor.tokenizer.bos_token_id
        assert torch.equal(ours["input_ids"], theirs["input_ids"])
        assert torch.equal(ours["labels"], theirs["labels"])
        assert (theirs["labels"] != -100).sum() > 0
        torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"], rtol=0, atol=0)


def conversations() -> Dataset:
    return Dataset.from_list([{"messages": messages, "images": images} for _, messages, images in chat_records()])


def train_and_save(trainer_class, args, dataset: Dataset, output: Path, **trainer_kwargs) -> list[dict]:
    """Trains the demo checkpoint with `trainer_class` for `args`' steps and saves it; returns the logged losses."""
    trainer = trainer_class(
        model=demo_model(), args=args, train_dataset=dataset, processing_class=demo_processor(), **trainer_kwargs
    )
    trainer.train()
    trainer.save_model(str(output))
    return [entry for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("assistant_only_loss", [False, True], ids=["all_tokens", "assistant_only"])
def test_sft_on_conversations(assistant_only_loss, outputs):
    args = SFTConfig(output_dir=str(outputs / "run"), assistant_only_loss=assistant_only_loss, **STEPS)
    logs = train_and_save(SFTTrainer, args, conversations(), outputs / f"sft_{assistant_only_loss}")
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logs)


def single_turns() -> list[dict]:
    """One question and its answer per record, with the record's image."""
    return [
        {"question": messages[0]["content"], "answer": messages[1]["content"], "images": images}
        for _, messages, images in chat_records()
    ]


def question(item: dict) -> list[dict]:
    return [{"role": "user", "content": json.loads(json.dumps(item["question"]))}]


def test_sft_prompt_completion(outputs):
    rows = [
        {
            "prompt": question(item),
            "completion": [{"role": "assistant", "content": item["answer"]}],
            "images": item["images"],
        }
        for item in single_turns()
    ]
    args = SFTConfig(output_dir=str(outputs / "run"), **STEPS)
    logs = train_and_save(SFTTrainer, args, Dataset.from_list(rows), outputs / "sft_prompt_completion")
    assert len(logs) == 2


def test_dpo(outputs):
    rows = [
        {
            "prompt": question(item),
            "chosen": [{"role": "assistant", "content": item["answer"]}],
            "rejected": [{"role": "assistant", "content": "green"}],
            "images": item["images"],
        }
        for item in single_turns()
    ]
    args = DPOConfig(output_dir=str(outputs / "run"), **STEPS)
    logs = train_and_save(DPOTrainer, args, Dataset.from_list(rows), outputs / "dpo")
    assert len(logs) == 2


def count_reward(completions, **kwargs) -> list[float]:
    """1 for an answer that is a digit, else 0 (the demo answers counts with digits)."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(text.strip().isdigit()) for text in texts]


def test_grpo(outputs):
    rows = [{"prompt": question(item), "images": item["images"]} for item in single_turns()]
    args = GRPOConfig(output_dir=str(outputs / "run"), num_generations=2, max_completion_length=4, **STEPS)
    logs = train_and_save(GRPOTrainer, args, Dataset.from_list(rows), outputs / "grpo", reward_funcs=count_reward)
    assert len(logs) == 2


ANSWER = """
import json
from pathlib import Path
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

image = Image.open("{image}").convert("RGB")
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "{question}"}}]}}]
answers = {{}}
for folder in sorted(Path("{outputs}").iterdir()):
    if folder.name == "run":
        continue
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert "transformers_modules" in type(model).__module__, type(model).__module__
    inputs = processor.apply_chat_template(
        [dict(messages[0], content=[{{"type": "image", "image": image}}, messages[0]["content"][1]])],
        add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
    )
    output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    answers[folder.name] = processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
open("answers.json", "w").write(json.dumps(answers))
"""


def test_outputs_load_without_the_package_and_answer(outputs, tmp_path):
    expected = {"sft_False", "sft_True", "sft_prompt_completion", "dpo", "grpo"}
    assert expected <= {folder.name for folder in outputs.iterdir()}, "run the whole file: the trainers write these"
    shutil.rmtree(outputs / "run", ignore_errors=True)
    script = ANSWER.format(image=DEMO.parent / "sample.png", question=QUESTION, outputs=outputs)
    run_without_package(script, tmp_path, timeout=600)
    answers = json.loads((tmp_path / "answers.json").read_text())
    assert set(answers) == expected
    assert all(answer.strip() for answer in answers.values()), answers
