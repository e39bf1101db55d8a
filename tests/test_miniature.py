"""Pieces of the miniature experiment (storm_transformers/training/miniature.py) that run without a GPU."""

import os
import signal
import subprocess
import sys
import time
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


def test_stage_zero_radii_are_checked_before_anything_is_generated(tmp_path, capsys):
    from storm_transformers.training import miniature

    with pytest.raises(SystemExit):
        miniature.main(["--output", str(tmp_path / "out"), "--vision-radii", "9", "8"])
    assert "--vision-radii: radii=(9, 8) must be (smallest, largest) px with 1 ≤ smallest ≤ largest ≤ 10" in \
        capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_stage_zero_runs_the_seeds_at_once_each_as_it_would_alone(tmp_path):
    """`pretrain_towers`: every seed's stage 0 in a spawned process of its own; each gives the tower that
    `pretrain_vision` trains in this process with the same settings, and the seeds' towers differ."""
    import os

    import torch
    from safetensors.torch import load_file

    from storm_transformers.training import miniature

    def tower(folder):
        return {key: value for key, value in load_file(folder / "model.safetensors").items()
                if key.startswith("model.vision_tower.")}

    tokenizer = REPO / "checkpoints" / "storm-tiny-synthetic"  # holds tokenizer.json
    made = miniature.pretrain_towers(tmp_path / "at-once", tokenizer, [0, 1], steps=2, radii=(5, 10))
    assert sorted(made) == [0, 1] and [entry["step"] for entry in made[1][1]] == [1, 2]
    workers = min(8, max(1, (os.cpu_count() or 1) // 2))  # each process's share of the DataLoader workers
    alone, history = miniature.pretrain_vision(tmp_path / "alone", tokenizer, 0, 2, (5, 10), workers)
    assert history[-1]["patch"] == pytest.approx(made[0][1][-1]["patch"], rel=1e-4)
    at_once, other_seed = tower(made[0][0]), tower(made[1][0])
    for key, value in tower(alone).items():
        torch.testing.assert_close(at_once[key], value, rtol=1e-4, atol=1e-5)
    assert any(not torch.allclose(at_once[key], other_seed[key]) for key in at_once)


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


def test_curriculum_stage_trains_on_its_question_types_between_alignment_and_sft(tmp_path, monkeypatch):
    """`--curriculum direction`: alignment on the whole split, then SFT on the direction questions alone, then SFT on
    the whole split from there; a type the training split lacks is refused."""
    import json
    import subprocess

    from storm_transformers.training import miniature

    data = miniature.prepare_data(tmp_path / "data", [
        {"sizes": {"train": 24}, "seed": 0, "question_weights": {"direction": 1, "color": 1}}])
    curriculum = miniature.curriculum_data(data, ["direction"])
    rows = [json.loads(line) for line in curriculum.read_text().splitlines()]
    assert {row["question_type"] for row in rows} == {"direction"}
    assert len(rows) == len(miniature._rows(data, "train", kind="direction")) > 0
    with pytest.raises(ValueError, match="asks no shape question"):
        miniature.curriculum_data(data, ["direction", "shape"])

    commands = []
    monkeypatch.setattr(subprocess, "run", lambda command, **kwargs: commands.append(command) or
                        subprocess.CompletedProcess(command, 0))
    (tmp_path / "runs" / "bi-k4-seed0").mkdir(parents=True)
    steps = {"alignment": 10, "curriculum": 30, "sft": 50}
    final = miniature.train("bi-k4", 0, tmp_path, data, steps, 1, print, curriculum=curriculum)
    run = tmp_path / "runs" / "bi-k4-seed0"
    stages = [(Path(c[c.index("--model_name_or_path") + 1]).name, Path(c[c.index("--output_dir") + 1]).name,
               Path(c[c.index("--dataset_name") + 1]).name, int(c[c.index("--max_steps") + 1]),
               Path(c[c.index("--config") + 1]).name) for c in commands]
    assert stages == [("init", "alignment", "train.jsonl", 10, "miniature_alignment.yaml"),
                      ("alignment", "curriculum", curriculum.name, 30, "miniature_sft.yaml"),
                      ("curriculum", "sft", "train.jsonl", 50, "miniature_sft.yaml")]
    assert "--save_steps" in commands[2] and "--save_steps" not in commands[1]  # learning curves: the last SFT only
    assert final == run / "sft"


def test_exported_card_says_what_the_model_answers_partly_and_how_it_was_trained(tmp_path):
    """`export` (the shipped checkpoint's card): reliable types, partly learned ones with their chance level, types at
    chance, and the curriculum stage when the run had one."""
    from huggingface_hub import ModelCard

    from storm_transformers.training import miniature

    by_type = {"change": 1.0, "color": 1.0, "direction": 1.0, "order": 0.96, "shape": 0.93, "count": 0.56}
    args = {"vision_steps": 1500, "alignment_steps": 100, "sft_steps": 2000, "train_size": 6000, "data_seed": 0,
            "train_mix": [["direction", 3], ["count", 2]], "curriculum": ["direction"], "curriculum_steps": 800,
            "vision_radii": [5, 10]}
    results = {"args": args, "evaluations": {"bi-k4@s1": [{"seed": 0, "accuracy": 0.9, "temporal": 0.87,
                                                            "by type": by_type}]}}
    checkpoint = REPO / "checkpoints" / "storm-tiny-synthetic"
    miniature.export(checkpoint, results, "bi-k4", 0, tmp_path / "card-a", "python -m miniature --curriculum direction")
    text = ModelCard.load(tmp_path / "card-a" / "README.md").text
    assert "It answers change, color, direction, order, shape questions reliably; count (56%, chance 33%) questions " \
           "partly." in text
    assert "no better than guessing" not in text and "on no questions" not in text
    assert "then SFT on the training split's direction questions alone (800 steps, a curriculum)" in text
    assert "1500 steps of 128 frames, shapes of radius 5–10 px," in text

    results["evaluations"]["bi-k4@s1"][0]["by type"].update(direction=0.25, count=0.34)
    del args["curriculum"], args["vision_radii"]  # as in the results of runs from before these options
    miniature.export(checkpoint, results, "bi-k4", 0, tmp_path / "card-b", "python -m miniature")
    text = ModelCard.load(tmp_path / "card-b" / "README.md").text
    assert "; on direction, count questions it is no better than guessing." in text
    assert "curriculum" not in text
    assert "1500 steps of 128 frames, shapes of radius 8 px," in text


def test_spawned_processes_exit_when_the_main_process_is_killed(tmp_path):
    """A SIGKILL reaches only the main process: the evaluation / stage-0 processes it spawned (initialiser
    `_spawned_process`) must not go on without it."""
    script = tmp_path / "main.py"
    script.write_text(
        "import multiprocessing, os, sys, time\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "from storm_transformers.training.miniature import _spawned_process\n"
        "if __name__ == '__main__':\n"
        "    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('spawn'),\n"
        "                               initializer=_spawned_process, initargs=(1,))\n"
        "    print(pool.submit(os.getpid).result(), flush=True)\n"
        "    time.sleep(300)\n"
    )
    def running(pid):  # neither gone nor a zombie waiting for its new parent to reap it
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    main = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    child = int(main.stdout.readline())
    time.sleep(2)
    assert running(child)  # alive while the main process is
    main.kill()
    main.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if not running(child):
            return
        time.sleep(0.2)
    os.kill(child, signal.SIGKILL)
    pytest.fail(f"the spawned process {child} outlived the killed main process by 30 s")
