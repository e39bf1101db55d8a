"""Verification built into every conversion: the written checkpoint must compute what its sources compute.

Following transformers' conversion scripts (reload, then compare with the original; hf-conventions §5 step 6), on the
checkpoint as written to disk and reloaded with the Auto classes:

- vision: STORM's vision tower `hidden_states[vision_feature_layer]` (−2 by default: what STORM feeds its projector)
  equals the source vision model's, on frames of a video (a real clip, or fixed random frames);
- text: STORM's logits on a text-only chat prompt equal the source LLM's, over the source vocabulary;
- inputs: the checkpoint's own processor makes exactly the frames and token ids the sources were given;
- video: the whole visual pipeline runs on those frames (features finite, as many as the processor expects).

The reference outputs are computed from the sources before any conversion step. The maximum absolute differences are
printed; above `TOLERANCE` for the dtype (the copies are exact, so the differences are normally 0), or with inputs or
features that disagree, the conversion fails and nothing is written.
"""

from dataclasses import dataclass

import numpy as np
import torch

from storm_transformers import StormVideoProcessor

# A text-only conversation with its own system prompt, so that any ChatML template renders it the same way.
VERIFY_CONVERSATION = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "Name a primary colour."},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "What is the capital of France?"},
]
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}
RANDOM_FRAME_SIDE = 64


@dataclass
class Reference:
    """What the source models compute on the verification inputs.

    video (`str` or `np.ndarray` of shape `(num_frames, height, width, 3)`): the clip the frames come from.
    pixel_values (`torch.Tensor` of shape `(num_frames, 3, image_size, image_size)`): the frames, as the video
        processor makes them.
    vision_hidden_states (`torch.Tensor` of shape `(num_frames, num_patches, vision_hidden_size)`): the source vision
        model's `hidden_states[vision_feature_layer]`.
    input_ids (`torch.Tensor` of shape `(1, sequence_length)`): `VERIFY_CONVERSATION` through the LLM's own chat
        template.
    logits (`torch.Tensor` of shape `(1, sequence_length, source_vocab_size)`): source LLM.
    """

    video: str | np.ndarray
    pixel_values: torch.Tensor
    vision_hidden_states: torch.Tensor
    input_ids: torch.Tensor
    logits: torch.Tensor


def verification_video(video: str | None, num_frames: int) -> str | np.ndarray:
    """`video` (a path), or `num_frames` fixed random RGB frames when None."""
    if video is not None:
        return str(video)
    shape = (num_frames, RANDOM_FRAME_SIDE, RANDOM_FRAME_SIDE, 3)
    return np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)


def _frames(video_processor, video, num_frames: int) -> torch.Tensor:
    return video_processor(videos=[video], num_frames=num_frames, return_tensors="pt")["pixel_values_videos"][0]


@torch.no_grad()
def reference_outputs(
    vision_model, llm, tokenizer, vision_feature_layer: int, num_frames: int, video: str | None = None
) -> Reference:
    """Run the source models on the verification inputs (before anything is converted).

    Args:
        vision_model: the source SigLIP vision model; frames are made at its `config.image_size`.
        llm: the source causal LM; tokenizer: its tokenizer (chat template included).
        vision_feature_layer (`int`): the hidden state STORM reads (`StormConfig.vision_feature_layer`).
        num_frames (`int`): frames sampled from `video` (a multiple of the temporal pooling size).
        video (`str`, *optional*): a video file; fixed random frames when None.
    """
    side = vision_model.config.image_size
    video = verification_video(video, num_frames)
    pixel_values = _frames(StormVideoProcessor(size={"height": side, "width": side}), video, num_frames)
    hidden = vision_model(pixel_values.to(vision_model.dtype), output_hidden_states=True).hidden_states
    input_ids = tokenizer.apply_chat_template(
        VERIFY_CONVERSATION, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )["input_ids"]
    return Reference(video, pixel_values, hidden[vision_feature_layer], input_ids, llm(input_ids=input_ids).logits)


@torch.no_grad()
def verify_checkpoint(folder, reference: Reference) -> dict[str, float]:
    """Reload the checkpoint in `folder` and compare it with `reference`; print and return the max differences.

    Returns:
        `dict[str, float]`: `{"vision": max |Δ| of the vision hidden states, "text": max |Δ| of the logits}`.

    Raises:
        RuntimeError: a difference above `TOLERANCE`, inputs that differ from the reference's, or visual features that
        are not finite or not as many as expected.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    dtype = reference.logits.dtype
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype).eval()
    pixel_values, input_ids = _checkpoint_inputs(AutoProcessor.from_pretrained(folder), reference)
    layer = model.config.vision_feature_layer
    hidden = model.model.vision_tower(pixel_values.to(dtype), output_hidden_states=True).hidden_states[layer]
    logits = model(input_ids=input_ids).logits[..., : reference.logits.shape[-1]]
    features = model.get_video_features(pixel_values[None]).pooler_output
    diffs = {"vision": _max_diff(hidden, reference.vision_hidden_states), "text": _max_diff(logits, reference.logits)}
    tolerance = TOLERANCE[dtype]
    print(f"verification ({str(dtype).removeprefix('torch.')}, tolerance {tolerance:g}):")
    print(
        f"  vision tower hidden_states[{layer}] vs the source vision model: max |Δ| = {diffs['vision']:.3g} "
        f"over {tuple(hidden.shape)}"
    )
    print(f"  text-only logits vs the source LLM: max |Δ| = {diffs['text']:.3g} over {tuple(logits.shape)}")
    print(f"  video features on {len(pixel_values)} frames: {tuple(features.shape)}")
    failed = [name for name, diff in diffs.items() if not diff <= tolerance]
    if failed:
        raise RuntimeError(
            f"Verification failed: the {' and '.join(failed)} outputs differ from the sources by more than "
            f"{tolerance:g} (vision {diffs['vision']:.3g}, text {diffs['text']:.3g}). The weights were not copied "
            "faithfully."
        )
    expected = (1, model.config.num_video_tokens(len(pixel_values)), model.config.text_config.hidden_size)
    if tuple(features.shape) != expected or not torch.isfinite(features).all():
        raise RuntimeError(
            f"Verification failed: video features {tuple(features.shape)} (expected {expected}) or not finite."
        )
    return diffs


def _checkpoint_inputs(processor, reference: Reference) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames and prompt ids made by the checkpoint's own processor; they must be the ones the sources were given."""
    pixel_values = _frames(processor.video_processor, reference.video, reference.pixel_values.shape[0])
    input_ids = processor.apply_chat_template(
        VERIFY_CONVERSATION, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )["input_ids"]
    if not torch.equal(pixel_values, reference.pixel_values) or not torch.equal(input_ids, reference.input_ids):
        raise RuntimeError(
            "Verification failed: the checkpoint's processor does not make the inputs the sources were checked with "
            f"(frames {tuple(pixel_values.shape)} vs {tuple(reference.pixel_values.shape)}, prompt ids "
            f"{input_ids.tolist()} vs {reference.input_ids.tolist()})."
        )
    return pixel_values, input_ids


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return (a.float() - b.float()).abs().max().item()
