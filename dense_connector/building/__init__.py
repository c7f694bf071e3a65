"""Making new Dense Connector models from a vision tower and a causal language model, as the authors' training
starts (the paper's "plug-and-play" connector for any LLM and vision encoder).

`build_checkpoint` writes a complete checkpoint folder (what `dense-connector build` does), streaming the parts'
weights; `build_model` and `build_processor_for` give the same model and processor in memory. The package attaches
them to the classes as `DenseConnectorForConditionalGeneration.from_vision_text_pretrained` and
`DenseConnectorProcessor.from_vision_text_pretrained` (`model_from_parts`, `processor_from_parts`); they are not part
of the remote code a checkpoint ships, which imports nothing but transformers and torch. Modules: `command` (the
command line), `builder` (everything else).
"""

import os

from .builder import VERSIONS, BuildError, ConnectorOptions, build_checkpoint, build_model, build_processor_for


def model_from_parts(cls, vision_tower: str | os.PathLike, language_model: str | os.PathLike, **kwargs):
    """A new model from a vision tower and a causal LM (folders or Hub ids): their weights and a freshly initialised
    projector, to be trained. `kwargs` are `dense-connector build`'s options (`version`, `dtype`, `seed`,
    `connector`, `dense_connector_layers`, `dense_connector_groups`, `vision_feature_layer`, `projector_depth`,
    `image_downsample_factor`); `DenseConnectorProcessor.from_vision_text_pretrained` with the same ones gives its
    processor."""
    return build_model(vision_tower, language_model, **kwargs)


def processor_from_parts(
    cls, vision_tower: str | os.PathLike, language_model: str | os.PathLike, version: str | None = None, **options
):
    """The processor of `DenseConnectorForConditionalGeneration.from_vision_text_pretrained` with the same parts and
    options: the LM's tokenizer with `<image>` / `<video>` and the version's pad token and chat template, the tower's
    image preprocessing."""
    return build_processor_for(vision_tower, language_model, version, **options)


__all__ = [
    "VERSIONS",
    "BuildError",
    "ConnectorOptions",
    "build_checkpoint",
    "build_model",
    "build_processor_for",
    "model_from_parts",
    "processor_from_parts",
]
