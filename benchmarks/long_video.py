"""Long videos on one GPU (issue 11): time to first token, time per stage and peak memory, from 128 to 3600 frames.

STORM-7B sizes (`StormConfig()`: SigLIP-So400m/14 at 448 px, 2 bidirectional Mamba layers, Qwen2-7B sizes), random
weights, bf16, SDPA, batch 1, one video between 20 and 12 text tokens. For each frame count (128 / 512 / 1024 / 2048 /
3600 by default) and compression (k=4; k=4, s=2, p=2), two versions of the visual pipeline in one run:

- `after`: the library as it is: the vision tower `vision_chunk_size` frames at a time, stopping at
  `vision_feature_layer`; the temporal encoder in chunks of `temporal_encoder_config.chunk_size` tokens with the scan
  state carried, updating the residual stream in place; each chunk pooled as it leaves the last layer.
- `before`: the pipeline before issue 11 (`legacy_encode` below): the vision tower on all frames at once with
  `output_hidden_states=True` (every layer's hidden states kept, the last layer run), the temporal encoder over the
  whole sequence at once, pooling at the end. Rows above `--before-max-frames` (default 1024) are skipped: they
  certainly run out of memory on 141 GB (1024 frames already did).

Measured per row: time to first token (TTFT: one prefill forward with `logits_to_keep=1`, median of `--repeats` after
a warm-up), time in the vision tower, in projector + temporal encoder + pooling (the rest of the visual pipeline) and
in the LLM (CUDA events recorded during the last timed forward), and peak GPU memory (`torch.cuda.max_memory_allocated`,
the weights and the input frames included). An out-of-memory error is a row that says so. Rows whose visual tokens
exceed `--max-visual-tokens` (default 65536, twice Qwen2-7B's 32k context) are skipped with a note: the LLM alone
would dominate them and their run time.

GPU (about 5 minutes on an H200 with mamba_ssm + causal_conv1d):

    PYTHONPATH=. python benchmarks/long_video.py --out results/long_video

CPU, the same code on a tiny config in seconds (to test the script): `PYTHONPATH=. python benchmarks/long_video.py
--smoke --out /tmp/long_video`. Writes `long_video.json` into --out and prints a markdown table last.
"""

import argparse
import gc
import json
import platform
import statistics
import time
import types
from pathlib import Path

import torch

import storm_transformers.modeling_storm as modeling
from storm_transformers import StormConfig, StormForConditionalGeneration
from storm_transformers.modeling_storm import spatial_pool, temporal_pool, temporal_sample

TEXT_BEFORE, TEXT_AFTER = 20, 12
COMPRESSIONS = {"k=4": (4, 1, 1), "k=4, s=2, p=2": (4, 2, 2)}  # (k, s, p)


def legacy_encode(self, pixel_values: torch.Tensor, is_video: bool) -> torch.Tensor:
    """`StormModel._encode` before issue 11 (commit 05b1a5b), for the `before` rows."""
    batch, frames = pixel_values.shape[:2]
    frames_flat = pixel_values.flatten(0, 1).to(self.vision_tower.dtype)  # (B·T, 3, H, W)
    hidden_states = self.vision_tower(frames_flat, output_hidden_states=True).hidden_states
    tokens = self.multi_modal_projector(hidden_states[self.config.vision_feature_layer])  # (B·T, N, D)
    tokens_per_frame = tokens.shape[1]
    sequence = tokens.view(batch, frames * tokens_per_frame, -1)
    scan = self.temporal_encoder(sequence, chunk_size=sequence.shape[1])  # one chunk: the whole sequence
    features = scan.view(batch, frames, tokens_per_frame, -1)
    if is_video and self.config.temporal_pool_size > 1:
        features = temporal_pool(features, self.config.temporal_pool_size)
    if self.config.spatial_pool_size > 1:
        features = spatial_pool(features, self.config.spatial_pool_size)
    if is_video and not self.training and self.config.temporal_sample_rate > 1:
        features = temporal_sample(features, self.config.temporal_sample_rate)
    return features


class StageTimer:
    """Times calls of named callables: CUDA events on a GPU (read after a synchronize), wall time on a CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.calls: dict[str, list] = {}
        self._restore = []

    def wrap(self, owner, attribute: str, stage: str):
        original = getattr(owner, attribute)
        self._restore.append((owner, attribute, original if attribute in vars(owner) else None))

        def timed(*args, **kwargs):
            start = self._now()
            result = original(*args, **kwargs)
            self.calls.setdefault(stage, []).append((start, self._now()))
            return result

        setattr(owner, attribute, timed)

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, stage: str) -> float:
        spans = self.calls.get(stage, [])
        if self.cuda:
            return sum(start.elapsed_time(end) for start, end in spans) / 1000
        return sum(end - start for start, end in spans)

    def reset(self):
        self.calls.clear()

    def remove(self):
        for owner, attribute, original in reversed(self._restore):
            if original is None:
                delattr(owner, attribute)  # back to the class's method
            else:
                setattr(owner, attribute, original)


def build_model(smoke: bool, max_positions: int, device: str):
    if smoke:  # SigLIP 64 px / patch 8 (4×4 tokens per frame after the downsample), width 64, 2 Mamba layers
        config = StormConfig(
            vision_config={"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                           "num_hidden_layers": 3, "num_attention_heads": 2, "patch_size": 8, "image_size": 64,
                           "vision_use_head": False},
            text_config={"model_type": "qwen2", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
                         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
            temporal_encoder_config={"state_size": 4, "chunk_size": 128},
            vision_chunk_size=8, image_token_id=250, video_token_id=251,
        )
    else:
        config = StormConfig()
    config.text_config.max_position_embeddings = max_positions
    config._attn_implementation = "sdpa"
    dtype = torch.float32 if smoke else torch.bfloat16
    with torch.device(device):
        model = StormForConditionalGeneration._from_config(config, dtype=dtype)
    return model.eval()


def prompt(model, frames: int, device: str) -> dict:
    config = model.config
    visual = config.num_video_tokens(frames)
    text = torch.randint(10, 200, (TEXT_BEFORE + TEXT_AFTER,), device=device)
    ids = torch.cat([text[:TEXT_BEFORE], torch.full((visual,), config.video_token_id, device=device), text[TEXT_BEFORE:]])
    size = config.vision_config.image_size
    pixels = torch.randn(1, frames, 3, size, size, device=device, dtype=model.dtype)
    return {"input_ids": ids[None], "attention_mask": torch.ones_like(ids)[None], "pixel_values_videos": pixels}


def free_memory(cuda: bool):
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def measure(model, frames: int, version: str, repeats: int, cuda: bool, device: str) -> dict:
    """One row: TTFT, stage times and peak memory of one prefill, or the out-of-memory error."""
    inner = model.model
    timer = StageTimer(cuda)
    if version == "before":
        inner._encode = types.MethodType(legacy_encode, inner)
        timer.wrap(inner.vision_tower, "forward", "vision")
    else:
        timer.wrap(modeling, "vision_hidden_state", "vision")
    timer.wrap(inner, "_encode", "visual pipeline")
    timer.wrap(inner.language_model, "forward", "llm")
    free_memory(cuda)
    row = {"frames": frames, "visual tokens": model.config.num_video_tokens(frames)}
    try:
        inputs = prompt(model, frames, device)
        times = []
        for _ in range(repeats + 1):  # the first run warms up
            timer.reset()
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.inference_mode():
                model(**inputs, use_cache=True, logits_to_keep=1).logits.argmax(-1)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        vision = timer.seconds("vision")
        row.update({
            "TTFT (s)": statistics.median(times[1:]),
            "vision tower (s)": vision,
            "projector + temporal encoder + pooling (s)": timer.seconds("visual pipeline") - vision,
            "LLM (s)": timer.seconds("llm"),
            "peak memory (GiB)": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "result": "ok",
        })
    except torch.OutOfMemoryError:
        row["result"] = "out of memory"
    finally:
        timer.remove()
        if version == "before":
            del inner._encode
        inputs = None
        free_memory(cuda)
    return row


def run(args) -> list[dict]:
    cuda = not args.smoke
    device = "cuda" if cuda else "cpu"
    frames_list = args.frames or ([8, 32, 64] if args.smoke else [128, 512, 1024, 2048, 3600])
    model = build_model(args.smoke, args.max_visual_tokens + TEXT_BEFORE + TEXT_AFTER, device)
    rows = []
    for frames in frames_list:
        for name, (k, s, p) in COMPRESSIONS.items():
            model.config.temporal_pool_size, model.config.temporal_sample_rate, model.config.spatial_pool_size = k, s, p
            for version in ("before", "after"):
                base = {"version": version, "compression": name, "frames": frames, "visual tokens": model.config.num_video_tokens(frames)}
                if base["visual tokens"] > args.max_visual_tokens:
                    row = {**base, "result": f"skipped: more than --max-visual-tokens={args.max_visual_tokens}"}
                elif version == "before" and frames > args.before_max_frames:
                    row = {**base, "result": f"skipped: certain out of memory (> --before-max-frames={args.before_max_frames})"}
                else:
                    row = {"version": version, "compression": name, **measure(model, frames, version, args.repeats, cuda, device)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def environment() -> dict:
    import transformers

    from storm_transformers.kernels import mamba_kernels

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        kernels = mamba_kernels()
        info["mamba_ssm"], info["causal_conv1d"] = kernels.selective_scan_fn is not None, kernels.causal_conv1d_fn is not None
    return info


def markdown(rows: list[dict]) -> str:
    columns = ["frames", "compression", "visual tokens", "version", "TTFT (s)", "vision tower (s)",
               "projector + temporal encoder + pooling (s)", "LLM (s)", "peak memory (GiB)", "result"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [row.get(column, "") for column in columns]
        lines.append("| " + " | ".join(f"{c:.2f}" if isinstance(c, float) else ("" if c is None else str(c)) for c in cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmark-results/long_video")
    parser.add_argument("--frames", nargs="+", type=int, help="frame counts (default 128 512 1024 2048 3600)")
    parser.add_argument("--repeats", type=int, default=3, help="timed prefills per row, after one warm-up")
    parser.add_argument("--before-max-frames", type=int, default=1024)
    parser.add_argument("--max-visual-tokens", type=int, default=65536)
    parser.add_argument("--smoke", action="store_true", help="tiny config on the CPU, to test this script")
    args = parser.parse_args(argv)
    if args.smoke:
        args.max_visual_tokens = min(args.max_visual_tokens, 1024)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"environment": environment(), "args": vars(args)}
    print(json.dumps(results["environment"]), flush=True)
    results["rows"] = run(args)
    (out / "long_video.json").write_text(json.dumps(results, indent=1))
    print("\n" + markdown(results["rows"]))
    return results


if __name__ == "__main__":
    main()
