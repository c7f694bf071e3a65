"""Convert checkpoints of the original Dense Connector release to this package's transformers format.

The original checkpoints (`HuanjinYao/DenseConnector-v1.5-*` and fine-tunes made with the authors' code) use the
LLaVA layout: one `LlavaLlamaForCausalLM` state dict, a flat config with `mm_*` fields, and a vision tower taken from
the Hub repository named in `mm_vision_tower`. `convert_checkpoint` translates the config, streams the tensors
shard by shard into safetensors shards (never holding the model in memory), converts the tokenizer, writes the
processor, chat template, generation config and model card, checks the result with a forward pass, and only then
moves the folder into place. Anything it does not understand stops it with a message saying what and why.

Modules, each using only those listed after it: `cli` (command line), `convert` (the steps in order), `config`
(config translation). Writing, checking and moving the folder into place is `dense_connector.writing`'s, shared with
`dense-connector build`.
"""

from ..writing.sources import CheckpointError
from ..writing.staging import upload
from ..writing.tokenizer import convert_tokenizer
from .cli import build_parser, main, run_from_args
from .config import translate_config
from .convert import convert_checkpoint


__all__ = [
    "CheckpointError",
    "build_parser",
    "convert_checkpoint",
    "convert_tokenizer",
    "main",
    "run_from_args",
    "translate_config",
    "upload",
]
