"""The SFT recipe end to end on the tiny checkpoint and real videos: loss, freezing, LoRA, resume, CLI, bad input."""

import json
import re
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from peft import PeftModel
from safetensors.torch import load_file
from storm_testing import tiny_config
from transformers import AutoModelForImageTextToText, AutoProcessor
from trl import SFTConfig, SFTTrainer

from storm_transformers import StormForConditionalGeneration
from storm_transformers.cli import main as storm
from storm_transformers.training.args import StormDataArguments, StormModelArguments, storm_sft_config
from storm_transformers.training.data import StormDataCollator, load_conversations
from storm_transformers.training.modules import (
    ALIGNMENT_MODULES,
    LLM_LORA_TARGETS,
    check_lora_targets,
    storm_lora_config,
)
from storm_transformers.training.sft import load_model_and_processor, main

REPO = Path(__file__).resolve().parents[1]

NUM_FRAMES = 4
ROWS = [
    ("bikes.mp4", "What do the people do?", "They ride bikes."),
    ("carphone_pristine.mp4", "Where is he?", "In a car."),
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, videos_dir):
    """A JSONL file of two video conversations whose paths are relative to its folder."""
    folder = tmp_path_factory.mktemp("data")
    lines = []
    for name, question, answer in ROWS:
        (folder / name).symlink_to(videos_dir / name)
        user = {"role": "user", "content": [{"type": "video", "path": name}, {"type": "text", "text": question}]}
        lines.append(json.dumps({"messages": [user, {"role": "assistant", "content": answer}]}))
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "train.jsonl"


def train(checkpoint, dataset, output_dir, *, model=None, **config):
    """Run the recipe: tiny model on CPU, the two rows as one batch per step, logging every step."""
    defaults = {
        "max_steps": 3,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-2,
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "bf16": False,
        "use_cpu": True,
        "disable_tqdm": True,
        "gradient_checkpointing": False,  # covered by the CLI and README tests (LoRA) and tests/test_modeling_storm.py
    }
    data_args = StormDataArguments(dataset_name=str(dataset), num_frames=NUM_FRAMES)
    model_args = StormModelArguments(model_name_or_path=str(checkpoint), **(model or {}))
    return main(data_args, model_args, SFTConfig(output_dir=str(output_dir), **{**defaults, **config}))


def losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_sft_steps_on_a_repeated_batch_drive_the_loss_down(tiny_checkpoint, dataset, tmp_path):
    trainer = train(tiny_checkpoint, dataset, tmp_path / "sft", max_steps=6)
    curve = losses(trainer)
    assert len(curve) == 6 and curve[-1] < curve[0] - 2.0, curve  # 12.0 → 8.8 with seed 42

    out = tmp_path / "sft"
    model = AutoModelForImageTextToText.from_pretrained(out)
    trained = trainer.model.state_dict()
    assert all(torch.equal(tensor, trained[name]) for name, tensor in model.state_dict().items())
    assert AutoProcessor.from_pretrained(out).video_processor.num_frames == NUM_FRAMES
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert sorted(eos) == sorted(set(eos)) == [151643, 151645]  # <|endoftext|>, <|im_end|>; once each (5.17 doubled it)
    card = ModelCard.load(out / "README.md")
    assert card.data.pipeline_tag == "video-text-to-text" and card.data.library_name == "transformers"
    assert f"Fine-tuned from `{tiny_checkpoint}`" in card.text and "2 rows), 4 frames per video" in card.text
    assert "| visual tokens per video at 4 frames | 16 |" in card.text


def test_alignment_stage_leaves_frozen_weights_bit_identical(tiny_checkpoint, dataset, tmp_path):
    before = load_file(tiny_checkpoint / "model.safetensors")
    train(tiny_checkpoint, dataset, tmp_path / "align", model={"trainable_modules": list(ALIGNMENT_MODULES)})
    after = load_file(tmp_path / "align" / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {
        name.split(".")[1] if name.startswith("model.") else name
        for name in before
        if not torch.equal(before[name], after[name])
    }
    assert changed == {"multi_modal_projector", "temporal_encoder"}
    frozen = [name for name in before if name.startswith(("model.vision_tower.", "model.language_model.", "lm_head."))]
    assert len(frozen) > 40 and all(torch.equal(before[name], after[name]) for name in frozen)
    card = ModelCard.load(tmp_path / "align" / "README.md").text
    assert "trained: multi_modal_projector, temporal_encoder; frozen: vision_tower, language_model" in card


def test_lora_adapter_saves_loads_and_merges_to_the_same_outputs(tiny_checkpoint, dataset, tmp_path, capsys):
    out = tmp_path / "lora"
    trainer = train(tiny_checkpoint, dataset, out, model={"use_peft": True})
    adapted = trainer.model.eval()
    lora_layers = {name.split(".lora_A")[0] for name, _ in adapted.named_parameters() if ".lora_A." in name}
    assert len(lora_layers) == 14 and all(".model.language_model.layers." in name for name in lora_layers)
    saved = load_file(out / "adapter_model.safetensors")
    assert any("multi_modal_projector" in key for key in saved) and any("temporal_encoder" in key for key in saved)
    assert not any("vision_tower" in key for key in saved)
    assert ModelCard.load(out / "README.md").data.library_name == "peft"
    # The adapter folder is not a model: `storm generate --model` says what it is and how to use it.
    capsys.readouterr()
    assert storm(["generate", "--model", str(out), "--video", "clip.mp4", "--prompt", "?"]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"storm generate: error: {out} is a PEFT (LoRA) adapter") and len(error.splitlines()) == 1
    assert f"the base model {tiny_checkpoint}" in error and "merge_and_unload()" in error

    processor = AutoProcessor.from_pretrained(out)
    batch = StormDataCollator(processor, NUM_FRAMES, data_root=dataset.parent)(
        [json.loads(line) for line in dataset.read_text().splitlines()]
    )
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    with torch.no_grad():
        expected = adapted(**inputs).logits
        base = StormForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
        base_logits = base(**inputs).logits
        loaded = PeftModel.from_pretrained(base, out).eval()
        torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=0, atol=0)
        merged = loaded.merge_and_unload()
        assert type(merged) is StormForConditionalGeneration
        torch.testing.assert_close(merged(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
    assert (base_logits - expected).abs().max() > 1e-2  # the adapter changed the model


def test_resume_from_a_checkpoint_continues_the_step_count(tiny_checkpoint, dataset, tmp_path):
    alignment = {"trainable_modules": list(ALIGNMENT_MODULES)}
    first = train(
        tiny_checkpoint, dataset, tmp_path / "run", model=alignment, max_steps=2, save_strategy="steps", save_steps=2
    )
    assert (tmp_path / "run" / "checkpoint-2" / "optimizer.pt").exists()
    # learning_rate=0 after resuming: the step-3 loss is that of the checkpoint's weights only if they were restored.
    resumed = train(
        tiny_checkpoint,
        dataset,
        tmp_path / "run",
        model=alignment,
        max_steps=3,
        learning_rate=0.0,
        resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"),
    )
    assert resumed.state.global_step == 3
    assert [entry["step"] for entry in resumed.state.log_history if "loss" in entry] == [1, 2, 3]
    assert losses(resumed)[:2] == losses(first)
    assert losses(resumed)[2] < losses(first)[0] - 0.1, losses(resumed)  # restarting would repeat the first loss


def test_storm_train_runs_a_yaml_recipe_and_reports_bad_input(tiny_checkpoint, dataset, tmp_path, capsys):
    args = [
        "train",
        "--config",
        "storm_transformers/training/configs/sft_lora.yaml",
        "--model_name_or_path",
        str(tiny_checkpoint),
        "--dataset_name",
        str(dataset),
        "--num_frames",
        str(NUM_FRAMES),
        "--dtype",
        "float32",
        "--max_steps",
        "1",
        "--dataloader_num_workers",
        "0",
        "--disable_tqdm",
        "true",
    ]
    assert storm([*args, "--output_dir", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "adapter_config.json").exists()
    out = capsys.readouterr().out
    assert "Rows skipped for unreadable media: 0." in out
    if not torch.accelerator.is_available():  # the YAML says bf16: true; no --use_cpu needed on a CPU-only machine
        assert "No GPU or other accelerator found: training on the CPU in float32 (use_cpu=True, bf16=False)." in out

    assert storm([*args, "--output_dir", str(tmp_path / "k"), "--num_frames", "6"]) == 1
    assert "num_frames=6 is not a multiple of temporal_pool_size=4" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "No answer here."}]}) + "\n")
    assert storm([*args, "--output_dir", str(tmp_path / "bad"), "--dataset_name", str(bad)]) == 1
    assert "bad.jsonl, line 1: The conversation has no assistant turn" in capsys.readouterr().err


def test_a_bf16_checkpoint_stays_bf16_when_asked_and_an_upcast_is_announced(
    tiny_checkpoint, dataset, tmp_path, caplog
):
    bf16 = tmp_path / "bf16"
    AutoModelForImageTextToText.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16).save_pretrained(bf16)
    AutoProcessor.from_pretrained(tiny_checkpoint).save_pretrained(bf16)
    model, _ = load_model_and_processor(StormModelArguments(model_name_or_path=str(bf16)), NUM_FRAMES)
    assert model.dtype == torch.float32
    assert "Loading the torch.bfloat16 weights of" in caplog.text and "as float32" in caplog.text

    model, processor = load_model_and_processor(
        StormModelArguments(model_name_or_path=str(bf16), dtype="auto"), NUM_FRAMES
    )
    args = storm_sft_config(SFTConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none"))
    collator = StormDataCollator(processor, NUM_FRAMES, data_root=dataset.parent)
    trainer = SFTTrainer(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=load_conversations(dataset),
        processing_class=processor,
    )
    trainer.save_model()
    assert trainer.model.dtype == torch.bfloat16  # TRL's SFTTrainer (bf16=True by default) did not upcast it
    assert trainer.model.model.temporal_encoder.layers[0].mixer.A_log.dtype == torch.float32  # kept fp32 by the model
    assert AutoModelForImageTextToText.from_pretrained(tmp_path / "out").config.dtype == torch.bfloat16


def test_lora_targets_that_match_nothing_are_errors():
    model = StormForConditionalGeneration(tiny_config())
    counts = check_lora_targets(model, storm_lora_config())
    assert counts == {"language_model": 14}  # 2 layers × (q, k, v, o, gate, up, down); no SigLIP, no Mamba
    assert storm_lora_config().target_modules == LLM_LORA_TARGETS
    assert check_lora_targets(model, storm_lora_config(target_modules=["q_proj"])) == {
        "vision_tower": 2,
        "language_model": 2,
    }
    with pytest.raises(ValueError, match="LoRA target 'qproj' matches no module"):
        check_lora_targets(model, storm_lora_config(target_modules=["q_proj", "qproj"]))
    with pytest.raises(ValueError, match="LoRA target 'q_proj' matches no module.*regex that must match the whole"):
        check_lora_targets(model, storm_lora_config(target_modules="q_proj"))
    with pytest.raises(ValueError, match="contains 'language_model' and use_peft is set"):
        storm_lora_config(["language_model"])
    with pytest.raises(ValueError, match="unknown: \\['projector'\\]"):
        StormModelArguments(model_name_or_path="x", trainable_modules=["projector"])


def readme_code(heading: str) -> str:
    """The first Python block after `heading` in README.md."""
    text = (REPO / "README.md").read_text()
    return re.search(r"```python\n(.*?)```", text[text.index(heading) :], re.DOTALL).group(1)


def replaced(code: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        assert old in code, f"README code changed: {old!r} not found"
        code = code.replace(old, new)
    return code


def test_readme_notebook_recipe_trains_a_lora_adapter_that_merges(tiny_checkpoint, videos_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_videos").mkdir()
    for name, _, answer in ROWS:
        (tmp_path / "my_videos" / name).symlink_to(videos_dir / name)
        (tmp_path / "my_videos" / name).with_suffix(".txt").write_text(answer)
    recipe = replaced(
        readme_code("### Fine-tune on a folder of your own videos"),
        {
            '"runs/sft"': f'"{tiny_checkpoint}"',
            'dtype="bfloat16"': 'dtype="float32"',  # CPU: bf16 matmuls are slow here
            "num_frames=32": "num_frames=8",  # fewer frames to decode and scan
            "max_length=None)": "max_length=None, use_cpu=True, bf16=False)",
        },
    )
    namespace = {}
    exec(recipe, namespace)  # noqa: S102
    assert namespace["trainer"].state.global_step == 3  # 3 epochs of 2 rows, 8 accumulation steps
    assert (tmp_path / "storm-my-videos-lora" / "adapter_model.safetensors").exists()

    exec(replaced(readme_code("### LoRA"), {'"runs/sft"': f'"{tiny_checkpoint}"'}), namespace)  # noqa: S102
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "storm-my-videos")
    assert type(merged) is StormForConditionalGeneration
    assert AutoProcessor.from_pretrained(tmp_path / "storm-my-videos").video_processor.num_frames == 16


def test_push_to_hub_without_a_reachable_hub_is_one_line(tiny_checkpoint, dataset, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # as HF_ENDPOINT=http://127.0.0.1:9
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    with pytest.raises(RuntimeError, match=r"^Could not reach the Hub repository me/storm-run before training \(") as error:
        train(tiny_checkpoint, dataset, tmp_path / "run", push_to_hub=True, hub_model_id="me/storm-run")
    assert "\n" not in str(error.value) and error.value.__cause__ is None
