"""`--to gguf`: the files llama.cpp runs: an mmproj (tower, feature layers, folded projector, preprocessing) written
with the `gguf` package, and the language model, converted by llama.cpp's own `convert_hf_to_gguf.py`.

The mmproj is a LLaVA `mlp` projector file as llama.cpp's CLIP reads it (key and tensor names from llama.cpp's
`tools/mtmd/clip-impl.h` and `gguf-py/gguf/constants.py`): `clip.vision.feature_layer` lists the hidden states the
folded projector reads (llama.cpp's `i` is the input of encoder layer `i`, as transformers' `hidden_states[i]`), and
the tower's final layer norm is left out (llama.cpp applies it to the deepest state when present; the original never
does). The language model is written as a plain transformers folder; with `llama_cpp` (a llama.cpp source folder)
it is converted there, else the command that converts it is printed.
"""

import json
import logging
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import AutoModelForCausalLM

from ..processing_dense_connector import DenseConnectorProcessor
from ..writing.sources import CheckpointError, open_tensors
from ..writing.staging import check_output, staged_output
from ..writing.tensors import PlanBuilder, write_weights
from .folding import fold_weight, plan_fold
from .llava import FIRST_LAYER, Source, plain_tokenizer, read_source


logger = logging.getLogger(__name__)

FEATURE_LAYERS = "clip.vision.feature_layer"  # llama.cpp's KEY_FEATURE_LAYERS; the gguf package on PyPI may lack it
TOWERS = {"clip_vision_model", "siglip_vision_model"}
FILE_TYPES = {"f16": (gguf.LlamaFileType.MOSTLY_F16, np.float16), "f32": (gguf.LlamaFileType.ALL_F32, np.float32)}
LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.out_proj": "attn_out",
    "layer_norm1": "ln1",
    "layer_norm2": "ln2",
    "mlp.fc1": "ffn_up",
    "mlp.fc2": "ffn_down",
}
TOWER_NAMES = {
    "embeddings.class_embedding": "v.class_embd",
    "embeddings.patch_embedding.weight": "v.patch_embd.weight",
    "embeddings.patch_embedding.bias": "v.patch_embd.bias",
    "embeddings.position_embedding.weight": "v.position_embd.weight",
    "pre_layrnorm.weight": "v.pre_ln.weight",
    "pre_layrnorm.bias": "v.pre_ln.bias",
}
PROJECTOR_NAMES = {
    "model.connector.projector.0.bias": "mm.0.bias",
    "model.connector.projector.2.weight": "mm.2.weight",
    "model.connector.projector.2.bias": "mm.2.bias",
}


def gguf_refusal(source: Source) -> str | None:
    """Why llama.cpp's LLaVA path would not compute what this checkpoint does, or None."""
    config = source.config
    if config.vision_config.model_type not in TOWERS:
        return f"llama.cpp's LLaVA path runs CLIP and SigLIP towers, not {config.vision_config.model_type}"
    if config.image_grid_pinpoints is not None:
        return "AnyRes is exported to llama.cpp untested against the original; use --to llava (LLaVA-NeXT)"
    if config.projector_hidden_act != "gelu":
        return f"llama.cpp's MLP projector applies GELU, not {config.projector_hidden_act}"
    return None


def mmproj_name(name: str) -> str | None:
    """llama.cpp's name for a checkpoint tensor of the tower or projector; None for the language model's tensors and
    the tower's final layer norm (the original never applies it); refuses a tower tensor llama.cpp has no name for."""
    if name in PROJECTOR_NAMES:
        return PROJECTOR_NAMES[name]
    if not name.startswith("model.vision_tower."):
        return None
    short = name.removeprefix("model.vision_tower.").removeprefix("vision_model.")
    parts = short.split(".")
    if short in TOWER_NAMES:
        return TOWER_NAMES[short]
    if parts[0] == "post_layernorm":
        return None
    if parts[:2] == ["encoder", "layers"] and ".".join(parts[3:-1]) in LAYER_NAMES:
        return f"v.blk.{parts[2]}.{LAYER_NAMES['.'.join(parts[3:-1])]}.{parts[-1]}"
    raise CheckpointError(f"llama.cpp's CLIP has no tensor for the tower's {name}; this tower cannot be exported.")


def write_mmproj(source: Source, path: Path, outtype: str) -> None:
    """The mmproj file: CLIP keys for the cut tower, its preprocessing, and the folded LLaVA `mlp` projector."""
    config, vision = source.config, source.config.vision_config
    fold = plan_fold(config)
    file_type, matrix_dtype = FILE_TYPES[outtype]
    image_processor = read_processor(source).image_processor
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_file_type(file_type)
    writer.add_name(f"{source.folder.name} (Dense Connector {config.dense_connector_type.upper()}, folded)")
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type("mlp")
    writer.add_vision_projection_dim(config.text_config.hidden_size)
    writer.add_vision_image_size(vision.image_size)
    writer.add_vision_patch_size(vision.patch_size)
    writer.add_vision_embedding_length(vision.hidden_size)
    writer.add_vision_feed_forward_length(vision.intermediate_size)
    writer.add_vision_block_count(vision.num_hidden_layers)
    writer.add_vision_head_count(vision.num_attention_heads)
    writer.add_vision_attention_layernorm_eps(vision.layer_norm_eps)
    writer.add_vision_image_mean(list(image_processor.image_mean))
    writer.add_vision_image_std(list(image_processor.image_std))
    writer.add_vision_use_gelu(vision.hidden_act != "quick_gelu")  # SigLIP's tanh GELU; CLIP's quick GELU otherwise
    writer.add_array(FEATURE_LAYERS, fold.feature_layers)
    for path_in, names in source.tensors.items():
        with open_tensors(path_in) as get:
            for name in names:
                new_name = "mm.0.weight" if name == FIRST_LAYER else mmproj_name(name)
                if new_name is None:  # the language model's tensors are not even read
                    continue
                tensor = get(name)
                if name == FIRST_LAYER:
                    tensor = fold_weight(tensor, fold, vision.hidden_size)
                data = tensor.to(torch.float32).numpy()
                writer.add_tensor(new_name, data.astype(matrix_dtype if data.ndim > 1 else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_processor(source: Source) -> DenseConnectorProcessor:
    return DenseConnectorProcessor.from_pretrained(source.folder)


def write_language_model(source: Source, folder: Path, progress: bool) -> None:
    """The language model alone as a transformers causal-LM folder, with the checkpoint's tokenizer."""
    text_config = source.config.text_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(text_config)
    plan = PlanBuilder({name: tuple(t.shape) for name, t in model.state_dict().items()}, source.dtype)
    for path, names in source.tensors.items():
        for name, (shape, dtype) in names.items():
            if name.startswith("model.language_model."):
                plan.add(path, name, "model." + name.removeprefix("model.language_model."), shape, dtype)
            elif name == "lm_head.weight":
                plan.add(path, name, name, shape, dtype)
    finished = plan.finish(
        "checkpoint", "language model", "Is --model a Dense Connector checkpoint?", "Its config does not match."
    )
    folder.mkdir()
    write_weights(finished, folder, 5 * 10**9, progress=progress)
    model.config.architectures = [type(model).__name__]
    model.config.dtype = source.dtype
    model.config.save_pretrained(folder)
    processor = read_processor(source)
    tokenizer = plain_tokenizer(processor.tokenizer)
    tokenizer.chat_template = processor.chat_template  # llama.cpp's converter stores it in the GGUF (`--jinja`)
    # llama.cpp needs a token per embedding row; rows padded past the tokenizer get `[PAD<i>]` tokens, as its own
    # converter names them for SentencePiece vocabularies (no text ever becomes them).
    vocab_size = text_config.vocab_size
    if len(tokenizer) > vocab_size:
        raise CheckpointError(f"the tokenizer has {len(tokenizer)} tokens but the embedding only {vocab_size} rows.")
    tokenizer.add_tokens([f"[PAD{index}]" for index in range(len(tokenizer), vocab_size)], special_tokens=True)
    tokenizer.save_pretrained(folder)
    for name in ("generation_config.json", "tokenizer.model"):
        if (source.folder / name).is_file():
            shutil.copyfile(source.folder / name, folder / name)
    if not (folder / "tokenizer.model").is_file() and tokenizer_json_is_sentencepiece(folder / "tokenizer.json"):
        logger.warning(
            "%s has no tokenizer.model: llama.cpp's converter then gives every SentencePiece piece the same score "
            "and tokenises differently from transformers. Put the original tokenizer.model in it and export again.",
            source.folder,
        )


def tokenizer_json_is_sentencepiece(path: Path) -> bool:
    """Whether a tokenizer.json is a SentencePiece model converted to BPE (byte fallback), as Llama 2's are."""
    model = json.loads(path.read_text(encoding="utf-8"))["model"] if path.is_file() else {}
    return model.get("type") == "BPE" and bool(model.get("byte_fallback"))


def convert_command(llama_cpp: str, lm_folder: Path, outfile: Path, outtype: str) -> list[str]:
    script = str(Path(llama_cpp) / "convert_hf_to_gguf.py")
    return [sys.executable, script, str(lm_folder), "--outfile", str(outfile), "--outtype", outtype]


def export_gguf(
    model: str | Path,
    output: str | Path,
    llama_cpp: str | Path | None = None,
    outtype: str = "f16",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write `mmproj-model-<outtype>.gguf` and the language model into `output`.

    With `llama_cpp` (a llama.cpp source folder), the language model is converted by its `convert_hf_to_gguf.py`
    into `model-<outtype>.gguf`; without it, `language-model/` holds the transformers folder and the command that
    converts it is printed. Refuses (`CheckpointError`, nothing written) what llama.cpp's LLaVA path cannot compute.
    """
    output = Path(output).expanduser()
    check_output(output, overwrite)
    source = read_source(model)
    plan_fold(source.config)
    reason = gguf_refusal(source)
    if reason:
        raise CheckpointError(f"cannot export {model} to GGUF: {reason}.")
    if llama_cpp is not None and not (Path(llama_cpp) / "convert_hf_to_gguf.py").is_file():
        raise CheckpointError(f"--llama-cpp {llama_cpp} has no convert_hf_to_gguf.py; give llama.cpp's source folder.")
    with staged_output(output, overwrite) as staging:
        write_mmproj(source, staging / f"mmproj-model-{outtype}.gguf", outtype)
        write_language_model(source, staging / "language-model", progress)
        if llama_cpp is not None:
            command = convert_command(
                str(llama_cpp), staging / "language-model", staging / f"model-{outtype}.gguf", outtype
            )
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
                raise CheckpointError(f"llama.cpp's convert_hf_to_gguf.py failed: {tail[0]}")
            shutil.rmtree(staging / "language-model")
    if llama_cpp is None:
        command = convert_command(
            "LLAMA_CPP_DIR", output / "language-model", output / f"model-{outtype}.gguf", outtype
        )
        print(f"Convert the language model with llama.cpp (LLAMA_CPP_DIR: its source folder):\n{shlex.join(command)}")
    return output
