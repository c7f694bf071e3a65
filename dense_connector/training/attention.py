"""SDPA over padding-free rows, record by record, so a row costs its records' attention and not the whole row's.

A padding-free row holds a batch's records one after the other, `position_ids` restarting at each. With SDPA,
transformers reads that as packed sequences and masks attention across records, but the kernel still computes the
score of every pair of tokens in the row: 8 records of 700 tokens cost 8x their attention. Flash-attention's
variable-length kernels skip that work; `varlen_sdpa_attention` does the same with PyTorch's own SDPA, one call per
record, wherever SDPA runs (CPUs, and GPUs without flash-attention installed). Everything else (padded batches,
generation with a cache, sliding windows shorter than a record) is transformers' SDPA unchanged. It is registered
with transformers as the attention implementation `VARLEN_SDPA` when this module is imported; implementation names
are not saved with a checkpoint, so a model trained with it loads anywhere with SDPA.
"""

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask


VARLEN_SDPA = "sdpa_varlen"


def record_bounds(position_ids: torch.Tensor | None, length: int) -> list[int] | None:
    """Where each record of a one-row batch starts, and the row's end; `None` unless the row holds several records."""
    if position_ids is None or position_ids.shape[0] != 1 or position_ids.shape[-1] != length:
        return None
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    if len(starts) < 2 or starts[0] != 0:
        return None
    return [*starts, length]


def varlen_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, run on each record of a padding-free row by itself.

    transformers builds a mask for packed rows only without a cache and without a 2D attention mask; it is the mask's
    presence, together with positions that restart and a key as long as the query, that marks such a row here. Only
    causal layers are split, and sliding-window ones only where no record is longer than the window (the window then
masks nothing); a bidirectional layer keeps the masked whole row.
    """
    length = query.shape[2]
    bounds = record_bounds(position_ids, length) if attention_mask is not None and key.shape[2] == length else None
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    longest = max((b - a for a, b in zip(bounds, bounds[1:])), default=0) if bounds else 0
    if bounds is None or (window and longest > window) or not getattr(module, "is_causal", True):
        return sdpa_attention_forward(module, query, key, value, attention_mask, position_ids=position_ids, **kwargs)
    outputs = [
        sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, is_causal=True,
                               **{k: v for k, v in kwargs.items() if k != "is_causal"})[0]
        for a, b in zip(bounds, bounds[1:])
    ]  # fmt: skip
    return torch.cat(outputs, dim=1), None


AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
AttentionMaskInterface.register(VARLEN_SDPA, sdpa_mask)


def use_varlen_sdpa(model: nn.Module) -> str | None:
    """Switch the language model of `model` (a Dense Connector model, or a PEFT model around one) from SDPA to
    `VARLEN_SDPA` for padding-free batches. Returns one line saying so, or `None` where it uses another attention
    (flash-attention's own varlen kernels, eager, flex) or is not a Dense Connector model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    language_model = getattr(getattr(base, "model", None), "language_model", None)
    if language_model is None or language_model.config._attn_implementation != "sdpa":
        return None
    language_model.set_attn_implementation(VARLEN_SDPA)
    return ("Padding-free batches: the language model's SDPA attention runs record by record "
            f"({VARLEN_SDPA}), not over the whole row.")  # fmt: skip
