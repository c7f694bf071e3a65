"""Synthetic evaluation data from `dense_connector.demo_data`, in every format the evaluation commands read.

`write_demo_data(folder)` writes, from the held-out shapes questions:

- `llava/questions.jsonl`, `llava/images/*.png` and `llava/expected.jsonl` (the right answers): the authors'
  LLaVA format, for `dense-connector eval --question-file`;
- `dc_shapes/`: a local dataset (`datasets` parquet folder) for this package's lmms-eval task `dc_shapes`
  (exact match, see `shapes_task`);
- `pope/`: a stand-in for lmms-eval's POPE dataset (same columns: yes/no questions about which colours and shapes
  the image holds), so that the stock POPE task file runs offline.

The demo checkpoint was trained on the plain questions, so the files carry no benchmark instruction.
"""

import importlib.util
import json
import random
from pathlib import Path

from ..demo_data import COLORS, HELDOUT_SEED, POSITIONS, draw_scene, make_examples, random_scene
from .benchmarks import write_task_files
from .shapes_task import TASK


def pope_rows(num_images: int, seed: int) -> list[dict]:
    """POPE-shaped records: per scene, "Is there a <kind> ...?" (yes) and "Is there a <colour> shape ...?" (no)."""
    rng = random.Random(seed)
    rows = []
    for index in range(num_images):
        scene = random_scene(rng, rng.randint(1, len(POSITIONS)))
        image = draw_scene(scene)
        present = rng.choice(scene).kind
        absent = rng.choice(sorted(set(COLORS) - {shape.color for shape in scene}))
        questions = (
            (f"Is there a {present} in the image?", "yes"),
            (f"Is there a {absent} shape in the image?", "no"),
        )
        for offset, (question, answer) in enumerate(questions):
            rows.append(
                {
                    "id": str(len(rows)),
                    "question_id": f"{index}-{offset}",
                    "question": question,
                    "answer": answer,
                    "image_source": f"scene-{index}",
                    "image": image,
                    "category": "random",
                }
            )
    return rows


def write_llava_files(folder: Path, num_images: int, seed: int) -> list:
    """`folder/questions.jsonl`, `folder/expected.jsonl` (right answers) and `folder/images/`; returns the examples."""
    examples = make_examples(num_images, seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    questions, answers = [], []
    for index, example in enumerate(examples):
        file = f"{index:04d}.png"
        example.image.save(folder / "images" / file)
        kind = example.question_types[0]
        questions.append({"question_id": index, "image": file, "text": example.questions[0], "category": kind})
        answers.append({"question_id": index, "answer": example.answers[0]})
    write_jsonl(folder / "questions.jsonl", questions)
    write_jsonl(folder / "expected.jsonl", answers)
    return examples


def write_demo_data(folder: str | Path, num_images: int = 16, seed: int = HELDOUT_SEED) -> list[Path]:
    """Write the demo questions (one per image, the four question types in turn); returns the folders written.

    The lmms-eval datasets need `datasets` and `lmms_eval` (the eval extra); without them only the LLaVA files are
    written (`datasets` alone, as TRL installs it, is not enough: the task files include lmms-eval's own).
    """
    folder = Path(folder)
    examples = write_llava_files(folder / "llava", num_images, seed)
    if importlib.util.find_spec("lmms_eval") is None or importlib.util.find_spec("datasets") is None:
        return [folder / "llava"]
    import datasets

    shapes = [
        {"question_id": index, "question": e.questions[0], "answer": e.answers[0], "image": e.image}
        for index, e in enumerate(examples)
    ]
    for name, rows in ((TASK, shapes), ("pope", pope_rows(num_images, seed))):
        table = datasets.Dataset.from_list(rows).cast_column("image", datasets.Image())
        (folder / name / "data").mkdir(parents=True, exist_ok=True)
        table.to_parquet(str(folder / name / "data" / "test-00000-of-00001.parquet"))
    write_gqa(folder / "gqa", examples)
    write_task_files(["shapes", "pope", "gqa"], folder, folder / "tasks")
    return [folder / "llava", folder / TASK, folder / "pope", folder / "gqa", folder / "tasks"]


GQA_CARD = """\
---
configs:
- config_name: testdev_balanced_instructions
  data_files:
  - split: testdev
    path: testdev_balanced_instructions/*.parquet
- config_name: testdev_balanced_images
  data_files:
  - split: testdev
    path: testdev_balanced_images/*.parquet
---
Stand-in for lmms-eval's GQA dataset, made from dense_connector.demo_data.
"""


def write_gqa(folder: Path, examples: list) -> None:
    """The shapes questions in the layout of lmms-eval's GQA dataset: questions and images in two configurations."""
    import datasets

    questions = [
        {"id": str(index), "imageId": f"n{index:04d}", "question": e.questions[0], "answer": e.answers[0]}
        for index, e in enumerate(examples)
    ]
    images = [{"id": f"n{index:04d}", "image": e.image} for index, e in enumerate(examples)]
    for config, rows in (("testdev_balanced_instructions", questions), ("testdev_balanced_images", images)):
        (folder / config).mkdir(parents=True, exist_ok=True)
        table = datasets.Dataset.from_list(rows)
        if "image" in rows[0]:
            table = table.cast_column("image", datasets.Image())
        table.to_parquet(str(folder / config / "testdev-00000-of-00001.parquet"))
    (folder / "README.md").write_text(GQA_CARD)


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
