"""Model cards of STORM checkpoints, rendered from `storm.md` with huggingface_hub's `ModelCard` / `ModelCardData`.

Conversion and training write one into every checkpoint they produce (`README.md`), with the numbers read from the
checkpoint's own config and processor.
"""

from importlib import resources

from huggingface_hub import ModelCard, ModelCardData

from storm_transformers import get_num_visual_tokens

TEMPLATE = "storm.md"


def storm_model_card(
    model,
    processor,
    *,
    summary: str,
    provenance: str,
    limits: str,
    repo_id: str = "path/to/this/folder",
    base_model: list[str] | None = None,
    base_model_relation: str | None = None,
    license: str = "apache-2.0",
    datasets: list[str] | None = None,
    extra_tags: tuple[str, ...] = (),
    example: tuple[str, str] = ("clip.mp4", "What happens in this video?"),
) -> ModelCard:
    """Render the STORM card for `model` (a `StormForConditionalGeneration`) and its `StormProcessor`.

    `summary`, `provenance` and `limits` are Markdown paragraphs; `base_model`/`base_model_relation` describe where
    the weights came from (Hub ids, relation one of adapter | merge | quantized | finetune). Every STORM folder carries
    its code (`save_pretrained` writes it), so the usage loads it with `trust_remote_code=True` and the tags get
    "custom_code", besides "video", "mamba", "storm" and `extra_tags` (e.g. "random-weights", which `storm generate`
    warns about). `example`: the (video path, question) of the usage snippet.
    """
    config = model.config
    num_frames = processor.video_processor.num_frames
    tokens_per_video = config.num_video_tokens(num_frames)
    per_kept_frame = config.num_image_tokens()
    context = getattr(config.text_config, "max_position_embeddings", None)
    frames_per_kept = config.temporal_pool_size * config.temporal_sample_rate
    encoder = config.temporal_encoder_config
    if encoder.num_hidden_layers:
        direction = "bidirectional" if encoder.bidirectional else "uni-directional"
        encoder_text = (
            f"{encoder.num_hidden_layers} {direction} Mamba-1 layers (width {encoder.hidden_size}, state "
            f"{encoder.state_size}, expand {encoder.expand}, conv {encoder.conv_kernel})"
        )
    else:
        encoder_text = "none (Linear projector only)"
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="video-text-to-text",
        license=license,
        base_model=base_model,
        base_model_relation=base_model_relation,
        datasets=datasets,
        language=["en"],
        tags=["video", "mamba", "storm", "custom_code", *extra_tags],
    )
    template = resources.files(__package__).joinpath(TEMPLATE).read_text(encoding="utf-8")
    return ModelCard.from_template(
        card_data,
        template_str=template,
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        summary=summary,
        provenance=provenance,
        limits=limits,
        num_frames=num_frames,
        example_video=example[0],
        example_prompt=example[1],
        image_size=config.vision_config.image_size,
        patch_size=config.vision_config.patch_size,
        downsample_factor=config.downsample_factor,
        tokens_per_frame=get_num_visual_tokens(1, grid_size=config.token_grid_size),
        temporal_encoder=encoder_text,
        temporal_pool_size=config.temporal_pool_size,
        spatial_pool_size=config.spatial_pool_size,
        temporal_sample_rate=config.temporal_sample_rate,
        tokens_per_video=tokens_per_video,
        tokens_per_image=config.num_image_tokens(),
        context_length=context,
        max_frames=(context // per_kept_frame) * frames_per_kept if context else "unbounded",
        num_parameters=f"{model.num_parameters() / 1e6:.1f} M",
    )


__all__ = ["storm_model_card"]
