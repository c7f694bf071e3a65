"""The lmms-eval task `dc_shapes`: the demo's held-out shapes questions, scored by exact match.

`task_yaml` writes its task file; lmms-eval then calls the functions below by their dotted names.
"""

import json
from pathlib import Path


TASK = "dc_shapes"
TASK_YAML = """\
task: {task}
dataset_path: {dataset_path}
dataset_kwargs:
  cache_dir: {cache_dir}
test_split: test
output_type: generate_until
doc_to_visual: !function dense_connector.evaluation.shapes_task.doc_to_visual
doc_to_text: !function dense_connector.evaluation.shapes_task.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 16  # the longest demo answer, a one-shape caption, is 7 tokens
  temperature: 0
  do_sample: false
process_results: !function dense_connector.evaluation.shapes_task.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def doc_to_visual(doc: dict) -> list:
    return [doc["image"].convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["question"]


def process_results(doc: dict, results: list[str]) -> dict:
    return {"exact_match": float(results[0].strip().lower() == doc["answer"])}


def task_yaml(dataset_path: Path, cache_dir: Path) -> str:
    """The `dc_shapes` task file, reading the dataset folder `dataset_path` (cached in `cache_dir`)."""
    return TASK_YAML.format(
        task=TASK, dataset_path=json.dumps(str(dataset_path)), cache_dir=json.dumps(str(cache_dir))
    )
