"""STORM processor: tokenizer + SigLIP image processor + `StormVideoProcessor` + ChatML chat template.

It expands every video/image placeholder to exactly the number of visual tokens the model produces for it, computed by
`modeling_storm.get_num_visual_tokens` from the frames actually sampled and the pooling/sampling settings, which must
match the model config (`StormConfig.temporal_pool_size` etc.; conversion writes both from one source).
"""

import math
from importlib import resources

from transformers.processing_utils import ProcessorMixin

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
        image_processor (`SiglipImageProcessor`): resizes/normalizes images to `pixel_values` `(num_images, 3, H, W)`.
        tokenizer (`PreTrainedTokenizerBase`): the LLM's tokenizer; must contain `image_token` and `video_token`.
        video_processor (`StormVideoProcessor`): decodes/samples videos to `pixel_values_videos` `(B, T, 3, H, W)`.
        chat_template (`str`, *optional*): Jinja template; defaults to the package's ChatML template.
        image_token (`str`, *optional*, defaults to `"<|image_pad|>"`): image placeholder.
        video_token (`str`, *optional*, defaults to `"<|video_pad|>"`): video placeholder.
        patch_size (`int`, *optional*, defaults to 14): vision tower patch size (pixels).
        downsample_factor, temporal_pool_size, spatial_pool_size, temporal_sample_rate (`int`, *optional*):
            as in `StormConfig` (defaults 2, 4, 1, 1); they must equal the model's. Set `temporal_sample_rate` on both
            the processor and `model.config` to use test-time sampling. For training batches, where the model never
            samples, use `temporal_sample_rate=1`.

    Raises:
        ValueError: a placeholder token that the tokenizer lacks; frame counts that are not a multiple of
        `temporal_pool_size`; non-square frames.
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
        super().__init__(
            image_processor, tokenizer, video_processor, chat_template=chat_template or default_chat_template()
        )
        self.image_token_id = self._placeholder_id(image_token)
        self.video_token_id = self._placeholder_id(video_token)

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
        return math.ceil(height // self.patch_size / self.downsample_factor)

    def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs) -> str:
        """Placeholder string for video `video_idx`: `video_token` repeated `get_num_visual_tokens(...)` times."""
        frames, _, height, width = video_inputs["pixel_values_videos"][video_idx].shape
        try:
            count = get_num_visual_tokens(
                frames,
                grid_size=self._grid_size(height, width),
                temporal_pool_size=self.temporal_pool_size,
                spatial_pool_size=self.spatial_pool_size,
                temporal_sample_rate=self.temporal_sample_rate,
            )
        except ValueError as error:
            if kwargs.get("fps") is not None:
                raise ValueError(f"fps={kwargs['fps']} gave {frames} frames for video {video_idx}. {error}") from None
            raise
        return self.video_token * count

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        """Placeholder string for image `image_idx` (a one-frame video: spatial pooling only)."""
        _, height, width = image_inputs["pixel_values"][image_idx].shape
        count = get_num_visual_tokens(
            1, grid_size=self._grid_size(height, width), spatial_pool_size=self.spatial_pool_size
        )
        return self.image_token * count

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs):
        super().validate_inputs(images=images, text=text, videos=_countable_videos(videos), audio=audio, **kwargs)

    def _process_videos(self, videos, **kwargs):
        processed = self.video_processor(videos, **kwargs)
        num_videos = len(processed["pixel_values_videos"])
        return processed, [self.replace_video_token(processed, video_idx=i, **kwargs) for i in range(num_videos)]


__all__ = ["StormProcessor", "default_chat_template"]
