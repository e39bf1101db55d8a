"""Pieces of the miniature experiment (storm_transformers/training/miniature.py) that run without a GPU."""

from storm_transformers.training.miniature import checkpoints


def test_learning_curve_checkpoints_come_in_step_order(tmp_path):
    for step in (250, 2000, 1000, 500):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "model.safetensors").touch()
    assert checkpoints(tmp_path) == [(step, tmp_path / f"checkpoint-{step}") for step in (250, 500, 1000, 2000)]
