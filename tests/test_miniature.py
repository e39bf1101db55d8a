"""Pieces of the miniature experiment (storm_transformers/training/miniature.py) that run without a GPU."""

from pathlib import Path

import pytest

from storm_transformers.training.miniature import checkpoints

REPO = Path(__file__).resolve().parents[1]


def test_learning_curve_checkpoints_come_in_step_order(tmp_path):
    for step in (250, 2000, 1000, 500):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "model.safetensors").touch()
    assert checkpoints(tmp_path) == [(step, tmp_path / f"checkpoint-{step}") for step in (250, 500, 1000, 2000)]


def test_clips_are_generated_once_and_never_reused_for_other_arguments(tmp_path, monkeypatch):
    from storm_transformers.training import miniature, synthetic

    folder = tmp_path / "data"
    uniform = [{"sizes": {"test": 2}, "seed": 0}]
    weighted = [{"sizes": {"train": 2}, "seed": 0, "question_weights": {"direction": 1}}]
    assert miniature.prepare_data(folder, uniform) == folder
    with monkeypatch.context() as patch:  # the same arguments again: nothing is generated
        patch.setattr(synthetic, "generate_dataset", lambda *args, **kwargs: pytest.fail("generated again"))
        assert miniature.prepare_data(folder, uniform) == folder
    with pytest.raises(ValueError, match="holds clips generated with .* but this run asks for"):
        miniature.prepare_data(folder, weighted)
    (folder / "datasets.json").unlink()  # as after an interrupted generation: generated again
    miniature.prepare_data(folder, weighted)
    assert (folder / "train.jsonl").read_text().count('"question_type": "direction"') == 2


def test_train_mix_argument_is_type_equals_weight(capsys):
    from storm_transformers.training import miniature

    with pytest.raises(SystemExit):
        miniature.main(["--train-mix", "direction"])
    assert "'direction' is not TYPE=WEIGHT" in capsys.readouterr().err


def test_probes_leave_out_a_question_type_the_training_mix_lacks(tmp_path):
    """`representation` on the shipped miniature, with a training split of direction clips only (`--train-mix
    direction=1`): the direction probes are measured, the shape ones (no shape clip to fit on) are left out."""
    from storm_transformers.training import miniature

    data = miniature.prepare_data(tmp_path / "data", [
        {"sizes": {"train": 12}, "seed": 0, "question_weights": {"direction": 1}},
        {"sizes": {"test": 30}, "seed": 0},
    ])
    report = miniature.representation(REPO / "checkpoints" / "storm-tiny-synthetic", data, device="cpu")
    assert set(report) == {"probe direction", "probe direction, LLM input", "probe direction, LLM answer state"}
    assert all(0 <= value <= 1 for value in report.values())
