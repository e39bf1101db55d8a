import pytest
from storm_testing import tiny_config

from storm_transformers import StormConfig, StormTemporalEncoderConfig, get_num_visual_tokens


def test_defaults_reproduce_the_paper_7b_model():
    config = StormConfig()
    assert config.vision_config.model_type == "siglip_vision_model"
    assert (config.vision_config.image_size, config.vision_config.patch_size) == (448, 14)
    assert config.vision_config.hidden_size == 1152 and config.vision_config.num_hidden_layers == 27
    assert config.text_config.model_type == "qwen2" and config.text_config.hidden_size == 3584
    assert config.temporal_encoder_config.hidden_size == 3584  # inherited from the LLM
    assert config.temporal_encoder_config.dt_rank == 224 and config.temporal_encoder_config.bidirectional
    assert config.vision_feature_layer == -2
    assert config.token_grid_size == 16  # 1024 patches -> 256 tokens per frame (paper §4.1)
    assert config.num_image_tokens() == 256
    # Paper §2.1 token budgets: STORM + T.Pool at 128 frames = 32 x 256 = 8K; + T.Sampling s=2 at 256 frames = 8K.
    assert config.num_video_tokens(128) == 8192
    assert StormConfig(temporal_sample_rate=2).num_video_tokens(256) == 8192
    assert StormConfig(temporal_pool_size=1, spatial_pool_size=2).num_video_tokens(32) == 32 * 64


def test_round_trip_keeps_every_field(tmp_path):
    config = tiny_config(temporal_pool_size=4, spatial_pool_size=2, temporal_sample_rate=2, bidirectional=False)
    config.save_pretrained(tmp_path)
    loaded = StormConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert isinstance(loaded.temporal_encoder_config, StormTemporalEncoderConfig)
    assert loaded.temporal_encoder_config.bidirectional is False
    assert loaded.text_config.model_type == "qwen2" and loaded.vision_config.image_size == 32


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temporal_pool_size": 0}, "temporal_pool_size=0"),
        ({"temporal_sample_rate": 0}, "`temporal_sample_rate=0` must be at least 1. 1 = off"),
        ({"downsample_factor": -2}, "`downsample_factor=-2` must be at least 1"),
        ({"spatial_pool_size": 3}, "spatial_pool_size=3"),
        ({"temporal_encoder_config": {"hidden_size": 64}}, "must equal text_config.hidden_size"),
        ({"temporal_encoder_config": {"hidden_size": 0}}, "temporal_encoder_config.hidden_size=0"),
        ({"temporal_encoder_config": {"state_size": 0}}, r"temporal_encoder_config.state_size=0.*Default: 16"),
        ({"temporal_encoder_config": {"time_step_rank": 0}}, "time_step_rank=0.*\"auto\""),
        ({"temporal_encoder_config": {"layer_norm_epsilon": float("nan")}}, "layer_norm_epsilon=nan.*finite"),
        ({"temporal_encoder_config": {"initializer_range": -0.5}}, "initializer_range=-0.5"),
        ({"video_token_id": 10**6}, "outside the LLM vocabulary"),
        ({"video_token_id": 151655}, "`image_token_id` and `video_token_id` are both 151655"),
        ({"vision_feature_layer": 40}, "vision_feature_layer=40"),
        ({"vision_feature_layer": -29}, "vision_feature_layer=-29"),
        ({"vision_config": {"model_type": "siglip_vision_model", "image_size": 0}}, "vision_config.image_size=0"),
        ({"vision_config": {"model_type": "siglip_vision_model", "image_size": 8}}, "smaller than.*patch_size=16"),
        ({"text_config": {"model_type": "qwen9"}}, "`text_config` has model_type='qwen9'"),
    ],
)
def test_invalid_fields_raise_with_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StormConfig(**kwargs)


@pytest.mark.parametrize("value", [1.5, True, float("nan"), "4", None])
def test_counts_of_the_wrong_type_name_the_field(value):
    from huggingface_hub.errors import StrictDataclassFieldValidationError

    wrong_type = (StrictDataclassFieldValidationError, TypeError)  # @strict's, or ours where @strict accepts a bool
    with pytest.raises(wrong_type, match="temporal_pool_size"):
        StormConfig(temporal_pool_size=value)
    with pytest.raises(wrong_type, match="vision_feature_layer"):
        StormConfig(vision_feature_layer=value)
    config = StormConfig()
    try:  # checked on assignment by @strict (huggingface_hub >= 1.x accepts bools there), else where it is used
        config.temporal_sample_rate = value
    except StrictDataclassFieldValidationError as error:
        assert "temporal_sample_rate" in str(error)
    else:
        with pytest.raises(TypeError, match="`temporal_sample_rate` must be an integer"):
            config.num_video_tokens(8)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"num_frames": 0}, ValueError, "`num_frames=0` must be at least 1"),
        ({"num_frames": 8.0}, TypeError, r"`num_frames` must be an integer >= 1, got 8.0 \(float\)"),
        ({"num_frames": True}, TypeError, "got True \\(bool\\)"),
        ({"temporal_sample_rate": 0}, ValueError, "`temporal_sample_rate=0` must be at least 1"),  # was ZeroDivisionError
        ({"temporal_pool_size": -4}, ValueError, "`temporal_pool_size=-4`"),
        ({"spatial_pool_size": float("nan")}, TypeError, "`spatial_pool_size` must be an integer"),
        ({"grid_size": 0}, ValueError, "`grid_size=0`"),
    ],
)
def test_token_count_arguments_are_checked(kwargs, error, message):
    arguments = {"num_frames": 8, "grid_size": 16, "temporal_pool_size": 4} | kwargs
    with pytest.raises(error, match=message):
        get_num_visual_tokens(**arguments)


def test_a_sampling_rate_set_after_loading_is_checked_where_it_is_used():
    config = StormConfig()
    config.temporal_sample_rate = 0  # as the README's `model.config.temporal_sample_rate = ...`; __post_init__ is past
    with pytest.raises(ValueError, match="`temporal_sample_rate=0` must be at least 1"):
        config.num_video_tokens(8)


def test_every_hidden_state_can_be_the_feature_layer():
    assert StormConfig(vision_feature_layer=-28).vision_feature_layer == -28  # the patch embeddings of 27 layers
    assert StormConfig(vision_feature_layer=27).vision_feature_layer == 27


def test_token_count_formula():
    # T=8, k=4 -> 2 pooled frames; s=2 keeps frames 0 -> 1 frame; 16x16 grid pooled 2x2 -> 64 tokens.
    assert get_num_visual_tokens(8, grid_size=16, temporal_pool_size=4, spatial_pool_size=2, temporal_sample_rate=2) == 64
    # Sampling keeps frames 0, s, 2s, ...: 3 pooled frames with s=2 keep 2.
    assert get_num_visual_tokens(3, grid_size=2, temporal_sample_rate=2) == 8


def test_frame_count_not_a_multiple_of_k_names_the_counts_that_work():
    with pytest.raises(ValueError, match=r"num_frames=30 is not a multiple of temporal_pool_size=4.*Sample 28 or 32"):
        get_num_visual_tokens(30, grid_size=16, temporal_pool_size=4)
    with pytest.raises(ValueError, match="Sample 4 frames"):
        get_num_visual_tokens(3, grid_size=16, temporal_pool_size=4)
