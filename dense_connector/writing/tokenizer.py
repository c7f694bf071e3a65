"""The original tokenizer as a fast tokenizer that gives the original's ids.

This module owns the tokenizer conversion: a SentencePiece (`tokenizer.model`) tokenizer rebuilt with the normalizer
and pre-tokenizer that reproduce the original slow `LlamaTokenizer` (including its `legacy` behaviour and the model's
own whitespace rules), a `tokenizer.json` tokenizer taken as is, the `<image>` / `<video>` tokens, the pad token the
original would pad with, left padding, the conversation format a tokenizer implies, and the padded vocabulary size.
"""

import json
import re
import shutil
import tempfile
from pathlib import Path

from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from transformers import AddedToken, AutoTokenizer, PreTrainedTokenizerFast

from .sources import CheckpointError, read_json


IMAGE_TOKEN, VIDEO_TOKEN = "<image>", "<video>"
VOCAB_MULTIPLE = 64
SENTENCEPIECE_SPACE = "\u2581"


def sentencepiece_model(model_file: Path):
    """The parsed SentencePiece model proto (normalizer and trainer specs)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    return proto


def sentencepiece_pipeline(
    proto,
    legacy: bool,
    placeholders: tuple[str, ...] = (),
    specials: tuple[str, ...] = (),
    bos: str | None = None,
) -> tuple[normalizers.Normalizer | None, pre_tokenizers.PreTokenizer]:
    """Normalizer and pre-tokenizer that make the fast tokenizer split text as the original slow one does.

    The original code tokenises with transformers' slow `LlamaTokenizer`, i.e. SentencePiece with the model's own
    normalizer spec. transformers' fast conversion ignores that spec, so for models trained with
    `remove_extra_whitespaces` (runs of spaces collapsed, trailing spaces removed: a prompt chunk ending in "USER: "
    gets no trailing "▁") the ids differ. Non-legacy slow tokenizers (`legacy=False`) prefix the text with "▁" even
    when it starts with a space (" What" -> "▁▁What"), which the fast `Metaspace` does not; legacy ones let
    SentencePiece add its dummy prefix to every piece between special tokens.

    Non-legacy, the whole text goes through one normalizer (the tokens `specials` and `placeholders` are matched
    after normalisation), so that only the text's true start gets the prefix, as in the slow tokenizer; text before
    a special token loses its trailing spaces as SentencePiece strips each segment's. The original also tokenises
    the chunks between image placeholders one by one: each chunk after a placeholder starts with "▁" too, so a whole
    prompt gets the original's ids, and so does text after a leading `bos` (a chat template writes it; the original's
    prompt has none). Legacy tokenizers need none of this: every piece gets its own prefix.
    """
    spec = proto.normalizer_spec
    if not spec.escape_whitespaces or proto.trainer_spec.treat_whitespace_as_suffix:
        raise CheckpointError(
            "The SentencePiece model uses escape_whitespaces=False or treat_whitespace_as_suffix=True, which Llama "
            "tokenizers never do; this converter does not support it."
        )
    steps = [normalizers.Precompiled(spec.precompiled_charsmap)] if spec.precompiled_charsmap else []
    if not legacy:
        steps.append(normalizers.Replace(SENTENCEPIECE_SPACE, " "))
    if spec.remove_extra_whitespaces:
        # SentencePiece strips trailing whitespace after escaping it, so a trailing literal "▁" goes too.
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Replace(Regex("[ \u2581]+\\z"), "")]
        if legacy:
            steps.append(normalizers.Replace(Regex("\\A +"), ""))
    if legacy:
        if spec.add_dummy_prefix:
            steps.append(normalizers.Prepend(SENTENCEPIECE_SPACE))
        scheme = "never"
    else:
        steps.append(normalizers.Replace(Regex("\\A "), "  "))
        steps += segment_boundaries(placeholders, specials, spec.remove_extra_whitespaces, bos)
        scheme = "first"
    normalizer = normalizers.Sequence(steps) if steps else None
    return normalizer, pre_tokenizers.Metaspace(replacement=SENTENCEPIECE_SPACE, prepend_scheme=scheme, split=False)


def segment_boundaries(
    placeholders: tuple[str, ...], specials: tuple[str, ...], remove_extra_whitespaces: bool, bos: str | None = None
) -> list[normalizers.Normalizer]:
    """Normalizer steps for the places where the non-legacy original ends one SentencePiece call and starts another:
    before a special token or placeholder, trailing spaces go (with `remove_extra_whitespaces`); after a
    placeholder, or after a `bos` that starts the text, a chunk that starts with text gets its "▁"."""
    any_boundary = "|".join(re.escape(token) for token in (*placeholders, *specials))
    steps = []
    if bos:  # first, while the text still starts where it started
        steps.append(
            normalizers.Replace(Regex(f"\\A{re.escape(bos)}(?!{any_boundary}|\\z)"), bos + SENTENCEPIECE_SPACE)
        )
    if remove_extra_whitespaces and any_boundary:
        steps.append(normalizers.Replace(Regex(f"[ {SENTENCEPIECE_SPACE}]+(?={any_boundary})"), ""))
    for token in placeholders:
        followed_by_text = Regex(f"{re.escape(token)}(?!{any_boundary}|\\z)")
        steps.append(normalizers.Replace(followed_by_text, token + SENTENCEPIECE_SPACE))
    return steps


def normalized_added_tokens(backend: Tokenizer) -> Tokenizer:
    """`backend` with its added (special) tokens matched after normalisation rather than before."""
    state = json.loads(backend.to_str())
    for token in state["added_tokens"]:
        token["normalized"] = True
    return Tokenizer.from_str(json.dumps(state))


def sentencepiece_tokenizer(folder: Path, placeholders: tuple[str, ...] = (), **settings) -> PreTrainedTokenizerFast:
    """A fast tokenizer built from the original `tokenizer.model` that gives the original slow tokenizer's ids, with
    `placeholders` added as special tokens between which a whole prompt is tokenised as the original's chunks."""
    tokenizer_config = (
        read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    )
    legacy = tokenizer_config.get("legacy")
    legacy = True if legacy is None else bool(legacy)  # the slow LlamaTokenizer's default when unset
    with tempfile.TemporaryDirectory() as scratch:
        # Only the SentencePiece model and its configs, so that a stale tokenizer.json cannot take precedence.
        for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
            if (folder / name).is_file():
                shutil.copy(folder / name, scratch)
        converted = AutoTokenizer.from_pretrained(scratch, legacy=legacy)
    backend = converted.backend_tokenizer
    specials = tuple(token.content for token in backend.get_added_tokens_decoder().values())
    if not legacy:
        backend = normalized_added_tokens(backend)
    backend.normalizer, backend.pre_tokenizer = sentencepiece_pipeline(
        sentencepiece_model(folder / "tokenizer.model"), legacy, placeholders, specials, converted.bos_token
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=converted.bos_token,
        eos_token=converted.eos_token,
        unk_token=converted.unk_token,
        pad_token=converted.pad_token,
        clean_up_tokenization_spaces=False,
        **settings,
    )
    placeholder_tokens = [AddedToken(token, special=True, normalized=not legacy) for token in placeholders]
    tokenizer.add_tokens(placeholder_tokens, special_tokens=True)
    return tokenizer


def convert_tokenizer(folder: Path, original: dict) -> PreTrainedTokenizerFast:
    """The original tokenizer as a fast tokenizer with `<image>`/`<video>`, a pad token, and left padding."""
    # Left padding for batched generation; the original's training-time side is recorded in the model card.
    settings = {"padding_side": "left"}
    if original.get("tokenizer_model_max_length"):
        settings["model_max_length"] = int(original["tokenizer_model_max_length"])
    placeholders = (IMAGE_TOKEN, VIDEO_TOKEN)
    if (folder / "tokenizer.model").is_file():
        tokenizer = sentencepiece_tokenizer(folder, placeholders, **settings)
    elif (folder / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(folder, **settings)
        tokenizer.add_tokens(
            [AddedToken(token, special=True, normalized=False) for token in placeholders], special_tokens=True
        )
    else:
        raise CheckpointError(f"{folder} has neither tokenizer.model (SentencePiece) nor tokenizer.json.")
    if tokenizer.pad_token is None:
        vocab = tokenizer.get_vocab()
        pad_id = original.get("pad_token_id")
        if isinstance(pad_id, int) and 0 <= pad_id < len(tokenizer) and pad_id not in (tokenizer.eos_token_id,):
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)
        elif tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token  # what the original Vicuna training pads with
        elif "<|finetune_right_pad_id|>" in vocab:
            tokenizer.pad_token = "<|finetune_right_pad_id|>"
        else:
            tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def default_conv_mode(tokenizer) -> str:
    """`llama_3` for a Llama-3 tokenizer, `vicuna_v1` otherwise (the two formats of the released checkpoints)."""
    return "llama_3" if "<|eot_id|>" in tokenizer.get_vocab() else "vicuna_v1"


def padded_vocab_size(rows: int, tokenizer_size: int) -> int:
    return -(-max(rows, tokenizer_size) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
