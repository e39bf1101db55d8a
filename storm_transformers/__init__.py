"""STORM for transformers: `import storm_transformers` registers the model and its processors with the Auto classes.

After the import, `AutoConfig`, `AutoModel`, `AutoModelForImageTextToText`, `AutoProcessor` and `AutoVideoProcessor`
load STORM checkpoints with plain `from_pretrained`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor, AutoVideoProcessor

from .configuration_storm import StormConfig, StormTemporalEncoderConfig, get_num_visual_tokens
from .modeling_storm import StormForConditionalGeneration, StormModel, StormPreTrainedModel
from .processing_storm import StormProcessor, default_chat_template
from .temporal_encoder import StormTemporalEncoder
from .video_processing_storm import (
    StormVideoMetadata,
    StormVideoProcessor,
    StormVideoProcessorKwargs,
    read_video_pyav,
    sample_frame_indices,
)

AutoConfig.register(StormConfig.model_type, StormConfig, exist_ok=True)
AutoModel.register(StormConfig, StormModel, exist_ok=True)
AutoModelForImageTextToText.register(StormConfig, StormForConditionalGeneration, exist_ok=True)
AutoVideoProcessor.register(StormConfig, StormVideoProcessor, exist_ok=True)
AutoProcessor.register(StormConfig, StormProcessor, exist_ok=True)

__all__ = [
    "StormConfig",
    "StormTemporalEncoderConfig",
    "StormTemporalEncoder",
    "StormModel",
    "StormForConditionalGeneration",
    "StormPreTrainedModel",
    "StormProcessor",
    "StormVideoMetadata",
    "StormVideoProcessor",
    "StormVideoProcessorKwargs",
    "default_chat_template",
    "get_num_visual_tokens",
    "read_video_pyav",
    "sample_frame_indices",
]
