import pytest
import torch
from storm_testing import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, enable_checkpointing, tiny_config, video_inputs
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from storm_transformers import StormConfig, StormForConditionalGeneration, StormModel
from storm_transformers.modeling_storm import (
    space_to_channel,
    spatial_pool,
    temporal_pool,
    temporal_sample,
    vision_hidden_state,
)


def build(config: StormConfig, seed: int = 0) -> StormForConditionalGeneration:
    torch.manual_seed(seed)
    return StormForConditionalGeneration(config).eval()


def frame_features(model, pixel_values_videos):
    """Per-frame features `(B, T', N', D)` of the visual pipeline (no flattening), as the model computes them."""
    return model.model._encode(pixel_values_videos, is_video=True)


def test_save_and_load_through_the_auto_classes(tmp_path):
    model = build(tiny_config())
    inputs = video_inputs(model.config)
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "storm"
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(loaded) is StormForConditionalGeneration
    torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base) is StormModel
    keys = set(model.state_dict())
    for key in [
        "model.vision_tower.embeddings.patch_embedding.weight",
        "model.multi_modal_projector.linear.weight",
        "model.temporal_encoder.layers.1.norm.weight",
        "model.temporal_encoder.layers.0.mixer.in_proj.weight",
        "model.temporal_encoder.layers.0.mixer.A_b_log",
        "model.language_model.layers.1.mlp.down_proj.weight",
        "lm_head.weight",
    ]:
        assert key in keys, key


def test_bfloat16_keeps_the_ssm_parameters_in_float32(tmp_path):
    build(tiny_config()).save_pretrained(tmp_path)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    mixer = model.model.temporal_encoder.layers[0].mixer
    assert mixer.in_proj.weight.dtype == torch.bfloat16
    assert {mixer.A_log.dtype, mixer.D.dtype, mixer.A_b_log.dtype, mixer.D_b.dtype} == {torch.float32}
    logits = model(**video_inputs(model.config)).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


@pytest.mark.parametrize("frames, k, p, s", [(4, 2, 1, 1), (8, 4, 1, 2), (6, 2, 2, 3), (1, 1, 1, 1), (12, 3, 2, 2)])
@pytest.mark.parametrize("training", [False, True])
def test_feature_count_equals_the_token_count_function(frames, k, p, s, training):
    config = tiny_config(image_size=64, temporal_pool_size=k, spatial_pool_size=p, temporal_sample_rate=s)
    model = build(config).train(training)
    pixels = video_inputs(config, num_frames=frames, batch_size=2)["pixel_values_videos"]
    features = model.get_video_features(pixels).pooler_output
    assert features.shape == (2, config.num_video_tokens(frames, training=training), 32)


def test_temporal_pooling_is_the_mean_of_groups_of_k_frames():
    model = build(tiny_config(temporal_pool_size=1))
    pixels = video_inputs(model.config, num_frames=6)["pixel_values_videos"]
    per_frame = frame_features(model, pixels)  # (1, 6, 4, 32)
    model.config.temporal_pool_size = 3
    pooled = frame_features(model, pixels)
    assert pooled.shape == (1, 2, 4, 32)
    torch.testing.assert_close(pooled[:, 0], per_frame[:, 0:3].mean(1))
    torch.testing.assert_close(pooled[:, 1], per_frame[:, 3:6].mean(1))
    torch.testing.assert_close(temporal_pool(per_frame, 2), per_frame.view(1, 3, 2, 4, 32).mean(2))


def test_spatial_pooling_averages_2x2_windows_of_the_token_grid():
    model = build(tiny_config(image_size=64, temporal_pool_size=1))  # 4x4 token grid
    pixels = video_inputs(model.config, num_frames=2)["pixel_values_videos"]
    grid = frame_features(model, pixels).view(1, 2, 4, 4, 32)
    model.config.spatial_pool_size = 2
    pooled = frame_features(model, pixels).view(1, 2, 2, 2, 32)
    torch.testing.assert_close(pooled[0, 1, 0, 1], grid[0, 1, 0:2, 2:4].mean((0, 1)))
    torch.testing.assert_close(pooled[0, 0, 1, 0], grid[0, 0, 2:4, 0:2].mean((0, 1)))
    assert spatial_pool(grid.view(1, 2, 16, 32), 4).shape == (1, 2, 1, 32)


def test_temporal_sampling_keeps_frames_0_s_2s_in_eval_only():
    model = build(tiny_config(temporal_pool_size=1))
    pixels = video_inputs(model.config, num_frames=5)["pixel_values_videos"]
    all_frames = frame_features(model, pixels)
    model.config.temporal_sample_rate = 2
    sampled = frame_features(model, pixels)
    torch.testing.assert_close(sampled, all_frames[:, [0, 2, 4]])
    assert torch.equal(temporal_sample(all_frames, 3), all_frames[:, [0, 3]])
    model.train()  # the model is trained without sampling (paper §3.4)
    torch.testing.assert_close(frame_features(model, pixels), all_frames)


def _flat_square_2x2(x):
    """VILA's `flat_square_2x2` (llava/model/multimodal_projector/base_projector.py), written from its description."""
    n, w, h, c = x.size()
    if w % 2:
        x = torch.cat([x, x.new_zeros(n, 1, h, c)], dim=1)
        n, w, h, c = x.size()
    if h % 2:
        x = torch.cat([x, x.new_zeros(n, w, 1, c)], dim=2)
        n, w, h, c = x.size()
    x = x.reshape(n, w, h // 2, c * 2).permute(0, 2, 1, 3).reshape(n, h // 2, w // 2, c * 4)
    return x.permute(0, 2, 1, 3).reshape(n, (w // 2) * (h // 2), c * 4)


@pytest.mark.parametrize("side", [4, 5, 32])
def test_downsample_matches_vila_flat_square_2x2(side):
    patches = torch.randn(3, side * side, 6)
    expected = _flat_square_2x2(patches.view(3, side, side, 6))
    torch.testing.assert_close(space_to_channel(patches, 2), expected, rtol=0, atol=0)


def test_images_run_as_one_frame_videos_without_temporal_pooling():
    model = build(tiny_config(temporal_pool_size=2, temporal_sample_rate=2))
    image = torch.randn(2, 3, 32, 32)
    image_features = model.get_image_features(image).pooler_output
    assert image_features.shape == (2, model.config.num_image_tokens(), 32)
    model.config.temporal_pool_size = model.config.temporal_sample_rate = 1
    torch.testing.assert_close(image_features, model.get_video_features(image.unsqueeze(1)).pooler_output)
    tokens = model.config.num_image_tokens()
    input_ids = torch.tensor([[1, *([IMAGE_TOKEN_ID] * tokens), 2, *([IMAGE_TOKEN_ID] * tokens), 3]])
    out = model(input_ids=input_ids, pixel_values=image)
    torch.testing.assert_close(out.image_outputs.pooler_output, image_features)


def test_generate_with_and_without_cache_gives_the_same_tokens():
    model = build(tiny_config())
    inputs = video_inputs(model.config)
    with_cache = model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=True)
    without_cache = model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=False)
    assert with_cache.shape[1] == inputs["input_ids"].shape[1] + 8
    assert torch.equal(with_cache, without_cache)


def test_left_padded_batch_generates_the_same_tokens_as_each_prompt_alone():
    model = build(tiny_config())
    first = video_inputs(model.config, prefix=(1, 2, 3, 4, 5, 6), seed=1)
    second = video_inputs(model.config, prefix=(7,), seed=2)
    pad = 8 - 3
    batch_ids = torch.cat([first["input_ids"], torch.cat([torch.zeros(1, pad, dtype=torch.long), second["input_ids"]], 1)])
    attention_mask = (torch.arange(batch_ids.shape[1]) >= torch.tensor([[0], [pad]])).long()
    pixels = torch.cat([first["pixel_values_videos"], second["pixel_values_videos"]])
    batch = model.generate(
        input_ids=batch_ids, attention_mask=attention_mask, pixel_values_videos=pixels, max_new_tokens=6, do_sample=False
    )
    for row, single in enumerate([first, second]):
        alone = model.generate(**single, max_new_tokens=6, do_sample=False)
        assert torch.equal(batch[row, -6:], alone[0, -6:])


def test_assisted_decoding_with_the_model_as_its_own_assistant_gives_the_greedy_tokens():
    """transformers' assisted decoding never counts an assistant's `generate` call as a first iteration, so the
    assistant's prefill would get the video placeholders without their pixels (and raise)."""
    model = build(tiny_config())
    inputs = video_inputs(model.config)
    greedy = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assisted = model.generate(**inputs, max_new_tokens=4, do_sample=False, assistant_model=model)
    assert torch.equal(assisted, greedy)


def test_sdpa_and_eager_attention_agree(tmp_path):
    build(tiny_config()).save_pretrained(tmp_path)
    inputs = video_inputs(tiny_config())
    logits = {
        impl: AutoModelForImageTextToText.from_pretrained(tmp_path, attn_implementation=impl).eval()(**inputs).logits
        for impl in ("sdpa", "eager")
    }
    torch.testing.assert_close(logits["sdpa"], logits["eager"], rtol=1e-5, atol=1e-5)


def test_training_loss_reaches_every_stage_and_checkpointing_keeps_gradients():
    model = build(tiny_config()).train()
    inputs = video_inputs(model.config, training=True)
    labels = inputs["input_ids"].clone()
    labels[labels == VIDEO_TOKEN_ID] = -100
    model(**inputs, labels=labels).loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    for stage in ("vision_tower", "multi_modal_projector", "temporal_encoder.layers.0.mixer.A_b_log", "language_model"):
        assert any(stage in name and grad.abs().sum() > 0 for name, grad in grads.items()), stage
    model.zero_grad()
    enable_checkpointing(model)
    model(**inputs, labels=labels).loss.backward()
    for name, p in model.named_parameters():
        if name in grads:
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_placeholders_and_features_that_disagree_raise():
    model = build(tiny_config())
    inputs = video_inputs(model.config, num_frames=4)
    inputs["input_ids"] = inputs["input_ids"][:, 1:-1]  # fine: only text dropped
    model(**inputs)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([[VIDEO_TOKEN_ID]])], 1)  # one placeholder too many
    with pytest.raises(ValueError, match=r"9 video placeholder tokens .* 8 feature tokens .*4 frames, temporal_pool_size=2"):
        model(**inputs)


def test_frame_count_not_a_multiple_of_k_raises_before_encoding():
    model = build(tiny_config(temporal_pool_size=4))
    with pytest.raises(ValueError, match="num_frames=6 is not a multiple of temporal_pool_size=4.*Sample 4 or 8"):
        model.get_video_features(torch.randn(1, 6, 3, 32, 32))


def test_video_longer_than_the_context_raises_with_both_numbers():
    config = tiny_config(temporal_pool_size=1)
    config.text_config.max_position_embeddings = 64
    model = build(config)
    inputs = video_inputs(config, num_frames=20)  # 80 visual + 5 text tokens
    with pytest.raises(ValueError, match=r"85 tokens long, 80 of them visual, .* context is 64 .* at most 14 frames"):
        model(**inputs)


def unchunked_features(model, pixel_values_videos):
    """The visual pipeline as one pass over the whole video (the code before chunking): the vision tower with all its
    hidden states, the temporal encoder over the whole sequence at once, then pooling and sampling."""
    config, inner = model.config, model.model
    batch, frames = pixel_values_videos.shape[:2]
    hidden_states = inner.vision_tower(pixel_values_videos.flatten(0, 1), output_hidden_states=True).hidden_states
    tokens = inner.multi_modal_projector(hidden_states[config.vision_feature_layer])
    sequence = tokens.view(batch, frames * tokens.shape[1], -1)
    features = inner.temporal_encoder(sequence, chunk_size=sequence.shape[1]).view(batch, frames, tokens.shape[1], -1)
    if config.temporal_pool_size > 1:
        features = temporal_pool(features, config.temporal_pool_size)
    if config.spatial_pool_size > 1:
        features = spatial_pool(features, config.spatial_pool_size)
    if not model.training and config.temporal_sample_rate > 1:
        features = features[:, :: config.temporal_sample_rate]
    return features


@pytest.mark.parametrize("layer, size", [(-3, 32), (-2, 32), (-1, 32), (0, 32), (0, 39), (1, 32), (2, 32)])
def test_vision_tower_stops_at_the_feature_layer(layer, size):
    """Embeddings (the patch convolution as one matrix product) + the encoder layers up to `vision_feature_layer` = the
    tower's `hidden_states[layer]` (2 layers: hidden states -3..2), with no later layer run. 39 px: the convolution's
    "valid" padding drops the last 7 rows and columns of pixels (8 px patches), and so does the product."""
    tower = build(tiny_config()).model.vision_tower
    pixels = torch.randn(3, 3, size, size)
    expected = tower(pixels, output_hidden_states=True).hidden_states[layer]
    calls = []
    hooks = [encoder_layer.register_forward_hook(lambda *args, index=i: calls.append(index)) for i, encoder_layer in enumerate(tower.encoder.layers)]
    features = vision_hidden_state(tower, pixels, layer)
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)  # float32 rounding: a product, not a conv
    assert calls == list(range(layer % 3))


@pytest.mark.parametrize(
    "frames, k, p, s, vision_chunk, scan_chunk",
    [(12, 2, 1, 1, 5, 40), (12, 3, 2, 2, 7, 100), (16, 2, 2, 3, 3, 64), (5, 1, 1, 2, 2, 32), (8, 4, 1, 1, 8, None)],
)
@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("training", [False, True])
def test_chunked_pipeline_equals_one_pass_over_the_video(frames, k, p, s, vision_chunk, scan_chunk, bidirectional, training):
    """Vision tower in chunks of `vision_chunk` frames (not dividing T), scan in chunks of whole k-frame groups
    (`scan_chunk` tokens rounded down; 16 tokens per frame), each chunk pooled and sampled by its frames' index in the
    video: the features of one pass over the whole video."""
    config = tiny_config(image_size=64, temporal_pool_size=k, spatial_pool_size=p, temporal_sample_rate=s, bidirectional=bidirectional)
    config.vision_chunk_size, config.temporal_encoder_config.chunk_size = vision_chunk, scan_chunk
    model = build(config).train(training)
    pixels = video_inputs(config, num_frames=frames, batch_size=2)["pixel_values_videos"]
    with torch.no_grad():  # inference: the residual stream is updated in place
        features = model.get_video_features(pixels).pooler_output
        expected = unchunked_features(model, pixels)
    assert features.shape == (2, config.num_video_tokens(frames, training=training), 32)
    torch.testing.assert_close(features, expected.flatten(1, 2), rtol=0, atol=1e-5)
    if training:  # with autograd recording too
        torch.testing.assert_close(model.get_video_features(pixels).pooler_output, features, rtol=0, atol=1e-6)


def test_scan_chunks_are_whole_groups_of_k_frames():
    model = build(tiny_config(image_size=64, temporal_pool_size=4))  # 16 tokens per frame
    assert model.model._scan_chunk_frames(4096, 16, 4) == 32768 // 64 * 4
    model.config.temporal_encoder_config.chunk_size = 100  # 6.25 frames: one group of 4
    assert model.model._scan_chunk_frames(4096, 16, 4) == 4
    model.config.temporal_encoder_config.chunk_size = 10  # less than a group: still one group
    assert model.model._scan_chunk_frames(4096, 16, 4) == 4
    model.config.temporal_encoder_config.chunk_size = None
    assert model.model._scan_chunk_frames(4096, 16, 4) == 4096


def test_chunked_training_gives_the_unchunked_gradients():
    config = tiny_config(image_size=64, temporal_pool_size=2)
    model = build(config).train()
    inputs = video_inputs(config, num_frames=8, training=True)
    labels = inputs["input_ids"].clone()
    labels[labels == VIDEO_TOKEN_ID] = -100

    def gradients(vision_chunk, scan_chunk):
        model.zero_grad()
        config.vision_chunk_size, config.temporal_encoder_config.chunk_size = vision_chunk, scan_chunk
        model(**inputs, labels=labels).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    whole, chunked = gradients(100, None), gradients(3, 40)
    assert whole.keys() == chunked.keys()
    for name, grad in whole.items():
        torch.testing.assert_close(chunked[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_frames_move_to_the_vision_tower_one_chunk_at_a_time():
    """float64 frames (or frames on another device) are converted per chunk of `vision_chunk_size` frames: the same
    features as frames converted beforehand."""
    model = build(tiny_config())
    pixels = video_inputs(model.config, num_frames=6)["pixel_values_videos"]
    model.config.vision_chunk_size = 4
    with torch.no_grad():
        torch.testing.assert_close(
            model.get_video_features(pixels.double()).pooler_output, model.get_video_features(pixels).pooler_output
        )
    model.config.vision_chunk_size = 0
    with pytest.raises(ValueError, match="vision_chunk_size=0 must be a positive number of frames"):
        model.get_video_features(pixels)


# transformers' VLM contracts (the ones its common test mixins check; issue 14)


@pytest.mark.parametrize("modality", ["video", "image"])
def test_features_carry_the_vision_towers_outputs(modality):
    config = tiny_config()
    model = build(config)
    model.set_attn_implementation("eager")  # attention weights exist only there
    pixels = video_inputs(config, num_frames=4, batch_size=2)["pixel_values_videos"]  # (2, 4, 3, 32, 32)
    features = model.get_video_features if modality == "video" else model.get_image_features
    inputs = pixels if modality == "video" else pixels[:, 0]
    frames = pixels.flatten(0, 1) if modality == "video" else pixels[:, 0]
    vision = model.model.vision_tower(frames, output_hidden_states=True, output_attentions=True)
    plain = features(inputs)
    # last_hidden_state: the vision tower's hidden state at vision_feature_layer, per video (and frame)
    expected_state = vision.hidden_states[config.vision_feature_layer]  # (F, P, C)
    torch.testing.assert_close(plain.last_hidden_state.flatten(0, -3), expected_state, rtol=1e-5, atol=1e-5)
    assert plain.last_hidden_state.shape[0] == 2 and plain.last_hidden_state.shape[-1] == config.vision_config.hidden_size
    assert plain.hidden_states is None and plain.attentions is None
    asked = features(inputs, output_hidden_states=True, output_attentions=True)
    layers = config.vision_config.num_hidden_layers
    assert len(asked.hidden_states) == layers + 1 and len(asked.attentions) == layers
    torch.testing.assert_close(asked.hidden_states[-1], vision.hidden_states[-1])
    torch.testing.assert_close(asked.pooler_output, plain.pooler_output, rtol=1e-5, atol=1e-5)
    model.config.vision_config.output_hidden_states = True  # from the config too, as transformers' models do
    assert len(features(inputs).hidden_states) == layers + 1


def test_outputs_carry_the_image_and_video_outputs():
    config = tiny_config()
    model = build(config)
    inputs = video_inputs(config, num_frames=4, prefix=(1, *[IMAGE_TOKEN_ID] * config.num_image_tokens(), 2))
    image = torch.randn(1, 3, 32, 32)
    out = model(**inputs, pixel_values=image)
    torch.testing.assert_close(out.video_outputs.pooler_output, model.get_video_features(inputs["pixel_values_videos"]).pooler_output)
    torch.testing.assert_close(out.image_outputs.pooler_output, model.get_image_features(image).pooler_output)
    assert model(input_ids=inputs["input_ids"][:, :1]).video_outputs is None  # text only: no visual outputs


@pytest.mark.parametrize("drop", ["pixel_values_videos", "pixel_values"])
def test_placeholders_without_their_pixels_raise(drop):
    """A collator that drops the pixels (TRL's default one) would train on the placeholder's embedding in silence."""
    config = tiny_config()
    model = build(config).train()
    inputs = video_inputs(config, num_frames=4, prefix=(1, *[IMAGE_TOKEN_ID] * config.num_image_tokens(), 2))
    inputs["pixel_values"] = torch.randn(1, 3, 32, 32)
    inputs.pop(drop)
    with pytest.raises(ValueError, match=rf"placeholder tokens .* but no {drop} were given.*StormDataCollator"):
        model(**inputs, labels=inputs["input_ids"])
    # cached generation passes only the new ids: placeholders already in the cache are not re-checked
    model.eval()
    inputs = video_inputs(config)
    assert model.generate(**inputs, max_new_tokens=3, do_sample=False).shape[1] == inputs["input_ids"].shape[1] + 3


def test_a_generated_placeholder_id_is_read_as_text_not_rejected():
    """Only the placeholders of what is read from the start (a prompt, a training sequence) need pixels: a placeholder
    id the model itself generates comes after the cache, and is embedded as text (as in transformers' VLMs)."""
    model = build(tiny_config())
    inputs = video_inputs(model.config)
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False, sequence_bias={(VIDEO_TOKEN_ID,): 100.0})
    assert out[0, -3:].tolist() == [VIDEO_TOKEN_ID] * 3
    with pytest.raises(ValueError, match="but no pixel_values_videos were given"):
        model(input_ids=out)  # the same ids read from the start, without their pixels


def test_fp32_ssm_parameters_are_named_whole():
    """`_keep_in_fp32_modules_strict` names every fp32 parameter by its whole dotted name, not by a prefix of another."""
    import re

    model = build(tiny_config())
    names = set(model.state_dict())
    for entry in model.model.temporal_encoder._keep_in_fp32_modules_strict:
        assert any(re.search(rf"(?:^|\.){re.escape(entry)}(?:\.|$)", name) for name in names), entry
    kept = {name.rsplit(".", 1)[-1] for name in names if "mixer" in name and "proj" not in name and "conv" not in name}
    assert kept == {"A_log", "A_b_log", "D", "D_b"}
    assert all(f"mixer.{name}" in model.model.temporal_encoder._keep_in_fp32_modules_strict for name in kept)


def test_a_tied_lm_head_is_sharded_with_its_embedding():
    config = tiny_config()
    config.tie_word_embeddings = True
    model = build(config)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    names = {module: name for name, module in model.named_modules()}
    head, embedding = names[model.lm_head], names[model.get_input_embeddings()]
    assert (head in model.tp_plan) == (embedding in model.tp_plan), model.tp_plan


def test_weights_missing_from_a_checkpoint_get_the_vision_towers_own_init():
    """SigLIP's attention and MLP linears have no parameters of their own module; transformers 5.24 skips such
    modules for custom code when weights are missing, leaving torch's default init (`is_custom_code` is False)."""
    torch.manual_seed(0)
    model = StormForConditionalGeneration.from_pretrained(None, config=tiny_config(), state_dict={})
    attention = model.model.vision_tower.encoder.layers[0].self_attn
    for linear in (attention.q_proj, attention.k_proj, attention.v_proj):
        fan_out, fan_in = linear.weight.shape
        assert linear.weight.abs().max() <= (6 / (fan_in + fan_out)) ** 0.5  # xavier_uniform_ (SigLIP's init)
        assert not linear.bias.any()
    mlp = model.model.vision_tower.encoder.layers[0].mlp
    assert 0 < mlp.fc1.bias.abs().max() <= 1e-5  # SigLIP: normal_(std=1e-6)
