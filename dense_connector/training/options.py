"""The options of `dense-connector train` and `check-data`: model and data dataclasses, recipe files, parsing.

The command's options are the fields of `ModelArguments`, `DataArguments` and `DenseConnectorTrainingArguments`,
read by transformers' `HfArgumentParser`, so a field added to any of them is an option at once. `--config FILE` (a
YAML recipe whose keys are option names, or the name of a recipe shipped in `recipes/`) is read first and the flags
on the command line override it; its `datasets:` list (a weighted mixture of sources) becomes `--datasets` as JSON.
"""

import argparse
import json
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path

from transformers import HfArgumentParser, TrainingArguments

from ..chat_templates import VERSION_TEMPLATES
from ..checkpoints import UsageError
from .regimes import TUNE_REGIMES
from .trainer import DenseConnectorTrainingArguments


EVAL_TASKS = ("shapes",)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Dense Connector checkpoint: built (`dense-connector build`), converted or trained."},
    )
    pretrained_projector: str | None = field(
        default=None,
        metadata={"help": "Stage 1's projector.safetensors (or the original's mm_projector.bin), loaded into the "
                  "model before training; the model must be built from the same parts."},
    )  # fmt: skip
    tune: str = field(default="projector+lm", metadata={"help": "What to train.", "choices": TUNE_REGIMES})
    freeze_vision_tower: bool = field(default=True, metadata={"help": "Keep the vision tower frozen."})
    lora_r: int = field(default=128, metadata={"help": "LoRA rank (with --tune lora)."})
    lora_alpha: int = field(default=256, metadata={"help": "LoRA alpha (with --tune lora)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout (with --tune lora)."})
    dtype: str | None = field(
        default=None,
        metadata={"help": "Load the weights in this dtype (e.g. bfloat16, as in the original DeepSpeed runs). The "
                  "default keeps float32 master weights; --bf16 then trains with autocast."},
    )  # fmt: skip
    attn_implementation: str | None = field(default=None, metadata={"help": "e.g. sdpa, eager, flash_attention_2."})


@dataclass
class DataArguments:
    data_path: str | None = field(default=None, metadata={"help": "Training records: a JSON list or a .jsonl file."})
    image_folder: str | None = field(default=None, metadata={"help": "Folder the records' image paths are under."})
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A dataset through the `datasets` library instead of --data_path: a Hub id or a local "
                  "folder (parquet, arrow, json), with TRL's `messages` + `images` or LLaVA's `conversations` + "
                  "`image` columns; images embedded or as paths (under --image_folder)."},
    )  # fmt: skip
    dataset_config: str | None = field(default=None, metadata={"help": "The dataset's configuration (subset)."})
    dataset_split: str = field(default="train", metadata={"help": "The dataset's split."})
    streaming: bool = field(
        default=False,
        metadata={"help": "Read --dataset_name as a stream (needs --max_steps); its records are checked as they "
                  "come instead of before the first step."},
    )  # fmt: skip
    datasets: str | None = field(
        default=None,
        metadata={"help": "A weighted mixture of sources, as a recipe's `datasets:` list (JSON on the command "
                  "line): [{\"data_path\": ..., \"image_folder\": ..., \"weight\": 0.7}, {\"dataset_name\": ..., "
                  "\"weight\": 0.3}]; each source takes the options above."},
    )  # fmt: skip
    eval_data_path: str | None = field(default=None, metadata={"help": "Optional evaluation records."})
    version: str | None = field(
        default=None,
        metadata={"help": "Conversation format, the original's names: plain (stage 1: image + caption), v1 / "
                  "vicuna_v1, llama_3. It becomes the saved chat template. Default: the checkpoint's chat template.",
                  "choices": sorted(VERSION_TEMPLATES)},
    )  # fmt: skip
    model_max_length: int = field(
        default=2048,
        metadata={"help": "Maximum sequence length after image placeholders are expanded; longer records are "
                  "truncated, and records whose image placeholders do not fit are refused by the data check."},
    )  # fmt: skip
    skip_bad_records: bool = field(
        default=False,
        metadata={"help": "Train on the records that pass the data check; the others are named, with the reason, "
                  "in the log and in OUTPUT_DIR/skipped_records.txt."},
    )  # fmt: skip
    check_workers: int | None = field(
        default=None, metadata={"help": "Processes checking the records (default: the CPUs, at most 16)."}
    )
    eval_task: str | None = field(
        default=None,
        metadata={"help": "Evaluate while training: `shapes` asks the demo's held-out shapes questions (exact match) "
                  "every --eval_steps, logged as eval_shapes_exact_match.", "choices": EVAL_TASKS},
    )  # fmt: skip
    eval_samples: int = field(default=16, metadata={"help": "Held-out questions per --eval_task evaluation."})


RECIPES = resources.files("dense_connector.training") / "recipes"


def bundled_recipes() -> dict[str, str]:
    """The recipes shipped with the package: name -> the first line of its comment."""
    recipes = {}
    for entry in sorted(RECIPES.iterdir(), key=lambda entry: entry.name):
        if entry.name.endswith(".yaml"):
            first = entry.read_text().splitlines()[0]
            recipes[entry.name.removesuffix(".yaml")] = first.lstrip("# ")
    return recipes


def recipe_path(name: str) -> Path:
    """A recipe file: a path, or the name of a bundled recipe (`stage1`, `stage2`)."""
    path = Path(name)
    if path.is_file():
        return path
    bundled = RECIPES / f"{name.removesuffix('.yaml')}.yaml"
    if bundled.is_file():
        return Path(str(bundled))
    raise UsageError(f"--config {name}: no such file, nor a bundled recipe ({', '.join(bundled_recipes())})")


def option_names(parser: argparse.ArgumentParser) -> set[str]:
    """The parser's long options, with `activation_checkpointing*` where transformers before 5.20 spells it
    `gradient_checkpointing*` (`older_spellings` translates both the flags and a recipe's keys)."""
    names = {option[2:] for action in parser._actions for option in action.option_strings if option.startswith("--")}
    return names | {name.replace("gradient_", "activation_", 1) for name in names if "gradient_checkpointing" in name}


def config_argv(name: str, known: set[str], ignored: set[str] = frozenset()) -> list[str]:
    """The recipe's keys as command-line flags, to be parsed before the real ones (which then override them)."""
    import yaml

    path = recipe_path(name)
    try:
        recipe = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise UsageError(f"--config {path} is not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(recipe, dict):
        raise UsageError(f"--config {path} must map option names to values (e.g. `learning_rate: 2.0e-5`)")
    argv = []
    for key, value in recipe.items():
        key = str(key)
        if key in ignored or value is None:
            continue
        if key not in known:
            raise UsageError(f"--config {path}: `{key}` is not an option of this command; see its --help")
        if key == "datasets" and not isinstance(value, str):
            value = json.dumps(value)
        if isinstance(value, bool):
            argv += [f"--{key}", str(value).lower()]
        elif isinstance(value, list):
            argv += [f"--{key}", *map(str, value)]
        elif isinstance(value, dict):
            argv += [f"--{key}", json.dumps(value)]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def older_spellings(argv: list[str]) -> list[str]:
    """`--activation_checkpointing*` as `--gradient_checkpointing*`, its name before transformers 5.20."""
    if "activation_checkpointing" in {f.name for f in fields(TrainingArguments)}:
        return argv
    return [arg.replace("--activation_checkpointing", "--gradient_checkpointing", 1) for arg in argv]


def add_command_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a YAML recipe (keys: these options; flags override it), or a bundled "
                        "recipe's name: " + ", ".join(bundled_recipes()))  # fmt: skip
    parser.add_argument("--list_recipes", action="store_true", help="list the bundled recipes and exit")
    parser.add_argument("--traceback", action="store_true", help="show full tracebacks on errors")


def build_parser(prog: str, training: bool = True, description: str | None = None) -> HfArgumentParser:
    types = (ModelArguments, DataArguments) + ((DenseConnectorTrainingArguments,) if training else ())
    parser = HfArgumentParser(types, prog=prog, description=description)
    add_command_options(parser)
    return parser


def parse_options(argv: list[str], prog: str, training: bool = True, description: str | None = None) -> tuple:
    """(model, data, training arguments or None, the namespace of --config/--list_recipes/--traceback)."""
    parser = build_parser(prog, training, description)
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--config")
    config, _ = first.parse_known_args(argv)
    argv = older_spellings(argv)
    if config.config:
        ignored = set() if training else {f.name for f in fields(DenseConnectorTrainingArguments)}
        argv = older_spellings(config_argv(config.config, option_names(parser), ignored)) + argv
    parsed = parser.parse_args_into_dataclasses(args=argv)
    if training:
        return parsed
    return parsed[0], parsed[1], None, parsed[2]
