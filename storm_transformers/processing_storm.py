"""STORM processor: tokenizer + SigLIP image processor + `StormVideoProcessor` + ChatML chat template.

It expands every video/image placeholder to exactly the number of visual tokens the model produces for it, computed by
`configuration_storm.get_num_visual_tokens` from the frames actually sampled and the pooling/sampling settings, which
must match the model config (`StormConfig.temporal_pool_size` etc.; conversion writes both from one source).

`video_token_budget` says, before any frame is decoded, which frames a sampling takes, the visual tokens they make
and whether they fit the LLM context (and, asked to, finds the sampling that fits); `storm generate` prints it.
"""

import math
from dataclasses import dataclass
from importlib import resources

from transformers.image_utils import make_flat_list_of_images
from transformers.processing_utils import MultiModalData, ProcessorMixin
from transformers.video_utils import VideoMetadata

from .configuration_storm import StormConfig, check_count, get_num_visual_tokens

from .video_processing_storm import StormVideoMetadata, StormVideoProcessor, _flatten_videos, sample_frame_indices


def default_chat_template() -> str:
    """The ChatML template shipped with the package (`storm_transformers/chat_template.jinja`)."""
    return resources.files(__package__).joinpath("chat_template.jinja").read_text(encoding="utf-8")


def _countable_videos(videos):
    """One string per video of `videos` (any form `StormVideoProcessor` takes: files, bytes, arrays, frame lists,
    nested per sample): transformers' counting helpers only know string paths and decoded arrays."""
    return None if videos is None else ["video"] * len(_flatten_videos(videos))


class StormProcessor(ProcessorMixin):
    r"""
    Processor of STORM (`AutoProcessor`): turns chat messages with videos/images into model inputs.

    Args:
        image_processor (`SiglipImageProcessor`): resizes/normalizes images to `pixel_values` `(num_images, 3, H, W)`;
            its `size` is the vision tower's input size, which video frames must have too.
        tokenizer (`PreTrainedTokenizerBase`): the LLM's tokenizer; must contain `image_token` and `video_token`.
        video_processor (`StormVideoProcessor`): decodes/samples videos to `pixel_values_videos` `(B, T, 3, H, W)`.
        chat_template (`str`, *optional*): Jinja template; defaults to the package's ChatML template.
        image_token (`str`, *optional*, defaults to `"<|image_pad|>"`): image placeholder.
        video_token (`str`, *optional*, defaults to `"<|video_pad|>"`): video placeholder.
        patch_size (`int`, *optional*, defaults to 14): vision tower patch size (pixels).
        downsample_factor, temporal_pool_size, spatial_pool_size, temporal_sample_rate (`int`, *optional*):
            as in `StormConfig` (defaults 2, 4, 1, 1); they must equal the model's. Set `temporal_sample_rate` on both
            the processor and `model.config` to use test-time sampling. For training batches, where the model never
            samples, use `temporal_sample_rate=1`. `fps` sampling gives a multiple of `temporal_pool_size` frames.

    Raises:
        ValueError: a placeholder token that the tokenizer lacks; a size or rate that is not a positive int; frame
        counts that are not a multiple of `temporal_pool_size`; frames that are not square or not the vision tower's
        size. TypeError: a conversation that is not a list of `{"role", "content"}` messages.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        video_processor=None,
        chat_template=None,
        image_token="<|image_pad|>",
        video_token="<|video_pad|>",
        patch_size=14,
        downsample_factor=2,
        temporal_pool_size=4,
        spatial_pool_size=1,
        temporal_sample_rate=1,
    ):
        self.image_token = image_token
        self.video_token = video_token
        self.patch_size = patch_size
        self.downsample_factor = downsample_factor
        self.temporal_pool_size = temporal_pool_size
        self.spatial_pool_size = spatial_pool_size
        self.temporal_sample_rate = temporal_sample_rate
        self._check_settings()
        super().__init__(
            image_processor, tokenizer, video_processor, chat_template=chat_template or default_chat_template()
        )
        self.image_token_id = self._placeholder_id(image_token)
        self.video_token_id = self._placeholder_id(video_token)

    def save_pretrained(self, *args, **kwargs):
        """`ProcessorMixin.save_pretrained`, after which the processor equals the one `from_pretrained` loads back:
        transformers' `custom_object_save` sets `auto_map` on the processor to write it into `processor_config.json`
        (for remote code), while loading drops it."""
        had_auto_map = "auto_map" in self.__dict__
        try:
            return super().save_pretrained(*args, **kwargs)
        finally:
            if not had_auto_map:
                self.__dict__.pop("auto_map", None)

    def _check_settings(self) -> None:
        """The token-count settings are positive ints (they can be set after construction, e.g. by `storm generate`)."""
        for name in (
            "patch_size",
            "downsample_factor",
            "temporal_pool_size",
            "spatial_pool_size",
            "temporal_sample_rate",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"{name} must be a positive int (1 = off for pooling and sampling), got {value!r}. It must equal "
                    f"the model's config.{name}."
                )

    def _placeholder_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or (token_id == self.tokenizer.unk_token_id and token != self.tokenizer.unk_token):
            raise ValueError(
                f"The tokenizer has no {token!r} token. Add it as a special token (tokenizer.add_special_tokens("
                f"{{'extra_special_tokens': [{token!r}]}}, replace_extra_special_tokens=False)) and resize the "
                "model's embeddings to match (`storm convert compose` does both)."
            )
        return token_id

    def _grid_size(self, height: int, width: int) -> int:
        if height != width:
            raise ValueError(
                f"STORM needs square frames (it scans a square token grid); got {height}×{width}. Keep the video "
                "processor's size square, e.g. {'height': 448, 'width': 448}."
            )
        expected = getattr(getattr(self, "image_processor", None), "size", None)
        side = expected.get("height") if isinstance(expected, dict) else getattr(expected, "height", None)
        if side is not None and height != side:
            raise ValueError(
                f"The frames are {height}×{width} pixels but the vision tower takes {side}×{side} (image_processor."
                f"size). Set the video processor's size to {{'height': {side}, 'width': {side}}} and keep do_resize=True."
            )
        return math.ceil(height // self.patch_size / self.downsample_factor)

    def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs) -> str:
        """Placeholder string for video `video_idx`: `video_token` repeated `get_num_visual_tokens(...)` times."""
        frames, _, height, width = video_inputs["pixel_values_videos"][video_idx].shape
        count = get_num_visual_tokens(
            frames,
            grid_size=self._grid_size(height, width),
            temporal_pool_size=self.temporal_pool_size,
            spatial_pool_size=self.spatial_pool_size,
            temporal_sample_rate=self.temporal_sample_rate,
        )
        return self.video_token * count

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        """Placeholder string for image `image_idx` (a one-frame video: spatial pooling only)."""
        _, height, width = image_inputs["pixel_values"][image_idx].shape
        count = get_num_visual_tokens(
            1, grid_size=self._grid_size(height, width), spatial_pool_size=self.spatial_pool_size
        )
        return self.image_token * count

    def _get_num_multimodal_tokens(self, image_sizes=None, video_sizes=None, **kwargs) -> MultiModalData:
        """Placeholder tokens per image and per video of the given sizes, as `__call__` expands them (transformers'
        helper for serving engines such as vLLM). Every image and frame is resized to the processors' square `size`,
        so only the frame count matters.

        Args:
            image_sizes (`list[tuple[int, int]]`, *optional*): `(height, width)` of each image, in pixels.
            video_sizes (`list[tuple[int, int, int]]`, *optional*): `(num_frames, height, width)` of each video, with
                the frames the model receives (after sampling).

        Returns:
            `MultiModalData`: `num_image_tokens` and `num_image_patches` (1 per image), `num_video_tokens`.

        Raises:
            ValueError: a frame count that is not a multiple of `temporal_pool_size`.
        """
        self._check_settings()
        data = {}
        if image_sizes is not None:
            size = self.image_processor.size
            side = size["height"] if isinstance(size, dict) else size.height
            count = get_num_visual_tokens(
                1, grid_size=self._grid_size(side, side), spatial_pool_size=self.spatial_pool_size
            )
            data.update(num_image_tokens=[count] * len(image_sizes), num_image_patches=[1] * len(image_sizes))
        if video_sizes is not None:
            size = self.video_processor.size
            grid_size = self._grid_size(size["height"], size["width"])
            data["num_video_tokens"] = [
                get_num_visual_tokens(
                    frames,
                    grid_size=grid_size,
                    temporal_pool_size=self.temporal_pool_size,
                    spatial_pool_size=self.spatial_pool_size,
                    temporal_sample_rate=self.temporal_sample_rate,
                )
                for frames, _, _ in video_sizes
            ]
        return MultiModalData(**data)

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs):
        """transformers' checks, and one placeholder in `text` per video and per image (older transformers do not
        count them: a placeholder without its video would reach the model as a plain token).

        Raises:
            ValueError: the placeholders in `text` and the videos or images given differ in number.
        """
        super().validate_inputs(images=images, text=text, videos=_countable_videos(videos), audio=audio, **kwargs)
        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, (list, tuple)) or not all(isinstance(sample, str) for sample in texts):
            return  # no text, or pre-tokenized text
        for token, kind, count in (
            (self.video_token, "video", 0 if videos is None else len(_flatten_videos(videos))),
            (self.image_token, "image", 0 if images is None else len(make_flat_list_of_images(images))),
        ):
            placeholders = sum(sample.count(token) for sample in texts)
            if placeholders != count:
                raise ValueError(
                    f"The text has {placeholders} {token} placeholders but {count or 'no'} {kind}s were given: put one "
                    f"{token} in the text where each {kind} goes (apply_chat_template does so for each "
                    f"{{'type': '{kind}'}} part)."
                )

    def _process_videos(self, videos, **kwargs):
        """`pixel_values_videos` (fps sampling gives a multiple of `temporal_pool_size` frames) and the placeholder
        string of each video."""
        self._check_settings()
        kwargs = {**kwargs, "temporal_pool_size": self.temporal_pool_size}
        processed = self.video_processor(videos, **kwargs)
        num_videos = len(processed["pixel_values_videos"])
        return processed, [self.replace_video_token(processed, video_idx=i, **kwargs) for i in range(num_videos)]

    def apply_chat_template(self, conversation, *args, **kwargs):
        """transformers' `apply_chat_template`, after checking that `conversation` is a list of messages (or a batch
        of such lists), each a dict (or an object with these attributes) with a `role` and a `content` that is a string
        or a list of typed parts such as `{"type": "video", "path": "clip.mp4"}` and `{"type": "text", "text": "..."}`.

        Raises:
            TypeError: a message, content or part of another shape, naming where it is.
        """
        batch = conversation if conversation and isinstance(conversation[0], (list, tuple)) else [conversation]
        for i, messages in enumerate(batch):
            _check_messages(messages, f"conversation {i}" if batch is conversation else "conversation")
        return super().apply_chat_template(conversation, *args, **kwargs)


def _field(item, name: str):
    """`item[name]` of a dict, or the attribute of a message/part object (transformers accepts both, e.g. dataclasses);
    None when absent."""
    return item.get(name) if isinstance(item, dict) else getattr(item, name, None)


def _check_messages(messages, where: str) -> None:
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"{where} must be a list of messages, got a {type(messages).__name__}.")
    for j, message in enumerate(messages):
        here = f"{where}, message {j}"
        if _field(message, "role") is None:
            raise TypeError(
                f"{here} must be a dict (or an object) with 'role' and 'content', got {str(message)[:80]}."
            )
        content = _field(message, "content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, (list, tuple)):
            raise TypeError(
                f"{here}: content must be a string or a list of parts like {{'type': 'text', 'text': ...}} and "
                f"{{'type': 'video', 'path': ...}}, got a {type(content).__name__} ({str(content)[:80]}). Wrap a "
                "single part in a list."
            )
        for k, part in enumerate(content):
            if _field(part, "type") is None:
                raise TypeError(
                    f"{here}, part {k} must be a dict (or an object) with a 'type' ('text', 'image' or 'video'), got "
                    f"{str(part)[:80]}."
                )


@dataclass(frozen=True)
class VideoTokenBudget:
    """What one video will cost the LLM, known before any frame is decoded (returned by `video_token_budget`).

    Attributes:
        frames (`int`): frames T the sampling takes from the video.
        seconds (`tuple[float, float] | None`): times of the first and the last sampled frame, in seconds from the
            first frame of the video (`None` when the video's frame rate is unknown).
        visual_tokens (`int`): visual tokens those frames give the LLM (`StormConfig.num_video_tokens` at
            `temporal_sample_rate`).
        prompt_tokens (`int`): the prompt's other tokens (chat template and text).
        max_new_tokens (`int`): tokens kept for the answer.
        context_length (`int | None`): the LLM's context in tokens (`text_config.max_position_embeddings`); `None`
            when the config states none.
        fits (`bool`): `prompt_tokens + visual_tokens + max_new_tokens <= context_length` (True without a limit).
        frames_that_fit (`int | None`): the most frames (a multiple of k) whose visual tokens fit at this s next to
            the prompt and the answer; 0 when none do; `None` without a limit.
        temporal_pool_size, spatial_pool_size, temporal_sample_rate (`int`): k, p and s of the count (s is the
            config's, or the one `fit=True` chose).
        max_frames (`int | None`): the cap on `fps` sampling that gives these frames (pass it to the processor with
            the same `fps`); `None` for `num_frames` sampling.
        fitted (`str | None`): what `fit=True` changed, in words; `None` when nothing was changed.
    """

    frames: int
    seconds: tuple[float, float] | None
    visual_tokens: int
    prompt_tokens: int
    max_new_tokens: int
    context_length: int | None
    fits: bool
    frames_that_fit: int | None
    temporal_pool_size: int
    spatial_pool_size: int
    temporal_sample_rate: int
    max_frames: int | None = None
    fitted: str | None = None

    @property
    def total_tokens(self) -> int:
        """Prompt, visual and new tokens together: what must fit `context_length`."""
        return self.prompt_tokens + self.visual_tokens + self.max_new_tokens

    def __str__(self) -> str:
        span = f" at {self.seconds[0]:.2f} … {self.seconds[1]:.2f} s" if self.seconds else ""
        if self.context_length is None:
            verdict = "the LLM states no context limit"
        else:
            verdict = f"{'fits' if self.fits else 'does NOT fit'} the LLM context of {self.context_length} tokens"
        return (
            f"{self.frames} frames{span} → {self.visual_tokens} visual tokens (k={self.temporal_pool_size}, "
            f"p={self.spatial_pool_size}, s={self.temporal_sample_rate}) + {self.prompt_tokens} prompt tokens + "
            f"{self.max_new_tokens} new tokens = {self.total_tokens} tokens: {verdict}"
        )


def video_token_budget(
    metadata: VideoMetadata | dict,
    config: StormConfig,
    *,
    num_frames: int | None = None,
    fps: float | None = None,
    max_frames: int | None = StormVideoProcessor.max_frames,
    prompt_tokens: int = 0,
    max_new_tokens: int = 0,
    fit: bool = False,
) -> VideoTokenBudget:
    """The frames a sampling takes from a video, the visual tokens they make and whether they fit the LLM context,
    from the video's metadata alone: nothing is decoded.

    The frames are those `StormVideoProcessor` will decode with the same arguments (`sample_frame_indices`, with
    k = `config.temporal_pool_size`); the tokens are `config.num_video_tokens` (the one count, paper Eq. 6-8: k, p,
    s). They fit when `prompt_tokens + visual_tokens + max_new_tokens <= text_config.max_position_embeddings`.

    With `fit=True` a budget that does not fit is changed until it does: `fps` sampling takes fewer frames (the
    most, a multiple of k, that fit: `max_frames` lowered, so the frames spread over the whole video at a lower
    rate); `num_frames` sampling (a count the caller fixed) keeps its frames and raises the test-time temporal
    sampling rate s to the lowest that fits (set it on the model config and the processor). `fitted` says which.

    Args:
        metadata (`VideoMetadata` or `dict`): the video's `total_num_frames` (frames) and `fps` (frames per second),
            and `frame_timestamps` (seconds) when known: `read_video_metadata(path)` reads them from the container
            without decoding, e.g. `{"total_num_frames": 15000, "fps": 25.0}` for 10 minutes at 25 fps.
        config (`StormConfig`): the model's config (k, p, s, the token grid and the LLM context).
        num_frames (`int`, *optional*): frames spread uniformly over the video (a multiple of k).
        fps (`float`, *optional*): frames per second of video to sample instead (one of the two).
        max_frames (`int`, *optional*, defaults to `StormVideoProcessor.max_frames`, 3600): most frames `fps`
            sampling takes (pass the processor's if it differs); `None` for no cap.
        prompt_tokens (`int`, *optional*, defaults to 0): tokens of the prompt besides the visual ones.
        max_new_tokens (`int`, *optional*, defaults to 0): tokens kept free for the answer.
        fit (`bool`, *optional*, defaults to `False`): change the sampling until it fits (above).

    Returns:
        `VideoTokenBudget`.

    Raises:
        ValueError: both or neither of `num_frames` / `fps`; more frames than the video has; `num_frames` not a
        multiple of k; an fps sampling of a video whose frame rate is unknown; with `fit=True`, a prompt and
        `max_new_tokens` that leave no room for even one pooled frame. TypeError: a count that is not an int, an
        fps that is not a number.

    Example:

    ```python
    >>> budget = video_token_budget(read_video_metadata("talk.mp4"), model.config, fps=1, max_new_tokens=64, fit=True)
    >>> print(budget)  # 3600 frames at 0.00 … 3599.00 s → 28800 visual tokens (k=4, p=2, s=2) + … : fits …
    ```
    """
    if isinstance(metadata, dict):
        metadata = StormVideoMetadata(**metadata)
    check_count("prompt_tokens", prompt_tokens, minimum=0)
    check_count("max_new_tokens", max_new_tokens, minimum=0)
    k, rate = config.temporal_pool_size, config.temporal_sample_rate
    cap = max_frames if fps is not None else None
    indices = sample_frame_indices(metadata, num_frames=num_frames, fps=fps, temporal_pool_size=k, max_frames=cap)
    context = getattr(config.text_config, "max_position_embeddings", None)
    room = None if context is None else context - prompt_tokens - max_new_tokens  # visual tokens that fit
    fitted = None
    if fit and room is not None and config.num_video_tokens(len(indices), temporal_sample_rate=rate) > room:
        smallest = config.num_video_tokens(k, temporal_sample_rate=1)  # one pooled frame
        if room < smallest:
            raise ValueError(
                f"No sampling of the video fits: the prompt's {prompt_tokens} tokens and max_new_tokens="
                f"{max_new_tokens} leave {max(room, 0)} of the LLM's {context}-token context "
                "(text_config.max_position_embeddings), and one pooled frame alone is "
                f"{smallest} visual tokens. Shorten the prompt or lower max_new_tokens."
            )
        if fps is not None:  # fewer frames, spread over the whole video
            most = _frames_that_fit(config, room, rate)
            fitted = f"{most} frames instead of the {len(indices)} that fps={fps:g} gives, spread over the whole video"
            cap = most
            indices = sample_frame_indices(metadata, fps=fps, temporal_pool_size=k, max_frames=cap)
        else:  # the frames are the caller's: keep every s-th pooled frame, s as low as fits
            frames = len(indices)
            new_rate = _least(rate, lambda s: config.num_video_tokens(frames, temporal_sample_rate=s) <= room)
            fitted = f"temporal sampling s={new_rate} instead of s={rate}: 1 pooled frame in {new_rate} is kept"
            rate = new_rate
    visual = config.num_video_tokens(len(indices), temporal_sample_rate=rate)
    return VideoTokenBudget(
        frames=len(indices),
        seconds=_sampled_seconds(metadata, indices),
        visual_tokens=visual,
        prompt_tokens=prompt_tokens,
        max_new_tokens=max_new_tokens,
        context_length=context,
        fits=room is None or visual <= room,
        frames_that_fit=None if room is None else _frames_that_fit(config, room, rate),
        temporal_pool_size=k,
        spatial_pool_size=config.spatial_pool_size,
        temporal_sample_rate=rate,
        max_frames=cap,
        fitted=fitted,
    )


def _frames_that_fit(config: StormConfig, room: int, rate: int) -> int:
    """The most frames, a multiple of k, whose visual tokens at sampling rate `rate` are at most `room` (0: none)."""
    k = config.temporal_pool_size
    if config.num_video_tokens(k, temporal_sample_rate=rate) > room:
        return 0
    return k * _least(1, lambda groups: config.num_video_tokens(groups * k, temporal_sample_rate=rate) > room) - k


def _least(start: int, holds) -> int:
    """The least integer n >= `start` for which `holds(n)` is true, for a `holds` that stays true once it is (and is
    true for some n): doubling, then bisection."""
    low, high = start, start
    while not holds(high):
        low, high = high + 1, 2 * high
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if holds(middle) else (middle + 1, high)
    return low


def _sampled_seconds(metadata: VideoMetadata, indices) -> tuple[float, float] | None:
    """Times (seconds from the first frame) of the first and the last of the sampled frames `indices`."""
    times = getattr(metadata, "frame_timestamps", None)
    first, last = int(indices[0]), int(indices[-1])
    if times is not None:
        return times[first] - times[0], times[last] - times[0]
    return (first / metadata.fps, last / metadata.fps) if metadata.fps else None


__all__ = ["StormProcessor", "VideoTokenBudget", "default_chat_template", "video_token_budget"]
