"""Export: Dense Connector checkpoints as a stock transformers Llava / LLaVA-NeXT folder, or as llama.cpp's GGUF files.

`export_llava` and `export_gguf` are the Python API behind `dense-connector export --to llava|gguf`. Both refuse, in
one line and writing nothing, what a stock LLaVA cannot compute (STI, Efficient Dense Connector).
"""

from ..writing.sources import CheckpointError
from .llava import export_llava


__all__ = ["CheckpointError", "export_llava"]
