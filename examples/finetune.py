"""Fine-tune a Dense Connector checkpoint on image-text instruction data with the Hugging Face `Trainer`.

The data is a JSON list (or JSON-lines file) of LLaVA conversation records or chat-messages records; see
`dense_connector.training.DenseConnectorDataCollator`. The argument names follow the original training scripts
(`--model_name_or_path`, `--data_path`, `--image_folder`, `--model_max_length`), and every `TrainingArguments` option
is accepted too. Regimes (`--tune`): `projector` (stage 1), `projector+lm` (stage 2), `lora` (adapters on the
language model, projector fully trained); the vision tower stays frozen unless `--freeze_vision_tower false`.

    python examples/finetune.py --model_name_or_path path/to/converted --data_path data.json \
        --image_folder images/ --tune projector+lm --output_dir out --learning_rate 2e-5 --bf16

The original's two stages from a built model (`dense-connector build`): stage 1 `--version plain --tune projector
--save_projector_only` (captions; writes `projector.safetensors`), stage 2 `--version v1 --tune projector+lm
--pretrained_projector STAGE1/projector.safetensors --group_by_modality_length` from the same built folder.

Several GPUs: `accelerate launch --config_file examples/accelerate/fsdp.yaml examples/finetune.py ...`.
"""

import logging
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)

import dense_connector  # noqa: F401  (registers the Dense Connector classes with the Auto classes)
from dense_connector.chat_templates import CHAT_TEMPLATES, STOP_TOKENS, VERSION_TEMPLATES, stop_token_ids
from dense_connector.training import (
    TUNE_REGIMES,
    DenseConnectorDataCollator,
    DenseConnectorTrainer,
    DenseConnectorTrainingArguments,
    load_instruction_data,
    load_pretrained_projector,
    prepare_for_training,
    trainable_parameter_summary,
)
from dense_connector.writing.sources import is_hub_id


logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        metadata={"help": "Dense Connector checkpoint: built (`dense-connector build`), converted or trained."}
    )
    pretrained_projector: str | None = field(
        default=None,
        metadata={"help": "Stage 1's projector.safetensors (or the original's mm_projector.bin), loaded into the "
                  "model before training; the model must be built from the same parts."},
    )  # fmt: skip
    tune: str = field(
        default="projector+lm",
        metadata={"help": "What to train.", "choices": TUNE_REGIMES},
    )
    freeze_vision_tower: bool = field(default=True, metadata={"help": "Keep the vision tower frozen."})
    lora_r: int = field(default=128, metadata={"help": "LoRA rank (with --tune lora)."})
    lora_alpha: int = field(default=256, metadata={"help": "LoRA alpha (with --tune lora)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout (with --tune lora)."})
    dtype: str | None = field(
        default=None,
        metadata={
            "help": "Load the weights in this dtype (e.g. bfloat16, as in the original DeepSpeed runs). The default "
            "keeps float32 master weights; --bf16 then trains with autocast."
        },
    )
    attn_implementation: str | None = field(default=None, metadata={"help": "e.g. sdpa, eager, flash_attention_2."})


@dataclass
class DataArguments:
    data_path: str = field(metadata={"help": "Training records: a JSON list or a .jsonl file."})
    image_folder: str | None = field(default=None, metadata={"help": "Folder the records' image paths are under."})
    eval_data_path: str | None = field(default=None, metadata={"help": "Optional evaluation records."})
    version: str | None = field(
        default=None,
        metadata={
            "help": "Conversation format, the original's names: plain (stage 1: image + caption), v1 / vicuna_v1, "
            "llama_3. It becomes the saved chat template. Default: the checkpoint's chat template.",
            "choices": sorted(VERSION_TEMPLATES),
        },
    )
    model_max_length: int = field(
        default=2048,
        metadata={
            "help": "Maximum sequence length after image placeholders are expanded; longer records are truncated, "
            "and records whose image placeholders do not fit are dropped with a warning."
        },
    )


def set_conversation_format(processor, model, version: str | None) -> None:
    """The chat template (and the stop tokens generation uses) of `--version`; the checkpoint's without it."""
    if version is not None:
        template = VERSION_TEMPLATES[version]
        processor.chat_template = CHAT_TEMPLATES[template]
        if template in STOP_TOKENS:
            model.generation_config.eos_token_id = stop_token_ids(processor.tokenizer, template)
    if processor.chat_template is None:
        raise ValueError(
            "The checkpoint's processor has no chat template; pass --version (plain, v1 or llama_3) or save one "
            "(dense_connector.chat_templates.CHAT_TEMPLATES) with the checkpoint."
        )


def build_trainer(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> Trainer:
    """Model, processor, data and `Trainer`, ready for `.train()`."""
    if getattr(training_args, "save_projector_only", False) and model_args.tune != "projector":
        raise ValueError(f"--save_projector_only needs --tune projector (got --tune {model_args.tune}): the other "
                         "regimes train weights that projector.safetensors does not hold.")  # fmt: skip
    source = model_args.model_name_or_path
    if not Path(source).expanduser().exists() and not is_hub_id(source):  # refused at once, not tried on the Hub
        raise ValueError(f"--model_name_or_path {source}: no such folder (and not a Hub id, owner/name)")
    processor = AutoProcessor.from_pretrained(model_args.model_name_or_path)
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
    collator = DenseConnectorDataCollator(
        processor, image_folder=data_args.image_folder, max_length=data_args.model_max_length
    )
    eval_dataset = load_instruction_data(data_args.eval_data_path) if data_args.eval_data_path else None
    return DenseConnectorTrainer(
        model=model,
        args=training_args,
        train_dataset=load_instruction_data(data_args.data_path),
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=processor,
    )


def older_spellings(argv: list[str]) -> list[str]:
    """`--activation_checkpointing*` as `--gradient_checkpointing*`, its name before transformers 5.20."""
    if "activation_checkpointing" in {f.name for f in fields(TrainingArguments)}:
        return argv
    return [arg.replace("--activation_checkpointing", "--gradient_checkpointing", 1) for arg in argv]


def main(argv: list[str] | None = None) -> Trainer:
    parser = HfArgumentParser((ModelArguments, DataArguments, DenseConnectorTrainingArguments))
    argv = older_spellings(sys.argv[1:] if argv is None else argv)
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    trainer = build_trainer(model_args, data_args, training_args)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    # the full model, the LoRA adapter with the projector, or (--save_projector_only) projector.safetensors; the
    # processor alongside the first two
    trainer.save_model()
    return trainer


if __name__ == "__main__":
    main(sys.argv[1:])
