"""STORM configuration and the one function that counts visual tokens.

STORM: "Token-Efficient Long Video Understanding for Multimodal LLMs" (Jiang, Li et al., arXiv 2503.04130, ICCV 2025).
Defaults reproduce the paper's main 7B model (PaliGemma SigLIP-So400m/14 at 448 px, LLM of Qwen2-VL-7B, temporal
pooling k = 4). Fields the paper leaves open are marked "our choice" in the docstrings.
"""

import math
import numbers
from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import CONFIG_MAPPING, AutoConfig, PreTrainedConfig

# PaliGemma's SigLIP-So400m/14 vision tower at 448 px (1024 patches per frame). Paper §4.1; sizes are the public config.
DEFAULT_VISION_CONFIG = {
    "model_type": "siglip_vision_model",
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 448,
    "vision_use_head": False,
}

# The LLM of Qwen2-VL-7B-Instruct loaded as a plain Qwen2 decoder (1-D RoPE, as VILA does). Paper §4.1.
DEFAULT_TEXT_CONFIG = {
    "model_type": "qwen2",
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    "tie_word_embeddings": False,
}


@strict
class StormTemporalEncoderConfig(PreTrainedConfig):
    r"""
    Configuration of STORM's Mamba temporal encoder (paper §3.2, Eq. 5): `num_hidden_layers` pre-LayerNorm residual
    Mamba-1 layers that scan a whole video as one sequence of `num_frames * tokens_per_frame` tokens. Field names follow
    transformers' `MambaConfig`; the paper gives none of these sizes, so every default below is our choice (mamba_ssm's
    `Mamba` defaults, L = 2).

    Args:
        hidden_size (`int`, *optional*):
            Width D of the encoder. There is no projection after the encoder, so it must equal the LLM's hidden size;
            `StormConfig` fills it in from `text_config.hidden_size` when left unset.
        num_hidden_layers (`int`, *optional*, defaults to 2):
            Number of Mamba layers L. 0 turns the temporal encoder off (a plain Linear projector, VILA-style).
        state_size (`int`, *optional*, defaults to 16):
            SSM state size N (mamba_ssm `d_state`).
        conv_kernel (`int`, *optional*, defaults to 4):
            Kernel of the causal depthwise convolution before each scan (mamba_ssm `d_conv`).
        expand (`int`, *optional*, defaults to 2):
            Inner width E = `expand * hidden_size` (mamba_ssm `expand`).
        time_step_rank (`int` or `"auto"`, *optional*, defaults to `"auto"`):
            Rank of the Δ projection (mamba_ssm `dt_rank`); `"auto"` is `ceil(hidden_size / 16)`.
        bidirectional (`bool`, *optional*, defaults to `True`):
            Scan the sequence forwards and backwards (paper §3.2). `False` is the uni-directional (streaming) variant of
            paper Table 7, where a token only sees the frames before it.
        bidirectional_merge (`str`, *optional*, defaults to `"sum"`):
            How the two gated scan outputs are merged before `out_proj`: `"sum"` (bimamba-v2 of Video Mamba Suite) or
            `"mean"` (Vision Mamba's `if_devide_out`). Our choice; the paper does not say. Ignored when not bidirectional.
        layer_norm_epsilon (`float`, *optional*, defaults to 1e-5):
            Epsilon of the pre-norm LayerNorm of each layer (the paper says "layer normalization").
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal init of `in_proj` and `x_proj`.
        use_mamba_kernels (`bool`, *optional*, defaults to `True`):
            On CUDA tensors, run the scan with mamba_ssm's `selective_scan_fn` and the convolution with causal_conv1d's
            `causal_conv1d_fn` when those packages import (`pip install -e '.[cuda]'` in a clone), and the scan with
            our Triton kernel where mamba_ssm does not. `False` forces the torch path, which is the reference and
            runs everywhere.
        chunk_size (`int`, *optional*, defaults to 32768):
            Tokens per chunk of the scan (32768 = 128 frames of 256 tokens). A longer sequence is scanned chunk by
            chunk with each direction's state carried across the chunk boundaries (forward scan left to right,
            backward scan right to left), with the same result as one whole-sequence scan, so that memory holds the
            D-wide residual stream of the whole video but the 2E-wide tensors of one chunk only. `None` scans the
            whole sequence at once. `StormModel` rounds it down to whole groups of `temporal_pool_size` frames
            (at least one group), so that each chunk is pooled as it leaves the last layer. Our choice.
    """

    model_type = "storm_temporal_encoder"

    hidden_size: int | None = None
    num_hidden_layers: int = 2
    state_size: int = 16
    conv_kernel: int = 4
    expand: int = 2
    time_step_rank: int | Literal["auto"] = "auto"
    bidirectional: bool = True
    bidirectional_merge: Literal["sum", "mean"] = "sum"
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    use_mamba_kernels: bool = True
    chunk_size: int | None = 32768

    def __post_init__(self, **kwargs):
        # Types are checked by @strict on every assignment; the values are checked here.
        defaults = {name: field.default for name, field in type(self).__dataclass_fields__.items()}
        for name in ("state_size", "conv_kernel", "expand"):
            check_count(f"temporal_encoder_config.{name}", getattr(self, name), fix=f"Default: {defaults[name]}.")
        check_count(
            "temporal_encoder_config.num_hidden_layers", self.num_hidden_layers, minimum=0, fix="0 = no temporal encoder."
        )
        if self.hidden_size is not None:
            check_count("temporal_encoder_config.hidden_size", self.hidden_size, fix="Leave it unset to use the LLM's.")
        if self.time_step_rank != "auto":
            check_count("temporal_encoder_config.time_step_rank", self.time_step_rank, fix='Or "auto" (ceil(D / 16)).')
        for name, positive in (("layer_norm_epsilon", True), ("initializer_range", False)):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (positive and value == 0):
                bound = "> 0" if positive else ">= 0"
                raise ValueError(
                    f"`temporal_encoder_config.{name}={value}` must be a finite number {bound} "
                    f"(default {defaults[name]})."
                )
        super().__post_init__(**kwargs)

    @property
    def intermediate_size(self) -> int:
        """Inner width E of the mixer (`expand * hidden_size`)."""
        return self.expand * self.hidden_size

    @property
    def dt_rank(self) -> int:
        """Rank of the Δ projection, `time_step_rank` with `"auto"` resolved to `ceil(hidden_size / 16)`."""
        return math.ceil(self.hidden_size / 16) if self.time_step_rank == "auto" else self.time_step_rank


@strict
class StormConfig(PreTrainedConfig):
    r"""
    Configuration of a STORM model: SigLIP vision tower → 2×2 space-to-channel downsample + Linear → Mamba temporal
    encoder → temporal/spatial average pooling and test-time temporal sampling → decoder LLM.

    Args:
        vision_config (`dict` or `PreTrainedConfig`, *optional*):
            Vision tower config (a SigLIP vision model). Defaults to PaliGemma's SigLIP-So400m/14 at 448 px.
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            Decoder LLM config; any decoder transformers builds with `AutoModel.from_config`. Defaults to the Qwen2 LLM
            of Qwen2-VL-7B.
        temporal_encoder_config (`dict` or `StormTemporalEncoderConfig`, *optional*):
            Mamba temporal encoder; its `hidden_size` is set to the LLM's.
        vision_feature_layer (`int`, *optional*, defaults to -2):
            Vision tower hidden state used as frame features (second to last layer, all patches; VILA's default).
            Only the vision tower's layers up to that hidden state run.
        vision_chunk_size (`int`, *optional*, defaults to 32):
            Frames (or images) per vision tower call: a video's frames go through the vision tower and the projector
            this many at a time, so that the vision tower's activations do not grow with the video. It changes
            memory and speed, not the features (equal to 1e-6 in float32). Our choice.
        downsample_factor (`int`, *optional*, defaults to 2):
            Side of the space-to-channel downsample: each `f×f` patch neighbourhood is concatenated along channels
            (1024 patches of 1152 ch → 256 tokens of 4608 ch at 448 px), then a Linear maps to the LLM width. Odd
            grids are zero-padded as in VILA. Paper §3.1 ("downsample + Linear").
        temporal_pool_size (`int`, *optional*, defaults to 4):
            k of temporal average pooling (paper Eq. 6-7): non-overlapping groups of k frames are averaged after the
            temporal encoder, in training and inference. 1 = off. Videos must have a multiple of k frames.
        spatial_pool_size (`int`, *optional*, defaults to 1):
            p of spatial average pooling: p×p windows of the token grid are averaged after the temporal encoder
            (p = 2 gives the paper's 4× "S.Pool"; the 2-D window is our reading of §3.3). 1 = off. Applies to images.
        temporal_sample_rate (`int`, *optional*, defaults to 1):
            s of test-time temporal sampling (paper Eq. 8): keep pooled frames 0, s, 2s, … when the model is not
            training. 1 = off; the paper's "+T.Sampling" results use 2. Never applies to images.
        image_token_id (`int`, *optional*, defaults to 151655):
            Placeholder token of an image's features (Qwen2-VL's `<|image_pad|>`).
        video_token_id (`int`, *optional*, defaults to 151656):
            Placeholder token of a video's features (Qwen2-VL's `<|video_pad|>`).
        tie_word_embeddings (`bool`, *optional*, defaults to `False`):
            Tie `lm_head` to the LLM's input embeddings (taken from `text_config` when it ties).

    Raises:
        ValueError / TypeError (or huggingface_hub's `StrictDataclassFieldValidationError` for a value of the wrong
        type, from `@strict`): a count, size or rate that is not an integer >= 1 (0 and negative values, floats, bools,
        NaN), a `vision_feature_layer` outside the tower's hidden states, placeholder ids outside the vocabulary or
        equal to each other, a sub-config `model_type` transformers does not know, a temporal encoder width other
        than the LLM's. Each message names the field, the value and the fix.

    Example:

    ```python
    >>> from storm_transformers import StormConfig, StormForConditionalGeneration
    >>> config = StormConfig(temporal_sample_rate=2)  # paper's "STORM + T.Pooling + T.Sampling" at inference
    >>> config.temporal_encoder_config.hidden_size
    3584
    ```
    """

    model_type = "storm"
    # Plain class attribute (not `sub_configs_defaults`) so the same file works on transformers 5.17 and 5.23.
    sub_configs = {
        "vision_config": AutoConfig,
        "text_config": AutoConfig,
        "temporal_encoder_config": StormTemporalEncoderConfig,
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    temporal_encoder_config: dict | PreTrainedConfig | None = None
    vision_feature_layer: int = -2
    vision_chunk_size: int = 32
    downsample_factor: int = 2
    temporal_pool_size: int = 4
    spatial_pool_size: int = 1
    temporal_sample_rate: int = 1
    image_token_id: int = 151655
    video_token_id: int = 151656
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        self.vision_config = _build_sub_config("vision_config", self.vision_config, DEFAULT_VISION_CONFIG)
        self.text_config = _build_sub_config("text_config", self.text_config, DEFAULT_TEXT_CONFIG)
        if isinstance(self.temporal_encoder_config, dict):
            self.temporal_encoder_config = StormTemporalEncoderConfig(**self.temporal_encoder_config)
        elif self.temporal_encoder_config is None:
            self.temporal_encoder_config = StormTemporalEncoderConfig()
        text_width = self.text_config.hidden_size
        if self.temporal_encoder_config.hidden_size is None:
            self.temporal_encoder_config.hidden_size = text_width
        elif self.temporal_encoder_config.hidden_size != text_width:
            raise ValueError(
                f"temporal_encoder_config.hidden_size={self.temporal_encoder_config.hidden_size} must equal "
                f"text_config.hidden_size={text_width}: the temporal encoder's output goes straight into the LLM. "
                "Leave it unset to inherit the LLM width."
            )
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True
        self._validate_storm_fields()
        super().__post_init__(**kwargs)

    def _validate_storm_fields(self):
        for name in ("downsample_factor", "temporal_pool_size", "spatial_pool_size", "temporal_sample_rate"):
            check_count(name, getattr(self, name), fix="1 = off.")
        vision = self.vision_config
        for name in ("image_size", "patch_size"):
            check_count(f"vision_config.{name}", getattr(vision, name, None), fix="Use the vision tower's config.")
        if vision.image_size < vision.patch_size:
            raise ValueError(
                f"`vision_config.image_size={vision.image_size}` is smaller than `vision_config.patch_size="
                f"{vision.patch_size}`: a frame would have no patches. Use the vision tower's own config."
            )
        for name in ("vision_feature_layer", "image_token_id", "video_token_id"):  # older @strict accepts bools
            check_count(name, getattr(self, name), minimum=None)
        num_layers = self.vision_config.num_hidden_layers
        if not -(num_layers + 1) <= self.vision_feature_layer <= num_layers:  # hidden_states: embeddings + each layer
            raise ValueError(
                f"`vision_feature_layer={self.vision_feature_layer}` is out of range for a vision tower with "
                f"{num_layers} layers (hidden states -{num_layers + 1}..{num_layers})."
            )
        grid = self.token_grid_size
        if grid % self.spatial_pool_size:
            raise ValueError(
                f"`spatial_pool_size={self.spatial_pool_size}` must divide the {grid}×{grid} token grid "
                f"(image_size={self.vision_config.image_size}, patch_size={self.vision_config.patch_size}, "
                f"downsample_factor={self.downsample_factor}). Use a divisor of {grid}."
            )
        vocab_size = self.text_config.vocab_size
        for name in ("image_token_id", "video_token_id"):
            if not 0 <= getattr(self, name) < vocab_size:
                raise ValueError(
                    f"`{name}={getattr(self, name)}` is outside the LLM vocabulary (vocab_size={vocab_size}). "
                    "Add the placeholder token to the tokenizer and resize the embeddings, then set its id here."
                )
        if self.image_token_id == self.video_token_id:
            raise ValueError(
                f"`image_token_id` and `video_token_id` are both {self.image_token_id}: the model could not tell an "
                "image's placeholders from a video's. Use two different tokens (Qwen2-VL's <|image_pad|> and "
                "<|video_pad|>)."
            )

    @property
    def token_grid_size(self) -> int:
        """Side of the per-frame token grid after the downsample (16 for 448 px, patch 14, factor 2)."""
        patches_per_side = self.vision_config.image_size // self.vision_config.patch_size
        return math.ceil(patches_per_side / self.downsample_factor)

    def num_video_tokens(self, num_frames: int, training: bool = False, temporal_sample_rate: int | None = None) -> int:
        """Visual tokens the LLM receives for one video of `num_frames` frames (see `get_num_visual_tokens`): at the
        config's `temporal_sample_rate`, or at `temporal_sample_rate` when given (what another s would give), or
        without sampling when `training`."""
        if temporal_sample_rate is None:
            temporal_sample_rate = self.temporal_sample_rate
        return get_num_visual_tokens(
            num_frames,
            grid_size=self.token_grid_size,
            temporal_pool_size=self.temporal_pool_size,
            spatial_pool_size=self.spatial_pool_size,
            temporal_sample_rate=1 if training else temporal_sample_rate,
        )

    def num_image_tokens(self) -> int:
        """Visual tokens the LLM receives for one image (a one-frame video: no temporal pooling or sampling)."""
        return get_num_visual_tokens(1, grid_size=self.token_grid_size, spatial_pool_size=self.spatial_pool_size)


def check_count(name: str, value, minimum: int | None = 1, fix: str = "") -> None:
    """Raise unless `value` is an integer (not a bool) of at least `minimum` (None: any integer); the message names
    `name`, the value and `fix`.

    Raises:
        TypeError: not an integer (a float, a bool, a string, None). ValueError: below `minimum`.
    """
    fix = f" {fix}" if fix else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        kind = "an integer" if minimum is None else f"an integer >= {minimum}"
        raise TypeError(f"`{name}` must be {kind}, got {value!r} ({type(value).__name__}).{fix}")
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}={value}` must be at least {minimum}.{fix}")


def _build_sub_config(name: str, value, defaults: dict) -> PreTrainedConfig:
    if isinstance(value, PreTrainedConfig):
        return value
    value = dict(defaults) if value is None else dict(value)
    model_type = value.pop("model_type", defaults["model_type"])
    if model_type not in CONFIG_MAPPING:
        raise ValueError(
            f"`{name}` has model_type={model_type!r}, which this transformers version does not know. Use a "
            f"transformers model type (the default is {defaults['model_type']!r}), or upgrade transformers."
        )
    return CONFIG_MAPPING[model_type](**value)


def get_num_visual_tokens(
    num_frames: int,
    grid_size: int,
    temporal_pool_size: int = 1,
    spatial_pool_size: int = 1,
    temporal_sample_rate: int = 1,
) -> int:
    """Number of visual tokens the LLM receives for one video (or image, with `num_frames=1` and the defaults).

    This is the only place the count is written down: the processor expands placeholders with it and the model checks
    its features against it. Order of operations (paper §3.3-3.4): temporal pooling (k) → spatial pooling (p) →
    test-time temporal sampling (s, keeps pooled frames 0, s, 2s, …).

    Args:
        num_frames (`int`): frames T sampled from the video.
        grid_size (`int`): side of the per-frame token grid after the downsample (16 at 448 px).
        temporal_pool_size (`int`): k; T must be a multiple of k.
        spatial_pool_size (`int`): p; `grid_size` must be a multiple of p.
        temporal_sample_rate (`int`): s; pass 1 for training, where sampling never applies.

    Returns:
        `int`: `ceil((T / k) / s) * (grid_size / p) ** 2` tokens.

    Raises:
        TypeError: a count that is not an integer. ValueError: T < 1 or another count < 1, T not a multiple of k (the
        message lists frame counts that work), or p not dividing the grid.
    """
    check_count("num_frames", num_frames, fix="A video needs at least one frame.")
    check_count("grid_size", grid_size)
    check_count("temporal_pool_size", temporal_pool_size, fix="1 = no temporal pooling.")
    check_count("spatial_pool_size", spatial_pool_size, fix="1 = no spatial pooling.")
    check_count("temporal_sample_rate", temporal_sample_rate, fix="1 = no test-time temporal sampling.")
    if num_frames % temporal_pool_size:
        lower = num_frames - num_frames % temporal_pool_size
        upper = lower + temporal_pool_size
        options = f"{lower} or {upper}" if lower else f"{upper}"
        raise ValueError(
            f"num_frames={num_frames} is not a multiple of temporal_pool_size={temporal_pool_size}: temporal pooling "
            f"averages non-overlapping groups of {temporal_pool_size} frames. Sample {options} frames "
            f"(any multiple of {temporal_pool_size} works), or use a model configured with another temporal_pool_size."
        )
    if grid_size % spatial_pool_size:
        raise ValueError(f"spatial_pool_size={spatial_pool_size} does not divide the {grid_size}×{grid_size} grid.")
    pooled_frames = num_frames // temporal_pool_size
    kept_frames = math.ceil(pooled_frames / temporal_sample_rate)
    return kept_frames * (grid_size // spatial_pool_size) ** 2


__all__ = ["StormConfig", "StormTemporalEncoderConfig", "check_count", "get_num_visual_tokens"]
