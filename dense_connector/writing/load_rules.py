"""transformers' own load-time checkpoint conversion, applied to tensors as they are streamed into a written folder.

A Hub repository may keep tensors under older names (a `vision_model.` prefix, DINOv3's `layer.N`) or split where
the transformers 5 model holds one tensor: Mixtral, Qwen3-MoE, OLMoE and DeepSeek-V3 keep one tensor per expert, which
transformers fuses into one per layer when it loads. `LoadRules` takes the model's conversion mapping from
transformers (`get_model_conversion_mapping`), renames checkpoint names with its `rename_source_key`, and makes a
fused tensor with the matching converter's own operations (`Fused.tensor`), one target tensor at a time.
"""

from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key


@dataclass
class Fused:
    """One tensor of the model made from several checkpoint tensors by one of transformers' converters."""

    converter: WeightConverter
    target: str  # the model's name for it, as the converter names it
    config: object  # the model config the converter's operations may read
    parts: list[tuple[Path, str, str]] = field(default_factory=list)  # (file, tensor name, source pattern)

    def tensor(self, get: Callable[[Path, str], torch.Tensor], target: str) -> torch.Tensor:
        """The converter's tensor `target`, its parts read with `get(file, name)` in transformers' loading order."""
        converter = deepcopy(self.converter)
        for path, name, pattern in sorted(self.parts, key=lambda part: dot_natural_key(part[1])):
            converter.add_tensor(self.target, name, pattern, lambda path=path, name=name: get(path, name))
        return converter.convert(self.target, config=self.config)[target]


class LoadRules:
    """The renamings and converters transformers applies when it loads `model`'s checkpoint (a meta-device model)."""

    def __init__(self, model: PreTrainedModel):
        transforms = get_model_conversion_mapping(model)
        self.renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        self.converters = [t for t in transforms if isinstance(t, WeightConverter)]
        self.by_pattern = {pattern: c for c in self.converters for pattern in c.source_patterns}
        self.expected = model.state_dict()
        self.prefix = model.base_model_prefix
        self.config = model.config
        self.fused: dict[str, Fused] = {}

    def rename(self, name: str) -> tuple[str, str | None]:
        """(the model's name for checkpoint tensor `name`, the converter's source pattern when it is fused)."""
        renamed, pattern = rename_source_key(name, self.renamings, self.converters, self.prefix, self.expected)
        if renamed not in self.expected and name in self.expected:
            return name, None
        return renamed, pattern

    def collect(self, path: Path, name: str, target: str, pattern: str) -> Fused | None:
        """Record a part of fused tensor `target`; returns the `Fused` when it is new (else None)."""
        new = target not in self.fused
        if new:
            self.fused[target] = Fused(deepcopy(self.by_pattern[pattern]), target, self.config)
        self.fused[target].parts.append((path, name, pattern))
        return self.fused[target] if new else None
