"""STORM model: SigLIP → downsample + Linear → Mamba temporal encoder → pooling/sampling → decoder LLM.

Paper: "STORM: Token-Efficient Long Video Understanding for Multimodal LLMs" (arXiv 2503.04130), §3. The layout follows
transformers' VLMs (Llava-OneVision): `StormModel` holds `vision_tower`, `multi_modal_projector`, `temporal_encoder` and
`language_model`; `StormForConditionalGeneration` adds `lm_head` and generation.

Shape legend: B batch (videos or images), T frames, P vision patches per frame, C vision width, g side of the per-frame
token grid after the downsample, N = g² tokens per frame, D LLM width, k/p/s temporal pool / spatial pool / sample sizes.
"""

import functools
import inspect
import math
import os
import shutil
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel, SiglipVisionModel
from transformers.cache_utils import Cache
from transformers.dynamic_module_utils import get_relative_import_files
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_storm import StormConfig
from .kernels import register_attention, use_compiled_prefill_regions, use_gelu_epilogue, use_triton_layer_norm
from .temporal_encoder import StormTemporalEncoder

try:  # transformers >= 5.24: the multimodal outputs (with `image_outputs` / `video_outputs`) and the name `cache`
    from transformers.modeling_outputs import MultimodalBaseModelOutputWithPast as _ModelOutputWithPast
    from transformers.modeling_outputs import MultimodalCausalLMOutputWithPast as _CausalLMOutputWithPast
except ImportError:  # transformers 5.17-5.23
    from transformers.modeling_outputs import BaseModelOutputWithPast as _ModelOutputWithPast
    from transformers.modeling_outputs import CausalLMOutputWithPast as _CausalLMOutputWithPast

# transformers 5.24 renamed the KV cache from `past_key_values` to `cache`, as a forward keyword and as an output field
# (the old name still works there, with a deprecation warning). STORM passes and returns the cache under the name the
# installed transformers uses, so it warns about nothing on 5.24 and still works on 5.17-5.23.
CACHE_NAME = "cache" if "cache" in _CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

# `attn_implementation="sdpa_gqa_decode"` (kernels.gqa_decode_attention: SDPA, with decode steps read per key/value
# head), also where this file runs as a saved checkpoint's code; `load_storm` picks it for the LLM.
register_attention()


def accepts_legacy_cache_name(forward):
    """Let `forward(..., cache=...)` also be called with `past_key_values=...`: deprecated from transformers 5.24 on
    (with transformers' own `deprecate_kwarg`, as its VLMs do), the name older `generate` passes before that."""
    if CACHE_NAME == "cache":
        return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(forward)

    @functools.wraps(forward)
    def wrapper(*args, **kwargs):
        if "past_key_values" in kwargs:
            kwargs["cache"] = kwargs.pop("past_key_values")
        return forward(*args, **kwargs)

    return wrapper


@dataclass
class StormModelOutputWithPast(_ModelOutputWithPast):
    """The LLM's `last_hidden_state`, KV cache (`cache`; `past_key_values` before transformers 5.24), `hidden_states`
    and `attentions`, plus the outputs of the visual encoders (as transformers' multimodal outputs of 5.24):

    image_outputs (`BaseModelOutputWithPooling`, *optional*): `get_image_features` of the images of the input;
        `pooler_output` of shape `(num_images, tokens_per_image, hidden_size)`.
    video_outputs (`BaseModelOutputWithPooling`, *optional*): `get_video_features` of the videos of the input;
        `pooler_output` of shape `(num_videos, tokens_per_video, hidden_size)`.
    """

    image_outputs: BaseModelOutputWithPooling | None = None  # declared by transformers >= 5.24 too
    video_outputs: BaseModelOutputWithPooling | None = None


@dataclass
class StormCausalLMOutputWithPast(_CausalLMOutputWithPast):
    """`loss` (when `labels` are given), `logits` `(batch_size, sequence_length, vocab_size)`, the LLM's KV cache,
    `hidden_states` and `attentions`, and `image_outputs` / `video_outputs` as in `StormModelOutputWithPast`."""

    image_outputs: BaseModelOutputWithPooling | None = None
    video_outputs: BaseModelOutputWithPooling | None = None


def space_to_channel(features: torch.Tensor, factor: int) -> torch.Tensor:
    """2×2 (f×f) space-to-channel downsample of a row-major patch grid, VILA's `flat_square_2x2` (paper §3.1).

    Each f×f neighbourhood becomes one token whose channels are the concatenation in (row, column, channel) order;
    odd grids are zero-padded at the bottom/right first.

    Args:
        features (`torch.Tensor` of shape `(frames, P, C)`): patches, P = G² in row-major order.
        factor (`int`): f.

    Returns:
        `torch.Tensor` of shape `(frames, g², f²·C)` with g = ceil(G / f), tokens row-major.
    """
    frames, num_patches, channels = features.shape
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"Expected a square grid of vision patches, got {num_patches} patches per frame.")
    grid = features.view(frames, side, side, channels)  # (F, G, G, C)
    pad = -side % factor
    grid = F.pad(grid, (0, 0, 0, pad, 0, pad))  # (F, G', G', C), zero rows/columns at the bottom/right
    g = (side + pad) // factor
    grid = grid.view(frames, g, factor, g, factor, channels).permute(0, 1, 3, 2, 4, 5)  # (F, g, g, f, f, C)
    return grid.reshape(frames, g * g, factor * factor * channels)  # (F, g², f²C)


def temporal_pool(features: torch.Tensor, pool_size: int) -> torch.Tensor:
    """Temporal average pooling, paper Eq. 6-7: mean of non-overlapping groups of k frames.

    `(B, T, N, D)` → `(B, T / k, N, D)`; T must be a multiple of k (checked by `get_num_visual_tokens`).
    """
    batch, frames, tokens, dim = features.shape
    return features.view(batch, frames // pool_size, pool_size, tokens, dim).mean(dim=2)


def spatial_pool(features: torch.Tensor, pool_size: int) -> torch.Tensor:
    """Spatial average pooling (paper §3.3, read as a p×p window on the token grid): `(B, T, g², D)` → `(B, T, (g/p)², D)`."""
    batch, frames, tokens, dim = features.shape
    g = math.isqrt(tokens)
    grid = features.view(batch, frames, g // pool_size, pool_size, g // pool_size, pool_size, dim)
    return grid.mean(dim=(3, 5)).flatten(2, 3)


def temporal_sample(features: torch.Tensor, sample_rate: int, first_index: int = 0) -> torch.Tensor:
    """Test-time temporal token sampling, paper Eq. 8: keep frames 0, s, 2s, … of the video: `(B, T, N, D)` →
    `(B, ceil(T/s), N, D)`. For a chunk of a longer video whose first frame is frame `first_index` of the video, the
    frames kept are those whose index in the video is a multiple of s."""
    return features[:, -first_index % sample_rate :: sample_rate]


def vision_hidden_state(vision_tower: nn.Module, pixel_values: torch.Tensor, layer: int) -> torch.Tensor:
    """`vision_tower(pixel_values, output_hidden_states=True).hidden_states[layer]`, computed by running only the
    patch embeddings and the encoder layers up to that hidden state (no later layer, no tuple of hidden states).

    Args:
        vision_tower (`SiglipVisionModel`): SigLIP's vision model (`embeddings`, `encoder.layers`).
        pixel_values (`torch.Tensor` of shape `(frames, 3, H, W)`)
        layer (`int`): index into the hidden states (0 = embeddings, i = output of encoder layer i; negative from
            the end), `StormConfig.vision_feature_layer`.

    Returns:
        `torch.Tensor` of shape `(frames, P, C)`.
    """
    if not isinstance(vision_tower, SiglipVisionModel):
        raise TypeError(
            f"STORM's vision tower must be a SigLIP vision model (SiglipVisionModel), got {type(vision_tower).__name__}."
            " Set vision_config to a 'siglip_vision_model' config."
        )
    layers = vision_tower.encoder.layers
    hidden_states = patch_embeddings(vision_tower.embeddings, pixel_values)  # (F, P, C)
    for encoder_layer in layers[: layer % (len(layers) + 1)]:
        hidden_states = encoder_layer(hidden_states, None)  # (F, P, C); SigLIP's vision layers take no mask
    return hidden_states


def patch_embeddings(embeddings: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """SigLIP's `embeddings(pixel_values)` (`SiglipVisionEmbeddings`: a patch convolution with stride = kernel and no
    padding, plus position embeddings), with the convolution computed as one matrix product over every patch of every
    frame: `(F, 3, H, W)` → `(F, P, C)`. The same result to rounding; on an H200, cuDNN ran that convolution as a
    generic implicit GEMM: 2.5 ms per 32 frames at 448 px alone against 0.5 ms for the product, and 105 ms more for
    128 frames inside a prefill (docs/benchmarks.md, "Prefill speed-ups")."""
    conv = embeddings.patch_embedding
    (patch_h, patch_w), (frames, channels, height, width) = conv.kernel_size, pixel_values.shape
    rows, cols = height // patch_h, width // patch_w
    pixels = pixel_values[..., : rows * patch_h, : cols * patch_w].to(conv.weight.dtype)  # what "valid" padding reads
    patches = pixels.reshape(frames, channels, rows, patch_h, cols, patch_w).permute(0, 2, 4, 1, 3, 5)  # (F,r,c,3,p,p)
    patches = patches.reshape(frames * rows * cols, channels * patch_h * patch_w)  # (F·P, 3·p·p)
    hidden_states = F.linear(patches, conv.weight.flatten(1), conv.bias).view(frames, rows * cols, -1)  # (F, P, C)
    return hidden_states + embeddings.position_embedding(embeddings.position_ids)


class StormMultiModalProjector(nn.Module):
    """Downsample + Linear (paper §3.1, Fig. 6): `(frames, P, C)` patches → `(frames, g², D)` tokens.

    The Linear replaces VILA's 2-layer MLP projector.
    """

    def __init__(self, config: StormConfig):
        super().__init__()
        self.downsample_factor = config.downsample_factor
        in_features = config.vision_config.hidden_size * config.downsample_factor**2
        self.linear = nn.Linear(in_features, config.text_config.hidden_size)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear(space_to_channel(image_features, self.downsample_factor))


# The `auto_map` of every Auto class that loads a saved STORM model; file-relative names, as the code files are saved
# flat beside config.json. transformers' `custom_object_save` writes only the entry of the class being saved.
AUTO_MAP = {
    "AutoModel": "modeling_storm.StormModel",
    "AutoModelForImageTextToText": "modeling_storm.StormForConditionalGeneration",
    "AutoModelForMultimodalLM": "modeling_storm.StormForConditionalGeneration",
}


class StormPreTrainedModel(PreTrainedModel):
    config: StormConfig
    config_class = StormConfig
    base_model_prefix = "model"
    input_modalities = ("image", "video", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = [CACHE_NAME]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True  # the decode step (LLM only) compiles in one graph (upstream static-cache tests)

    @classmethod
    def is_custom_code(cls) -> bool:
        """False: STORM initialises through `transformers.initialization` (per-parameter flags), as in-library models
        do. transformers (5.24) treats out-of-tree classes as custom code and then skips every module without
        parameters of its own, SigLIP's attention and MLP among them, when weights are missing from a checkpoint, so
        their linears would keep torch's default init instead of SigLIP's (`test_can_init_all_missing_weights`)."""
        return False

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' `save_pretrained`. When the class is registered for an Auto class (`import
        storm_transformers` does it, and transformers does it for remote code it loads), transformers also saves the
        code files and `auto_map` (`custom_object_save`); `auto_map` then names every Auto class of `AUTO_MAP`, not
        only the saved class's, so that `AutoModel`, `AutoModelForImageTextToText` and `AutoModelForMultimodalLM` all
        load the folder with `trust_remote_code=True`.

        A model sharded with FSDP2 is an instance of `FSDP<Class>`, a subclass defined in torch: transformers would
        copy torch's module and name that subclass in `auto_map` (it strips the prefix from `architectures` only), so
        the STORM class's own files are copied here instead (`get_relative_import_files`, as `custom_object_save`)."""
        if self._auto_class is None:
            return super().save_pretrained(save_directory, *args, **kwargs)
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **AUTO_MAP}
        wrapper = type(self)
        if wrapper.__module__ == __name__:
            return super().save_pretrained(save_directory, *args, **kwargs)
        storm_class = next(cls for cls in wrapper.__mro__ if cls.__module__ == __name__)
        if kwargs.get("is_main_process", True):
            os.makedirs(save_directory, exist_ok=True)
            source = inspect.getfile(storm_class)
            for path in (source, *get_relative_import_files(source)):
                shutil.copy(path, save_directory)
        wrapper._auto_class = None  # on the wrapper class only: transformers saves no code of its own
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            del wrapper._auto_class  # inherited again from the STORM class


class StormModel(StormPreTrainedModel):
    """STORM without the LM head: returns the LLM's last hidden state for text with visual features spliced in."""

    def __init__(self, config: StormConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        use_gelu_epilogue(self.vision_tower)  # its MLPs' GELU in the GEMM on CUDA (kernels.py)
        use_triton_layer_norm(self.vision_tower)  # its LayerNorms by a Triton kernel on CUDA (kernels.py)
        self.multi_modal_projector = StormMultiModalProjector(config)
        self.temporal_encoder = StormTemporalEncoder(config.temporal_encoder_config)
        self.language_model = AutoModel.from_config(config.text_config)
        use_compiled_prefill_regions(self.language_model)  # norms, MLPs, RoPE compiled at prefill on CUDA (kernels.py)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def _encode(self, pixel_values: torch.Tensor, is_video: bool, vision_states: list | None = None) -> torch.Tensor:
        """The STORM visual pipeline for a batch of equally long videos, `(B, T, 3, H, W)` → `(B, T', N', D)`.

        Memory does not grow with activations of the whole video: the vision tower and projector run on
        `config.vision_chunk_size` frames at a time, the temporal encoder scans chunks of whole groups of k frames
        with its state carried between them (updating the residual stream in place when autograd is not recording),
        and each chunk is pooled and sampled as it leaves the last layer. The result equals one pass over the whole
        video (tests/test_modeling_storm.py). `vision_states`, when given, receives the vision tower's hidden state
        at `vision_feature_layer` chunk by chunk (`(F_c, P, C)` each)."""
        batch, frames = pixel_values.shape[:2]
        tokens = self._frame_tokens(pixel_values.flatten(0, 1), vision_states)  # (B·T, N, D)
        return self._temporal_features(tokens.view(batch, frames, *tokens.shape[1:]), is_video)

    def _temporal_features(self, tokens: torch.Tensor, is_video: bool) -> torch.Tensor:
        """Temporal encoder, then temporal/spatial pooling and sampling, chunk by chunk: `(B, T, N, D)` projected frame
        tokens → `(B, T', N', D)`."""
        batch, frames, tokens_per_frame, width = tokens.shape
        pool_size = self.config.temporal_pool_size if is_video else 1
        chunk_frames = self._scan_chunk_frames(frames, tokens_per_frame, pool_size)
        sequence = tokens.view(batch, frames * tokens_per_frame, width)  # (B, T·N, D), (t, row, col)
        pooled = [
            self._pool(chunk.view(batch, -1, tokens_per_frame, width), start // tokens_per_frame, is_video)
            for start, chunk in self.temporal_encoder.output_chunks(sequence, chunk_frames * tokens_per_frame)
        ]  # each (B, T_c', N', D)
        return pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=1)  # (B, T', N', D)

    def _frame_tokens(self, frames: torch.Tensor, vision_states: list | None = None) -> torch.Tensor:
        """Vision tower (up to `vision_feature_layer`) + downsample + Linear, `config.vision_chunk_size` frames at a
        time: `(F, 3, H, W)` → `(F, N, D)`. Frames move to the vision tower's device and dtype one chunk at a time.
        `vision_states`, when given, receives each chunk's vision hidden state `(F_c, P, C)`."""
        chunk_size = self.config.vision_chunk_size
        if chunk_size < 1:
            raise ValueError(f"vision_chunk_size={chunk_size} must be a positive number of frames.")
        device, dtype = self.vision_tower.device, self.vision_tower.dtype
        tokens = None
        for start in range(0, frames.shape[0], chunk_size):
            pixels = frames[start : start + chunk_size].to(device, dtype)  # (F_c, 3, H, W)
            patches = vision_hidden_state(self.vision_tower, pixels, self.config.vision_feature_layer)  # (F_c, P, C)
            if vision_states is not None:
                vision_states.append(patches)
            chunk = self.multi_modal_projector(patches)  # (F_c, N, D)
            if start == 0 and len(pixels) == frames.shape[0]:
                return chunk
            if tokens is None:  # written in place, chunk by chunk: no list of chunks to concatenate (a second copy)
                tokens = chunk.new_empty(frames.shape[0], *chunk.shape[1:])  # (F, N, D)
            tokens[start : start + len(pixels)] = chunk
        return tokens

    def _visual_outputs(self, pixel_values, is_video, output_hidden_states, output_attentions) -> BaseModelOutputWithPooling:
        """`get_video_features` / `get_image_features` for `(B, T, 3, H, W)`: the STORM tokens `(B, T', N', D)` as
        `pooler_output`, and the vision tower's outputs as transformers' VLMs return them."""
        vision_config = self.config.vision_config
        if output_hidden_states is None:
            output_hidden_states = vision_config.output_hidden_states or self.config.output_hidden_states
        if output_attentions is None:
            output_attentions = vision_config.output_attentions or self.config.output_attentions
        batch, frames = pixel_values.shape[:2]
        if not (output_hidden_states or output_attentions):
            states = []
            features = self._encode(pixel_values, is_video, vision_states=states)
            patches = states[0] if len(states) == 1 else torch.cat(states)  # (B·T, P, C)
            return BaseModelOutputWithPooling(last_hidden_state=patches.unflatten(0, (batch, frames)), pooler_output=features)
        # Every layer's hidden states or attentions asked for: the whole vision tower runs on all frames at once, as in
        # transformers' VLMs (STORM's own path stops at `vision_feature_layer` and keeps no hidden states).
        flat = pixel_values.flatten(0, 1).to(self.vision_tower.device, self.vision_tower.dtype)  # (B·T, 3, H, W)
        vision = self.vision_tower(flat, output_hidden_states=True, output_attentions=bool(output_attentions))
        patches = vision.hidden_states[self.config.vision_feature_layer]  # (B·T, P, C)
        tokens = self.multi_modal_projector(patches)  # (B·T, N, D)
        features = self._temporal_features(tokens.unflatten(0, (batch, frames)), is_video)  # (B, T', N', D)
        return BaseModelOutputWithPooling(
            last_hidden_state=patches.unflatten(0, (batch, frames)),
            pooler_output=features,
            hidden_states=vision.hidden_states if output_hidden_states else None,
            attentions=vision.attentions if output_attentions else None,
        )

    def _scan_chunk_frames(self, frames: int, tokens_per_frame: int, pool_size: int) -> int:
        """Frames per chunk of the temporal encoder's scan: `temporal_encoder_config.chunk_size` tokens rounded down to
        whole groups of `pool_size` frames (at least one group); all `frames` when it is None."""
        chunk_size = self.config.temporal_encoder_config.chunk_size
        if chunk_size is None:
            return frames
        return max(chunk_size // (tokens_per_frame * pool_size), 1) * pool_size

    def _pool(self, features: torch.Tensor, first_frame: int, is_video: bool) -> torch.Tensor:
        """Temporal pooling (k), spatial pooling (p) and, in eval mode, temporal sampling (s) of frames `first_frame
        …` of a video, `(B, T_c, N, D)` → `(B, T_c', N', D)`. `first_frame` and T_c are multiples of k, so pooling a
        video chunk by chunk gives the pooled frames of the whole video, and sampling keeps the pooled frames whose
        index in the whole video is a multiple of s."""
        pool_size = self.config.temporal_pool_size if is_video else 1
        if pool_size > 1:
            features = temporal_pool(features, pool_size)  # (B, T_c/k, N, D)
        if self.config.spatial_pool_size > 1:
            features = spatial_pool(features, self.config.spatial_pool_size)  # (B, T_c/k, N/p², D)
        if is_video and not self.training and self.config.temporal_sample_rate > 1:
            first_pooled = first_frame // pool_size
            features = temporal_sample(features, self.config.temporal_sample_rate, first_pooled)  # (B, ~T_c/k/s, N/p², D)
        return features

    @can_return_tuple
    def get_video_features(
        self,
        pixel_values_videos: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """Visual tokens of a batch of videos, and the vision tower's outputs (as transformers' VLMs return them).

        Args:
            pixel_values_videos (`torch.Tensor` of shape `(batch_size, num_frames, 3, height, width)`):
                Frames as the video processor returns them; `num_frames` must be a multiple of `temporal_pool_size`.
            output_hidden_states, output_attentions (`bool`, *optional*): also return every vision layer's hidden
                states / attentions (defaults: the vision config's, then the model config's). The whole vision tower
                then runs on all frames at once; without them it runs `vision_chunk_size` frames at a time and stops
                at `vision_feature_layer`.

        Returns:
            `BaseModelOutputWithPooling`:
            - `pooler_output` `(batch_size, tokens_per_video, hidden_size)`: what the LLM receives,
              `tokens_per_video = config.num_video_tokens(num_frames, training=self.training)`;
            - `last_hidden_state` `(batch_size, num_frames, num_patches, vision_hidden_size)`: the vision tower's hidden
              state at `vision_feature_layer`, the one STORM projects (kept for all frames: for long videos use the
              model's forward, which does not keep it);
            - `hidden_states` / `attentions`: tuples over the vision tower's layers, each `(batch_size * num_frames,
              …)`, when asked for.

        Raises:
            ValueError: if the input is not 5-D float frames of the vision tower's size (`vision_config.image_size`)
            or `num_frames` is not a multiple of `temporal_pool_size`.
        """
        batch, expected = self._video_token_count(pixel_values_videos)
        outputs = self._visual_outputs(pixel_values_videos, True, output_hidden_states, output_attentions)
        outputs.pooler_output = outputs.pooler_output.reshape(batch, expected, -1)
        return outputs

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """Visual tokens of a batch of images, each run as a one-frame video (spatial scan only, paper §3.2).

        Args:
            pixel_values (`torch.Tensor` of shape `(num_images, 3, height, width)`)
            output_hidden_states, output_attentions (`bool`, *optional*): as in `get_video_features`.

        Returns:
            `BaseModelOutputWithPooling` whose `pooler_output` has shape `(num_images, config.num_image_tokens(),
            hidden_size)` and `last_hidden_state` `(num_images, num_patches, vision_hidden_size)` (the vision tower's
            hidden state at `vision_feature_layer`); `hidden_states` / `attentions` as in `get_video_features`.
        """
        self._check_image_pixels(pixel_values)
        outputs = self._visual_outputs(pixel_values.unsqueeze(1), False, output_hidden_states, output_attentions)
        outputs.last_hidden_state = outputs.last_hidden_state.squeeze(1)  # (I, P, C)
        outputs.pooler_output = outputs.pooler_output.flatten(1, 2)  # (I, N', D)
        return outputs

    def _video_token_count(self, pixel_values_videos: torch.Tensor) -> tuple[int, int]:
        """`(num_videos, visual tokens per video)` of `pixel_values_videos` `(B, T, 3, H, W)`, checked."""
        if pixel_values_videos.dim() != 5:
            raise ValueError(
                f"pixel_values_videos must have shape (batch_size, num_frames, 3, height, width), got "
                f"{tuple(pixel_values_videos.shape)}. Use StormVideoProcessor to build it."
            )
        self._check_pixels(pixel_values_videos, "pixel_values_videos")
        batch, frames = pixel_values_videos.shape[:2]
        return batch, self.config.num_video_tokens(frames, training=self.training)  # validates frames vs k

    def _check_image_pixels(self, pixel_values: torch.Tensor) -> None:
        if pixel_values.dim() != 4:
            raise ValueError(
                f"pixel_values must have shape (num_images, 3, height, width), got {tuple(pixel_values.shape)}."
            )
        self._check_pixels(pixel_values, "pixel_values")

    def _check_placeholders_have_pixels(self, input_ids, pixel_values, pixel_values_videos, cache) -> None:
        """Placeholders without their pixels would reach the LLM as the placeholder token's embedding, silently (e.g.
        a data collator that drops `pixel_values_videos`). Checked when the ids are read from the start (a prompt, a
        training sequence), i.e. nothing is cached yet: after the cache come the tokens `generate` produced, where a
        placeholder id the model generated is text, as in transformers' VLMs."""
        if input_ids is None or torch.compiler.is_compiling():  # a compiled decode step: no host sync, no graph break
            return
        if cache is not None and cache.get_seq_length() > 0:
            return
        for pixels, token_id, name, modality in (
            (pixel_values, self.config.image_token_id, "pixel_values", "image"),
            (pixel_values_videos, self.config.video_token_id, "pixel_values_videos", "video"),
        ):
            if pixels is None and bool((input_ids == token_id).any()):
                count = int((input_ids == token_id).sum())
                raise ValueError(
                    f"input_ids hold {count} {modality} placeholder tokens (id {token_id}) but no {name} were given, "
                    f"so the LLM would read the placeholder's embedding instead of the {modality}. Pass {name} "
                    "(StormProcessor returns both); when training with TRL's SFTTrainer, use "
                    "training.data.StormDataCollator (or `storm train`), since a default collator drops the pixels."
                )

    def _check_pixels(self, pixels: torch.Tensor, name: str) -> None:
        """Frames `(..., 3, H, W)` as the processor returns them: floating point, `num_channels` channels, H = W =
        `vision_config.image_size` (the vision tower's position embeddings fit that size only).

        Raises:
            ValueError: another dtype, channel count or size, naming what was expected.
        """
        vision = self.config.vision_config
        channels, side = getattr(vision, "num_channels", 3), vision.image_size
        if pixels.is_floating_point() and tuple(pixels.shape[-3:]) == (channels, side, side):
            return
        raise ValueError(
            f"{name} must be normalised float frames of shape (..., {channels}, {side}, {side}) (channels first; "
            f"{side} = vision_config.image_size, the size the vision tower takes); got {pixels.dtype} of shape "
            f"{tuple(pixels.shape)}. Build them with the checkpoint's StormProcessor / StormVideoProcessor (size "
            f"{{'height': {side}, 'width': {side}}}), which resizes, rescales and normalises the frames."
        )

    def get_placeholder_mask(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor, token_id: int
    ) -> torch.Tensor:
        """Boolean mask `(batch_size, sequence_length, 1)` of the placeholder `token_id` (from `input_ids`, or by
        comparing `inputs_embeds` with that token's embedding when only embeddings are given)."""
        if input_ids is None:
            token_embedding = self.get_input_embeddings()(torch.tensor(token_id, device=inputs_embeds.device))
            mask = (inputs_embeds == token_embedding).all(-1)
        else:
            mask = input_ids == token_id
        return mask.unsqueeze(-1).to(inputs_embeds.device)

    def _scatter_features(self, inputs_embeds, mask, features, modality: str, describe_features: str):
        """Put `features` `(num_tokens, D)` at the placeholder positions; the counts must agree exactly."""
        num_placeholders = int(mask.sum())
        if num_placeholders != features.shape[0]:
            token_id = self.config.video_token_id if modality == "video" else self.config.image_token_id
            raise ValueError(
                f"The input has {num_placeholders} {modality} placeholder tokens (id {token_id}) but the "
                f"{modality}s give {features.shape[0]} feature tokens ({describe_features}). Build the inputs with "
                f"StormProcessor, which expands each placeholder to exactly this count, and make sure its "
                f"temporal_pool_size / spatial_pool_size / temporal_sample_rate match the model config."
            )
        return inputs_embeds.masked_scatter(mask, features.to(inputs_embeds.device, inputs_embeds.dtype))

    def _check_context_length(self, input_ids, inputs_embeds, num_videos: int):
        max_positions = getattr(self.config.text_config, "max_position_embeddings", None)
        length = inputs_embeds.shape[1]
        if max_positions is None or length <= max_positions:
            return
        visual = self.get_placeholder_mask(input_ids, inputs_embeds, self.config.video_token_id)
        visual = visual | self.get_placeholder_mask(input_ids, inputs_embeds, self.config.image_token_id)
        num_visual = int(visual.sum(dim=1).max())
        hint = ""
        if num_videos:
            budget = (max_positions - (length - num_visual)) // num_videos  # visual tokens per video that fit
            sample_rate = 1 if self.training else self.config.temporal_sample_rate
            frames_per_kept_frame = self.config.temporal_pool_size * sample_rate
            max_frames = max(budget // self.config.num_image_tokens(), 0) * frames_per_kept_frame
            hint = f" Sample at most {max_frames} frames per video (num_frames),"
        raise ValueError(
            f"The input is {length} tokens long, {num_visual} of them visual, but the LLM's context is {max_positions} "
            f"tokens (text_config.max_position_embeddings).{hint} or compress more: a larger temporal_pool_size or "
            f"spatial_pool_size at training time, or temporal_sample_rate at inference."
        )

    @can_return_tuple
    @accepts_legacy_cache_name
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> StormModelOutputWithPast:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                Token ids with each image/video placeholder expanded to its visual token count (StormProcessor).
            pixel_values (`torch.Tensor` of shape `(num_images, 3, height, width)`, *optional*)
            pixel_values_videos (`torch.Tensor` of shape `(num_videos, num_frames, 3, height, width)`, *optional*)
            attention_mask, position_ids, inputs_embeds, use_cache: as for the LLM.
            cache (`Cache`, *optional*): the LLM's KV cache (`past_key_values` before transformers 5.24, still
                accepted).

        Raises:
            ValueError: placeholder tokens and visual features disagree in number, or placeholders come without their
            pixels (checked while nothing is cached: a placeholder id that `generate` produced is text); pixels of
            another dtype or size than the vision tower takes; the prompt exceeds the LLM context.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        self._check_placeholders_have_pixels(input_ids, pixel_values, pixel_values_videos, cache)
        image_outputs = video_outputs = None
        if pixel_values is not None or pixel_values_videos is not None:
            num_videos = 0 if pixel_values_videos is None else pixel_values_videos.shape[0]
            self._check_context_length(input_ids, inputs_embeds, num_videos)
        # The visual features go through `_encode`, which keeps no vision hidden states (long videos), rather than
        # `get_*_features`; `image_outputs` / `video_outputs` carry the features the LLM received.
        if pixel_values is not None:
            self._check_image_pixels(pixel_values)
            image_features = self._encode(pixel_values.unsqueeze(1), is_video=False).flatten(1, 2)  # (I, N', D)
            image_outputs = BaseModelOutputWithPooling(pooler_output=image_features)
            mask = self.get_placeholder_mask(input_ids, inputs_embeds, self.config.image_token_id)
            describe = f"{pixel_values.shape[0]} images × {self.config.num_image_tokens()} tokens"
            inputs_embeds = self._scatter_features(inputs_embeds, mask, image_features.flatten(0, 1), "image", describe)
        if pixel_values_videos is not None:
            batch, expected = self._video_token_count(pixel_values_videos)
            video_features = self._encode(pixel_values_videos, is_video=True).reshape(batch, expected, -1)  # (V, n, D)
            video_outputs = BaseModelOutputWithPooling(pooler_output=video_features)
            frames = pixel_values_videos.shape[1]
            describe = (
                f"{batch} videos × {expected} tokens: {frames} frames, "
                f"temporal_pool_size={self.config.temporal_pool_size}, spatial_pool_size={self.config.spatial_pool_size}, "
                f"temporal_sample_rate={self.config.temporal_sample_rate}"
                + (" (not applied in training mode)" if self.training else "")
            )
            mask = self.get_placeholder_mask(input_ids, inputs_embeds, self.config.video_token_id)
            inputs_embeds = self._scatter_features(inputs_embeds, mask, video_features.flatten(0, 1), "video", describe)

        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **{CACHE_NAME: cache},
            **kwargs,
        )
        return StormModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=image_outputs,
            video_outputs=video_outputs,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
        )


class StormForConditionalGeneration(StormPreTrainedModel, GenerationMixin):
    """STORM with a language-modeling head: the class `AutoModelForImageTextToText` loads.

    Example:

    ```python
    >>> import storm_transformers  # registers the Auto classes
    >>> from transformers import AutoModelForImageTextToText, AutoProcessor
    >>> model = AutoModelForImageTextToText.from_pretrained("path/to/storm")
    >>> processor = AutoProcessor.from_pretrained("path/to/storm")
    >>> messages = [{"role": "user", "content": [{"type": "video", "path": "clip.mp4"}, {"type": "text", "text": "What happens?"}]}]
    >>> inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
    ...                                        return_tensors="pt", processor_kwargs={"num_frames": 16})
    >>> answer = model.generate(**inputs, max_new_tokens=32)
    ```
    """

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}  # as Llava-OneVision: a tied head is sharded with its embedding

    def __init__(self, config: StormConfig):
        super().__init__(config)
        self.model = StormModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()
        if config.tie_word_embeddings and "model.language_model.embed_tokens" not in self._tp_plan:
            # transformers < 5.24 keeps the input embeddings whole under tensor parallelism: so must their tied head
            self._tp_plan.pop("lm_head", None)

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def get_video_features(self, pixel_values_videos: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        """See `StormModel.get_video_features`."""
        return self.model.get_video_features(pixel_values_videos, **kwargs)

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        """See `StormModel.get_image_features`."""
        return self.model.get_image_features(pixel_values, **kwargs)

    # `generate` checks its kwargs against this signature: show the base method's (its cache argument is named
    # `past_key_values` before transformers 5.24, `cache` from 5.24 on)
    @functools.wraps(GenerationMixin.prepare_inputs_for_generation, assigned=())
    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, **kwargs) -> dict:
        """`GenerationMixin.prepare_inputs_for_generation`, except that `pixel_values` / `pixel_values_videos` go
        with every forward whose cache is still empty, i.e. whose `input_ids` still hold the placeholders.

        transformers forwards pixels on a `generate` call's first iteration only, and never counts an assistant
        model's call (assisted decoding, `assistant_model=`) as a first iteration: the assistant's prefill would get
        the placeholders without their pixels, which `StormModel.forward` rejects.
        """
        model_inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        cache = kwargs.get(CACHE_NAME)
        if cache is None or cache.get_seq_length() == 0:
            for name in ("pixel_values", "pixel_values_videos"):
                if model_inputs.get(name) is None and kwargs.get(name) is not None:
                    model_inputs[name] = kwargs[name]
        return model_inputs

    @can_return_tuple
    @accepts_legacy_cache_name
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> StormCausalLMOutputWithPast:
        r"""
        Args: as `StormModel.forward`, plus
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Next-token targets; -100 positions (prompt, visual placeholders, padding) are ignored.
            logits_to_keep (`int` or `torch.Tensor`, *optional*, defaults to 0):
                Compute logits only for the last `logits_to_keep` positions (0 = all), as in transformers' LMs.
        """
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            pixel_values_videos=pixel_values_videos,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs)
        return StormCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=outputs.image_outputs,
            video_outputs=outputs.video_outputs,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
        )


__all__ = ["StormModel", "StormForConditionalGeneration", "StormPreTrainedModel"]
