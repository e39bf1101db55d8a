"""The budget of a video before it is decoded (issue 11 item 5): `read_video_metadata`, `video_token_budget` and what
`storm generate` prints and refuses with it."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoProcessor

import storm_transformers.video_processing_storm as video_processing
from storm_transformers import (
    StormConfig,
    read_video_metadata,
    read_video_pyav,
    sample_frame_indices,
    video_token_budget,
)
from storm_cli import DEFAULT_MODEL, main
from storm_testing import tiny_config

REPO = Path(__file__).resolve().parents[1]
HOUR_AT_25_FPS = {"total_num_frames": 90000, "fps": 25.0}


@pytest.fixture
def no_decoding(monkeypatch):
    """Fail the test if any frame of a video file is decoded."""

    def refuse(*args, **kwargs):
        raise AssertionError("a frame was decoded")

    monkeypatch.setattr(video_processing, "_decode", refuse)
    monkeypatch.setattr(video_processing, "_first_frame", refuse)


@pytest.fixture(scope="module")
def miniature():
    """The shipped miniature's config and processor (64 px, k=4, 16 tokens per pooled frame, a 1024-token context)."""
    import storm_transformers  # noqa: F401  (registers STORM)

    return AutoConfig.from_pretrained(DEFAULT_MODEL), AutoProcessor.from_pretrained(DEFAULT_MODEL)


def test_metadata_comes_from_the_container_alone(videos_dir, no_decoding):
    metadata = read_video_metadata(videos_dir / "bikes.mp4")
    assert metadata.total_num_frames == 250 and metadata.fps == pytest.approx(25.0)
    assert metadata.duration == pytest.approx(10.0) and metadata.frames_indices is None
    assert len(metadata.frame_timestamps) == 250 and metadata.frame_timestamps[-1] == pytest.approx(9.96)
    assert (metadata.width, metadata.height) == (640, 272)


def test_metadata_is_what_decoding_samples_from(video_path):
    seen = []
    read_video_pyav(video_path, lambda metadata: seen.append(metadata) or [0])
    metadata = read_video_metadata(video_path)
    for field in ("total_num_frames", "fps", "duration", "frame_timestamps", "keyframe_indices", "width", "height"):
        assert getattr(metadata, field) == getattr(seen[0], field), field


def test_an_hour_at_one_frame_per_second_on_storm_7b():
    """The paper's model: 3600 frames at k=4 are 230,400 tokens, far past Qwen2-7B's 32k; k=4, s=2, p=2 fit."""
    budget = video_token_budget(HOUR_AT_25_FPS, StormConfig(), fps=1, prompt_tokens=30, max_new_tokens=64)
    assert (budget.frames, budget.visual_tokens, budget.context_length) == (3600, 230400, 32768)
    assert budget.seconds == (0.0, 3599.0) and not budget.fits
    assert budget.frames_that_fit == (32768 - 30 - 64) // 256 * 4 == 508
    assert budget.total_tokens == 30 + 230400 + 64 and budget.fitted is None
    compressed = StormConfig(temporal_sample_rate=2, spatial_pool_size=2)
    budget = video_token_budget(HOUR_AT_25_FPS, compressed, fps=1, prompt_tokens=30, max_new_tokens=64)
    assert (budget.visual_tokens, budget.fits) == (28800, True)
    assert str(budget) == (
        "3600 frames at 0.00 … 3599.00 s → 28800 visual tokens (k=4, p=2, s=2) + 30 prompt tokens + 64 new tokens "
        "= 28894 tokens: fits the LLM context of 32768 tokens"
    )


def test_max_frames_caps_fps_sampling_as_the_processor_does():
    budget = video_token_budget(HOUR_AT_25_FPS, tiny_config(), fps=1, max_frames=101)
    assert (budget.frames, budget.max_frames) == (100, 101)  # floored to a multiple of k=2
    assert budget.seconds == (0.0, 3564.0)  # spread over the whole hour: one frame every 36 s
    assert video_token_budget(HOUR_AT_25_FPS, tiny_config(), fps=1, max_frames=None).frames == 3600


@pytest.mark.parametrize("max_new_tokens", [0, 100, 400])
def test_fit_takes_the_most_frames_that_fit(max_new_tokens):
    config = tiny_config()  # k=2, 4 tokens per pooled frame, 512-token context
    room = 512 - 20 - max_new_tokens
    budget = video_token_budget(HOUR_AT_25_FPS, config, fps=1, prompt_tokens=20, max_new_tokens=max_new_tokens, fit=True)
    assert budget.fits and budget.visual_tokens <= room < config.num_video_tokens(budget.frames + 2)
    assert budget.frames == budget.max_frames == budget.frames_that_fit == room // 4 * 2
    assert budget.fitted == f"{budget.frames} frames instead of the 3600 that fps=1 gives, spread over the whole video"
    assert budget.seconds[1] > 3500  # the whole video, at a lower rate
    assert budget.temporal_sample_rate == 1


@pytest.mark.parametrize("temporal_sample_rate", [1, 3])
def test_fit_with_a_frame_count_raises_the_sampling_rate(temporal_sample_rate):
    config = tiny_config(temporal_sample_rate=temporal_sample_rate)
    budget = video_token_budget(HOUR_AT_25_FPS, config, num_frames=1000, prompt_tokens=20, max_new_tokens=100, fit=True)
    rate = budget.temporal_sample_rate
    assert budget.frames == 1000 and budget.max_frames is None and budget.fits
    assert budget.visual_tokens == config.num_video_tokens(1000, temporal_sample_rate=rate) <= 392
    assert config.num_video_tokens(1000, temporal_sample_rate=rate - 1) > 392  # the lowest s that fits
    assert rate == 6 and budget.fitted == f"temporal sampling s=6 instead of s={temporal_sample_rate}: 1 pooled frame in 6 is kept"
    assert config.temporal_sample_rate == temporal_sample_rate  # the caller's config is left alone


def test_fit_changes_nothing_that_fits():
    budget = video_token_budget(HOUR_AT_25_FPS, tiny_config(), num_frames=16, prompt_tokens=20, fit=True)
    assert (budget.frames, budget.visual_tokens, budget.fits, budget.fitted) == (16, 32, True, None)
    assert budget.frames_that_fit == (512 - 20) // 4 * 2
    assert budget.seconds == (0.0, pytest.approx(89999 / 25))


def test_what_cannot_fit_or_be_sampled_is_refused_before_decoding():
    with pytest.raises(ValueError, match=r"No sampling of the video fits: the prompt's 400 tokens and max_new_tokens=110 leave 2 .*one pooled frame alone is 4 visual tokens"):
        video_token_budget(HOUR_AT_25_FPS, tiny_config(), fps=1, prompt_tokens=400, max_new_tokens=110, fit=True)
    budget = video_token_budget(HOUR_AT_25_FPS, tiny_config(), fps=1, prompt_tokens=400, max_new_tokens=110)
    assert not budget.fits and budget.frames_that_fit == 0
    with pytest.raises(ValueError, match="not a multiple of temporal_pool_size=2"):
        video_token_budget(HOUR_AT_25_FPS, tiny_config(), num_frames=7)
    with pytest.raises(ValueError, match="exactly one of num_frames or fps"):
        video_token_budget(HOUR_AT_25_FPS, tiny_config())
    with pytest.raises(ValueError, match="Asked for 100000 frames but the video has only 90000"):
        video_token_budget(HOUR_AT_25_FPS, tiny_config(), num_frames=100000)
    with pytest.raises(ValueError, match="`max_new_tokens=-1` must be at least 0"):
        video_token_budget(HOUR_AT_25_FPS, tiny_config(), fps=1, max_new_tokens=-1)


def test_the_budget_is_what_the_processor_then_gives(videos_dir, miniature, no_decoding, monkeypatch):
    """Frames, times and tokens of the budget (container only) equal those of the processed video."""
    config, processor = miniature
    video = videos_dir / "bikes.mp4"
    budget = video_token_budget(
        read_video_metadata(video), config, fps=10, prompt_tokens=23, max_new_tokens=800, fit=True
    )
    assert (budget.frames, budget.visual_tokens, budget.fitted is not None) == (48, 192, True)  # 1024-23-800: 12·16
    monkeypatch.undo()  # decoding allowed from here
    messages = [{"role": "user", "content": [{"type": "video", "path": str(video)}, {"type": "text", "text": "What happens?"}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
        processor_kwargs={"fps": 10, "max_frames": budget.max_frames, "return_metadata": True},
    )
    metadata = inputs["video_metadata"][0]
    assert len(metadata.frames_indices) == budget.frames
    assert (metadata.timestamps[0], metadata.timestamps[-1]) == budget.seconds
    assert int((inputs["input_ids"] == config.video_token_id).sum()) == budget.visual_tokens
    assert inputs["input_ids"].shape[1] == budget.prompt_tokens + budget.visual_tokens
    expected = sample_frame_indices(metadata, fps=10, temporal_pool_size=4, max_frames=budget.max_frames)
    assert metadata.frames_indices == expected.tolist()


def test_storm_generate_refuses_before_decoding_what_does_not_fit(videos_dir, no_decoding, capsys, monkeypatch):
    """bikes.mp4 at 25 fps on the miniature (1024-token context): 248 frames, 992 visual tokens; refused, undecoded,
    and before the weights load (minutes for STORM-7B)."""
    import storm_transformers.loading

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded for a video that does not fit")

    monkeypatch.setattr(storm_transformers.loading, "load_storm", no_weights)
    video = str(videos_dir / "bikes.mp4")
    assert main(["generate", "--video", video, "--prompt", "What happens?", "--fps", "25"]) == 1
    captured = capsys.readouterr()
    assert "video: " + video + " (10.0 s, 250 frames, 25.00 fps)" in captured.out
    assert (
        "budget: 248 frames at 0.00 … 9.96 s → 992 visual tokens (k=4, p=1, s=1) + 23 prompt tokens + 64 new tokens "
        "= 1079 tokens: does NOT fit the LLM context of 1024 tokens"
    ) in captured.out
    assert "storm generate: error: 248 frames make 992 visual tokens" in captured.err
    assert "1079 tokens, past the LLM's context of 1024 tokens" in captured.err and "Nothing was decoded" in captured.err
    assert "--fit (it takes the 232 frames that fit, spread over the whole video), or --max-frames 232" in captured.err

    assert main(["generate", "--video", video, "--prompt", "What happens?", "--num-frames", "248"]) == 1
    err = capsys.readouterr().err
    assert "--fit (it keeps the frames and raises the temporal sampling rate to s=2), or --temporal-sample-rate 2" in err
    assert "--num-frames 232 (or fewer)" in err


def test_storm_generate_fit_prints_what_it_picked_before_decoding(video_path, capsys, monkeypatch):
    """Big Buck Bunny at 25 fps is 132 frames; a long prompt leaves room for fewer: --fit takes the most that fit,
    says so before the first frame is decoded, and the LLM gets exactly the budget's tokens."""
    decoded = []
    read = video_processing.read_video_pyav

    def record(*args, **kwargs):
        decoded.append(capsys.readouterr().out)  # what was printed before decoding started
        return read(*args, **kwargs)

    monkeypatch.setattr(video_processing, "read_video_pyav", record)
    prompt = "Describe the video. " * 200  # ~800 tokens
    assert main(["generate", "--video", str(video_path), "--prompt", prompt, "--fps", "25", "--fit", "--max-new-tokens", "1"]) == 0
    before, after = decoded[0], capsys.readouterr().out
    budget = re.search(r"budget: (\d+) frames at 0\.00 … ([\d.]+) s → (\d+) visual tokens .* \+ (\d+) prompt tokens", before)
    frames, last, visual, prompt_tokens = budget.groups()
    assert int(visual) <= 1024 - 1 - int(prompt_tokens) < int(visual) + 16 and int(frames) < 132
    assert f"--fit: {frames} frames instead of the 132 that fps=25 gives, spread over the whole video" in before
    assert "frames decoded" not in before and len(decoded) == 1
    assert f"frames decoded: {frames} of 1280×720, at 0.00 … {last} s" in after
    assert f"visual tokens sent to the LLM: {visual} (k=4" in after
    assert f"prompt {int(prompt_tokens) + int(visual)} tokens" in after


def test_max_frames_needs_fps(capsys):
    assert main(["generate", "--video", "x.mp4", "--prompt", "?", "--num-frames", "8", "--max-frames", "8"]) == 1
    assert "--max-frames 8 caps --fps sampling" in capsys.readouterr().err


def test_new_flags_are_checked_without_torch():
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "storm_cli", "generate", "--video", "x", "--prompt", "?",
         "--fps", "1", "--fit", "--max-frames", "0"],
        capture_output=True, text=True, cwd=REPO,
    )
    assert result.returncode == 2 and "argument --max-frames: '0' must be at least 1" in result.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "argparse" in imported and not {"torch", "transformers", "numpy"} & imported
