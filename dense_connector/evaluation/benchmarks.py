"""The paper's image benchmarks through lmms-eval: run them, then tabulate and chart the scores beside the authors'.

`run_benchmarks` starts `python -m lmms_eval` (or `accelerate launch -m lmms_eval` on several GPUs) with this
package's `dense_connector` model, reads lmms-eval's results file, and writes `scores.md` (the columns of the authors'
model zoo, with their reported numbers beside ours when the checkpoint is one of theirs), `scores.json` and
`scores.png`. A benchmark whose dataset lies in `DATA_DIR/<task>` (a folder `datasets.load_dataset` reads, e.g. a
saved copy of the Hub dataset) runs from there, offline; the others use lmms-eval's Hub datasets.
"""

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from . import shapes_task


@dataclass(frozen=True)
class Benchmark:
    column: str  # the authors' model-zoo column
    task: str  # lmms-eval task name
    yaml: str  # the stock task file under lmms_eval/tasks/ ("" for tasks this package writes)
    metric: str  # the aggregated metric lmms-eval reports
    scale: float = 1.0  # to the paper's unit (percent, or MME's raw score)
    judge: bool = False  # scored by an LLM judge (needs an API key for lmms-eval's judge)


BENCHMARKS = {
    "textvqa": Benchmark("TextVQA", "textvqa_val", "textvqa/textvqa_val.yaml", "exact_match", 100),
    "sqa": Benchmark("SQA-I", "scienceqa_img", "scienceqa/scienceqa_img.yaml", "exact_match", 100),
    "gqa": Benchmark("GQA", "gqa", "gqa/gqa.yaml", "exact_match", 100),
    "llava-w": Benchmark(
        "LLaVA-W", "llava_in_the_wild", "llava-in-the-wild/llava-in-the-wild.yaml", "gpt_eval_llava_all", judge=True
    ),
    "mmbench": Benchmark("MMBench", "mmbench_en_dev", "mmbench/mmbench_en_dev.yaml", "gpt_eval_score", judge=True),
    "mm-vet": Benchmark("MM-Vet", "mmvet", "mmvet/mmvet.yaml", "gpt_eval_score", judge=True),
    "mmmu": Benchmark("MMMU", "mmmu_val", "mmmu/mmmu_val.yaml", "mmmu_acc", 100),
    "mathvista": Benchmark(
        "MathVista",
        "mathvista_testmini_format",
        "mathvista/mathvista_testmini_format.yaml",
        "llm_as_judge_eval",
        judge=True,
    ),
    "pope": Benchmark("POPE", "pope", "pope/pope.yaml", "pope_f1_score", 100),
    "mme": Benchmark("MME", "mme", "mme/mme.yaml", "mme_perception_score"),
    "shapes": Benchmark("Shapes (demo)", shapes_task.TASK, "", "exact_match", 100),
}
PAPER = ("textvqa", "sqa", "gqa", "llava-w", "mmbench", "mm-vet", "mmmu", "mathvista", "pope", "mme")

# The authors' model zoo (TextVQA, SQA-I, GQA, LLaVA-W, MMBench, MM-Vet, MMMU, MathVista), longest names first so
# that "DenseConnector-v1.5-SigLIP-7B-AnyRes" is not taken for "-7B".
REPORTED_COLUMNS = ("TextVQA", "SQA-I", "GQA", "LLaVA-W", "MMBench", "MM-Vet", "MMMU", "MathVista")
REPORTED = {
    "DenseConnector-v1.5-SigLIP-7B-AnyRes": (66.5, 69.3, 64.8, 70.7, 67.2, 34.8, 36.3, 27.0),
    "DenseConnector-v1.5-13B": (64.7, 73.0, 65.4, 73.6, 71.4, 41.6, 34.3, 29.6),
    "DenseConnector-v1.5-7B": (62.6, 70.5, 64.4, 67.4, 68.4, 35.4, 36.7, 25.5),
    "DenseConnector-v1.5-8B": (62.2, 75.2, 65.1, 68.8, 74.4, 34.6, 40.4, 28.6),
}


def parse_benchmarks(text: str) -> list[str]:
    """`"paper"` or a comma-separated list of benchmark names, checked."""
    names = list(PAPER) if text == "paper" else [name.strip().lower() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown or not names:
        raise ValueError(
            f"unknown benchmark(s) {', '.join(unknown) or text!r}; use 'paper' or some of: {', '.join(BENCHMARKS)}"
        )
    return names


def identify_release(model: str, name: str | None = None) -> str | None:
    """Which of the authors' releases `model` is: `name` if given, else from the path or Hub id, else from the model
    card that `dense-connector convert` writes ("Converted from ... `HuanjinYao/DenseConnector-v1.5-7B`")."""
    card = Path(model) / "README.md"
    texts = [name or "", model, card.read_text(errors="replace") if card.is_file() else ""]
    for text in texts:
        for release in REPORTED:
            if release in text:
                return release
    if name:
        raise ValueError(f"{name!r} is not one of the authors' releases: {', '.join(REPORTED)}")
    return None


def stock_task_file(benchmark: Benchmark) -> Path:
    return Path(str(resources.files("lmms_eval") / "tasks" / benchmark.yaml))


GQA_IMAGES = """\
\"\"\"GQA's images from a local copy of its dataset (written by `dense-connector eval`).\"\"\"

from dense_connector.evaluation.benchmarks import with_gqa_images


def process_docs(dataset):
    return with_gqa_images(dataset, {folder}, {cache})
"""


def with_gqa_images(dataset, folder: str, cache_dir: str):
    """GQA questions with an `image` column, looked up by `imageId` in the local copy's image configuration."""
    import datasets

    images = datasets.load_dataset(folder, "testdev_balanced_images", split="testdev", cache_dir=cache_dir)
    by_id = dict(zip(images["id"], images["image"]))
    missing = sorted(set(dataset["imageId"]) - set(by_id))
    if missing:
        raise ValueError(f"{folder} lacks the images {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return dataset.map(lambda doc: {"image": by_id[doc["imageId"]].convert("RGB")})


def cache_dir_for(local: Path, folder: Path) -> Path:
    """A `datasets` cache just for this copy of a dataset, as it is now.

    `datasets` names the cache of a local folder after the folder's name and its configuration, not its contents, so
    two copies called `gqa` (a stand-in and the real one) would otherwise share one cached table.
    """
    files = sorted(path for path in local.rglob("*") if path.is_file())
    stamp = [str(local.resolve())] + [
        f"{path.relative_to(local)}:{path.stat().st_size}:{path.stat().st_mtime_ns}" for path in files
    ]
    return folder.parent / "datasets-cache" / hashlib.sha256("\n".join(stamp).encode()).hexdigest()[:16]


def write_task_files(names: list[str], data_dir: Path | None, folder: Path) -> list[str]:
    """Task files pointing lmms-eval at local dataset folders; returns the task names to run, in order.

    A benchmark with `data_dir/<task>` gets `folder/<task>_local.yaml`, the stock task with `dataset_path` replaced
    (no Hub token asked for; a cache of its own, see `cache_dir_for`). GQA's stock task also fetches its images from
    a second Hub dataset: its local task reads them from the `testdev_balanced_images` configuration of the same local
    copy instead. The demo task `dc_shapes` always reads `data_dir/dc_shapes`.
    """
    folder.mkdir(parents=True, exist_ok=True)
    tasks = []
    for name in names:
        benchmark = BENCHMARKS[name]
        local = data_dir / benchmark.task if data_dir else None
        if name == "shapes":
            if local is None or not local.is_dir():
                raise ValueError("the shapes benchmark needs --data-dir with the demo data (see --write-demo-data)")
            cache = cache_dir_for(local, folder).resolve()
            (folder / f"{benchmark.task}.yaml").write_text(shapes_task.task_yaml(local.resolve(), cache))
            tasks.append(benchmark.task)
        elif local is not None and local.is_dir():
            task = f"{benchmark.task}_local"
            override = {
                "include": str(stock_task_file(benchmark)),
                "task": task,
                "dataset_path": str(local.resolve()),
                "dataset_kwargs": {"cache_dir": str(cache_dir_for(local, folder).resolve())},
            }
            lines = [f"{key}: {json.dumps(value)}\n" for key, value in override.items()]
            if name == "gqa":
                code = GQA_IMAGES.format(
                    folder=json.dumps(str(local.resolve())),
                    cache=json.dumps(str(cache_dir_for(local, folder).resolve())),
                )
                (folder / f"{task}_images.py").write_text(code)
                lines.append(f"process_docs: !function {task}_images.process_docs\n")
            (folder / f"{task}.yaml").write_text("".join(lines))
            tasks.append(task)
        else:
            tasks.append(benchmark.task)
    return tasks


def lmms_eval_command(
    model: str,
    tasks: list[str],
    output: Path,
    include_path: Path,
    batch_size: int = 8,
    limit: int | None = None,
    num_gpus: int = 1,
    model_args: str = "",
) -> list[str]:
    """The lmms-eval command line; several GPUs run data-parallel under `accelerate launch`."""
    launcher = [sys.executable, "-m"]
    if num_gpus > 1:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_gpus), "-m"]
    arguments = f"pretrained={Path(model).resolve() if Path(model).is_dir() else model}"
    arguments += f",{model_args}" if model_args else ""
    command = [*launcher, "lmms_eval", "--model", "dense_connector", "--model_args", arguments]
    command += ["--tasks", ",".join(tasks), "--batch_size", str(batch_size), "--include_path", str(include_path)]
    command += ["--output_path", str(output), "--log_samples"]
    return command + (["--limit", str(limit)] if limit else [])


def latest_results(output: Path) -> dict:
    files = sorted(output.rglob("*_results.json"), key=lambda path: path.stat().st_mtime)
    if not files:
        raise RuntimeError(f"lmms-eval wrote no results under {output}; see its messages above")
    return json.loads(files[-1].read_text())


def scores_from_results(results: dict, names: list[str], tasks: list[str]) -> dict[str, float | None]:
    """Model-zoo column -> score in the paper's unit (None where lmms-eval reported nothing usable)."""
    scores = {}
    for name, task in zip(names, tasks):
        benchmark = BENCHMARKS[name]
        value = results.get("results", {}).get(task, {}).get(f"{benchmark.metric},none")
        scores[benchmark.column] = round(value * benchmark.scale, 2) if isinstance(value, int | float) else None
    return scores


def markdown_table(scores: dict[str, float | None], model_name: str, release: str | None) -> str:
    """One row for this run and, for one of the authors' releases, one row with their reported numbers."""
    columns = list(scores)
    reported = dict(zip(REPORTED_COLUMNS, REPORTED[release])) if release else {}

    def cell(value) -> str:
        return "–" if value is None else f"{value:g}"

    lines = [
        "| model | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
        f"| {model_name} (this run) | " + " | ".join(cell(scores[c]) for c in columns) + " |",
    ]
    if release:
        lines.append(f"| {release} (reported) | " + " | ".join(cell(reported.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def plot_scores(scores: dict[str, float | None], model_name: str, release: str | None, path: Path) -> None:
    """Bar chart, one group per benchmark: this run, and the authors' reported number where there is one.

    MME (a raw score out of 2000) is left out of the chart so that the percentages stay readable; the table has it.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    columns = [column for column in scores if column != "MME"]
    reported = dict(zip(REPORTED_COLUMNS, REPORTED[release])) if release else {}
    positions = range(len(columns))
    width = 0.4 if release else 0.6
    figure, axes = pyplot.subplots(figsize=(max(5.0, 1.1 * len(columns) + 1.5), 4.5))
    ours = [scores[column] or 0.0 for column in columns]
    bars = axes.bar(
        [p - (width / 2 if release else 0) for p in positions], ours, width, label=f"{model_name} (this run)"
    )
    axes.bar_label(bars, labels=[("–" if scores[c] is None else f"{scores[c]:.1f}") for c in columns], fontsize=8)
    if release:
        theirs = [reported.get(column) or 0.0 for column in columns]
        bars = axes.bar([p + width / 2 for p in positions], theirs, width, label=f"{release} (reported)")
        axes.bar_label(
            bars, labels=[("–" if c not in reported else f"{reported[c]:.1f}") for c in columns], fontsize=8
        )
    axes.set_xticks(list(positions), columns, rotation=20)
    axes.set_ylabel("score (%)")
    axes.set_ylim(0, 105)
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=8, frameon=False)
    axes.set_title("Dense Connector benchmarks" + (" (MME, a raw score, is in scores.md)" if "MME" in scores else ""))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def run_benchmarks(
    model: str,
    names: list[str],
    output: Path,
    data_dir: Path | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    gpus: list[str] | None = None,
    model_args: str = "",
    release: str | None = None,
) -> dict[str, float | None]:
    """Run lmms-eval, then write `scores.md`, `scores.json` and `scores.png` into `output`; return the scores."""
    output.mkdir(parents=True, exist_ok=True)
    tasks = write_task_files(names, data_dir, output / "tasks")
    gpus = gpus or []
    command = lmms_eval_command(
        model, tasks, output / "lmms-eval", output / "tasks", batch_size, limit, max(len(gpus), 1), model_args
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(gpus)} if gpus else dict(os.environ)
    if (
        Path(model).is_dir()
        and data_dir
        and all(task.endswith("_local") or name == "shapes" for name, task in zip(names, tasks))
    ):
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")  # everything is local: never ask the Hub
    code = subprocess.run(command, env=env).returncode
    if code != 0:
        raise RuntimeError(f"lmms-eval stopped with exit code {code}; its messages above say why")
    scores = scores_from_results(latest_results(output / "lmms-eval"), names, tasks)
    model_name = Path(model.rstrip("/")).name
    release = identify_release(model, release)
    (output / "scores.md").write_text(markdown_table(scores, model_name, release))
    (output / "scores.json").write_text(
        json.dumps({"model": model, "release": release, "scores": scores}, indent=2) + "\n"
    )
    plot_scores(scores, model_name, release, output / "scores.png")
    return scores
