"""STORM for transformers: `import modeling_storm` registers the model with the Auto classes.

After the import, `AutoConfig`, `AutoModel`, `AutoModelForImageTextToText` and `AutoModelForMultimodalLM` load STORM
checkpoints with plain `from_pretrained`, so `pipeline("image-text-to-text", model=folder)` and
`pipeline("any-to-any", model=folder)` both work. The processors live in `processing_storm`; serving through
transformers' OpenAI-compatible server is `modeling_storm.serving` (`storm serve`).
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoModelForMultimodalLM

from .configuration_storm import StormConfig, StormTemporalEncoderConfig, get_num_visual_tokens
from .modeling_storm import StormForConditionalGeneration, StormModel, StormPreTrainedModel
from .temporal_encoder import StormTemporalEncoder

AutoConfig.register(StormConfig.model_type, StormConfig, exist_ok=True)
AutoModel.register(StormConfig, StormModel, exist_ok=True)
AutoModelForImageTextToText.register(StormConfig, StormForConditionalGeneration, exist_ok=True)
AutoModelForMultimodalLM.register(StormConfig, StormForConditionalGeneration, exist_ok=True)  # any-to-any

__all__ = [
    "StormConfig",
    "StormTemporalEncoderConfig",
    "StormTemporalEncoder",
    "StormModel",
    "StormForConditionalGeneration",
    "StormPreTrainedModel",
    "get_num_visual_tokens",
]
