"""Dense Connector (Yao et al., NeurIPS 2024) for Hugging Face transformers.

Importing the package registers the config, models and processor with the Auto classes, and marks them for
`register_for_auto_class` so that `save_pretrained` ships their code for `trust_remote_code=True`.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .building import model_from_parts, processor_from_parts
from .configuration_dense_connector import DenseConnectorConfig
from .modeling_dense_connector import (
    DenseConnectorForConditionalGeneration,
    DenseConnectorModel,
    DenseConnectorPreTrainedModel,
)
from .processing_dense_connector import DenseConnectorProcessor


AutoConfig.register(DenseConnectorConfig.model_type, DenseConnectorConfig, exist_ok=True)
AutoModel.register(DenseConnectorConfig, DenseConnectorModel, exist_ok=True)
AutoModelForImageTextToText.register(DenseConnectorConfig, DenseConnectorForConditionalGeneration, exist_ok=True)
AutoProcessor.register(DenseConnectorConfig, DenseConnectorProcessor, exist_ok=True)

DenseConnectorConfig.register_for_auto_class()
DenseConnectorModel.register_for_auto_class("AutoModel")
DenseConnectorForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
DenseConnectorProcessor.register_for_auto_class("AutoProcessor")

# Building from parts is package code, not remote code (a checkpoint ships only the four files above, which import
# nothing but transformers and torch), so the package attaches it to the classes here.
DenseConnectorForConditionalGeneration.from_vision_text_pretrained = classmethod(model_from_parts)
DenseConnectorProcessor.from_vision_text_pretrained = classmethod(processor_from_parts)

__all__ = [
    "DenseConnectorConfig",
    "DenseConnectorForConditionalGeneration",
    "DenseConnectorModel",
    "DenseConnectorPreTrainedModel",
    "DenseConnectorProcessor",
]
