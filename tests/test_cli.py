import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from transformers import AutoModelForImageTextToText

from storm_transformers import StormForConditionalGeneration, cli, loading
from storm_transformers.loading import check_checkpoint
from storm_cli import DEFAULT_MODEL, DTYPES, main

REPO = Path(__file__).resolve().parents[1]


def test_tiny_random_checkpoint_is_complete_and_says_it_is_random(tiny_checkpoint):
    names = {path.name for path in tiny_checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "README.md"} <= names
    assert not any(path.name.startswith(".") for path in tiny_checkpoint.parent.iterdir())  # no leftover staging
    card = ModelCard.load(tiny_checkpoint / "README.md")
    assert "random-weights" in card.data.tags and card.data.pipeline_tag == "video-text-to-text"
    assert "weights of this checkpoint are random" in card.text
    assert "| visual tokens per video at 16 frames | 64 |" in card.text
    model = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint)
    assert isinstance(model, StormForConditionalGeneration)
    assert model.config.text_config.vocab_size % 64 == 0


def test_storm_generate_on_a_real_video(tiny_checkpoint, video_path, capsys):
    code = main(["generate", "--model", str(tiny_checkpoint), "--video", str(video_path), "--prompt", "What happens?",
                 "--num-frames", "8", "--max-new-tokens", "5"])
    out = capsys.readouterr().out
    assert code == 0
    assert "has random (untrained) weights" in out
    assert "budget: 8 frames at 0.00 … 5.24 s → 32 visual tokens" in out
    assert "frames decoded: 8 of 1280×720, at 0.00 … 5.24 s" in out
    assert "visual tokens sent to the LLM: 32 (k=4" in out  # 8 frames / k=4 -> 2 x 16 tokens
    assert "(5 new tokens)" in out and "answer: " in out


def test_storm_generate_reports_bad_input(tiny_checkpoint, tmp_path, capsys):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    assert main(["generate", "--model", str(tiny_checkpoint), "--video", str(empty), "--prompt", "?"]) == 1
    assert "is empty (0 bytes)" in capsys.readouterr().err
    args = ["generate", "--model", str(tiny_checkpoint), "--video", str(empty), "--prompt", "?", "--num-frames", "6"]
    empty.unlink()
    assert main(args) == 1
    assert "Video file not found" in capsys.readouterr().err


def test_help_lists_the_commands():
    result = subprocess.run([sys.executable, "-m", "storm_transformers.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "generate" in result.stdout and "fetch-assets" in result.stdout


@pytest.mark.parametrize(
    "argv, code, output",
    [
        (["--help"], 0, "convert"),
        (["convert", "compose", "--help"], 0, "--push-to-hub"),
        (["generate", "--video", "x.mp4", "--prompt", "?", "--num-frames", "0"], 2, "argument --num-frames: '0' must"),
        (["convert", "compose", "--vision", "a", "--llm", "b", "--output", "c", "--num-frames", "0"], 2, "'0' must"),
    ],
)
def test_help_and_flag_errors_do_not_import_torch(argv, code, output):
    """`storm` imports no torch (or transformers) to print its help or refuse a flag: `python -X importtime`."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "storm_cli", *argv], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == code and output in result.stdout + result.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "argparse" in imported  # the import log is there
    assert not {"torch", "transformers", "numpy", "storm_transformers"} & imported


def test_the_default_checkpoint_is_the_shipped_miniature():
    assert Path(DEFAULT_MODEL) == REPO / "checkpoints" / "storm-tiny-synthetic"
    assert check_checkpoint(DEFAULT_MODEL) == Path(DEFAULT_MODEL)
    assert set(DTYPES) == set(loading.DTYPES)  # the CLI's --dtype choices are the loader's


def test_a_missing_default_checkpoint_says_how_to_get_it(monkeypatch, tmp_path, capsys):
    import storm_cli

    monkeypatch.setattr(storm_cli, "DEFAULT_MODEL", str(tmp_path / "storm-tiny-synthetic"))
    monkeypatch.setattr(cli, "DEFAULT_MODEL", str(tmp_path / "storm-tiny-synthetic"))
    assert main(["generate", "--video", "x.mp4", "--prompt", "?"]) == 1
    assert "install from a clone (`pip install -e .`) or pass --model" in capsys.readouterr().err
