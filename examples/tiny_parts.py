"""Tiny parts laid out as Hub repositories, to try `dense-connector build` and the paper's two training stages on a
CPU in seconds (docs/training.md, "The two stages in miniature"; `tests/test_recipe.py` trains on them for longer).

- `FOLDER/tower`: a vision-only CLIP repository (`CLIPVisionModel`, 4 layers, 64 px, 16 px patches) holding the
  bundled demo checkpoint's trained tower, as the paper's towers are pretrained (its last layer, which the
  connector never reads, keeps transformers' random initialisation);
- `FOLDER/vicuna`: Vicuna's layout at demo size: an untrained 2-layer Llama (transformers' initialisation, seeded)
  with the demo's SentencePiece `tokenizer.model` and a `LlamaTokenizer` config (`legacy: false`), as
  `lmsys/vicuna-7b-v1.5` has.

    python examples/tiny_parts.py tiny-parts
"""

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, CLIPImageProcessor, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

import dense_connector
from dense_connector.writing.tokenizer import sentencepiece_model


DEMO = Path(dense_connector.__file__).parent / "demo" / "checkpoint"
VICUNA_TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": True, "add_eos_token": False,
    "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
    "clean_up_tokenization_spaces": False,
}  # fmt: skip


def write_parts(folder: str | Path) -> tuple[Path, Path]:
    """Write the tower and the language model under `folder`; return their folders."""
    folder = Path(folder)
    config = AutoConfig.from_pretrained(DEMO)
    tower, language_model = folder / "tower", folder / "vicuna"
    torch.manual_seed(1)
    vision_model = CLIPVisionModel(config.vision_config)
    prefix = "model.vision_tower."
    trained = {
        name[len(prefix) :]: tensor
        for name, tensor in load_file(DEMO / "model.safetensors").items()
        if name.startswith(prefix)
    }
    missing, unexpected = vision_model.load_state_dict(trained, strict=False)
    assert not unexpected and all(".layers.3." in name for name in missing), (missing, unexpected)
    vision_model.save_pretrained(tower)
    CLIPImageProcessor(size={"shortest_edge": 64}, crop_size=64).save_pretrained(tower)

    vocab_size = len(sentencepiece_model(DEMO / "tokenizer.model").pieces)
    text_config = {**config.text_config.to_dict(), "vocab_size": vocab_size, "pad_token_id": 0}
    torch.manual_seed(2)
    LlamaForCausalLM(LlamaConfig(**text_config)).save_pretrained(language_model)
    shutil.copyfile(DEMO / "tokenizer.model", language_model / "tokenizer.model")
    (language_model / "tokenizer_config.json").write_text(json.dumps(VICUNA_TOKENIZER_CONFIG, indent=2))
    return tower, language_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="where to write tower/ and vicuna/")
    tower, language_model = write_parts(parser.parse_args().folder)
    print(f"wrote {tower} and {language_model}")


if __name__ == "__main__":
    main()
