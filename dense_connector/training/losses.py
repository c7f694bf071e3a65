"""Causal-LM losses computed from the last hidden states, so the (tokens x vocabulary) logits are never held whole.

`DenseConnectorForConditionalGeneration.hidden_states_loss` takes one of these in training. Both shift the labels as
transformers' `ForCausalLMLoss` does and divide by `num_items_in_batch` when the `Trainer` passes it (else by the
number of trained tokens), so the loss is the stock one. `chunked_cross_entropy` runs anywhere: only the trained
positions go through the head, `chunk_size` at a time, each chunk's logits recomputed in the backward pass.
`liger_fused_linear_cross_entropy` is Liger's fused kernel (Triton: GPUs only).
"""

import logging
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .collator import IGNORE_INDEX


logger = logging.getLogger(__name__)


def trained_positions(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states that predict a label and those labels (labels shifted left by one, as for a causal LM)."""
    labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].to(hidden.device)
    keep = labels != IGNORE_INDEX
    return hidden[keep], labels[keep]


def mean_over_items(total: torch.Tensor, count: int, num_items_in_batch=None) -> torch.Tensor:
    if num_items_in_batch is None:
        return total / count
    return total / (num_items_in_batch.to(total.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch)


def _chunk_loss(lm_head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(lm_head(hidden).float(), labels, reduction="sum")


def chunked_cross_entropy(
    hidden: torch.Tensor,
    lm_head: nn.Module,
    labels: torch.Tensor,
    num_items_in_batch=None,
    chunk_size: int = 1024,
    **kwargs,
) -> torch.Tensor:
    """The causal-LM cross-entropy of `lm_head(hidden)`, holding at most `chunk_size` rows of logits at a time."""
    hidden, labels = trained_positions(hidden, labels)
    total = hidden.sum() * 0.0  # keeps the graph when no position is trained
    for start in range(0, len(labels), chunk_size):
        chunk = slice(start, start + chunk_size)
        total = total + checkpoint(_chunk_loss, lm_head, hidden[chunk], labels[chunk], use_reentrant=False)
    return mean_over_items(total, max(len(labels), 1), num_items_in_batch)


def liger_fused_linear_cross_entropy(
    hidden: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor, num_items_in_batch=None, **kwargs
) -> torch.Tensor:
    """Liger's fused linear cross-entropy (head and loss in one Triton kernel, chunked) over the trained positions."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    hidden, labels = trained_positions(hidden, labels)
    total = LigerFusedLinearCrossEntropyLoss(reduction="sum")(lm_head.weight, hidden, labels)
    return mean_over_items(total, max(len(labels), 1), num_items_in_batch)


def liger_runs() -> bool:
    """Whether Liger's kernels can run here: liger-kernel installed and a CUDA GPU (its kernels are Triton)."""
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def use_memory_efficient_loss(model: nn.Module, liger: bool, chunk_size: int | None = None) -> str:
    """Give `model` (a Dense Connector model, or a PEFT model around one) a loss that never holds the full logits,
    and with `liger` Liger's kernels (RMSNorm, RoPE, SwiGLU, ...) in its language model, chosen by that model's own
    `model_type`, where Liger runs. Returns one line saying what was applied."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if liger and liger_runs():
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        language_model = base.model.language_model
        _apply_liger_kernel_to_instance(model=language_model)
        base.hidden_states_loss = liger_fused_linear_cross_entropy
        return (f"Liger's kernels applied to the {language_model.config.model_type} language model, and its fused "
                "linear cross-entropy to the head.")  # fmt: skip
    base.hidden_states_loss = partial(chunked_cross_entropy, chunk_size=chunk_size or 1024)
    line = f"Chunked cross-entropy ({chunk_size or 1024} tokens at a time): the full logits are never held."
    if liger:
        line = (f"Liger's kernels are Triton, for CUDA GPUs with liger-kernel installed, so not used here; {line}")
    return line
