"""`dense-connector train` and `dense-connector check-data` (also `python -m dense_connector.training`, and
`examples/finetune.py`, which `accelerate launch` runs on several GPUs).

`train` loads the checkpoint's processor, checks every record of every source before anything is written (one line
per bad record; without `--skip_bad_records` it exits non-zero before the output folder exists), then loads the
model, sets the regime and runs the `DenseConnectorTrainer` with progress (tokens/s, samples/s, ETA) in its logs, an
optional evaluation task, and `loss_curve.png` in the output folder at the end. `check-data` runs the data check
alone. Bad input gets one line naming the option, source or record and what to do (`--traceback`: the traceback); a run
that fails before writing a checkpoint removes the output folder it created.
"""

import contextlib
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from ..chat_templates import CHAT_TEMPLATES, STOP_TOKENS, VERSION_TEMPLATES, stop_token_ids
from ..checkpoints import PROG, UsageError, one_line, read_config
from .checks import RecordChecker, check_records, report_lines
from .data import load_instruction_data
from .options import bundled_recipes, parse_options, recipe_path
from .progress import LossCurveCallback, ShapesTask, Throughput
from .regimes import prepare_for_training, trainable_parameter_summary
from .sources import Mixture, RecordSubset, StreamedRecords, load_records, sources_from
from .trainer import DenseConnectorTrainer, load_pretrained_projector


logger = logging.getLogger(__name__)

SKIPPED_FILE = "skipped_records.txt"


class DataError(UsageError):
    """Records that cannot be trained on (each already printed on its own line)."""


def set_chat_template(processor, version: str | None) -> None:
    """The chat template of `--version`; the checkpoint's without it."""
    if version is not None:
        processor.chat_template = CHAT_TEMPLATES[VERSION_TEMPLATES[version]]
    if processor.chat_template is None:
        raise UsageError("the checkpoint's processor has no chat template; pass --version (plain, v1 or llama_3)")


def set_conversation_format(processor, model, version: str | None) -> None:
    """The chat template of `--version` and the stop tokens generation uses with it; the checkpoint's without it."""
    set_chat_template(processor, version)
    template = VERSION_TEMPLATES.get(version)
    if template in STOP_TOKENS:
        model.generation_config.eos_token_id = stop_token_ids(processor.tokenizer, template)


def check_model(name: str | None) -> None:
    """Refuse, in one line, what is not a Dense Connector checkpoint (a text-only LM: build one from it first)."""
    if not name:
        raise UsageError("give --model_name_or_path: a Dense Connector checkpoint (built, converted or trained)")
    config = read_config(name)
    if "mm_dense_connector_type" in config:
        raise UsageError(f"{name} is an original Dense Connector checkpoint; convert it first (`{PROG} convert`)")
    if config.get("model_type") == "dense_connector":
        return
    if "vision_config" not in config and config.get("model_type"):
        build = f"{PROG} build --vision-tower openai/clip-vit-large-patch14-336 --language-model {name} --output DIR"
        kind = config["model_type"]
        raise UsageError(f"{name} is a text-only language model ({kind}); make a Dense Connector model from it first: "
                         f"{build}, then train DIR")  # fmt: skip
    raise UsageError(f"{name} is a {config.get('model_type')!r} checkpoint, not a Dense Connector one")


def streamed_check(checker: RecordChecker, name: str, skip: bool, skipped_file: Path):
    """The check of a streamed source's records, one at a time as they come; with `skip`, each bad record is logged
    and added to `skipped_file` as it is found (the whole list is not known before training)."""

    def check(record, number):
        bad, _ = checker.check({number: record}, [number], name)
        if not bad:
            return record
        if skip:
            logger.warning(f"skipped {bad[0].line()}")
            skipped_file.parent.mkdir(parents=True, exist_ok=True)
            with skipped_file.open("a") as file:
                file.write(bad[0].line() + "\n")
            return None
        raise DataError(f"{bad[0].line()} (--skip_bad_records skips such records)")

    return check


def training_data(data_args, processor, seed: int = 0, output_dir: str = "."):
    """The checked training records (a mixture when several sources are given), and the data check's reports."""
    sources = sources_from(data_args)
    checker = RecordChecker(processor, data_args.model_max_length)
    parts, reports = [], []
    for source in sources:
        records = load_records(source)
        if isinstance(records, StreamedRecords):
            if len(sources) > 1:
                raise UsageError(f"{source.name}: a streamed source cannot be mixed with others; drop `streaming`")
            skipped_file = Path(output_dir) / SKIPPED_FILE
            records.check = streamed_check(checker, source.name, data_args.skip_bad_records, skipped_file)
            parts.append(records)
            continue
        report = check_records(records, checker, source.name, data_args.check_workers)
        logger.info(f"data check: {report.summary()}")
        reports.append(report)
        if report.bad and data_args.skip_bad_records:
            bad = {record.index for record in report.bad}
            records = RecordSubset(records, [index for index in range(len(records)) if index not in bad])
            if not len(records):
                print("\n".join(report_lines([report])), file=sys.stderr)
                raise DataError(f"no record of {source.name} can be trained on (listed above)")
        parts.append(records)
    bad = sum(len(report.bad) for report in reports)
    if bad and not data_args.skip_bad_records:
        for line in report_lines(reports):
            print(line, file=sys.stderr)
        total = sum(report.checked for report in reports)
        raise DataError(f"{bad:,} of {total:,} records cannot be trained on (listed above); fix them, or pass "
                        "--skip_bad_records to train on the others")  # fmt: skip
    if len(parts) == 1:
        return parts[0], reports
    mixture = Mixture(parts, [source.weight for source in sources], seed)
    shares = ", ".join(f"{source.name}: {count:,}" for source, count in zip(sources, mixture.counts()))
    logger.info(f"mixture of {len(mixture):,} records an epoch ({shares})")
    return mixture, reports


def build_trainer(model_args, data_args, training_args) -> DenseConnectorTrainer:
    """Checked data, model, processor and `DenseConnectorTrainer`, ready for `.train()`."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor, set_seed

    import dense_connector  # noqa: F401  (registers the Dense Connector classes with the Auto classes)

    if getattr(training_args, "save_projector_only", False) and model_args.tune != "projector":
        raise UsageError(f"--save_projector_only needs --tune projector (got --tune {model_args.tune}): the other "
                         "regimes train weights that projector.safetensors does not hold")  # fmt: skip
    check_model(model_args.model_name_or_path)
    processor = AutoProcessor.from_pretrained(model_args.model_name_or_path)
    set_chat_template(processor, data_args.version)
    train_dataset, reports = training_data(data_args, processor, training_args.seed, training_args.output_dir)
    if isinstance(train_dataset, StreamedRecords):
        if training_args.max_steps <= 0:
            raise UsageError("--streaming needs --max_steps: a stream has no length to count epochs by")
        training_args.dataloader_num_workers = 0  # each worker would read the whole stream again
    eval_dataset = None
    if data_args.eval_data_path:
        eval_dataset = load_instruction_data(data_args.eval_data_path)
        report = check_records(eval_dataset, RecordChecker(processor, data_args.model_max_length), "eval records")
        if report.bad:
            print("\n".join(report_lines([report])), file=sys.stderr)
            raise DataError(f"{len(report.bad)} records of --eval_data_path cannot be evaluated on (listed above)")

    dtype = getattr(torch, model_args.dtype) if model_args.dtype else None
    set_seed(training_args.seed)  # what is initialised here (LoRA) is then the same in every run and on every rank
    model = AutoModelForImageTextToText.from_pretrained(
        model_args.model_name_or_path, dtype=dtype, attn_implementation=model_args.attn_implementation
    )
    set_conversation_format(processor, model, data_args.version)
    if model_args.pretrained_projector:
        load_pretrained_projector(model, model_args.pretrained_projector)
    model = prepare_for_training(
        model,
        tune=model_args.tune,
        freeze_vision_tower=model_args.freeze_vision_tower,
        lora_r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
    )
    logger.info(trainable_parameter_summary(model))

    # The collator reads the raw record fields, which the Trainer would otherwise remove.
    training_args.remove_unused_columns = False
    # Every trainable parameter takes part in every step (a text-only batch runs the tower on a zero image), so DDP
    # needs no extra pass over the graph to find unused ones; a trained tower has some (its unread last layers).
    if training_args.ddp_find_unused_parameters is None:
        training_args.ddp_find_unused_parameters = not model_args.freeze_vision_tower
    task = ShapesTask(data_args.eval_samples) if data_args.eval_task == "shapes" else None
    if task is not None:
        eval_dataset = eval_dataset if eval_dataset is not None else task.records()
        task.schedule(training_args)
    from .collator import DenseConnectorDataCollator

    collator = DenseConnectorDataCollator(
        processor, max_length=data_args.model_max_length, padding_free=training_args.padding_free
    )
    trainer = DenseConnectorTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=processor,
        callbacks=[LossCurveCallback()],
    )
    trainer.throughput, trainer.eval_task = Throughput(processor.image_token_id), task
    trainer.add_callback(trainer.throughput)
    trainer.data_reports = reports
    return trainer


def write_skipped(trainer) -> None:
    """The skipped records, one line each, in the log and OUTPUT_DIR/skipped_records.txt (main process)."""
    lines = report_lines(trainer.data_reports, limit=None)
    if not lines or not trainer.args.should_save:
        return
    for line in lines[:50]:
        logger.warning(f"skipped {line}")
    folder = Path(trainer.args.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SKIPPED_FILE).write_text("\n".join(lines) + "\n")
    logger.warning(f"skipped {len(lines):,} bad records; all are listed in {folder / SKIPPED_FILE}")


@contextlib.contextmanager
def removed_if_failed(output_dir: str | None) -> Iterator[None]:
    """Remove the output folder this run created if the run fails before writing a checkpoint into it."""
    folder = Path(output_dir) if output_dir else None
    existed = folder is None or folder.exists()
    try:
        yield
    except BaseException:
        main_process = int(os.environ.get("RANK", 0)) == 0
        if not existed and main_process and folder.is_dir():
            if any(folder.glob("checkpoint-*")):
                logger.error(f"the checkpoints written so far are kept in {folder} (--resume_from_checkpoint)")
            else:
                shutil.rmtree(folder, ignore_errors=True)
        raise


def train(argv: list[str], prog: str = f"{PROG} train", description: str | None = None):
    """Parse the options, check the data, train and save; returns the `Trainer`."""
    model_args, data_args, training_args, _ = parse_options(argv, prog, description=description)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    with removed_if_failed(training_args.output_dir):
        trainer = build_trainer(model_args, data_args, training_args)
        write_skipped(trainer)
        trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        # the full model, the LoRA adapter with the projector, or (--save_projector_only) projector.safetensors; the
        # processor alongside the first two
        trainer.save_model()
    return trainer


def check_data(argv: list[str], prog: str = f"{PROG} check-data", description: str | None = None) -> int:
    """The data check alone: every bad record on stdout, a summary per source on stderr; 1 if any is bad."""
    from transformers import AutoProcessor

    import dense_connector  # noqa: F401

    model_args, data_args, _, _ = parse_options(argv, prog, training=False, description=description)
    check_model(model_args.model_name_or_path)
    processor = AutoProcessor.from_pretrained(model_args.model_name_or_path)
    set_chat_template(processor, data_args.version)
    checker, reports = RecordChecker(processor, data_args.model_max_length), []
    for source in sources_from(data_args):
        if source.streaming:
            raise UsageError(f"{source.name}: check-data reads whole sources; drop --streaming")
        reports.append(check_records(load_records(source), checker, source.name, data_args.check_workers))
        print(f"{prog}: {reports[-1].summary()}", file=sys.stderr)
    for line in report_lines(reports, limit=None):
        print(line)
    return 1 if any(report.bad for report in reports) else 0


def list_recipes() -> int:
    for name, summary in bundled_recipes().items():
        print(f"{name}\t{recipe_path(name)}\n\t{summary}")
    return 0


def main(
    argv: list[str] | None = None, command: str = "train", debug: bool = False, description: str | None = None
) -> int:
    """`dense-connector train` (or `check-data`) with one-line errors; `--traceback` (or `dense-connector --debug
    train`) shows the traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    prog = f"{PROG} {command}"
    try:
        if "--list_recipes" in argv:
            return list_recipes()
        if command == "check-data":
            return check_data(argv, prog, description)
        trainer = train(argv, prog, description)
        # the process group's threads must stop before the interpreter exits, or a process can abort at exit
        # ("terminate called without an active exception") after a successful run
        trainer.accelerator.end_training()
        return 0
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except Exception as error:
        if debug or "--traceback" in argv:
            raise
        if isinstance(error, UsageError):
            print(f"{prog}: error: {error}", file=sys.stderr)
        else:
            print(f"{prog}: error: {type(error).__name__}: {one_line(error)} (run with --traceback for the traceback)",
                  file=sys.stderr)  # fmt: skip
        return 1
