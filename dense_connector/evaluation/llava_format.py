"""The authors' own evaluation format (LLaVA's `model_vqa_loader`): question files in, answer files out.

A question file has one JSON record per line with `question_id`, `image` (a path under the image folder; absent for a
text-only question) and `text` (the question, with the benchmark's instruction already appended, as in LLaVA's files).
The answer file gets one record per question, in question order, in the original's format: `question_id`, `prompt`
(the question text), `text` (the answer), `answer_id`, `model_id` (the checkpoint folder's name), `metadata` (`{}`),
so the official scoring scripts (GQA's `eval.py`, POPE, MME, TextVQA) read it unchanged.

The answer file is written atomically: to a hidden file beside it, moved into place only when every question is
answered, so a run stopped by an error or Ctrl-C leaves no partial answer file (and an older complete one untouched);
missing images are reported before the model loads.

Several GPUs split the questions into contiguous chunks as the original scripts do (`--num-chunks`/`--chunk-idx`: one
process per chunk, then the chunk files are concatenated in order); `run_on_gpus` does all of that in one call.
"""

import json
import math
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from ..writing.staging import staged_file
from .generator import Answerer, GenerationSettings


def read_questions(path: str | Path) -> list[dict]:
    """Records of a LLaVA question file (`.jsonl`, one per line), with a clear error for a malformed one."""
    records = []
    with open(path) as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number} is not a JSON record ({error.msg})") from error
            missing = [key for key in ("question_id", "text") if key not in record]
            if missing:
                raise ValueError(
                    f"{path}:{number} lacks {', '.join(missing)}; each question needs question_id and text"
                )
            records.append(record)
    return records


def chunk(records: list, num_chunks: int, index: int) -> list:
    """The `index`-th of `num_chunks` contiguous chunks of ceil(len / num_chunks) records (empty past the end)."""
    if not 0 <= index < num_chunks:
        raise ValueError(f"chunk index {index} is outside 0..{num_chunks - 1}")
    size = math.ceil(len(records) / num_chunks)
    return records[index * size : (index + 1) * size]


def model_id(model_path: str) -> str:
    """The original's model name: the folder's name, prefixed by its parent for a `checkpoint-N` folder."""
    parts = Path(model_path.rstrip("/")).parts
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:
        return f"{parts[-2]}_{parts[-1]}"
    return parts[-1]


def check_images(records: list[dict], image_folder: str | Path) -> None:
    """Raise FileNotFoundError naming the first question whose image is missing (and how many are), before any
    answering starts."""
    missing = [r for r in records if r.get("image") and not (Path(image_folder) / r["image"]).is_file()]
    if missing:
        first = missing[0]
        raise FileNotFoundError(
            f"question {first['question_id']}: image {Path(image_folder) / first['image']} not found ({len(missing)} "
            f"of {len(records)} questions have no image file; check --image-folder)"
        )


def load_images(record: dict, image_folder: str | Path) -> list[Image.Image]:
    if not record.get("image"):
        return []
    path = Path(image_folder) / record["image"]
    if not path.is_file():
        raise FileNotFoundError(f"question {record['question_id']}: image {path} not found")
    with Image.open(path) as image:
        return [image.convert("RGB")]


def batches(records: list[dict], batch_size: int) -> Iterator[list[dict]]:
    for start in range(0, len(records), batch_size):
        yield records[start : start + batch_size]


def answer_file(
    answerer: Answerer,
    questions: list[dict],
    image_folder: str | Path,
    answers_file: str | Path,
    model_name: str,
    settings: GenerationSettings,
    batch_size: int = 8,
    progress: bool = True,
) -> int:
    """Answer `questions` in batches and write the answer file (atomically: complete or not at all); returns the
    number of answers written."""
    check_images(questions, image_folder)
    with (
        staged_file(Path(answers_file)) as staging,
        open(staging, "w") as out,
        tqdm(total=len(questions), desc="answering", disable=not progress) as bar,
    ):
        for batch in batches(questions, batch_size):
            images = [load_images(record, image_folder) for record in batch]
            texts = answerer.answer(images, [record["text"] for record in batch], settings)
            for record, text in zip(batch, texts):
                answer = {
                    "question_id": record["question_id"],
                    "prompt": record["text"],
                    "text": text,
                    "answer_id": uuid.uuid4().hex,
                    "model_id": model_name,
                    "metadata": {},
                }
                out.write(json.dumps(answer) + "\n")
            out.flush()
            bar.update(len(batch))
    return len(questions)


def chunk_file(answers_file: str | Path, num_chunks: int, index: int) -> Path:
    """Where chunk `index` writes its answers: `A.jsonl` -> `A.chunks/8_3.jsonl`, as the original scripts name them."""
    answers_file = Path(answers_file)
    return answers_file.with_suffix(".chunks") / f"{num_chunks}_{index}.jsonl"


def run_on_gpus(argv: list[str], gpus: list[str], answers_file: str | Path) -> None:
    """Run this command once per GPU (`CUDA_VISIBLE_DEVICES` set, one chunk each) and merge the chunks in order.

    `argv` is the `dense-connector eval` argument list without `--gpus`; each process gets `--num-chunks`,
    `--chunk-idx` and its own chunk file as `--answers-file`.
    """
    files = [chunk_file(answers_file, len(gpus), index) for index in range(len(gpus))]
    processes = []
    for index, (gpu, path) in enumerate(zip(gpus, files)):
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu}
        command = [sys.executable, "-m", "dense_connector.cli", "eval", *argv]
        command += ["--num-chunks", str(len(gpus)), "--chunk-idx", str(index), "--answers-file", str(path)]
        processes.append(subprocess.Popen(command, env=env))
    failed = [gpu for gpu, process in zip(gpus, processes) if process.wait() != 0]
    if failed:
        raise RuntimeError(f"the processes on GPU(s) {', '.join(failed)} failed; see their messages above")
    with staged_file(Path(answers_file)) as staging, open(staging, "w") as merged:
        for path in files:
            merged.write(path.read_text())
