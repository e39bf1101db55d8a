"""STORM for transformers: `import storm_transformers` registers the model and its processors with the Auto classes.

After the import, `AutoConfig`, `AutoModel`, `AutoModelForImageTextToText`, `AutoModelForMultimodalLM`,
`AutoProcessor` and `AutoVideoProcessor` load STORM checkpoints with plain `from_pretrained`, so
`pipeline("image-text-to-text", model=folder)` and `pipeline("any-to-any", model=folder)` both work; serving through transformers' OpenAI-compatible server is `storm_transformers.serving` (`storm serve`).

The classes are also registered for their Auto classes with transformers' `register_for_auto_class`, so that every
`save_pretrained` (and `push_to_hub`, the training recipes, a merged LoRA, the conversions) writes the code files of
this folder that the saved class needs (`configuration_storm.py`, `modeling_storm.py` and what they import relatively;
`processing_storm.py`, `video_processing_storm.py`) and `auto_map` into the saved folder, with transformers' own
`custom_object_save`. Such a folder loads where only transformers is installed, with `trust_remote_code=True`; where
this package is imported, its registered classes load it, with or without `trust_remote_code`.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    AutoModelForMultimodalLM,
    AutoProcessor,
    AutoVideoProcessor,
)

from .configuration_storm import StormConfig, StormTemporalEncoderConfig, get_num_visual_tokens
from .modeling_storm import StormForConditionalGeneration, StormModel, StormPreTrainedModel
from .processing_storm import StormProcessor, VideoTokenBudget, default_chat_template, video_token_budget
from .temporal_encoder import StormTemporalEncoder
from .video_processing_storm import (
    StormVideoMetadata,
    StormVideoProcessor,
    StormVideoProcessorKwargs,
    read_video_metadata,
    read_video_pyav,
    sample_frame_indices,
)

AutoConfig.register(StormConfig.model_type, StormConfig, exist_ok=True)
AutoModel.register(StormConfig, StormModel, exist_ok=True)
AutoModelForImageTextToText.register(StormConfig, StormForConditionalGeneration, exist_ok=True)
AutoModelForMultimodalLM.register(StormConfig, StormForConditionalGeneration, exist_ok=True)
AutoVideoProcessor.register(StormConfig, StormVideoProcessor, exist_ok=True)
AutoProcessor.register(StormConfig, StormProcessor, exist_ok=True)

StormConfig.register_for_auto_class("AutoConfig")
StormModel.register_for_auto_class("AutoModel")
StormForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
StormProcessor.register_for_auto_class("AutoProcessor")
StormVideoProcessor.register_for_auto_class("AutoVideoProcessor")

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
    "VideoTokenBudget",
    "default_chat_template",
    "get_num_visual_tokens",
    "read_video_metadata",
    "read_video_pyav",
    "sample_frame_indices",
    "video_token_budget",
]
