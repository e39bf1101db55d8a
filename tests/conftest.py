"""Shared fixtures: real assets (fetched by `storm fetch-assets`) and the real Qwen2 tokenizer."""

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("STORM_ASSETS", REPO / "assets"))

torch.set_num_threads(min(2, torch.get_num_threads()))


def _asset(*parts) -> Path:
    path = ASSETS.joinpath(*parts)
    if not path.exists():
        pytest.fail(f"Missing test asset {path}: run `storm fetch-assets` first (README, test command).")
    return path


@pytest.fixture(scope="session")
def video_path():
    """Big Buck Bunny excerpt: 1280×720 H.264, 25 fps, 132 frames, 5.3 s, one keyframe."""
    return _asset("videos", "bigbuckbunny.mp4")


@pytest.fixture(scope="session")
def videos_dir():
    return _asset("videos")


@pytest.fixture(scope="session")
def smollm2_gguf():
    """SmolLM2-135M-Instruct (Llama architecture, ChatML), Q4_1 GGUF, fetched with `storm fetch-assets --with-llm`."""
    return _asset("llm", "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def qwen2_tokenizer_dir(tmp_path_factory):
    """The real Qwen2 tokenizer (from llama.cpp's vocab GGUF) saved as tokenizer.json, converted once per session."""
    from transformers import AutoTokenizer

    from storm_transformers.conversion.assets import QWEN2_GGUF

    out = tmp_path_factory.mktemp("qwen2_tokenizer")
    AutoTokenizer.from_pretrained(_asset("tokenizer"), gguf_file=QWEN2_GGUF).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, qwen2_tokenizer_dir):
    """The embedded default (tiny, random weights, real Qwen2 tokenizer), built once per session."""
    from storm_transformers.conversion.tiny import build_tiny_random

    return build_tiny_random(tmp_path_factory.mktemp("ckpt") / "storm-tiny-random", qwen2_tokenizer_dir)
