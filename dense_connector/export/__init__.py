"""Export: Dense Connector checkpoints as a stock transformers Llava / LLaVA-NeXT folder, or as llama.cpp's GGUF files.

`export_llava` and `export_gguf` are the Python API behind `dense-connector export --to llava|gguf`. Both refuse, in
one line and writing nothing, what a stock LLaVA cannot compute (STI, Efficient Dense Connector). They are imported
on first use, so that the command line's `export` subcommand loads neither torch nor gguf until it runs.
"""

import importlib


_API = {"export_llava": "llava", "export_gguf": "gguf", "CheckpointError": "llava"}


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CheckpointError", "export_gguf", "export_llava"]
