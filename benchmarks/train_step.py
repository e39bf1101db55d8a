"""Step time and peak GPU memory of STORM training at the paper's 7B size: LoRA and full fine-tuning, one GPU.

The model is `StormConfig()` (PaliGemma SigLIP-So400m/14 at 448 px, 2 bidirectional Mamba layers, Qwen2-7B sizes;
about 8.3 B parameters) with random weights, SDPA attention and gradient checkpointing. One sample per step: a
32-frame 448 px video with temporal pooling k = 4 (8 pooled frames × 256 = 2048 visual tokens) between a 32-token
prompt and a 32-token answer; the loss covers the answer (logits only for those positions, as TRL's fused LM head
does). A step is forward + backward + AdamW step (`fused=True`) + zero_grad; the first `--warmup` steps are not timed.

Modes (each in a fresh model; an out-of-memory error is reported as a result, with the phase it happened in):

| mode | weights | trained | optimizer states |
|---|---|---|---|
| `lora` | bf16, frozen | LoRA r=16 on the LLM's q/k/v/o/gate/up/down (PEFT keeps them fp32) + projector and temporal encoder in full (bf16), as the `sft_lora.yaml` training config | AdamW, dtype of each parameter |
| `full-bf16` | bf16 | everything | AdamW in bf16: fits one GPU, but bf16 updates lose precision (a memory-saving choice, not the recipe's) |
| `full-fp32` | fp32 master weights, bf16 autocast | everything | AdamW fp32: the recipe's full SFT (`dtype: float32`), meant for FSDP over several GPUs; 16 bytes per parameter ≈ 133 GB does not fit one 80 GB GPU |

Run on one GPU from the repository root (needs torch, transformers >= 5.17, peft; nothing is downloaded):

```bash
PYTHONPATH=. python benchmarks/train_step.py                 # all three modes
PYTHONPATH=. python benchmarks/train_step.py --modes lora --steps 5
```

Output (one row per mode, then the environment); one H100 run, `docs/benchmark-results/h100-train-step.txt`:

```
| mode | trainable params | step time (s) | peak allocated (GiB) | peak reserved (GiB) | result |
|---|---|---|---|---|---|
| lora | 0.23 B | 0.89 | 21.7 | 23.0 | ok |
| full-bf16 | 8.21 B | 0.81 | 63.8 | 67.1 | ok |
| full-fp32 | 8.21 B | - | 75.4 | 78.2 | out of memory in optimizer step |
GPU: NVIDIA H100 80GB HBM3; torch 2.11.0+cu130, transformers 5.17.0; mamba_ssm installed: yes; 32 frames, k = 4, ...
```
"""

import argparse
import gc
import importlib.util
import time

import torch

PROMPT_TOKENS, ANSWER_TOKENS = 32, 32
MODES = ("lora", "full-bf16", "full-fp32")


def build(mode: str, config):
    """The model of `mode` on the GPU with its trainable parameters set, and the AdamW over them."""
    from storm_transformers import StormForConditionalGeneration

    dtype = torch.float32 if mode == "full-fp32" else torch.bfloat16
    with torch.device("cuda"):
        model = StormForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.gradient_checkpointing_enable()
    if mode == "lora":
        from peft import get_peft_model

        from storm_transformers.training.modules import storm_lora_config

        model = get_peft_model(model, storm_lora_config())
        model.enable_input_require_grads()  # as TRL does for PEFT + gradient checkpointing
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(parameters, lr=1e-5, fused=True)


def make_inputs(config, num_frames: int) -> dict[str, torch.Tensor]:
    """One sample: prompt, the video placeholders, answer; labels on the answer only."""
    generator = torch.Generator().manual_seed(0)
    visual = config.num_video_tokens(num_frames, training=True)
    high = config.image_token_id - 1
    prompt = torch.randint(0, high, (PROMPT_TOKENS,), generator=generator)
    answer = torch.randint(0, high, (ANSWER_TOKENS,), generator=generator)
    input_ids = torch.cat([prompt, torch.full((visual,), config.video_token_id), answer])[None]
    size = config.vision_config.image_size
    pixels = torch.randn(1, num_frames, 3, size, size, generator=generator)
    return {"input_ids": input_ids.cuda(), "pixel_values_videos": pixels.cuda(), "answer": answer.cuda()}


def train_step(model, optimizer, inputs, phase: list[str]) -> None:
    phase[0] = "forward"
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(
            input_ids=inputs["input_ids"],
            pixel_values_videos=inputs["pixel_values_videos"],
            logits_to_keep=ANSWER_TOKENS + 1,
            use_cache=False,
        ).logits  # (1, answer + 1, vocab): the positions that predict the answer, and one past it
        loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), inputs["answer"])
    phase[0] = "backward"
    loss.backward()
    phase[0] = "optimizer step"
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(mode: str, config, inputs, steps: int, warmup: int) -> dict:
    """Run `warmup + steps` steps of `mode`; the mean time of the timed ones and the peak memory, or the OOM phase."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    phase = ["building the model"]
    row = {"mode": mode, "trainable": None, "step_s": None}
    model = optimizer = None
    try:
        model, optimizer = build(mode, config)
        row["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        for _ in range(warmup):
            train_step(model, optimizer, inputs, phase)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            train_step(model, optimizer, inputs, phase)
        torch.cuda.synchronize()
        row["step_s"] = (time.perf_counter() - start) / steps
        row["result"] = "ok"
    except torch.OutOfMemoryError:
        row["result"] = f"out of memory in {phase[0]}"
    row["allocated"] = torch.cuda.max_memory_allocated() / 2**30
    row["reserved"] = torch.cuda.max_memory_reserved() / 2**30
    del model, optimizer
    gc.collect()
    torch.cuda.empty_cache()
    return row


def main() -> None:
    import transformers

    from storm_transformers import StormConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--num-frames", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("This benchmark needs a CUDA GPU.")

    config = StormConfig()
    inputs = make_inputs(config, args.num_frames)
    print("| mode | trainable params | step time (s) | peak allocated (GiB) | peak reserved (GiB) | result |")
    print("|---|---|---|---|---|---|")
    for mode in args.modes:
        row = measure(mode, config, inputs, args.steps, args.warmup)
        trainable = f"{row['trainable'] / 1e9:.2f} B" if row["trainable"] is not None else "-"
        step = f"{row['step_s']:.2f}" if row["step_s"] is not None else "-"
        print(
            f"| {mode} | {trainable} | {step} | {row['allocated']:.1f} | {row['reserved']:.1f} | {row['result']} |",
            flush=True,
        )
    kernels = "yes" if importlib.util.find_spec("mamba_ssm") is not None else "no (torch selective scan)"
    print(
        f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}, transformers {transformers.__version__}; "
        f"mamba_ssm installed: {kernels}; {args.num_frames} frames, k = {config.temporal_pool_size}, "
        f"{config.num_video_tokens(args.num_frames, training=True)} visual + {PROMPT_TOKENS + ANSWER_TOKENS} text "
        f"tokens; SDPA, gradient checkpointing; {args.warmup} warm-up + {args.steps} timed steps"
    )


if __name__ == "__main__":
    main()
