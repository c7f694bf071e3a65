"""The original's tokenisation, rebuilt on SentencePiece as a reference for the tests.

The original code tokenises with transformers 4.36's slow `LlamaTokenizer` and LLaVA's `tokenizer_image_token`:
the prompt is split at each `<image>`, every chunk is tokenised on its own (BOS added), and the chunks are joined
with the placeholder -200, keeping only the first chunk's BOS. The slow tokenizer splits its text at its special
tokens and encodes each segment with SentencePiece; `legacy=False` loads the model without its dummy prefix, puts a
"▁" in front of the whole text instead (after turning any "▁" in it into a space), and encodes a segment that starts
with a space behind a throw-away `<unk>` so that SentencePiece keeps that space. This module re-implements that
behaviour from its description; `tests/test_tokenization.py` checks it against ids recorded with the original.
"""

import re
from pathlib import Path

import sentencepiece
from sentencepiece import sentencepiece_model_pb2


SPACE = "\u2581"
ORIGINAL_IMAGE_TOKEN_INDEX = -200


class SlowLlamaTokenizer:
    """transformers 4.36's slow `LlamaTokenizer` on a SentencePiece model (BOS added, no EOS)."""

    def __init__(self, model_file: Path, legacy: bool, remove_extra_whitespaces: bool | None = None):
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(Path(model_file).read_bytes())
        if remove_extra_whitespaces is not None:
            proto.normalizer_spec.remove_extra_whitespaces = remove_extra_whitespaces
        if not legacy:
            proto.normalizer_spec.add_dummy_prefix = False
        self.model = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self.legacy = legacy
        self.specials = {"<unk>": self.model.unk_id(), "<s>": self.model.bos_id(), "</s>": self.model.eos_id()}
        self.unk_pieces = len(self.model.encode("<unk>", out_type=str))

    def _encode(self, segment: str) -> list[str]:
        if self.legacy or not segment.startswith((SPACE, " ")):
            return self.model.encode(segment, out_type=str)
        return self.model.encode("<unk>" + segment, out_type=str)[self.unk_pieces :]

    def tokenize(self, text: str) -> list[str]:
        if not self.legacy and text:
            text = SPACE + text.replace(SPACE, " ")
        pieces = []
        for segment in re.split("(" + "|".join(map(re.escape, self.specials)) + ")", text):
            if segment in self.specials:
                pieces.append(segment)
            elif segment:
                pieces.extend(self._encode(segment))
        if not self.legacy and len(pieces) > 1 and pieces[0] == SPACE and pieces[1] in self.specials:
            pieces = pieces[1:]
        return pieces

    def __call__(self, text: str) -> list[int]:
        ids = [self.specials[p] if p in self.specials else self.model.piece_to_id(p) for p in self.tokenize(text)]
        return [self.model.bos_id(), *ids]


def tokenizer_image_token(tokenize, prompt: str, bos_token_id: int, placeholders=("<image>",)) -> list[int]:
    """LLaVA's formula: chunks between placeholders tokenised one by one (`tokenize` adds the BOS), joined with -200,
    only the first chunk's BOS kept. Each placeholder in `placeholders` stands for one -200."""
    chunks = [tokenize(chunk) for chunk in re.split("|".join(map(re.escape, placeholders)), prompt)]
    offset = 1 if chunks and chunks[0][:1] == [bos_token_id] else 0
    ids = [bos_token_id] if offset else []
    for index, chunk in enumerate(chunks):
        if index:
            ids.append(ORIGINAL_IMAGE_TOKEN_INDEX)
        ids.extend(chunk[offset:])
    return ids
