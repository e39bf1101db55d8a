"""STORM processor: tokenizer + SigLIP image processor + `StormVideoProcessor` + ChatML chat template.

It expands every video/image placeholder to exactly the number of visual tokens the model produces for it, computed by
`modeling_storm.get_num_visual_tokens` from the frames actually sampled and the pooling/sampling settings, which must
match the model config (`StormConfig.temporal_pool_size` etc.; conversion writes both from one source).
"""

import math
from importlib import resources

from transformers.processing_utils import MultiModalData, ProcessorMixin

from modeling_storm.configuration_storm import get_num_visual_tokens

from .video_processing_storm import _flatten_videos


def default_chat_template() -> str:
    """The ChatML template shipped with the package (`processing_storm/chat_template.jinja`)."""
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
        super().validate_inputs(images=images, text=text, videos=_countable_videos(videos), audio=audio, **kwargs)

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


__all__ = ["StormProcessor", "default_chat_template"]
