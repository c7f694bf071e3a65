"""Making new Dense Connector models from a vision tower and a causal language model, as the authors' training
starts (the paper's "plug-and-play" connector for any LLM and vision encoder).

`build_checkpoint` writes a complete checkpoint folder (what `dense-connector build` does), streaming the parts'
weights; `build_model` and `build_processor_for` give the same model and processor in memory (what
`DenseConnectorForConditionalGeneration.from_vision_text_pretrained` and
`DenseConnectorProcessor.from_vision_text_pretrained` return). Modules: `command` (the command line), `builder`
(everything else).
"""

from .builder import VERSIONS, BuildError, ConnectorOptions, build_checkpoint, build_model, build_processor_for


__all__ = ["VERSIONS", "BuildError", "ConnectorOptions", "build_checkpoint", "build_model", "build_processor_for"]
