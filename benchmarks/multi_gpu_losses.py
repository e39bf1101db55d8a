"""Data-parallel check: a tiny STORM trained on 2 GPUs (FSDP2, storm_transformers/training/accelerate/fsdp.yaml) has
the same per-step losses as on 1 GPU with the same global batch.

The model is a tiny random STORM (64 px frames, 16 tokens per frame, 2 Mamba layers, k = 4, a 512-token vocabulary)
and the data are fixed synthetic videos and token ids, so this needs only torch, transformers (>= 5.17), accelerate
and this repository: no TRL, PEFT, datasets, PyAV, torchvision, assets or downloads. It trains with
`transformers.Trainer`, the base of TRL's `SFTTrainer`; TRL's fused LM head is not exercised here.

Every step sees the whole data set (`--num_samples` = the global batch), so the losses do not depend on how the
samples are split between GPUs and micro-batches. Run from the repository root (fp32, so the runs agree closely):

```bash
# 1 GPU (one visible GPU: with several, Trainer would use nn.DataParallel): 4 samples per micro-batch × 2 accumulation
CUDA_VISIBLE_DEVICES=0 PYTHONPATH=. python benchmarks/multi_gpu_losses.py \
    --per_device_train_batch_size 4 --gradient_accumulation_steps 2 --output_dir /tmp/storm_losses_1gpu
# 2 GPUs, FSDP2: 4 samples per GPU; compares with the 1-GPU losses and exits with 1 if they differ
PYTHONPATH=. accelerate launch --config_file storm_transformers/training/accelerate/fsdp.yaml --num_processes 2 \
    --mixed_precision no benchmarks/multi_gpu_losses.py --per_device_train_batch_size 4 \
    --output_dir /tmp/storm_losses_2gpu --reference /tmp/storm_losses_1gpu/losses.json
```

Add `--trainable_modules multi_modal_projector temporal_encoder` to both runs to check the alignment stage (frozen
vision tower and LLM) under FSDP. Prints one line per step (`step, loss`, and the reference loss and relative
difference when given) and writes `losses.json` to `--output_dir`.
"""

import json
import sys
from dataclasses import dataclass, field

import torch

VOCAB_SIZE, IMAGE_TOKEN_ID, VIDEO_TOKEN_ID = 512, 510, 511
PROMPT_TOKENS, ANSWER_TOKENS = 12, 8
TOLERANCE = 1e-3  # relative, fp32


@dataclass
class CheckArguments:
    num_samples: int = field(default=8, metadata={"help": "Synthetic samples; also the global batch of every step."})
    num_frames: int = field(default=8, metadata={"help": "Frames per synthetic video (a multiple of k = 4)."})
    trainable_modules: list[str] | None = field(default=None, metadata={"help": "Components trained (default: all)."})
    reference: str | None = field(default=None, metadata={"help": "losses.json of a run to compare with."})


class SyntheticVideoChats(torch.utils.data.Dataset):
    """`num_samples` rows of equal length: random prompt ids, the video placeholders, a labelled random answer."""

    def __init__(self, config, num_samples: int, num_frames: int, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        size = config.vision_config.image_size
        visual = config.num_video_tokens(num_frames, training=True)
        self.rows = []
        for _ in range(num_samples):
            prompt = torch.randint(0, IMAGE_TOKEN_ID, (PROMPT_TOKENS,), generator=generator)
            answer = torch.randint(0, IMAGE_TOKEN_ID, (ANSWER_TOKENS,), generator=generator)
            input_ids = torch.cat([prompt, torch.full((visual,), VIDEO_TOKEN_ID), answer])
            labels = torch.cat([torch.full((PROMPT_TOKENS + visual,), -100), answer])
            pixels = torch.randn(num_frames, 3, size, size, generator=generator)
            self.rows.append({"input_ids": input_ids, "labels": labels, "pixel_values_videos": pixels})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]


def check_config():
    """The tiny STORM: SigLIP 64 px / patch 8 (16 tokens per frame), 2 bidirectional Mamba layers, Qwen2 of width 64."""
    from storm_transformers import StormConfig

    vision = {"model_type": "siglip_vision_model", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
    vision.update(num_attention_heads=2, patch_size=8, image_size=64, vision_use_head=False)
    text = {"model_type": "qwen2", "vocab_size": VOCAB_SIZE, "hidden_size": 64, "intermediate_size": 128}
    text.update(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    return StormConfig(
        vision_config=vision,
        text_config=text,
        temporal_encoder_config={"num_hidden_layers": 2, "state_size": 8},
        temporal_pool_size=4,
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
    )


def main(check: CheckArguments, training_args) -> list[float]:
    from transformers import Trainer, set_seed

    from storm_transformers import StormForConditionalGeneration
    from storm_transformers.training.modules import set_trainable_modules

    config = check_config()
    set_seed(training_args.seed)
    model = StormForConditionalGeneration(config)
    if check.trainable_modules is not None:
        set_trainable_modules(model, check.trainable_modules)
    dataset = SyntheticVideoChats(config, check.num_samples, check.num_frames, seed=training_args.seed)
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    if trainer.is_world_process_zero():
        report(losses, check.reference, training_args, trainer.accelerator.distributed_type)
    return losses


def report(losses: list[float], reference_path: str | None, training_args, distributed_type) -> None:
    """Print the losses (and the relative differences to `reference_path`), write losses.json; exit 1 on a mismatch."""
    from pathlib import Path

    world = training_args.world_size
    batch = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * world
    print(f"{world} process(es), {distributed_type}, global batch {batch}")
    reference = json.loads(Path(reference_path).read_text()) if reference_path else None
    worst = 0.0
    for step, loss in enumerate(losses, start=1):
        line = f"step {step:3d}  loss {loss:.6f}"
        if reference is not None and step <= len(reference):
            difference = abs(loss - reference[step - 1]) / abs(reference[step - 1])
            worst = max(worst, difference)
            line += f"  reference {reference[step - 1]:.6f}  relative difference {difference:.2e}"
        print(line)
    Path(training_args.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(training_args.output_dir) / "losses.json").write_text(json.dumps(losses))
    if reference is not None:
        matched = len(reference) == len(losses) and worst <= TOLERANCE
        steps = (
            f", {len(losses)} steps here vs {len(reference)} in the reference" if len(reference) != len(losses) else ""
        )
        verdict = "MATCH" if matched else "MISMATCH"
        print(f"{verdict}: largest relative difference {worst:.2e} (tolerance {TOLERANCE}){steps}")
        if not matched:
            sys.exit(1)


def make_parser():
    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser((CheckArguments, TrainingArguments))
    parser.set_defaults(
        max_steps=10,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        disable_tqdm=True,
    )
    return parser


if __name__ == "__main__":
    main(*make_parser().parse_args_into_dataclasses())
