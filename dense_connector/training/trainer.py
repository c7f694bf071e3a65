"""The original's `Trainer` choices for Dense Connector models: batches of one modality, a projector learning rate,
and a stage-1 output of the projector alone.

`DenseConnectorTrainer` is the Hugging Face `Trainer` with three of the original `LLaVATrainer`'s behaviours:
`group_by_modality_length` draws every optimizer step's records from image records only or text-only records only
(the original's sampler for the 665K mix, so no step pays the tower for a batch of text), `group_by_length` groups
raw instruction records by length (the stock `Trainer` can only measure datasets of token ids; both samplers read
the collator's exact token lengths, the original's word counts with another collator), and `mm_projector_lr`
gives the projector its own learning rate. `save_projector_only` makes stage 1 write `projector.safetensors` (the
original's `mm_projector.bin`) instead of a copy of the frozen tower and language model; `load_pretrained_projector`
puts it, or the original's file, into a model built from the same parts for stage 2.
"""

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Sampler
from transformers import Trainer, TrainingArguments
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

from .attention import use_varlen_sdpa
from .collator import DenseConnectorDataCollator
from .data import record_to_messages
from .losses import use_memory_efficient_loss


logger = logging.getLogger(__name__)

PROJECTOR_FILE = "projector.safetensors"
# What stage 1 trains and saves: the projector, and AnyRes `image_newline` (the original's `mm_projector` keys)
PROJECTOR_PREFIXES = ("model.connector.", "model.image_newline")
IMAGE_TOKENS_GUESS = 128  # what the original's `lengths` adds for an image record's placeholders


@dataclass
class DenseConnectorTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the original training script's extra options."""

    group_by_length: bool = field(
        default=False,
        metadata={"help": "Batches of records of similar length (the original's name for "
                  "--train_sampling_strategy group_by_length)."},
    )  # fmt: skip
    group_by_modality_length: bool = field(
        default=False,
        metadata={"help": "Every optimizer step of image records only or of text-only records only, grouped by "
                  "length (the original's stage-2 sampler); only the last step takes what is left of both."},
    )  # fmt: skip
    mm_projector_lr: float | None = field(
        default=None, metadata={"help": "Learning rate of the projector (default: --learning_rate)."}
    )
    padding_free: bool = field(
        default=False,
        metadata={"help": "Each batch's records in one row without padding, position ids restarting at every record "
                  "(no attention across records); the same loss as padded batches with less compute."},
    )  # fmt: skip
    loss_chunk_size: int | None = field(
        default=None,
        metadata={"help": "Compute the training loss this many trained tokens at a time, never holding the full "
                  "logits (the default of --use_liger_kernel where Liger's GPU kernels do not run: 1024)."},
    )  # fmt: skip
    save_projector_only: bool = field(
        default=False,
        metadata={"help": "With --tune projector: save projector.safetensors only (the original's mm_projector.bin), "
                  "not a copy of the frozen weights; stage 2 reads it with --pretrained_projector."},
    )  # fmt: skip

    def __post_init__(self):
        super().__post_init__()
        if self.group_by_length and self.group_by_modality_length:
            raise ValueError("Pass --group_by_length or --group_by_modality_length, not both.")
        if self.group_by_length:
            self.train_sampling_strategy = "group_by_length"


def record_words(record: dict) -> tuple[int, bool]:
    """Words in a record's messages (whitespace-split, as the original counts them) and whether it has images."""
    messages, images = record_to_messages(record)
    words = 0
    for message in messages:
        content = message["content"]
        texts = [content] if isinstance(content, str) else [item.get("text", "") for item in content]
        words += sum(len(text.split()) for text in texts)
    return words, bool(images)


def record_lengths(records: Sequence[dict]) -> list[int]:
    """The original's `lengths`: words, plus 128 for a record with an image."""
    return [words + IMAGE_TOKENS_GUESS * has_image for words, has_image in map(record_words, records)]


def modality_lengths(records: Sequence[dict]) -> list[int]:
    """The original's `modality_lengths`: words (at least 1), positive for image records, negative for text-only."""
    return [max(words, 1) * (1 if has_image else -1) for words, has_image in map(record_words, records)]


def modality_grouped_indices(lengths: list[int], step_size: int, generator=None) -> list[int]:
    """Indices in runs of `step_size` (one optimizer step over all ranks) from one modality each, grouped by length
    inside a modality, runs in random order; what is left of both modalities comes last, in one run."""
    runs, rest = [], []
    for sign in (1, -1):
        indices = [index for index, length in enumerate(lengths) if length * sign > 0]
        if not indices:
            continue
        order = get_length_grouped_indices([abs(lengths[i]) for i in indices], step_size, generator=generator)
        order = [indices[i] for i in order]
        full = len(order) - len(order) % step_size
        runs += [order[start : start + step_size] for start in range(0, full, step_size)]
        rest += order[full:]
    shuffled = [runs[i] for i in torch.randperm(len(runs), generator=generator).tolist()]
    return [index for run in shuffled for index in run] + sorted(rest)


class ModalityLengthGroupedSampler(Sampler):
    """The original's `group_by_modality_length` sampler on `modality_lengths`; `step_size` is the per-device
    batch size x processes x gradient-accumulation steps, so each device's batch, and each step, has one modality."""

    def __init__(self, lengths: list[int], step_size: int, generator=None):
        self.lengths, self.step_size, self.generator = lengths, step_size, generator

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        return iter(modality_grouped_indices(self.lengths, self.step_size, self.generator))


class DenseConnectorTrainer(Trainer):
    """`Trainer` with the samplers, projector learning rate and projector-only saving of the original's, a loss
    that never holds the full logits with `--use_liger_kernel` or `--loss_chunk_size`, and SDPA record by record
    (`attention.VARLEN_SDPA`) with a padding-free collator.

    `dense-connector train` sets `throughput` (a `progress.Throughput` callback: tokens/s, samples/s and ETA added
    to the training logs) and `eval_task` (called on the model and processor at each evaluation, its metrics logged
    as `eval_*`); both stay `None` when the Trainer is built by hand.
    """

    throughput = None
    eval_task = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        liger = self.args.use_liger_kernel
        if liger or getattr(self.args, "loss_chunk_size", None):
            logger.warning(use_memory_efficient_loss(self.model, liger, getattr(self.args, "loss_chunk_size", None)))
            # done here for the language model: the stock Trainer would patch by the model's own model_type, which
            # Liger does not know, and fail where liger-kernel is not installed
            self.args.use_liger_kernel = False
        if isinstance(self.data_collator, DenseConnectorDataCollator) and self.data_collator.padding_free:
            line = use_varlen_sdpa(self.model)
            if line:
                logger.warning(line)

    def compute_loss(self, model, inputs, *args, **kwargs):
        if self.throughput is not None and model.training:
            self.throughput.count(inputs)
        return super().compute_loss(model, inputs, *args, **kwargs)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self.throughput is not None and "loss" in logs:
            logs = {**logs, **self.throughput.metrics(self)}
        super().log(logs, *args, **kwargs)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if self.eval_task is not None:
            scores = self.eval_task(self.accelerator.unwrap_model(self.model), self.processing_class)
            scores = {f"{metric_key_prefix}_{name}": value for name, value in scores.items()}
            self.log(scores)
            metrics.update(scores)
        return metrics

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        args = self.args
        if getattr(args, "group_by_modality_length", False):
            step_size = args.train_batch_size * args.world_size * args.gradient_accumulation_steps
            return ModalityLengthGroupedSampler(self.record_lengths(dataset, signed=True), step_size)
        if args.train_sampling_strategy == "group_by_length" and not hasattr(dataset, "column_names"):
            batch = args.train_batch_size * args.gradient_accumulation_steps
            return LengthGroupedSampler(batch, lengths=self.record_lengths(dataset, signed=False))
        return super()._get_train_sampler(train_dataset)

    def record_lengths(self, records: Sequence[dict], signed: bool) -> list[int]:
        """Exact token lengths (`DenseConnectorDataCollator.token_lengths`, computed once per dataset) with this
        package's collator, else the original's word counts; `signed`: negative for text-only records."""
        if not isinstance(self.data_collator, DenseConnectorDataCollator):
            return modality_lengths(records) if signed else record_lengths(records)
        cache = self.__dict__.setdefault("_token_lengths", {})
        if id(records) not in cache:
            cache[id(records)] = self.data_collator.token_lengths(records)
        return cache[id(records)] if signed else [abs(length) for length in cache[id(records)]]

    def create_optimizer(self, model=None):
        """The stock optimizer, with the projector's parameters moved into groups of their own at `mm_projector_lr`."""
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(model)
        lr = getattr(self.args, "mm_projector_lr", None)
        if fresh and lr is not None:
            named = (self.model if model is None else model).named_parameters()
            projector = {id(p) for name, p in named if ".connector.projector." in name}
            moved_any = False
            for group in list(optimizer.param_groups):
                moved = [p for p in group["params"] if id(p) in projector]
                if moved:
                    group["params"] = [p for p in group["params"] if id(p) not in projector]
                    optimizer.add_param_group({**group, "params": moved, "lr": lr})
                    moved_any = True
            # no emptied group left behind (DeepSpeed refuses those)
            optimizer.param_groups[:] = [group for group in optimizer.param_groups if group["params"]]
            if not moved_any:
                raise ValueError("--mm_projector_lr is set but the projector has no trainable parameter.")
        return optimizer

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not getattr(self.args, "save_projector_only", False):
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return None
        output_dir = Path(output_dir or self.args.output_dir)
        model = self.accelerator.unwrap_model(self.model)
        save_projector(model, output_dir, state_dict)
        return None


def save_projector(model: nn.Module, folder: str | Path, state_dict: dict | None = None) -> Path:
    """Write `folder/projector.safetensors`: the projector (and `image_newline`) of `model`, with the base folder and
    connector type in its metadata, so stage 2 can be pointed at the parts it belongs to."""
    state_dict = model.state_dict() if state_dict is None else state_dict
    tensors = {
        name: tensor.detach().cpu().contiguous()
        for name, tensor in state_dict.items()
        if name.startswith(PROJECTOR_PREFIXES)
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": "pt",
        "base_model": str(model.config._name_or_path),
        "dense_connector_type": str(model.config.dense_connector_type),
    }
    save_file(tensors, folder / PROJECTOR_FILE, metadata=metadata)
    return folder / PROJECTOR_FILE


def read_projector_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Projector tensors from our `projector.safetensors` (or a folder holding it) or the original's
    `mm_projector.bin`, named as in `DenseConnectorForConditionalGeneration`."""
    path = Path(path)
    if path.is_dir():
        path = path / PROJECTOR_FILE
    if not path.is_file():
        raise FileNotFoundError(f"--pretrained_projector {path} does not exist; pass stage 1's {PROJECTOR_FILE}.")
    if path.suffix == ".safetensors":
        return load_file(path)
    tensors = torch.load(path, map_location="cpu", weights_only=True)
    return {name.replace("model.mm_projector.", "model.connector.projector."): t for name, t in tensors.items()}


def load_pretrained_projector(model: nn.Module, path: str | Path) -> None:
    """Put stage 1's projector into `model`, checking that every tensor is a projector tensor of the same shape."""
    tensors = read_projector_file(path)
    own = model.state_dict()
    unknown = sorted(set(tensors) - {name for name in own if name.startswith(PROJECTOR_PREFIXES)})
    if unknown or not tensors:
        raise ValueError(f"{path} holds no projector of this model (unexpected tensors: {unknown[:4]}).")
    wrong = [
        f"{name} {tuple(t.shape)} vs {tuple(own[name].shape)}"
        for name, t in tensors.items()
        if t.shape != own[name].shape
    ]
    if wrong:
        raise ValueError(
            f"{path} was trained for other parts or another connector than this model's ({'; '.join(wrong[:2])}); "
            "start stage 2 from the folder stage 1 started from."
        )
    model.load_state_dict(tensors, strict=False)
    logger.info(f"Loaded the projector of {path} ({len(tensors)} tensors).")


__all__ = [
    "PROJECTOR_FILE",
    "DenseConnectorTrainer",
    "DenseConnectorTrainingArguments",
    "ModalityLengthGroupedSampler",
    "load_pretrained_projector",
    "modality_grouped_indices",
    "modality_lengths",
    "record_lengths",
    "save_projector",
]
