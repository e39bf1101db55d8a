"""STORM processors: `import processing_storm` registers them with `AutoProcessor` and `AutoVideoProcessor`.

Importing it also imports `modeling_storm` (the config the Auto classes are keyed on).
"""

from transformers import AutoProcessor, AutoVideoProcessor

from modeling_storm import StormConfig

from .processing_storm import StormProcessor, VideoTokenBudget, default_chat_template, video_token_budget
from .video_processing_storm import (
    StormVideoMetadata,
    StormVideoProcessor,
    StormVideoProcessorKwargs,
    read_video_metadata,
    read_video_pyav,
    sample_frame_indices,
)

AutoVideoProcessor.register(StormConfig, StormVideoProcessor, exist_ok=True)
AutoProcessor.register(StormConfig, StormProcessor, exist_ok=True)

__all__ = [
    "StormProcessor",
    "StormVideoMetadata",
    "StormVideoProcessor",
    "StormVideoProcessorKwargs",
    "VideoTokenBudget",
    "default_chat_template",
    "read_video_metadata",
    "read_video_pyav",
    "sample_frame_indices",
    "video_token_budget",
]
