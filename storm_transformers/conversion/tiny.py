"""Build the embedded default checkpoint: a tiny STORM with random weights and the real Qwen2 tokenizer.

It exists so that `storm generate` runs end to end (decode → STORM → generate) on a fresh machine before any trained
checkpoint does; its answers are noise, and its card and `storm generate` say so. Build it with
`storm build-tiny-random` after `storm fetch-assets`.
"""

from pathlib import Path

import torch
from transformers import AutoTokenizer

from storm_transformers import StormConfig, StormForConditionalGeneration
from storm_transformers.model_cards import storm_model_card

from .assets import QWEN2_GGUF
from .checkpoint import add_placeholder_tokens, build_processor, chat_generation_config, prepare_output_dir, write_checkpoint

TINY_NUM_FRAMES = 16
VOCAB_MULTIPLE = 64


def tiny_config(vocab_size: int, image_token_id: int, video_token_id: int) -> StormConfig:
    """A STORM small enough for a CPU: SigLIP 64 px / patch 8 (16 tokens per frame), 2 bidirectional Mamba layers,
    a 2-layer Qwen2 of width 64; temporal pooling k = 4, as the paper's main model."""
    return StormConfig(
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "patch_size": 8,
            "image_size": 64,
            "vision_use_head": False,
        },
        text_config={
            "model_type": "qwen2",
            "vocab_size": vocab_size,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "tie_word_embeddings": False,
        },
        temporal_encoder_config={"num_hidden_layers": 2, "state_size": 8},
        temporal_pool_size=4,
        image_token_id=image_token_id,
        video_token_id=video_token_id,
    )


def build_tiny_random(
    output_dir: str | Path, tokenizer_dir: str | Path = "assets/tokenizer", seed: int = 0, overwrite: bool = False
) -> Path:
    """Write the tiny random STORM (float32, ≈20 M parameters, nearly all in the two 152k-row embeddings) to `output_dir`.

    Args:
        output_dir: folder to create.
        tokenizer_dir: folder with `ggml-vocab-qwen2.gguf` (from `storm fetch-assets`) or a saved Qwen2 tokenizer.
        seed: torch seed of the random weights.
        overwrite: replace an existing `output_dir`.

    Raises:
        FileExistsError: `output_dir` exists and `overwrite` is False. FileNotFoundError: no tokenizer found.
    """
    return random_checkpoint(
        output_dir,
        tokenizer_dir,
        tiny_config,
        seed=seed,
        num_frames=TINY_NUM_FRAMES,
        summary="**The weights of this checkpoint are random.** It is a tiny STORM (about 20 M parameters) with the "
        "real Qwen2 tokenizer that exercises the whole pipeline; its answers are noise.",
        origin="`storm build-tiny-random` (`storm_transformers/conversion/tiny.py`)",
        overwrite=overwrite,
    )


def random_checkpoint(
    output_dir: str | Path,
    tokenizer_dir: str | Path,
    make_config,
    *,
    seed: int,
    num_frames: int,
    summary: str,
    origin: str = "`storm_transformers.conversion.tiny.random_checkpoint`",
    overwrite: bool = False,
) -> Path:
    """Write a randomly initialised STORM with the real Qwen2 tokenizer (and its processor and card) to `output_dir`.

    `make_config(vocab_size, image_token_id, video_token_id)` returns the `StormConfig`; the vocabulary is the
    tokenizer's plus the two placeholders, padded to a multiple of 64. `num_frames` is the processor's default.

    Raises:
        FileExistsError: `output_dir` exists and `overwrite` is False. FileNotFoundError: no tokenizer found.
    """
    output_dir = prepare_output_dir(output_dir, overwrite)
    tokenizer_dir = Path(tokenizer_dir)
    if (tokenizer_dir / QWEN2_GGUF).exists():
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, gguf_file=QWEN2_GGUF)
    elif (tokenizer_dir / "tokenizer.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        raise FileNotFoundError(f"No Qwen2 tokenizer in {tokenizer_dir}: run `storm fetch-assets` first.")
    image_token_id, video_token_id = add_placeholder_tokens(tokenizer)
    vocab_size = -(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    config = make_config(vocab_size, image_token_id, video_token_id)
    torch.manual_seed(seed)
    model = StormForConditionalGeneration(config)
    model.generation_config = chat_generation_config(tokenizer, max_new_tokens=32)
    processor = build_processor(config, tokenizer, num_frames=num_frames)
    card = storm_model_card(
        model,
        processor,
        repo_id=output_dir.name,
        summary=summary,
        provenance=f"Built by {origin} from a config, torch seed {seed}. The tokenizer is Qwen2's BPE vocabulary "
        "from the `ggml-vocab-qwen2.gguf` that llama-cpp-python ships, plus the `<|image_pad|>` / `<|video_pad|>` "
        "placeholders.",
        limits="Random weights: it understands nothing. Use it to test installation, input handling and speed only.",
        extra_tags=("random-weights",),
    )
    return write_checkpoint(output_dir, model, processor, card, overwrite=overwrite)
