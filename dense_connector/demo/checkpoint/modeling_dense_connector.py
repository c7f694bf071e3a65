"""PyTorch Dense Connector model: a LLaVA-style model whose connector reads several vision-encoder layers."""

import os
import tempfile
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, ModelOutput
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import can_return_tuple
from transformers.utils.hub import hf_api

from .configuration_dense_connector import (
    NO_NAFLEX_VIDEO,
    DenseConnectorConfig,
    select_best_resolution,
    unpadded_grid_size,
)
from .connector_dense_connector import DenseConnector, valid_patch_counts, zero_image


try:
    from transformers.modeling_utils import slice_logits_to_keep
except ImportError:  # transformers before 5.21 slices in each model, for an int or 1-D positions

    def slice_logits_to_keep(hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
        indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return hidden_states[:, indices, :]


@dataclass
class DenseConnectorModelOutputWithPast(BaseModelOutputWithPast):
    """Language-model outputs plus the projected image (and video) features that replaced the placeholders."""

    image_hidden_states: torch.Tensor | None = None
    video_hidden_states: torch.Tensor | None = None


@dataclass
class DenseConnectorCausalLMOutputWithPast(ModelOutput):
    """Causal-LM outputs (loss, logits, cache) plus the projected image and video features."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.Tensor] | None = None
    attentions: tuple[torch.Tensor] | None = None
    image_hidden_states: torch.Tensor | None = None
    video_hidden_states: torch.Tensor | None = None


TOWER_KWARGS = ("output_hidden_states", "output_attentions")  # what get_*_features pass to the tower


def features_output(tower_outputs: ModelOutput, features: list[torch.Tensor]) -> BaseModelOutputWithPooling:
    """`get_*_features`' result, as Llava's: the tower's outputs, with the projected features as `pooler_output`."""
    return BaseModelOutputWithPooling(
        last_hidden_state=tower_outputs.last_hidden_state,
        pooler_output=features,
        hidden_states=tower_outputs.hidden_states,
        attentions=tower_outputs.attentions,
    )


MODEL_CARD = """---
library_name: transformers
pipeline_tag: image-text-to-text
tags:
- dense-connector
- image-text-to-text
---

# Dense Connector ({connector}) vision-language model

A `{architecture}` ([Dense Connector](https://arxiv.org/abs/2405.13800), Yao et al., NeurIPS 2024): a
`{tower}` vision tower whose hidden states `{layers}` are fused by the **{connector}** connector, projected,
and fed to a `{language_model}` language model ({tokens}).

The modeling code ships with the weights; load it with `trust_remote_code=True`:

```python
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained("<this repo>", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("<this repo>", trust_remote_code=True)
```
"""


class DenseConnectorPreTrainedModel(PreTrainedModel):
    config: DenseConnectorConfig
    config_class = DenseConnectorConfig
    base_model_prefix = "model"
    input_modalities = ("image", "video", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values"]
    _no_split_modules = ["DenseConnector"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True  # decoding steps; the tower's hooks and AnyRes shapes run at the (eager) prefill

    def model_card(self) -> str:
        """A model card naming the architecture, connector, tower and language model."""
        config = self.config
        return MODEL_CARD.format(
            architecture=type(self).__name__,
            connector=config.dense_connector_type,
            tower=config.vision_config.model_type,
            layers=config.dense_connector_layers or config.dense_connector_groups or "-",
            language_model=config.text_config.model_type,
            tokens="one token per valid patch of each image, at its own aspect ratio"
            if config.takes_patch_sequences
            else f"{config.num_image_tokens((config.tower_image_size,) * 2)} tokens per tower-sized image",
        )

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        """Save as transformers does, plus a `README.md` model card when the folder has none.

        A saved model with a head also maps `AutoModel` to its base model in `auto_map`: vLLM's Transformers backend
        builds the base model with `AutoModel` from the same folder. A model sharded by FSDP2 (whose class becomes
        torch's `FSDP<name>` subclass) is saved as its own class, so the folder holds this code, not torch's.
        """
        base = getattr(self, self.base_model_prefix, None)
        if self.is_remote_code() and isinstance(base, DenseConnectorModel):
            entry = f"{type(base).__module__.rsplit('.', 1)[-1]}.{type(base).__name__}"
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), "AutoModel": entry}
        sharded_class = type(self)
        self.__class__ = next(cls for cls in sharded_class.__mro__ if cls.__module__ == __name__)
        try:
            super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.__class__ = sharded_class
        card = os.path.join(save_directory, "README.md")
        if not os.path.exists(card):
            with open(card, "w", encoding="utf-8") as f:
                f.write(self.model_card())

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str = "Upload Dense Connector model",
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str = "5GB",
        **kwargs,
    ):
        """Upload a complete folder (weights, config with `auto_map`, code, model card) in one commit."""
        repo_id = hf_api().create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, max_shard_size=max_shard_size)
            return self._upload_modified_files(
                folder,
                repo_id,
                files_timestamps={},
                commit_message=commit_message,
                token=token,
                create_pr=create_pr,
                revision=revision,
            )

    @classmethod
    def is_custom_code(cls) -> bool:
        """False, so that tensors missing from a checkpoint get each sub-model's own initialisation.

        For custom code transformers treats a module whose own parameters are all set as initialised; a module with
        no parameters of its own (CLIP's attention and MLP, whose weights sit in child `nn.Linear`s) is then skipped,
        and its children keep the generic std-0.02 init. Our `_init_weights` uses the guarded init functions, so the
        standard path is correct for it.
        """
        return False

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, DenseConnectorModel) and module.image_newline is not None:
            std = 1 / module.image_newline.shape[0] ** 0.5
            nn.init.normal_(module.image_newline, std=std)


class DenseConnectorModel(DenseConnectorPreTrainedModel):
    """Vision tower, Dense Connector and language model, without a language-modeling head."""

    def __init__(self, config: DenseConnectorConfig):
        super().__init__(config)
        # `vision_config` holds only the layers up to the deepest hidden state the connector reads (see the config).
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.connector = DenseConnector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        anyres = config.image_grid_pinpoints is not None
        self.image_newline = nn.Parameter(torch.empty(config.text_config.hidden_size)) if anyres else None
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def _tiles_per_image(self, image_sizes: torch.Tensor) -> list[tuple[int, int]]:
        """AnyRes `(rows, cols)` tile grid of each image, from its original `(height, width)`."""
        tile = self.config.tower_image_size
        grids = []
        for height, width in image_sizes.tolist():
            best_height, best_width = select_best_resolution((height, width), self.config.image_grid_pinpoints)
            grids.append((best_height // tile, best_width // tile))
        return grids

    def _merge_anyres(self, tiles: torch.Tensor, grid: tuple[int, int], image_size: tuple[int, int]) -> torch.Tensor:
        """Base-image features, then the tile grid re-assembled, unpadded, and closed by `image_newline` per row."""
        base = tiles[0]
        rows, cols = grid
        newline = self.image_newline.to(base.dtype)
        if rows * cols == 1:
            return torch.cat([base, newline[None]], dim=0)
        side = int(base.shape[0] ** 0.5)
        hidden = base.shape[-1]
        grid_features = tiles[1 : 1 + rows * cols].view(rows, cols, side, side, hidden)
        grid_features = grid_features.permute(0, 2, 1, 3, 4).reshape(rows * side, cols * side, hidden)
        keep_rows, keep_cols = unpadded_grid_size(rows * side, cols * side, image_size)
        top, left = (rows * side - keep_rows) // 2, (cols * side - keep_cols) // 2
        grid_features = grid_features[top : top + keep_rows, left : left + keep_cols]
        grid_features = torch.cat([grid_features, newline.expand(keep_rows, 1, hidden)], dim=1)
        return torch.cat([base, grid_features.flatten(0, 1)], dim=0)

    def _check_pixels(self, pixels: torch.Tensor, layout: str | None, name: str = "pixel_values") -> None:
        """Refuse pixels the tower cannot encode correctly, saying what was expected."""
        layout = layout or "(num_images, channels, height, width)"
        vision = self.config.vision_config
        expected = (vision.num_channels, self.config.tower_image_size, self.config.tower_image_size)
        if pixels.dim() != layout.count(",") + 1 or tuple(pixels.shape[-3:]) != expected:
            raise ValueError(
                f"{name} must have shape {layout} with (channels, height, width) = {expected} for this vision tower; "
                f"got {tuple(pixels.shape)}. Prepare images with the model's processor."
            )
        if not pixels.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor (normalised pixels), got {pixels.dtype}.")

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        spatial_shapes: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling:
        """Encode images with the tower and project them into the LM's embedding space.

        `pixel_values` is `(num_images, C, H, W)`, or `(num_images, max_tiles, C, H, W)` with AnyRes, in which case
        `image_sizes` (`(num_images, 2)`, original height and width) is required. A tower that takes patch sequences
        (SigLIP 2 NaFlex) gets `(num_images, max_num_patches, C*P*P)` with its `pixel_attention_mask` and
        `spatial_shapes` (`(num_images, 2)` patch rows and columns); each image then gives one feature per valid patch
        (more with STI). As Llava's, the result holds the tower's outputs (`last_hidden_state` of tower width, one row
        per image or AnyRes tile; `hidden_states` and `attentions` when asked) and, in `pooler_output`, one
        `(tokens, text_hidden_size)` tensor per image: exactly what replaces that image's placeholders.
        """
        kwargs = {k: v for k, v in kwargs.items() if k in TOWER_KWARGS}
        if self.config.takes_patch_sequences:
            counts = valid_patch_counts(self.config, pixel_values, pixel_attention_mask, spatial_shapes)
            outputs, features = self.connector(
                self.vision_tower,
                pixel_values.to(self.vision_tower.dtype),
                valid_tokens=counts,
                pixel_attention_mask=pixel_attention_mask,
                spatial_shapes=spatial_shapes,
                **kwargs,
            )
            return features_output(outputs, features)
        anyres = self.config.image_grid_pinpoints is not None
        self._check_pixels(pixel_values, "(num_images, tiles, channels, height, width)" if anyres else None)
        if not anyres:
            outputs, features = self.connector(self.vision_tower, pixel_values.to(self.vision_tower.dtype), **kwargs)
            return features_output(outputs, list(features))

        if image_sizes is None:
            raise ValueError("AnyRes needs image_sizes (each image's original height and width) with pixel_values.")
        grids = self._tiles_per_image(image_sizes)
        counts = [1 + rows * cols for rows, cols in grids]
        tiles = torch.cat([pixels[:count] for pixels, count in zip(pixel_values, counts)], dim=0)
        outputs, features = self.connector(self.vision_tower, tiles.to(self.vision_tower.dtype), **kwargs)
        per_image = torch.split(features, counts, dim=0)
        merged = [
            self._merge_anyres(image_tiles, grid, tuple(size))
            for image_tiles, grid, size in zip(per_image, grids, image_sizes.tolist())
        ]
        return features_output(outputs, merged)

    @can_return_tuple
    def get_video_features(
        self, pixel_values_videos: torch.Tensor, **kwargs: Unpack[TransformersKwargs]
    ) -> BaseModelOutputWithPooling:
        """Project videos into the LM's embedding space, training-free (FreeVA style, as the paper evaluates video).

        `pixel_values_videos` is `(num_videos, frames, C, H, W)`. Every frame goes through the tower, connector and
        projector like an image; its tokens are max-pooled by `video_pool_stride`; the frames are joined in time order.
        The result holds the tower's outputs over all frames (`last_hidden_state` of shape `(num_videos * frames,
        patches, vision_hidden_size)`; `hidden_states` and `attentions` when asked) and, in `pooler_output`, one
        `(frames * tokens, text_hidden_size)` tensor per video. A video longer than the language model's
        `max_position_embeddings` is refused before the tower runs.
        """
        if self.config.takes_patch_sequences:
            raise ValueError(NO_NAFLEX_VIDEO)
        if pixel_values_videos.dim() != 5:
            raise ValueError(
                "pixel_values_videos must be (num_videos, frames, channels, height, width), got shape "
                f"{tuple(pixel_values_videos.shape)}."
            )
        num_videos, num_frames = pixel_values_videos.shape[:2]
        self._check_video_length(num_frames)
        frames = pixel_values_videos.flatten(0, 1).to(self.vision_tower.dtype)
        kwargs = {k: v for k, v in kwargs.items() if k in TOWER_KWARGS}
        outputs, features = self.connector(self.vision_tower, frames, **kwargs)
        stride = self.config.video_pool_stride
        if stride > 1:
            features = F.max_pool1d(features.transpose(1, 2), stride, stride).transpose(1, 2)
        videos = features.reshape(num_videos, num_frames * features.shape[1], features.shape[-1])
        return features_output(outputs, list(videos))

    def _check_video_length(self, num_frames: int) -> None:
        """Refuse, before the tower runs, a video whose tokens alone exceed the LM's `max_position_embeddings`."""
        limit = getattr(self.config.text_config, "max_position_embeddings", None)
        positions = self.config.num_video_tokens(num_frames)
        if limit is not None and positions > limit:
            raise ValueError(
                f"A video of {num_frames} frames takes {positions} positions, more than the language model's "
                f"max_position_embeddings={limit}. Sample fewer frames (the processor's `num_video_frames`, or "
                "`num_frames=` when calling it) or keep the per-frame max-pooling on (`video_pool_stride` > 1)."
            )

    def _zero_image_term(self) -> torch.Tensor:
        """0 x the features of a zero image, for a text-only training batch: as the original (which gives text-only
        records a zero image it never places), every rank runs the tower and connector at every step, so DDP reduces,
        and FSDP / ZeRO-3 gather, the same parameters on all ranks."""
        pixels, grid = zero_image(self.config, self.vision_tower.device, self.vision_tower.dtype)
        term = sum(features.sum() for features in self.connector(self.vision_tower, pixels, **grid)[1])
        if self.image_newline is not None:
            term = term + self.image_newline.sum()
        return 0.0 * term

    def _scatter_features(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor,
        features: list[torch.Tensor],
        token_id: int,
        modality: str,
    ) -> torch.Tensor:
        """Put `features` (one tensor per image or video, in order) where the placeholder tokens stand."""
        if input_ids is None:
            placeholder = self.get_input_embeddings()(torch.tensor(token_id, device=inputs_embeds.device))
            mask = (inputs_embeds == placeholder).all(-1)
        else:
            mask = input_ids == token_id
        flat = torch.cat(features, dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
        num_tokens = int(mask.sum())
        if num_tokens != flat.shape[0]:
            raise ValueError(
                f"The input has {num_tokens} {modality} placeholder tokens but the {len(features)} {modality}(s) give "
                f"{flat.shape[0]} features ({[len(f) for f in features]} per {modality}). Use the processor to expand "
                f"each <{modality}> into the right number of placeholders, and pass one {modality} per placeholder."
            )
        return inputs_embeds.masked_scatter(mask.unsqueeze(-1).to(inputs_embeds.device), flat)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        spatial_shapes: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> DenseConnectorModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        mm_encoder_outputs = dict(mm_encoder_outputs or {})
        if self.training or (attention_mask is None and position_ids is not None and past_key_values is None):
            # as the original; a cache also breaks activation recomputation, and it would turn off transformers'
            # packed-sequence mask that position ids without an attention mask (padding-free rows) ask for
            kwargs.setdefault("use_cache", False)
            if pixel_values is None and pixel_values_videos is None and not mm_encoder_outputs:
                inputs_embeds = inputs_embeds + self._zero_image_term().to(inputs_embeds.dtype)
        if pixel_values is not None:
            if mm_encoder_outputs.get("image") is not None:
                raise ValueError("Pass either pixel_values or pre-computed image features, not both.")
            mm_encoder_outputs["image"] = self.get_image_features(
                pixel_values,
                image_sizes=image_sizes,
                pixel_attention_mask=pixel_attention_mask,
                spatial_shapes=spatial_shapes,
            )
        if pixel_values_videos is not None:
            if mm_encoder_outputs.get("video") is not None:
                raise ValueError("Pass either pixel_values_videos or pre-computed video features, not both.")
            mm_encoder_outputs["video"] = self.get_video_features(pixel_values_videos)

        image_features = video_features = None
        if mm_encoder_outputs.get("image") is not None:
            image_features = mm_encoder_outputs["image"].pooler_output
            inputs_embeds = self._scatter_features(
                input_ids, inputs_embeds, image_features, self.config.image_token_id, "image"
            )
        if mm_encoder_outputs.get("video") is not None:
            if self.config.video_token_id is None:
                raise ValueError("This model has no video_token_id in its config; it cannot place video features.")
            video_features = mm_encoder_outputs["video"].pooler_output
            inputs_embeds = self._scatter_features(
                input_ids, inputs_embeds, video_features, self.config.video_token_id, "video"
            )

        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
        return DenseConnectorModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=torch.cat(image_features) if image_features is not None else None,
            video_hidden_states=torch.cat(video_features) if video_features is not None else None,
        )


class DenseConnectorForConditionalGeneration(DenseConnectorPreTrainedModel, GenerationMixin):
    """Dense Connector model with a language-modeling head, for `generate()` and training with `labels`."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    # In training with labels, `hidden_states_loss(last_hidden_state, lm_head, labels, **loss_kwargs)` (when set, e.g.
    # by `--use_liger_kernel`) gives the loss instead of the head and `loss_function`, and no logits are returned: a
    # chunked or fused cross-entropy need never hold the (tokens x vocabulary) logits.
    hidden_states_loss = None

    def __init__(self, config: DenseConnectorConfig):
        super().__init__(config)
        self.model = DenseConnectorModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        spatial_shapes: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling:
        return self.model.get_image_features(
            pixel_values,
            image_sizes=image_sizes,
            pixel_attention_mask=pixel_attention_mask,
            spatial_shapes=spatial_shapes,
            **kwargs,
        )

    def get_video_features(
        self, pixel_values_videos: torch.Tensor, **kwargs: Unpack[TransformersKwargs]
    ) -> BaseModelOutputWithPooling:
        return self.model.get_video_features(pixel_values_videos, **kwargs)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        image_sizes: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        spatial_shapes: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> DenseConnectorCausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            image_sizes=image_sizes,
            pixel_values_videos=pixel_values_videos,
            mm_encoder_outputs=mm_encoder_outputs,
            pixel_attention_mask=pixel_attention_mask,
            spatial_shapes=spatial_shapes,
            **kwargs,
        )
        loss = logits = None
        if labels is not None and self.training and self.hidden_states_loss is not None:
            loss = self.hidden_states_loss(outputs.last_hidden_state, self.lm_head, labels, **kwargs)
        else:
            logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        if labels is not None and loss is None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        return DenseConnectorCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
            video_hidden_states=outputs.video_hidden_states,
        )


__all__ = ["DenseConnectorPreTrainedModel", "DenseConnectorModel", "DenseConnectorForConditionalGeneration"]
