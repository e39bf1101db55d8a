"""STORM for transformers: `import modeling_storm` registers the model with the Auto classes.

After the import, `AutoConfig`, `AutoModel` and `AutoModelForImageTextToText` load STORM checkpoints with plain
`from_pretrained`. The processors live in `processing_storm`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from .configuration_storm import StormConfig, StormTemporalEncoderConfig, get_num_visual_tokens
from .modeling_storm import StormForConditionalGeneration, StormModel, StormPreTrainedModel
from .temporal_encoder import StormTemporalEncoder

AutoConfig.register(StormConfig.model_type, StormConfig, exist_ok=True)
AutoModel.register(StormConfig, StormModel, exist_ok=True)
AutoModelForImageTextToText.register(StormConfig, StormForConditionalGeneration, exist_ok=True)

__all__ = [
    "StormConfig",
    "StormTemporalEncoderConfig",
    "StormTemporalEncoder",
    "StormModel",
    "StormForConditionalGeneration",
    "StormPreTrainedModel",
    "get_num_visual_tokens",
]
