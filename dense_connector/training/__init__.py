"""Training Dense Connector models: instruction data, the batch collator, the original's regimes and `Trainer`.

Modules, each using only those listed after it: `command` (`dense-connector train` and `check-data`), `options`
(their options, recipe files), `progress` (throughput, loss curve, evaluation task), `sources` (files, `datasets`,
mixtures), `checks` (the data check), `trainer` (the original's sampler, projector learning rate and stage-1
projector file), `attention` (SDPA record by record for padding-free rows), `losses` (losses that never hold the
full logits: chunked, Liger), `regimes` (which parameters train), `collator` (records to batches with masked labels,
padded or padding-free), `data` (instruction files and records), `parallel` (work over every record in forked
processes). Only `trainer` and those after it are imported here; `recipes/` holds the bundled recipes.
"""

from .attention import VARLEN_SDPA, use_varlen_sdpa
from .collator import IGNORE_INDEX, DenseConnectorDataCollator, assistant_spans, mask_labels, token_char_starts
from .data import InstructionRecords, llava_to_messages, load_instruction_data, record_name, record_to_messages
from .losses import chunked_cross_entropy, use_memory_efficient_loss
from .regimes import TUNE_REGIMES, language_model_linear_names, prepare_for_training, trainable_parameter_summary
from .trainer import (
    PROJECTOR_FILE,
    DenseConnectorTrainer,
    DenseConnectorTrainingArguments,
    load_pretrained_projector,
    save_projector,
)


__all__ = [
    "IGNORE_INDEX",
    "PROJECTOR_FILE",
    "TUNE_REGIMES",
    "VARLEN_SDPA",
    "DenseConnectorDataCollator",
    "DenseConnectorTrainer",
    "DenseConnectorTrainingArguments",
    "InstructionRecords",
    "assistant_spans",
    "chunked_cross_entropy",
    "language_model_linear_names",
    "llava_to_messages",
    "load_instruction_data",
    "load_pretrained_projector",
    "mask_labels",
    "prepare_for_training",
    "record_name",
    "record_to_messages",
    "save_projector",
    "token_char_starts",
    "trainable_parameter_summary",
    "use_varlen_sdpa",
    "use_memory_efficient_loss",
]
