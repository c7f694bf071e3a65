"""The paper's two-stage recipe in miniature, run as a user runs it: `dense-connector build` on Hub-like parts (a
CLIP tower and a Llama of the demo's shape, random weights), stage 1 (`--version plain --tune projector`, projector
saved alone), stage 2 (`--version v1 --tune projector+lm` from the same built folder and stage 1's projector, image
and text-only records, `--group_by_modality_length`), both as `dense-connector train --config stage1` / `stage2` (the
bundled recipes, with flags for a short CPU run) in subprocesses; then the
result answers the demo's shapes questions through `pipeline`, in a fresh process without the package (remote
code), clearly better than the built model did."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tiny import REPO, run_without_package

from dense_connector.demo_data import make_splits, to_conversation


sys.path.insert(0, str(REPO / "examples"))
import tiny_parts  # noqa: E402  (examples/tiny_parts.py, which docs/training.md runs as a script)


TRAIN_IMAGES, HELDOUT_QUESTIONS = 1000, 80


def demo_sized_parts(folder) -> tuple:
    """Hub-like parts of the demo's shape (`examples/tiny_parts.py`, as docs/training.md's miniature uses them): the
    demo's trained 4-layer tower as a vision-only CLIP repository, and an untrained 2-layer Llama with the demo's
    SentencePiece tokenizer in Vicuna's layout."""
    return tiny_parts.write_parts(folder)


def built_model(tmp_path):
    """`dense-connector build` on the parts, as a user runs it."""
    tower, language_model = demo_sized_parts(tmp_path / "parts")
    folder = tmp_path / "built"
    command = [str(Path(sys.executable).with_name("dense-connector")), "build", "--vision-tower", str(tower),
               "--language-model", str(language_model), "--connector", "dci", "--version", "v1",
               "--output", str(folder)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


def caption(example) -> str:
    """A stage-1 caption of a demo scene: "red circle top left", or "3 shapes"."""
    answers = dict(zip(example.question_types, example.answers))
    if "color" in answers:
        return f"{answers['color']} {answers['shape']} {answers['position']}"
    return f"{answers['count']} shapes"


def write_data(folder):
    """Stage-1 captions and stage-2 conversations (plus text-only records) on the same training images, and the
    held-out questions with their images."""
    train, heldout = make_splits(TRAIN_IMAGES, HELDOUT_QUESTIONS)
    (folder / "images").mkdir(parents=True)
    captions, conversations = [], []
    for index, example in enumerate(train):
        name = f"images/{index}.png"
        example.image.save(folder / name)
        first = {"from": "human", "value": "<image>\nRender a clear and concise summary of the photo."}
        reply = {"from": "gpt", "value": caption(example)}
        captions.append({"id": str(index), "image": name, "conversations": [first, reply]})
        conversations.append({"id": str(index), **to_conversation(example, name)})
    for index in range(100):
        turns = [{"from": "human", "value": "Name a shape."}, {"from": "gpt", "value": ("circle", "cross")[index % 2]}]
        conversations.insert(index * 10, {"id": f"text-{index}", "conversations": turns})
    (folder / "captions.json").write_text(json.dumps(captions))
    (folder / "conversations.json").write_text(json.dumps(conversations))
    questions = []
    for index, example in enumerate(heldout):
        path = folder / f"heldout{index}.png"
        example.image.save(path)
        questions.append({"image": str(path), "question": example.questions[0], "answer": example.answers[0]})
    (folder / "heldout.json").write_text(json.dumps(questions))
    return folder


def train(*args: str) -> None:
    """`dense-connector train` with a bundled recipe (`--config stage1`) and flags for a CPU run in miniature."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    cpu = ["--per_device_train_batch_size", "16", "--bf16", "false", "--tf32", "false", "--activation_checkpointing",
           "false", "--dataloader_num_workers", "0", "--save_strategy", "no", "--logging_steps", "10", "--use_cpu",
           "--seed", "0", "--disable_tqdm", "true"]  # fmt: skip
    result = subprocess.run(
        [str(Path(sys.executable).with_name("dense-connector")), "train", *args, *cpu],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, f"train failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


ANSWERS = """
import json
from transformers import pipeline

questions = json.load(open({heldout!r}))
chats = [[{{"role": "user", "content": [{{"type": "image", "path": q["image"]}},
                                         {{"type": "text", "text": q["question"]}}]}}] for q in questions]
answers = {{}}
for name, folder in {folders!r}.items():
    pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
    outputs = pipe(text=chats, max_new_tokens=8, return_full_text=False, batch_size=16)
    answers[name] = [output[0]["generated_text"].strip() for output in outputs]
print(json.dumps(answers))
"""


def test_build_stage_1_stage_2_then_answers_through_pipeline(tmp_path):
    built = built_model(tmp_path)
    data = write_data(tmp_path / "data")
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    train("--config", "stage1", "--model_name_or_path", str(built),
          "--data_path", str(data / "captions.json"), "--image_folder", str(data),
          "--max_steps", "60", "--output_dir", str(stage1))  # fmt: skip
    # no copy of the frozen parts: the projector, and the loss curve
    assert sorted(path.name for path in stage1.iterdir()) == ["loss_curve.png", "projector.safetensors"]
    train("--config", "stage2", "--model_name_or_path", str(built),
          "--pretrained_projector", str(stage1 / "projector.safetensors"),
          "--data_path", str(data / "conversations.json"), "--image_folder", str(data),
          "--learning_rate", "2e-3", "--max_steps", "120", "--output_dir", str(stage2))  # fmt: skip

    script = ANSWERS.format(heldout=str(data / "heldout.json"), folders={"built": str(built), "trained": str(stage2)})
    answers = json.loads(run_without_package(script, tmp_path).stdout.strip().splitlines()[-1])
    expected = [question["answer"] for question in json.loads((data / "heldout.json").read_text())]
    accuracy = {name: sum(a == b for a, b in zip(given, expected)) / len(expected) for name, given in answers.items()}
    print(f"held-out exact match: {accuracy}")
    assert accuracy["built"] <= 0.1 and accuracy["trained"] >= 0.35, accuracy
