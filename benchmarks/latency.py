"""STORM latency benchmark: the paper's Table 13 on our hardware, plus LLaVA-OneVision-7B and the temporal encoder.

Sections (pick with --sections, all by default):

- `storm`: the paper's 7B configuration (SigLIP-So400m/14 at 448 px, 2 bidirectional Mamba layers, Qwen2-7B sizes;
  random weights), bf16, SDPA, batch 1, one video + 32 text tokens. For each frame count and compression
  1× (k=1), 2× (k=1, s=2), 4× (k=4), 8× (k=4, s=2): time in the vision tower, in downsample + temporal encoder, in
  the LLM prefill, time to first token (one full forward with `logits_to_keep=1`), decode ms/token (greedy, 64 new
  tokens, dynamic KV cache) and peak GPU memory. Module times come from CUDA events recorded by forward hooks during
  that same forward, so they add up to the time to first token.
- `decode`: decode speed by context length with the dynamic cache, and with transformers' static cache
  (`cache_implementation="static"`, with which `generate` compiles the decode step with
  `torch.compile(mode="reduce-overhead")`) after a 128-frame 4× prefill.
- `profile`: the 20 costliest GPU kernels of one 128-frame 4× prefill (torch.profiler).
- `llava`: transformers' `LlavaOnevisionForConditionalGeneration` at 7B sizes (SigLIP-So400m/14 at 384 px, 196
  tokens per frame after its 2×2 bilinear pooling, Qwen2-7B), same measurements.
- `encoder`: the temporal encoder alone (2 bidirectional layers), forward+backward, kernels vs torch path, at width
  256 / 4096 tokens and at the paper's width 3584 / 32768 tokens (128 frames; forward only for the torch path there,
  whose backward would need ~200 GB for saved states).
- `cpu`: the torch scan and the torch temporal encoder on the CPU, forward+backward, width 256, 1024-8192 tokens.

Usage: `python benchmarks/latency.py --out results/ [--sections storm llava ...] [--frames 8 32 ...]`. Prints
markdown tables and writes `latency.json` into --out. Timings are medians of --repeats runs after one warm-up.
"""

import argparse
import gc
import json
import platform
import statistics
import time
from pathlib import Path

import torch

COMPRESSIONS = {"1×": (1, 1), "2× (s=2)": (1, 2), "4× (k=4)": (4, 1), "8× (k=4, s=2)": (4, 2)}
TEXT_TOKENS = 32
NEW_TOKENS = 64


# ---------------------------------------------------------------- timing helpers


class ModuleTimer:
    """CUDA events around the forward of named submodules; `times()` gives seconds per name for the last call(s)."""

    def __init__(self, modules: dict):
        self.events: dict[str, list] = {name: [] for name in modules}
        self.handles = []
        for name, module in modules.items():
            self.handles.append(module.register_forward_pre_hook(self._pre(name)))
            self.handles.append(module.register_forward_hook(self._post(name)))

    def _pre(self, name):
        def hook(module, args):
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self.events[name].append([start, None])

        return hook

    def _post(self, name):
        def hook(module, args, output):
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.events[name][-1][1] = end

        return hook

    def reset(self):
        for calls in self.events.values():
            calls.clear()

    def seconds(self, name, call=None) -> float:
        calls = self.events[name] if call is None else [self.events[name][call]]
        return sum(start.elapsed_time(end) for start, end in calls) / 1000

    def remove(self):
        for handle in self.handles:
            handle.remove()


def timed(fn, repeats: int):
    """Run fn once to warm up, then `repeats` times; return (median seconds, last result)."""
    result = fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def gib(num_bytes: int) -> float:
    return num_bytes / 2**30


def free_memory():
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


# ---------------------------------------------------------------- models


def storm_7b(max_positions: int):
    from storm_transformers import StormConfig, StormForConditionalGeneration

    config = StormConfig()
    config.text_config.max_position_embeddings = max_positions  # 256 uncompressed frames = 65536 visual tokens
    config._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = StormForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    return model.eval()


def llava_onevision_7b():
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    config = LlavaOnevisionConfig(
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "patch_size": 14,
            "image_size": 384,
            "num_hidden_layers": 26,
            "num_attention_heads": 16,
            "vision_use_head": False,
        },
        text_config={
            "model_type": "qwen2",
            "vocab_size": 152128,
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "max_position_embeddings": 32768,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        },
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_token_index=151646,
        video_token_index=151647,
    )
    config._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = LlavaOnevisionForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    return model.eval()


def video_prompt(video_token_id: int, visual_tokens: int, frames: int, image_size: int):
    text = torch.randint(1000, 100000, (TEXT_TOKENS,), device="cuda")
    ids = torch.cat([text[:20], torch.full((visual_tokens,), video_token_id, device="cuda"), text[20:]])
    pixels = torch.randn(1, frames, 3, image_size, image_size, device="cuda", dtype=torch.bfloat16)
    return {"input_ids": ids[None], "attention_mask": torch.ones_like(ids)[None], "pixel_values_videos": pixels}


def measure(model, inputs, timer: ModuleTimer, stages: dict, repeats: int) -> dict:
    """Time to first token with per-stage times, decode ms/token and peak memory for one prompt.

    `stages` maps a column name to the timer names it sums; decode: see `decode_ms_per_token` (dynamic cache).
    """
    free_memory()

    def prefill():
        timer.reset()
        with torch.inference_mode():
            return model(**inputs, use_cache=True, logits_to_keep=1).logits.argmax(-1)

    ttft, _ = timed(prefill, repeats)
    row = {label: sum(timer.seconds(name) for name in names) for label, names in stages.items()}
    row["time to first token (s)"] = ttft
    row["peak memory (GiB)"] = gib(torch.cuda.max_memory_allocated())
    row["decode (ms/token)"] = decode_ms_per_token(model, inputs)
    return row


def decode_ms_per_token(model, inputs, runs: int = 1, **generate_kwargs) -> float:
    """(wall time of a 64-token greedy generation − that of a 1-token one) / 63, after a 64-token warm-up.

    Module hooks stay off the decode path (torch.compile would trace them)."""

    def generate(new_tokens):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **generate_kwargs)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    generate(NEW_TOKENS)
    full = statistics.median(generate(NEW_TOKENS) for _ in range(runs))
    first = statistics.median(generate(1) for _ in range(runs))
    return 1000 * (full - first) / (NEW_TOKENS - 1)


# ---------------------------------------------------------------- sections


def bench_storm(frames_list, repeats) -> list[dict]:
    model = storm_7b(max_positions=256 * 256 + 1024)
    inner = model.model
    timer = ModuleTimer(
        {"vision": inner.vision_tower, "projector": inner.multi_modal_projector, "encoder": inner.temporal_encoder,
         "llm": inner.language_model}
    )
    stages = {"vision tower (s)": ["vision"], "projector (s)": ["projector", "encoder"], "LLM prefill (s)": ["llm"]}
    rows = []
    for frames in frames_list:
        for name, (k, s) in COMPRESSIONS.items():
            model.config.temporal_pool_size, model.config.temporal_sample_rate = k, s
            visual = model.config.num_video_tokens(frames)
            inputs = video_prompt(model.config.video_token_id, visual, frames, 448)
            row = measure(model, inputs, timer, stages, repeats)
            rows.append({"model": "STORM", "frames": frames, "compression": name, "visual tokens": visual, **row})
            print(_row_line(rows[-1]), flush=True)
    timer.remove()
    del model, inner
    free_memory()
    return rows


def bench_decode(repeats) -> list[dict]:
    """Decode speed (64 greedy tokens, batch 1) by context length, with the dynamic cache and with transformers'
    static cache, with which `generate` compiles the decode step (`torch.compile(mode="reduce-overhead")`)."""
    model = storm_7b(max_positions=40000)
    rows = []
    settings = [(8, "1×", "dynamic"), (128, "4× (k=4)", "dynamic"), (128, "1×", "dynamic"), (128, "4× (k=4)", "static")]
    for frames, name, cache in settings:
        model.config.temporal_pool_size, model.config.temporal_sample_rate = COMPRESSIONS[name]
        inputs = video_prompt(model.config.video_token_id, model.config.num_video_tokens(frames), frames, 448)
        kwargs = {"cache_implementation": "static"} if cache == "static" else {}
        ms = decode_ms_per_token(model, inputs, runs=repeats, **kwargs)
        rows.append({"frames": frames, "compression": name, "context (tokens)": inputs["input_ids"].shape[1],
                     "cache": cache, "decode (ms/token)": ms, "decode (tokens/s)": 1000 / ms})
        print(rows[-1], flush=True)
    del model
    free_memory()
    return rows


def bench_profile() -> list[dict]:
    """Where the time of one 128-frame 4× prefill goes: the 20 costliest GPU operations (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    model = storm_7b(max_positions=32768)
    model.config.temporal_pool_size, model.config.temporal_sample_rate = 4, 1
    inputs = video_prompt(model.config.video_token_id, model.config.num_video_tokens(128), 128, 448)
    with torch.inference_mode():
        model(**inputs, logits_to_keep=1)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(**inputs, logits_to_keep=1)
            torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in prof.key_averages() if e.device_time_total > 0 and not e.key.startswith("aten::"))
    rows = [{"GPU kernel": e.key[:90], "calls": e.count, "total (ms)": e.device_time_total / 1000,
             "share of kernel time": e.device_time_total / total} for e in events if not e.key.startswith("aten::")][:20]
    del model
    free_memory()
    return rows


def bench_llava(frames_list, repeats) -> list[dict]:
    model = llava_onevision_7b()
    inner = model.model
    timer = ModuleTimer(
        {"vision": inner.vision_tower, "projector": inner.multi_modal_projector, "llm": inner.language_model}
    )
    stages = {"vision tower (s)": ["vision"], "projector (s)": ["projector"], "LLM prefill (s)": ["llm"]}
    rows = []
    for frames in frames_list:
        visual = frames * 196 + 1  # 14x14 pooled tokens per frame + one newline token per video
        inputs = video_prompt(model.config.video_token_id, visual, frames, 384)
        row = measure(model, inputs, timer, stages, repeats)
        rows.append({"model": "LLaVA-OneVision", "frames": frames, "compression": "1× (196/frame)", "visual tokens": visual, **row})
        print(_row_line(rows[-1]), flush=True)
    timer.remove()
    del model, inner
    free_memory()
    return rows


def bench_encoder(repeats) -> list[dict]:
    from storm_transformers import StormTemporalEncoder, StormTemporalEncoderConfig
    from storm_transformers.kernels import mamba_kernels

    rows = []
    kernels = mamba_kernels()
    for width, tokens, dtype in [(256, 4096, torch.float32), (256, 4096, torch.bfloat16), (3584, 32768, torch.bfloat16)]:
        config = StormTemporalEncoderConfig(hidden_size=width)
        with torch.device("cuda"):
            encoder = StormTemporalEncoder(config).to(dtype)
        x = torch.randn(1, tokens, width, device="cuda", dtype=dtype)
        for path in ("kernels", "torch"):
            config.use_mamba_kernels = path == "kernels"
            if path == "kernels" and kernels.selective_scan_fn is None:
                continue
            free_memory()
            with torch.no_grad():
                forward, _ = timed(lambda: encoder(x), repeats)
            row = {"width": width, "tokens": tokens, "dtype": str(dtype).split(".")[-1], "path": path, "forward (ms)": 1000 * forward}
            if path == "kernels" or width == 256:
                free_memory()
                xg = x.clone().requires_grad_()
                both, _ = timed(lambda: encoder(xg).sum().backward(), repeats)
                row["forward+backward (ms)"] = 1000 * both
                row["peak memory (GiB)"] = gib(torch.cuda.max_memory_allocated())
            rows.append(row)
            print(row, flush=True)
        del encoder
        free_memory()
    rows.append({"kernels": {"selective_scan_fn": kernels.selective_scan_fn is not None,
                             "causal_conv1d_fn": kernels.causal_conv1d_fn is not None}})
    return rows


def bench_cpu(repeats) -> list[dict]:
    from storm_transformers import StormTemporalEncoder, StormTemporalEncoderConfig
    from storm_transformers.selective_scan import selective_scan

    rows = []
    torch.manual_seed(0)
    for tokens in (1024, 2048, 4096, 8192):
        inner, state = 512, 16  # width 256, expand 2
        leaves = [torch.randn(1, inner, tokens), torch.rand(1, inner, tokens) * 0.1, -torch.rand(inner, state),
                  torch.randn(1, state, tokens), torch.randn(1, state, tokens)]
        for leaf in leaves:
            leaf.requires_grad_()

        def scan():
            selective_scan(*leaves).sum().backward()

        scan_time = _cpu_timed(scan, repeats)
        encoder = StormTemporalEncoder(StormTemporalEncoderConfig(hidden_size=256, num_hidden_layers=1))
        x = torch.randn(1, tokens, 256, requires_grad=True)
        encoder_time = _cpu_timed(lambda: encoder(x).sum().backward(), repeats)
        rows.append({"tokens": tokens, "torch scan fwd+bwd (s)": scan_time,
                     "1 bidirectional layer fwd+bwd (s)": encoder_time, "threads": torch.get_num_threads()})
        print(rows[-1], flush=True)
    return rows


def _cpu_timed(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---------------------------------------------------------------- report


def _row_line(row) -> str:
    return " | ".join(f"{value:.3f}" if isinstance(value, float) else str(value) for value in row.values())


def markdown(rows: list[dict]) -> str:
    rows = [row for row in rows if "kernels" not in row]
    if not rows:
        return ""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [row.get(column, "") for column in columns]
        lines.append("| " + " | ".join(f"{c:.3f}" if isinstance(c, float) else str(c) for c in cells) + " |")
    return "\n".join(lines)


def ratios(storm: list[dict], llava: list[dict]) -> list[dict]:
    ttft = {(r["frames"], r["compression"]): r["time to first token (s)"] for r in storm}
    out = []
    for frames in sorted({r["frames"] for r in storm}):
        base = ttft.get((frames, "1×"))
        row = {"frames": frames}
        for name in ("4× (k=4)", "8× (k=4, s=2)"):
            if base and (frames, name) in ttft:
                row[f"STORM 1× / STORM {name}"] = base / ttft[(frames, name)]
        other = next((r for r in llava if r["frames"] == frames), None)
        if other and (frames, "4× (k=4)") in ttft:
            row["LLaVA-OV / STORM 4×"] = other["time to first token (s)"] / ttft[(frames, "4× (k=4)")]
        out.append(row)
    return out


def environment() -> dict:
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
    try:
        import mamba_ssm

        info["mamba_ssm"] = mamba_ssm.__version__
    except ImportError:
        pass
    return info


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmark-results")
    parser.add_argument("--sections", nargs="+", default=["encoder", "storm", "decode", "llava", "profile"],
                        choices=["encoder", "storm", "decode", "llava", "profile", "cpu"])
    parser.add_argument("--frames", nargs="+", type=int, default=[8, 32, 64, 128, 256])
    parser.add_argument("--llava-frames", nargs="+", type=int, default=[32, 64, 128])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"environment": environment(), "args": vars(args)}
    print(results["environment"], flush=True)
    runners = {
        "encoder": lambda: bench_encoder(args.repeats),
        "storm": lambda: bench_storm(args.frames, args.repeats),
        "decode": lambda: bench_decode(args.repeats),
        "profile": bench_profile,
        "llava": lambda: bench_llava(args.llava_frames, args.repeats),
        "cpu": lambda: bench_cpu(args.repeats),
    }
    for section in args.sections:
        results[section] = runners[section]()
        (out / "latency.json").write_text(json.dumps(results, indent=1, default=str))
    if "storm" in results:
        results["ratios"] = ratios(results["storm"], results.get("llava", []))
    (out / "latency.json").write_text(json.dumps(results, indent=1, default=str))
    for section in ("encoder", "storm", "decode", "llava", "ratios", "profile", "cpu"):
        if section in results:
            print(f"\n## {section}\n\n{markdown(results[section])}")


if __name__ == "__main__":
    main()
