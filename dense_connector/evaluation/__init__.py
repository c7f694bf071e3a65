"""Evaluation of Dense Connector checkpoints: lmms-eval benchmarks and the authors' LLaVA question/answer files."""

from .generator import Answerer, GenerationSettings, load_pretrained


__all__ = ["Answerer", "GenerationSettings", "load_pretrained"]
