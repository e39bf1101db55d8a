"""Tiny STORM configs and inputs whose placeholder and feature counts agree (like transformers' ModelTesters)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from storm_transformers import StormConfig

REPO = Path(__file__).resolve().parents[1]

IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, VOCAB_SIZE = 120, 121, 128


def tiny_config(image_size=32, temporal_pool_size=2, spatial_pool_size=1, temporal_sample_rate=1, **encoder) -> StormConfig:
    """SigLIP 32 px / patch 8 (4×4 patches → 2×2 = 4 tokens per frame), Qwen2 width 32, 2 Mamba layers."""
    return StormConfig(
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "patch_size": 8,
            "image_size": image_size,
            "vision_use_head": False,
        },
        text_config={
            "model_type": "qwen2",
            "vocab_size": VOCAB_SIZE,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
        },
        temporal_encoder_config={"num_hidden_layers": 2, "state_size": 4, **encoder},
        temporal_pool_size=temporal_pool_size,
        spatial_pool_size=spatial_pool_size,
        temporal_sample_rate=temporal_sample_rate,
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
    )


def video_inputs(config: StormConfig, num_frames=4, batch_size=1, prefix=(1, 2, 3), suffix=(4, 5), training=False, seed=0):
    """`input_ids` with one correctly expanded video placeholder per row, and matching `pixel_values_videos`."""
    generator = torch.Generator().manual_seed(seed)
    size = config.vision_config.image_size
    pixels = torch.randn(batch_size, num_frames, 3, size, size, generator=generator)
    tokens = config.num_video_tokens(num_frames, training=training)
    row = [*prefix, *([config.video_token_id] * tokens), *suffix]
    return {"input_ids": torch.tensor([row] * batch_size), "pixel_values_videos": pixels}


def enable_checkpointing(model) -> None:
    """Activation (gradient) checkpointing: `activation_checkpointing_enable` from transformers 5.24 on, where
    `gradient_checkpointing_enable` became its deprecated alias."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def run_under_triton_interpreter(script: str, timeout: int) -> dict:
    """Run the test file `script` as a program under Triton's interpreter (`TRITON_INTERPRET=1`, which Triton reads
    when a kernel is defined, hence a fresh process) and return the JSON object its last printed line holds."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, script], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
