"""The miniature STORM that ships in checkpoints/ (docs/miniature.md): it loads, answers held-out clips on CPU, and is
the default of `storm generate` (README command 1)."""

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from storm_transformers.cli import DEFAULT_MODEL, main
from storm_transformers.training.miniature import SHIFTED_DATA_SEED, _linear_probe, evaluate, representation
from storm_transformers.training.synthetic import generate_dataset

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "checkpoints" / "storm-tiny-synthetic"
# Question types it learned, with the accuracy it reaches on the first 60 test clips (on all 600: color, change and
# direction 100%, order 94%, shape 98%; count 34%, chance 33%: not learned; its card and docs/miniature.md): order 7 of
# its 8 clips, shape at least 8 of its 9 (it answers all 9).
LEARNED = {"color": 1.0, "change": 1.0, "direction": 1.0, "order": 0.85, "shape": 0.85}
# The same on the first 60 shifted clips (other backgrounds, shape sizes and speeds; another seed stream): order 8 of
# its 9, shape at least 10 of its 11 (it answers all 11); on all 600 shifted clips order 90%, shape 94%.
LEARNED_SHIFTED = {"color": 1.0, "change": 1.0, "direction": 1.0, "order": 0.85, "shape": 0.9}


def test_it_is_the_default_of_storm_generate_and_within_the_size_budget():
    assert Path(DEFAULT_MODEL) == CHECKPOINT
    assert (CHECKPOINT / "model.safetensors").stat().st_size <= 40 * 2**20
    card = ModelCard.load(CHECKPOINT / "README.md")
    assert "synthetic-data" in card.data.tags and "random-weights" not in card.data.tags
    assert "It knows only its synthetic world" in card.text
    assert "examples/square_turns_green.mp4" in card.text  # the usage snippet runs as written from the repo root
    eos = json.loads((CHECKPOINT / "generation_config.json").read_text())["eos_token_id"]
    assert eos == [151643, 151645]  # <|endoftext|>, <|im_end|>: each once


def test_readme_command_answers_the_example_clip(capsys):
    code = main(["generate", "--video", str(REPO / "examples" / "square_turns_green.mp4"),
                 "--prompt", "What colour does the square turn into?", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0 and "random (untrained) weights" not in out
    assert "visual tokens sent to the LLM: 32 (k=4" in out
    assert out.strip().endswith("answer: green")


@pytest.fixture(scope="module")
def held_out_clips(tmp_path_factory):
    """The first 60 clips of the held-out test split (data seed 0), regenerated: rows depend on (seed, index) only."""
    folder = tmp_path_factory.mktemp("synthetic")
    generate_dataset(folder, {"test": 60}, seed=0)
    return folder


def test_it_answers_held_out_clips_of_the_types_it_learned(held_out_clips):
    scores = evaluate(CHECKPOINT, held_out_clips, device="cpu")
    assert scores["questions"] == 60
    for kind, accuracy in LEARNED.items():
        assert scores["by type"][kind] >= accuracy, (kind, scores)
    rows = [json.loads(line) for line in (held_out_clips / "test.jsonl").read_text().splitlines()]
    assert sum(row["question_type"] in LEARNED for row in rows) >= 30  # the check covers a fair number of clips


def test_it_answers_clips_with_other_nuisances(tmp_path):
    """docs/miniature.md's generalisation check: shape sizes (radius 6 or 10 px, not 8), backgrounds and speeds the QA
    clips never show. A stage-0 tower that saw radius 8 only answered 48% of shape questions there."""
    generate_dataset(tmp_path, {"test": 60}, seed=SHIFTED_DATA_SEED, shifted=True)
    scores = evaluate(CHECKPOINT, tmp_path, device="cpu")
    for kind, accuracy in LEARNED_SHIFTED.items():
        assert scores["by type"][kind] >= accuracy, (kind, scores)


def test_its_visual_tokens_have_not_collapsed(held_out_clips):
    """The collapse of docs/miniature.md (a vision tower trained end to end on video QA from scratch): token norms of
    205 (vision tower) and 816 (projector) and every token of a frame alike. The shipped tower comes from stage 0 and
    stayed frozen: 26.3 and 41.1 on the full splits."""
    generate_dataset(held_out_clips, {"train": 120}, seed=0)  # the probes fit on training clips
    report = representation(CHECKPOINT, held_out_clips, device="cpu")
    assert report["vision-token norm"] < 40 and report["projector-output norm"] < 80, report
    assert report["within-frame cosine"] < 0.95, report
    assert set(report) >= {"probe shape", *(f"probe {kind}{where}" for kind in ("direction", "count")
                                            for where in ("", ", LLM input", ", LLM answer state"))}


def test_the_linear_probe_reads_what_is_there_and_only_that():
    generator = torch.Generator().manual_seed(0)
    labels = ["a", "b", "c"] * 40
    centres = torch.randn(3, 16, generator=generator) * 3
    features = centres[[("a", "b", "c").index(label) for label in labels]] + torch.randn(120, 16, generator=generator)
    assert _linear_probe(features[:90], labels[:90], features[90:], labels[90:]) == 1.0
    noise = torch.randn(120, 16, generator=generator)  # features that say nothing about the labels
    assert _linear_probe(noise[:90], labels[:90], noise[90:], labels[90:]) < 0.6


def test_the_shipped_checkpoints_code_is_the_packages():
    """Its remote code (loaded with `trust_remote_code=True` where the package is not installed) is a copy of the
    package's files; after editing one, refresh the copy:
    `for f in checkpoints/storm-tiny-synthetic/*.py; do cp storm_transformers/$(basename $f) $f; done`."""
    copies = sorted(CHECKPOINT.glob("*.py"))
    assert {path.name for path in copies} >= {"configuration_storm.py", "modeling_storm.py", "processing_storm.py"}
    stale = [path.name for path in copies if path.read_bytes() != (REPO / "storm_transformers" / path.name).read_bytes()]
    assert not stale, f"stale copies in {CHECKPOINT}: {stale}"
