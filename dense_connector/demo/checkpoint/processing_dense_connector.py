"""Processor for Dense Connector models: image processor + tokenizer + chat template."""

import functools
import re

import torch
import transformers
from transformers import BatchFeature, PilBackend, ProcessorMixin
from transformers.image_utils import make_flat_list_of_images
from transformers.processing_utils import MultiModalData
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER
from transformers.utils import logging
from transformers.utils.chat_template_utils import render_jinja_template
from transformers.video_utils import is_batched_video, is_valid_video

from .configuration_dense_connector import (
    NO_NAFLEX_VIDEO,
    num_anyres_tokens,
    num_connector_tokens,
    num_tile_tokens,
    num_video_tokens,
)


IMAGE_BACKENDS = ("pil", "torchvision")


def pil_image_processor(image_processor):
    """The PIL-backend twin (`<Name>Pil`, same settings) of a torchvision-backend image processor; others unchanged."""
    pil_class = getattr(transformers, type(image_processor).__name__ + "Pil", None)
    if isinstance(image_processor, PilBackend) or pil_class is None:
        return image_processor
    return pil_class.from_dict(image_processor.to_dict())


def leading_count(text: str, token: str) -> int:
    """How many times `text` starts with `token` in a row."""
    count = 0
    while text.startswith(token, count * len(token)):
        count += 1
    return count


@functools.lru_cache(maxsize=8)
def template_bos_count(chat_template: str | None, bos_token: str) -> int:
    """How many BOS strings `chat_template` writes before its text (1 without a template, or when it writes none):
    text that starts with that many already holds the BOS the tokenizer would add."""
    if chat_template is None:
        return 1
    rendered, _ = render_jinja_template(
        conversations=[[{"role": "user", "content": "x"}]], chat_template=chat_template, bos_token=bos_token
    )
    return max(1, leading_count(rendered[0], bos_token))


def none_if_empty(items):
    """`None` for an empty list or a list of empty lists (one per sample): how text-only callers say "no images"."""
    if isinstance(items, (list, tuple)) and all(isinstance(item, (list, tuple)) and not item for item in items):
        return None
    return items


class DenseConnectorProcessor(ProcessorMixin):
    r"""
    Turns prompts and images into model inputs. Each `<image>` in the text becomes exactly as many image placeholder
    tokens as the connector produces for that image (and each `<video>` as many as the frames give), computed with
    the same functions the model's config uses. With a NaFlex image processor (SigLIP 2: `pixel_values` as patch
    sequences, `pixel_attention_mask`, `spatial_shapes`) each image's count follows its own valid patches.

    Text is tokenised as the original Dense Connector code does: split at the image/video placeholders, each chunk
    tokenised on its own (so a SentencePiece tokenizer starts every chunk with its dummy prefix), chunk BOS tokens
    dropped but the first. The released checkpoints were trained on exactly these ids.

    Args:
        image_processor: a transformers image processor (`LlavaImageProcessorPil` with `do_pad=True` reproduces the
            original `pad` preprocessing; `LlavaNextImageProcessorPil` the `anyres` one).
        tokenizer: the language model's tokenizer, with `image_token` (and `video_token`) as special tokens.
        chat_template (`str`, *optional*): Jinja chat template.
        image_token (`str`): the image placeholder.
        video_token (`str`): the video placeholder.
        patch_size (`int`): the vision tower's patch size.
        dense_connector_type (`str`): the model's connector type (`sti` adds pooled tokens).
        sti_pool_stride (`int`): the model's `sti_pool_stride`.
        image_downsample_factor (`int`): the model's `image_downsample_factor` (Efficient Dense Connector).
        video_pool_stride (`int`): the model's `video_pool_stride`.
        num_video_frames (`int`, *optional*): sample this many frames uniformly from each longer video (all frames
            when `None`); `num_frames=` in a call overrides it.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        image_token: str = "<image>",
        video_token: str = "<video>",
        patch_size: int = 14,
        dense_connector_type: str = "dci",
        sti_pool_stride: int = 8,
        image_downsample_factor: int = 1,
        video_pool_stride: int = 2,
        num_video_frames: int | None = None,
        **kwargs,
    ):
        self.image_token = image_token
        self.video_token = video_token
        self.patch_size = patch_size
        self.dense_connector_type = dense_connector_type
        self.sti_pool_stride = sti_pool_stride
        self.image_downsample_factor = image_downsample_factor
        self.video_pool_stride = video_pool_stride
        self.num_video_frames = num_video_frames
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(image_token)
        vocab = self.tokenizer.get_vocab()
        self.video_token_id = vocab.get(video_token)
        if image_token not in vocab:
            raise ValueError(
                f"The tokenizer has no {image_token!r} token; add it with "
                f"tokenizer.add_special_tokens({{'additional_special_tokens': [{image_token!r}]}}) and resize the "
                "model's embeddings."
            )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, backend: str = "pil", **kwargs):
        """Load a saved processor, with transformers' PIL image backend unless `backend="torchvision"`.

        The PIL backend's pixels are the original's. Where torchvision is installed, transformers would otherwise pick
        its torchvision backend, whose resizing differs (by up to 1.5e-2 on the reference fixtures).
        """
        if backend not in IMAGE_BACKENDS:
            raise ValueError(f"backend={backend!r} is not an image-processing backend; use one of {IMAGE_BACKENDS}.")
        processor = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if backend == "pil":
            processor.image_processor = pil_image_processor(processor.image_processor)
        return processor

    @property
    def model_input_names(self) -> list[str]:
        return [
            "input_ids",
            "attention_mask",
            "pixel_values",
            "image_sizes",
            "pixel_attention_mask",
            "spatial_shapes",
            "pixel_values_videos",
        ]

    def num_image_tokens(self, pixel_height: int, pixel_width: int, image_size: tuple[int, int] | None = None) -> int:
        """Placeholders for one image whose tower input is `pixel_height x pixel_width` (original size for AnyRes)."""
        tile = num_tile_tokens(
            pixel_height // self.patch_size,
            self.dense_connector_type,
            self.sti_pool_stride,
            self.image_downsample_factor,
        )
        pinpoints = getattr(self.image_processor, "image_grid_pinpoints", None)
        if image_size is None or pinpoints is None:
            return tile
        return num_anyres_tokens(tuple(image_size), pinpoints, pixel_height, tile)

    def num_video_tokens(self, num_frames: int, pixel_height: int) -> int:
        """Placeholders for one video of `num_frames` frames, each `pixel_height` pixels square at the tower input."""
        frame_tokens = self.num_image_tokens(pixel_height, pixel_height)
        return num_video_tokens(num_frames, frame_tokens, self.video_pool_stride)

    @staticmethod
    def _video_list(videos) -> list:
        """`videos` as a list of videos, each a list of frames or a `(frames, height, width, channels)` array."""
        if is_batched_video(videos):
            return list(videos)
        if is_valid_video(videos):
            return [videos]
        raise ValueError(
            "`videos` must be one video (a list of PIL images, or an array or tensor of shape (frames, height, width, "
            f"channels)) or a list of such videos; got {type(videos).__name__}."
        )

    @staticmethod
    def _sample_frames(video, num_frames: int | None) -> list:
        """`num_frames` frames spread uniformly over `video`: the middle frame of each of `num_frames` equal segments,
        as the original evaluation code picks them. A video with no more frames than that keeps them all."""
        total = len(video)
        if num_frames is None or total <= num_frames:
            return list(video)
        segment = (total - 1) / num_frames
        return [video[(round(segment * i) + round(segment * (i + 1))) // 2] for i in range(num_frames)]

    def _frame_pixel_values(self, frames: list, images_kwargs: dict) -> torch.Tensor:
        """Frames preprocessed exactly like images, `(frames, C, H, W)`; an AnyRes processor's tiles are dropped and
        only each frame's base (whole-image) view is kept, as a video frame is encoded as one tower-sized image."""
        images_kwargs = {k: v for k, v in images_kwargs.items() if k != "image_grid_pinpoints"}
        pixels = self.image_processor(frames, **{**images_kwargs, "return_tensors": "pt"})["pixel_values"]
        return pixels[:, 0] if pixels.dim() == 5 else pixels

    def _process_videos(self, videos: list, images_kwargs: dict, num_frames: int | None) -> tuple[torch.Tensor, list]:
        """Sample and preprocess every video: `(num_videos, frames, C, H, W)` pixels and each video's placeholders."""
        if num_frames is not None and num_frames < 1:
            raise ValueError(f"num_frames={num_frames} must be a positive number of frames to sample per video.")
        pixel_values = [
            self._frame_pixel_values(self._sample_frames(video, num_frames), images_kwargs) for video in videos
        ]
        frame_counts = [len(pixels) for pixels in pixel_values]
        if len(set(frame_counts)) > 1:
            raise ValueError(
                f"The videos have {frame_counts} frames after sampling; videos processed together must have the same "
                "number of frames. Pass `num_frames=` (or set `num_video_frames`) no larger than the shortest video."
            )
        counts = [self.num_video_tokens(len(pixels), pixels.shape[-2]) for pixels in pixel_values]
        return torch.stack(pixel_values), counts

    def _tokenize(
        self, text: str, adds_bos: bool, replacements: list[tuple[str, int, int]]
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """Chunk-by-chunk tokenisation of one prompt; each placeholder expanded to its run of placeholder ids.

        BOS strings leading the text become BOS ids and the text after them is tokenised as the start of a text, as
        the original's prompt (which has no BOS string) is; the tokenizer's BOS is added (`adds_bos`: special tokens
        are added and the tokenizer adds a BOS) only when the text does not already start with the BOS the chat
        template writes. Also returns each token's character span in the text
        with every placeholder expanded to its run (`(0, 0)` for an added BOS), as `return_offsets_mapping` reports.
        """
        bos, bos_id = self.tokenizer.bos_token, self.tokenizer.bos_token_id
        leading = leading_count(text, bos) if bos and bos_id is not None else 0
        template = self.chat_template if isinstance(self.chat_template, str) else None
        add_bos = adds_bos and leading < template_bos_count(template, bos)
        input_ids, offsets = ([bos_id], [(0, 0)]) if add_bos else ([], [])
        input_ids += [bos_id] * leading
        offsets += [(index * len(bos), (index + 1) * len(bos)) for index in range(leading)]
        position = leading * len(bos) if leading else 0
        pattern = "(" + "|".join(re.escape(token) for token in (self.image_token, self.video_token)) + ")"
        parts = re.split(pattern, text[position:])
        chunks = parts[0::2]
        encoded = self.tokenizer(chunks, add_special_tokens=False, return_offsets_mapping=True)
        for index, (chunk, chunk_ids, chunk_offsets) in enumerate(
            zip(chunks, encoded["input_ids"], encoded["offset_mapping"])
        ):
            if index > 0:
                _, token_id, count = replacements.pop(0)
                width = len(parts[2 * index - 1])
                input_ids.extend([token_id] * count)
                offsets.extend((position + k * width, position + (k + 1) * width) for k in range(count))
                position += count * width
            input_ids.extend(chunk_ids)
            offsets.extend((position + start, position + end) for start, end in chunk_offsets)
            position += len(chunk)
        return input_ids, offsets

    def __call__(self, images=None, text=None, videos=None, **kwargs) -> BatchFeature:
        """Process `images`, `videos` and `text` into `input_ids`, `attention_mask`, `pixel_values`, ...

        Accepts the usual tokenizer arguments (`padding`, `padding_side`, `truncation`, `max_length`,
        `return_tensors`, `add_special_tokens`, `return_offsets_mapping`: each token's character span in the text
        with every placeholder expanded to its run, as `return_assistant_tokens_mask` needs);
        truncation never cuts through an image's or video's placeholders.
        `videos` is one video or a list of videos, each a list of PIL images or a `(frames, height, width, channels)`
        array or tensor; `num_frames=` samples that many frames uniformly from each (default `num_video_frames`).
        Videos become `pixel_values_videos` of shape `(num_videos, frames, channels, height, width)`. Empty lists of
        images or videos mean none.
        """
        images, videos = none_if_empty(images), none_if_empty(videos)
        if images is None and text is None and videos is None:
            raise ValueError("DenseConnectorProcessor needs at least one of `text`, `images`, `videos`.")
        if isinstance(text, str):
            text = [text]
        if text is not None and not all(isinstance(t, str) for t in text):
            raise ValueError("`text` must be a string or a list of strings.")
        merged = self._merge_kwargs(
            self.valid_processor_kwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
        )
        text_kwargs, images_kwargs = merged["text_kwargs"], merged["images_kwargs"]
        return_offsets = text_kwargs.pop("return_text_replacement_offsets", False)
        return_tensors = text_kwargs.pop("return_tensors", None) or kwargs.get("return_tensors")

        data, replacements = {}, []
        if images is not None:
            images = self.image_processor.fetch_images(images)
            if text is not None:
                self._check_images_per_sample(text, images)
            images = make_flat_list_of_images(images)
            if text is not None:
                self._check_counts(text, self.image_token, len(images), "image")
            processed = self.image_processor(images, **{**images_kwargs, "return_tensors": None})
            data.update(processed)
            sizes = processed.get("image_sizes")
            for index, pixels in enumerate(processed["pixel_values"]):
                if "spatial_shapes" in processed:  # NaFlex patch sequences: one feature per valid patch
                    rows, cols = processed["spatial_shapes"][index]
                    count = num_connector_tokens(
                        int(rows) * int(cols), self.dense_connector_type, self.sti_pool_stride
                    )
                else:
                    height, width = pixels.shape[-2:]
                    count = self.num_image_tokens(height, width, None if sizes is None else sizes[index])
                replacements.append(("image", self.image_token_id, count))
        elif text is not None:
            self._check_counts(text, self.image_token, 0, "image")
        video_replacements = []
        if videos is not None:
            if self.video_token_id is None:
                raise ValueError(
                    f"The tokenizer has no {self.video_token!r} token, so it cannot take videos; add it with "
                    f"tokenizer.add_special_tokens({{'additional_special_tokens': [{self.video_token!r}]}})."
                )
            if "spatial_shapes" in getattr(self.image_processor, "model_input_names", ()):
                raise ValueError(NO_NAFLEX_VIDEO)
            videos = self._video_list(videos)
            if text is not None:
                self._check_counts(text, self.video_token, len(videos), "video")
            num_frames = merged["videos_kwargs"].get("num_frames")
            num_frames = self.num_video_frames if num_frames is None else num_frames
            data["pixel_values_videos"], counts = self._process_videos(videos, images_kwargs, num_frames)
            video_replacements = [("video", self.video_token_id, count) for count in counts]
        elif text is not None:
            self._check_counts(text, self.video_token, 0, "video")

        if text is not None:
            bos_id = self.tokenizer.bos_token_id
            adds_bos = text_kwargs.pop("add_special_tokens", True) and bos_id is not None
            adds_bos = adds_bos and self.tokenizer("")["input_ids"][:1] == [bos_id]
            image_queue, video_queue = list(replacements), list(video_replacements)
            return_offsets_mapping = text_kwargs.pop("return_offsets_mapping", False)
            sequences, offsets = [], []
            for sample in text:
                sample_replacements = []
                for match in re.finditer("|".join(re.escape(t) for t in (self.image_token, self.video_token)), sample):
                    queue = image_queue if match.group(0) == self.image_token else video_queue
                    sample_replacements.append(queue.pop(0))
                ids, spans = self._tokenize(sample, adds_bos, sample_replacements)
                sequences.append(self._truncate(ids, text_kwargs))
                offsets.append(spans[: len(sequences[-1])])
            self._warn_if_long(sequences)
            padded = self.tokenizer.pad(
                {"input_ids": sequences},
                padding=text_kwargs.get("padding", False),
                max_length=text_kwargs.get("max_length"),
                pad_to_multiple_of=text_kwargs.get("pad_to_multiple_of"),
                padding_side=text_kwargs.get("padding_side"),
                return_attention_mask=text_kwargs.get("return_attention_mask", True),
            )
            data.update(padded)
            if return_offsets_mapping:
                data["offset_mapping"] = self._pad_offsets(offsets, padded["input_ids"], text_kwargs)
            if return_offsets:
                data["text_replacement_offsets"] = self._replacement_offsets(text, replacements + video_replacements)
        return BatchFeature(data, tensor_type=return_tensors, skip_tensor_conversion=self.skip_tensor_conversion)

    def _pad_offsets(
        self, offsets: list[list[tuple[int, int]]], padded_ids: list[list[int]], text_kwargs: dict
    ) -> list[list[tuple[int, int]]]:
        """Each sequence's token spans padded with `(0, 0)` on the side the ids were padded on."""
        side = text_kwargs.get("padding_side") or self.tokenizer.padding_side
        result = []
        for spans, ids in zip(offsets, padded_ids):
            padding = [(0, 0)] * (len(ids) - len(spans))
            result.append(padding + spans if side == "left" else spans + padding)
        return result

    def _replacement_offsets(self, text: list[str], replacements: list[tuple[str, int, int]]) -> list[list[dict]]:
        """Where each placeholder of each prompt stands and the placeholder run it becomes, as transformers'
        `get_text_with_replacements` reports them (`return_text_replacement_offsets=True`; vLLM locates images so)."""
        tokens = {"image": self.image_token, "video": self.video_token}
        runs = {modality: [] for modality in tokens}
        for modality, _, count in replacements:
            runs[modality].append(tokens[modality] * count)
        return self.get_text_with_replacements(list(text), runs["image"], runs["video"])[1]

    def _get_num_multimodal_tokens(self, image_sizes: list[list[int]] | None = None, **kwargs) -> MultiModalData:
        """Placeholders of images of the given original `(height, width)`s, and their rows of `pixel_values` (one
        per image, AnyRes tiles included). vLLM sizes its multimodal budget and splits batched inputs with it."""
        if image_sizes is None:
            return MultiModalData()
        if "spatial_shapes" in getattr(self.image_processor, "model_input_names", ()):
            raise ValueError("Serving a model on a NaFlex tower (SigLIP 2) with vLLM is not supported.")
        processor = self.image_processor
        size = processor.crop_size if getattr(processor, "do_center_crop", False) else processor.size
        side = size.get("height") or size["shortest_edge"]
        counts = [self.num_image_tokens(side, side, tuple(image_size)) for image_size in image_sizes]
        return MultiModalData(num_image_tokens=counts, num_image_patches=[1] * len(counts))

    def _check_images_per_sample(self, text: list[str], images) -> None:
        """With images nested per sample (`[[a], [b, c]]`), each sample must hold one image per placeholder."""
        nested = isinstance(images, (list, tuple)) and all(isinstance(group, (list, tuple)) for group in images)
        if not nested or len(images) != len(text):
            return
        for index, (sample, group) in enumerate(zip(text, images)):
            if sample.count(self.image_token) != len(group):
                raise ValueError(
                    f"Sample {index} has {sample.count(self.image_token)} {self.image_token} placeholder(s) but "
                    f"{len(group)} image(s); pass exactly one image per placeholder in each sample."
                )

    def _check_counts(self, text: list[str], token: str, num_given: int, modality: str) -> None:
        found = sum(sample.count(token) for sample in text)
        if found != num_given:
            raise ValueError(
                f"The prompts contain {found} {token} placeholder(s) but {num_given} {modality}(s) were given; pass "
                f"exactly one {modality} per {token}, in order."
            )

    def _warn_if_long(self, sequences: list[list[int]]) -> None:
        """Warn (the model no longer refuses: RoPE scaling and packed rows make longer inputs valid) when a prompt,
        placeholders included, is longer than the tokenizer's `model_max_length`."""
        limit = self.tokenizer.model_max_length
        longest = max((len(ids) for ids in sequences), default=0)
        if limit is not None and limit < VERY_LARGE_INTEGER and longest > limit:
            logging.get_logger(__name__).warning(
                f"A prompt is {longest} tokens long (image and video placeholders included), more than the "
                f"tokenizer's model_max_length={limit}; unless the language model's RoPE is scaled for it, shorten "
                "the text or use fewer images, frames or tiles."
            )

    def _truncate(self, ids: list[int], text_kwargs: dict) -> list[int]:
        """Right-truncate to `max_length` when asked, refusing to cut an image's or video's placeholders."""
        max_length = text_kwargs.get("max_length")
        if not text_kwargs.get("truncation") or max_length is None or len(ids) <= max_length:
            return ids
        placeholder_ids = {self.image_token_id, self.video_token_id}
        if ids[max_length - 1] in placeholder_ids and ids[max_length] in placeholder_ids:
            raise ValueError(
                f"Truncating to max_length={max_length} would cut through an image's placeholder tokens; raise "
                "max_length or shorten the text."
            )
        return ids[:max_length]

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)


__all__ = ["DenseConnectorProcessor"]
