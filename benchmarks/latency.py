"""STORM latency benchmark: the paper's Table 13 on our hardware, its peers in the same run, and where the time goes.

Sections (pick with --sections; all GPU sections by default, in this order):

- `scan`: the selective scan alone at 128 frames (32768 tokens, E = 7168 channels per direction, N = 16, bf16
  inputs as the model gives them): mamba_ssm's kernel, our Triton kernel (its default launch configuration and a
  sweep of others) and the torch spec; forward and forward+backward; the Triton/mamba_ssm ratio (target ≤ 5×); the
  Triton forward at a quarter of the length (linear: ×4); and the Triton scan's errors against the torch spec
  (float32, outputs and every gradient, with initial and last state) and against mamba_ssm (bf16, outputs).
- `encoder`: the temporal encoder alone (2 bidirectional layers), forward and forward+backward, on each path
  (mamba_ssm + causal_conv1d; Triton scan + causal_conv1d; Triton scan + torch convolution, what a GPU without either
  package runs; torch), at width 256 / 4096 tokens and the paper's width 3584 / 32768 tokens (forward only for the
  torch path there, whose saved states would need ~200 GB).
- `encoder-profile`: one 128-frame k=4 STORM-7B prefill (time to first token and its stages), then the temporal
  encoder of that prefill alone under torch.profiler, on each available scan path: GPU time by piece (GEMMs, scan,
  convolution, flips/concatenations/copies and casts, other element-wise ops, LayerNorm) and its share of the TTFT.
- `vision`: the vision tower on 128 frames (SigLIP-So400m at 448 px up to layer −2, 32 frames per call, as STORM
  runs it): eager (transformers' SigLIP layers as they are), with STORM's defaults on CUDA (the MLPs' GELU in the
  GEMM's epilogue, `kernels.use_gelu_epilogue`; the LayerNorms by Triton, `kernels.use_triton_layer_norm`), and with
  each encoder layer compiled (regional compilation, torch.compile's default mode): first call (compilation
  included), warm time, TFLOP/s and the largest difference from eager.
- `storm`: the paper's 7B configuration (random weights), bf16, SDPA, batch 1, one video + 32 text tokens, STORM's
  defaults (scan kernels, compiled regions, GELU epilogue, Triton LayerNorm). For each frame count and compression 1×
  (k=1), 2× (k=1, s=2), 4× (k=4), 8× (k=4, s=2): time in the vision tower, in downsample + temporal encoder + pooling,
  in the LLM prefill, time to first token (one full forward with `logits_to_keep=1`) and peak GPU memory. Stage times
  are CUDA events recorded around those calls inside that same forward, so that they add up to the TTFT.
- `peers`: STORM 4× (k=4), STORM 1× (no compression) and transformers' LLaVA-OneVision-7B (eager, its default; and
  with STORM's speed-ups: GELU epilogue and Triton LayerNorm in its SigLIP, its LLM's norms, MLPs and RoPE compiled
  at prefill) on 128 frames, measured in turn, --rounds times in one run; each ratio is given as the median over the
  rounds with its min-max spread.
- `speed-ups`: the 128-frame k=4 prefill with STORM's prefill speed-ups switched off one at a time, then all four
  (the LLM's norms, MLPs and RoPE compiled at prefill, the GELU epilogue, the Triton LayerNorm, the patch convolution
  as one product): first call (compilation included), TTFT and its stages.
- `decode`: decode speed at batch 1 after a 128-frame k=4 prefill: with transformers' SDPA, the dynamic cache
  (transformers' default), the static cache (`cache_implementation="static"`; transformers then compiles the decode
  step with CUDA graphs) and the static cache for the LLM alone (Qwen2ForCausalLM holding STORM's LLM, a text prompt
  of the same length); the static cache with transformers' flex attention for the LLM; with `storm generate`'s
  defaults (static cache, the LLM's decode steps by `kernels.gqa_decode_attention`), as they are, with
  transformers' deferred stop check forced on, with each layer's q/k/v and gate/up projections fused into one
  product each (an experiment: `fused_projections`), and with both: first call (compilation included), warm
  ms/token and whether the greedy tokens equal the defaults'; and where a token of `storm generate`'s defaults goes
  on the host (its costliest Python functions).
- `decode-kernels`: where the GPU time of a decode step with `storm generate`'s defaults goes: the GPU kernels of one
  token (torch.profiler), compiled with and without CUDA graphs; the same step for the LLM alone, with flex
  attention, and compiled in mode "max-autotune".
- `fp8`: the 128-frame k=4 prefill in bf16, with the LLM's linears in FP8, then with the vision tower's too
  (`kernels.quantize_linears_fp8`): TTFT, stages, and the relative difference of the video features and the logits.
- `llava`: LLaVA-OneVision-7B (SigLIP-So400m/14 at 384 px, 196 tokens per frame after its 2×2 bilinear pooling,
  Qwen2-7B) alone at 32, 64 and 128 frames: the same measurements as `storm`.
- `profile`: the 20 costliest GPU kernels of one 128-frame 4× prefill (torch.profiler).
- `cpu`: the torch scan and the torch temporal encoder on the CPU, forward+backward, width 256, 1024-8192 tokens.

Usage: `python benchmarks/latency.py --out results/ [--sections scan encoder ...] [--repeats 3]`. Prints each row as
it is measured and markdown tables at the end, and writes `latency.json` into --out after every section. Timings
are medians of --repeats runs after one warm-up. `--smoke` runs every section on the CPU with tiny models in
seconds (the Triton scan under Triton's interpreter): it tests this script and measures nothing.
"""

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import re
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

COMPRESSIONS = {"1×": (1, 1), "2× (s=2)": (1, 2), "4× (k=4)": (4, 1), "8× (k=4, s=2)": (4, 2)}
TEXT_TOKENS = 32
SMOKE = False  # set by --smoke: tiny models on the CPU
DEVICE = "cuda"


# ---------------------------------------------------------------- timing helpers


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


class Stopwatch:
    """Times named calls by wrapping callables in place (CUDA events on a GPU, `perf_counter` on the CPU), so that
    the stages of one forward are measured inside that forward. `seconds(name)` sums the calls since `reset()`."""

    def __init__(self):
        self.calls = defaultdict(list)
        self._originals = []

    def wrap(self, owner, attribute: str, name: str):
        original = getattr(owner, attribute)

        def timed(*args, **kwargs):
            start = self._mark()
            result = original(*args, **kwargs)
            self.calls[name].append((start, self._mark()))
            return result

        self._originals.append((owner, attribute, owner.__dict__.get(attribute, None)))
        setattr(owner, attribute, timed)

    @staticmethod
    def _mark():
        if DEVICE != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def reset(self):
        self.calls.clear()

    def seconds(self, name) -> float:
        sync()
        if DEVICE != "cuda":
            return sum(end - start for start, end in self.calls[name])
        return sum(start.elapsed_time(end) for start, end in self.calls[name]) / 1000

    def remove(self):
        for owner, attribute, original in reversed(self._originals):
            if original is None:
                delattr(owner, attribute)
            else:
                setattr(owner, attribute, original)
        self._originals.clear()


def timed(fn, repeats: int):
    """Run fn once to warm up, then `repeats` times; return (median seconds, last result)."""
    result = fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        result = fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def first_call(fn):
    """(seconds, result) of one call, synchronised: the cost of a first call, compilation included."""
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return time.perf_counter() - start, result


def gib(num_bytes: int) -> float:
    return num_bytes / 2**30


def free_memory():
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> float | None:
    return gib(torch.cuda.max_memory_allocated()) if DEVICE == "cuda" else None


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual − expected| / max |expected|."""
    actual, expected = actual.float(), expected.float()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


@contextlib.contextmanager
def scan_path(path: str):
    """Run the temporal encoder on `path`: "mamba_ssm" (its scan, causal_conv1d's convolution when installed),
    "triton" (our Triton scan, causal_conv1d's convolution when installed), "triton, torch conv" (what a GPU without
    either package runs) or "torch" (`use_mamba_kernels` off). Yields the value `use_mamba_kernels` must take."""
    import storm_transformers.temporal_encoder as temporal_encoder
    from storm_transformers.kernels import MambaKernels, mamba_kernels

    original = temporal_encoder.mamba_kernels
    if path.startswith("triton"):
        conv = None if path == "triton, torch conv" else mamba_kernels().causal_conv1d_fn
        temporal_encoder.mamba_kernels = lambda: MambaKernels(None, conv)
    try:
        yield path != "torch"
    finally:
        temporal_encoder.mamba_kernels = original


def available_scan_paths() -> list[str]:
    from storm_transformers.kernels import mamba_kernels, triton_selective_scan

    if DEVICE != "cuda":
        return ["torch"]
    paths = ["mamba_ssm"] if mamba_kernels().selective_scan_fn is not None else []
    if triton_selective_scan() is not None:
        paths += ["triton", "triton, torch conv"] if mamba_kernels().causal_conv1d_fn is not None else ["triton"]
    return paths + ["torch"]


def vision_kernels(tower, gelu_epilogue: bool, layer_norm: bool):
    """Install or remove STORM's speed-ups of a SigLIP vision tower: the GELU epilogue of its MLPs
    (`kernels.use_gelu_epilogue`) and its LayerNorms by Triton (`kernels.use_triton_layer_norm`)."""
    from storm_transformers import kernels

    for module in tower.modules():
        module.__dict__.pop("forward", None)  # what either installed
    if gelu_epilogue:
        kernels.use_gelu_epilogue(tower)
    if layer_norm:
        kernels.use_triton_layer_norm(tower)


# ---------------------------------------------------------------- models


def storm_config(max_positions: int = 131072):
    """The paper's STORM-7B (StormConfig defaults), or a tiny one with --smoke; the LLM's context raised to
    `max_positions` (random weights), so that the uncompressed rows (65,536 visual tokens at 256 frames) fit."""
    from storm_transformers import StormConfig

    if SMOKE:
        config = StormConfig(
            vision_config={"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                           "num_hidden_layers": 3, "num_attention_heads": 2, "patch_size": 14, "image_size": 56,
                           "vision_use_head": False},
            text_config={"model_type": "qwen2", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
                         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
            temporal_encoder_config={"state_size": 4}, image_token_id=250, video_token_id=251,
        )
    else:
        config = StormConfig()
    config.text_config.max_position_embeddings = max_positions
    config._attn_implementation = "sdpa"
    return config


def storm_7b(max_positions: int = 131072):
    from storm_transformers import StormForConditionalGeneration

    with torch.device(DEVICE):
        model = StormForConditionalGeneration._from_config(storm_config(max_positions), dtype=torch.bfloat16)
    return model.eval()


def llava_onevision_7b():
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    vision = {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304, "patch_size": 14,
              "image_size": 384, "num_hidden_layers": 26, "num_attention_heads": 16, "vision_use_head": False}
    text = {"model_type": "qwen2", "vocab_size": 152128, "hidden_size": 3584, "intermediate_size": 18944,
            "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
            "max_position_embeddings": 32768, "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}
    tokens = {"image_token_index": 151646, "video_token_index": 151647}
    if SMOKE:
        vision.update(hidden_size=32, intermediate_size=64, image_size=56, num_hidden_layers=3, num_attention_heads=2)
        text.update(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2)
        tokens = {"image_token_index": 250, "video_token_index": 251}
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, vision_feature_layer=-1,
                                  vision_feature_select_strategy="full", **tokens)
    config._attn_implementation = "sdpa"
    with torch.device(DEVICE):
        model = LlavaOnevisionForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    return model.eval()


def llava_visual_tokens(model, frames: int) -> int:
    """Frames × ceil(g/2)² tokens (g×g patches per frame, 2×2 bilinear pooling) + one newline token per video."""
    vision = model.config.vision_config
    return frames * math.ceil(vision.image_size // vision.patch_size / 2) ** 2 + 1


def video_prompt(model, visual_tokens: int, frames: int):
    """`input_ids` (20 text tokens, the video's placeholders, 12 text tokens), `attention_mask`, random frames."""
    config = model.config
    video_token_id = getattr(config, "video_token_id", None) or config.video_token_index
    vocab = config.text_config.vocab_size
    image_size = config.vision_config.image_size
    text = torch.randint(min(1000, vocab // 4), min(100000, vocab // 2), (TEXT_TOKENS,), device=DEVICE)
    ids = torch.cat([text[:20], torch.full((visual_tokens,), video_token_id, device=DEVICE), text[20:]])
    pixels = torch.randn(1, frames, 3, image_size, image_size, device=DEVICE, dtype=torch.bfloat16)
    return {"input_ids": ids[None], "attention_mask": torch.ones_like(ids)[None], "pixel_values_videos": pixels}


def storm_prompt(model, frames: int, compression: str):
    model.config.temporal_pool_size, model.config.temporal_sample_rate = COMPRESSIONS[compression]
    return video_prompt(model, model.config.num_video_tokens(frames), frames)


def storm_stopwatch(model) -> Stopwatch:
    """Stages of a STORM forward: the vision tower (`vision_hidden_state`, every chunk of frames), downsample +
    Linear (`multi_modal_projector`), the whole visual pipeline (`StormModel._encode`) and the LLM."""
    import storm_transformers.modeling_storm as modeling

    watch = Stopwatch()
    watch.wrap(modeling, "vision_hidden_state", "vision")
    watch.wrap(model.model.multi_modal_projector, "forward", "projector")
    watch.wrap(type(model.model), "_encode", "encode")
    watch.wrap(model.model.language_model, "forward", "llm")
    return watch


def storm_stages(watch: Stopwatch) -> dict:
    vision, encode = watch.seconds("vision"), watch.seconds("encode")
    return {"vision tower (s)": vision, "downsample + temporal encoder + pooling (s)": encode - vision,
            "LLM prefill (s)": watch.seconds("llm")}


def llava_stopwatch(model) -> Stopwatch:
    watch = Stopwatch()
    inner = model.model
    watch.wrap(inner.vision_tower, "forward", "vision")
    watch.wrap(inner.multi_modal_projector, "forward", "projector")
    watch.wrap(inner.language_model, "forward", "llm")
    return watch


def llava_stages(watch: Stopwatch) -> dict:
    return {"vision tower (s)": watch.seconds("vision"), "projector (s)": watch.seconds("projector"),
            "LLM prefill (s)": watch.seconds("llm")}


def prefill(model, inputs):
    """One prefill forward as generation runs it (KV cache, logits of the last position only)."""
    with torch.inference_mode():
        return model(**inputs, use_cache=True, logits_to_keep=1).logits


def measure_prefill(model, inputs, watch: Stopwatch, stages, repeats: int) -> dict:
    """Time to first token (median of `repeats` after a warm-up) with the stage times of the last run."""
    free_memory()

    def run():
        watch.reset()
        return prefill(model, inputs)

    ttft, _ = timed(run, repeats)
    return {**stages(watch), "time to first token (s)": ttft, "peak memory (GiB)": peak_memory_gib()}


def greedy(model, inputs, new_tokens: int, **generate_kwargs):
    """`generate` of exactly `new_tokens` greedy tokens (min = max), without autograd."""
    with torch.inference_mode():
        return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              **generate_kwargs)


def decode_ms_per_token(model, inputs, new_tokens: int, runs: int = 1, **generate_kwargs) -> float:
    """(wall time of an `new_tokens` greedy generation − that of a 1-token one) / (new_tokens − 1), after a warm-up
    generation (which compiles the decode step when the cache is static)."""

    def generate(count):
        return first_call(lambda: greedy(model, inputs, count, **generate_kwargs))[0]

    generate(new_tokens)
    full = statistics.median(generate(new_tokens) for _ in range(runs))
    first = statistics.median(generate(1) for _ in range(runs))
    return 1000 * (full - first) / (new_tokens - 1)


# ---------------------------------------------------------------- sections


def scan_inputs(dim, length, groups=1, dtype=torch.bfloat16, seed=0, requires_grad=False):
    """Inputs of a selective scan like the temporal encoder's (N = 16): Δ before softplus around softplus⁻¹(0.01),
    S4D-real A."""
    state = 16 if not SMOKE else 2
    generator = torch.Generator(device=DEVICE).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, device=DEVICE) * scale).to(dtype)

    inputs = dict(
        u=randn(1, dim, length), delta=randn(1, dim, length, scale=0.5) - 4.6,
        A=-torch.arange(1, state + 1, device=DEVICE, dtype=torch.float32).repeat(dim, 1),
        B=randn(1, groups, state, length), C=randn(1, groups, state, length),
        D=torch.ones(dim, device=DEVICE), delta_bias=torch.zeros(dim, device=DEVICE),
    )
    return {name: tensor.requires_grad_(requires_grad) for name, tensor in inputs.items()}


def bench_scan(repeats) -> list[dict]:
    from storm_transformers import selective_scan_triton
    from storm_transformers.kernels import mamba_kernels
    from storm_transformers.selective_scan import selective_scan

    mamba = mamba_kernels().selective_scan_fn if DEVICE == "cuda" else None
    triton_scan = selective_scan_triton.selective_scan_triton
    if SMOKE:  # small tiles: Triton's interpreter runs every element in Python
        selective_scan_triton.CONFIG.update(BLOCK_T=8, BLOCK_E=4, BACKWARD_BLOCK_E=4)
    default = dict(selective_scan_triton.CONFIG)
    rows = []
    dim, length, check_dim, check_length = (7168, 32768, 256, 4096) if not SMOKE else (4, 16, 4, 12)

    # Correctness: Triton against the torch spec (float32, initial and last state, every gradient) ...
    inputs = scan_inputs(check_dim, check_length, dtype=torch.float32, requires_grad=True)
    initial = torch.randn(1, check_dim, inputs["A"].shape[1], device=DEVICE, requires_grad=True)
    errors = {}
    results = {}
    for name, scan in (("triton", triton_scan), ("torch", selective_scan)):
        out, last = scan(**inputs, delta_softplus=True, initial_state=initial, return_last_state=True)
        weights = torch.Generator(device=DEVICE).manual_seed(1)
        loss = (out * torch.randn(out.shape, generator=weights, device=DEVICE)).sum() + last.square().sum()
        results[name] = (out, last, torch.autograd.grad(loss, [*inputs.values(), initial]))
    (out, last, grads), (ref_out, ref_last, ref_grads) = results["triton"], results["torch"]
    errors = {"output": relative_error(out, ref_out), "last state": relative_error(last, ref_last)}
    errors |= {f"grad {n}": relative_error(g, r) for n, g, r in zip([*inputs, "initial_state"], grads, ref_grads)}
    rows.append({"check": f"Triton vs torch spec, float32, E={check_dim}, L={check_length}, initial + last state",
                 "largest relative error": max(errors.values()), "errors": errors})
    print(rows[-1], flush=True)
    # ... and against mamba_ssm's kernel at full size (bf16 inputs, both directions as 2 groups).
    full = scan_inputs(2 * dim, length, groups=2)
    if mamba is not None:
        error = relative_error(triton_scan(**full, delta_softplus=True), mamba(**full, delta_softplus=True))
        rows.append({"check": f"Triton vs mamba_ssm, bf16 inputs, 2 groups × E={dim}, L={length}",
                     "largest relative error": error})
        print(rows[-1], flush=True)

    def time_scan(scan, inputs, backward: bool):
        def run():
            out = scan(**inputs, delta_softplus=True)
            if backward:
                out.backward(torch.ones_like(out))
            return out

        return 1000 * timed(run, repeats)[0]

    def measure(path, scan, inputs, label, backward=True):
        free_memory()
        row = {"path": path, "scan": label, "forward (ms)": time_scan(scan, inputs, False)}
        if backward:
            inputs = {name: tensor.detach().requires_grad_(tensor.is_floating_point()) for name, tensor in inputs.items()}
            row["forward+backward (ms)"] = time_scan(scan, inputs, True)
            row["peak memory (GiB)"] = peak_memory_gib()
        rows.append(row)
        print(row, flush=True)
        return row

    one = scan_inputs(dim, length)
    label = f"1 direction: E={dim}, L={length}"
    both_label = f"2 directions as groups: 2×{dim} channels, L={length}"
    timings = {}
    if mamba is not None:
        timings["mamba_ssm"] = measure("mamba_ssm", mamba, one, label)
        measure("mamba_ssm", mamba, full, both_label)
    timings["triton"] = measure(f"triton {_config_name(default)}", triton_scan, one, label)
    measure(f"triton {_config_name(default)}", triton_scan, full, both_label)
    quarter = scan_inputs(dim, length // 4)
    short = measure("triton (a quarter of the length)", triton_scan, quarter, f"1 direction: E={dim}, L={length // 4}",
                    backward=False)
    rows.append({"check": "Triton forward time, 4× the length / 1×", "ratio": timings["triton"]["forward (ms)"]
                 / short["forward (ms)"]})
    if mamba is not None:
        for key in ("forward (ms)", "forward+backward (ms)"):
            rows.append({"check": f"Triton / mamba_ssm, {key.split(' ')[0]} ({label})",
                         "ratio": timings["triton"][key] / timings["mamba_ssm"][key]})
    with torch.no_grad():
        measure("torch spec", selective_scan, one, label, backward=False)

    # Launch configurations of the Triton kernels (forward; forward+backward for the backward's own settings).
    sweep = [(16, 8, 4), (16, 16, 4), (32, 8, 4), (32, 16, 8), (64, 8, 8), (16, 4, 2), (32, 4, 2), (64, 4, 4)]
    backward_sweep = [(16, 4, 4), (16, 8, 4), (32, 4, 4), (32, 8, 8), (64, 4, 8)]
    if SMOKE:
        sweep, backward_sweep = [(8, 4, 1)], [(8, 4, 1)]
    try:
        for block_t, block_e, warps in sweep:
            selective_scan_triton.CONFIG.update(BLOCK_T=block_t, BLOCK_E=block_e, num_warps=warps)
            _sweep_row(rows, measure, triton_scan, one, label, backward=False)
        for block_t, block_e, warps in backward_sweep:
            selective_scan_triton.CONFIG.update(default, BLOCK_T=block_t, BACKWARD_BLOCK_E=block_e, backward_num_warps=warps)
            _sweep_row(rows, measure, triton_scan, one, label, backward=True)
    finally:
        selective_scan_triton.CONFIG.update(default)
    for key, sweep_rows in (("forward (ms)", rows[-len(backward_sweep) - len(sweep) : -len(backward_sweep)]),
                            ("forward+backward (ms)", rows[-len(backward_sweep) :])):
        timed_rows = [row for row in sweep_rows if key in row]
        if timed_rows:
            best = min(timed_rows, key=lambda row: row[key])
            rows.append({"check": f"fastest Triton configuration, {key.split(' ')[0]}", "configuration": best["path"],
                         key: best[key], "default": _config_name(default)})
    return rows


def _config_name(config: dict) -> str:
    return (f"T={config['BLOCK_T']} E={config['BLOCK_E']} w={config['num_warps']} / "
            f"bwd E={config['BACKWARD_BLOCK_E']} w={config['backward_num_warps']}")


def _sweep_row(rows, measure, scan, inputs, label, backward):
    from storm_transformers import selective_scan_triton

    name = f"triton sweep {_config_name(selective_scan_triton.CONFIG)}"
    try:
        measure(name, scan, inputs, label, backward=backward)
    except Exception as error:  # a configuration that does not compile or run on this GPU
        rows.append({"path": name, "scan": label, "error": f"{type(error).__name__}: {str(error)[:200]}"})
        print(rows[-1], flush=True)


def bench_encoder(repeats) -> list[dict]:
    from storm_transformers import StormTemporalEncoder, StormTemporalEncoderConfig

    rows = []
    sizes = [(256, 4096, torch.float32), (256, 4096, torch.bfloat16), (3584, 32768, torch.bfloat16)]
    if SMOKE:
        sizes = [(16, 64, torch.float32)]
    for width, tokens, dtype in sizes:
        config = StormTemporalEncoderConfig(hidden_size=width, state_size=16 if not SMOKE else 4)
        with torch.device(DEVICE):
            encoder = StormTemporalEncoder(config).to(dtype)
        x = torch.randn(1, tokens, width, device=DEVICE, dtype=dtype)
        for path in available_scan_paths():
            with scan_path(path) as kernels_on:
                config.use_mamba_kernels = kernels_on
                free_memory()
                with torch.no_grad():
                    forward, _ = timed(lambda: encoder(x), repeats)
                row = {"width": width, "tokens": tokens, "dtype": str(dtype).split(".")[-1], "path": path,
                       "forward (ms)": 1000 * forward}
                if path != "torch" or width == 256 or SMOKE:
                    free_memory()
                    xg = x.clone().requires_grad_()
                    both, _ = timed(lambda: encoder(xg).sum().backward(), repeats)
                    row["forward+backward (ms)"] = 1000 * both
                    row["peak memory (GiB)"] = peak_memory_gib()
            rows.append(row)
            print(row, flush=True)
        encoder = None  # (not `del`: the lambdas above name it)
        free_memory()
    return rows


# GPU kernel name → piece of the temporal encoder (first match wins).
KERNEL_PIECES = [
    ("scan", r"selective_scan|_scan_forward_kernel|_scan_backward_kernel"),
    ("convolution", r"causal_conv1d|conv1d|convolution|depthwise|fprop|cudnn"),
    ("GEMM (in_proj, x_proj, dt_proj, out_proj)",
     r"gemm|nvjet|cutlass|xmma|wgmma|s16816|s1688|cublas|sm90_|sm80_|aten::(mm|bmm|addmm|matmul|linear)$"),
    ("LayerNorm", r"layer_norm|LayerNorm"),
    ("flip", r"flip"),
    ("concatenation, copies and dtype casts", r"CatArray|cat_|copy|Copy|to_copy"),
    ("other element-wise (SiLU, gate, merge, exp, residual)", r"elementwise|vectorized|silu|exp|mul|add|softplus"),
]


def kernel_pieces(prof, top: int = 12) -> tuple[list[dict], list[dict]]:
    """GPU time of a torch.profiler run by piece (KERNEL_PIECES) and the `top` costliest kernels."""
    from torch.autograd import DeviceType

    events = [e for e in prof.key_averages() if e.device_time_total > 0 and "Memcpy" not in e.key and "Memset" not in e.key]
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]  # GPU kernels, not the operators above them
    kernels = kernels or [e for e in events if not e.key.startswith(("aten::", "cuda"))]
    if not kernels:  # the CPU (--smoke): the ATen operators' own CPU time
        kernels = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
        time_of = lambda e: e.self_cpu_time_total  # noqa: E731
    else:
        time_of = lambda e: e.device_time_total  # noqa: E731
    total = sum(time_of(e) for e in kernels) or 1
    pieces = defaultdict(float)
    top_rows = []
    for event in sorted(kernels, key=time_of, reverse=True):
        piece = next((name for name, pattern in KERNEL_PIECES if re.search(pattern, event.key)), "other")
        pieces[piece] += time_of(event)
        if len(top_rows) < top:
            top_rows.append({"kernel": event.key[:90], "piece": piece, "calls": event.count,
                             "total (ms)": time_of(event) / 1000, "share": time_of(event) / total})
    by_piece = [{"piece": name, "time (ms)": value / 1000, "share of the encoder's kernel time": value / total}
                for name, value in sorted(pieces.items(), key=lambda item: -item[1])]
    return by_piece, top_rows


def bench_encoder_profile(repeats) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    model = storm_7b()
    frames = 128 if not SMOKE else 8
    inputs = storm_prompt(model, frames, "4× (k=4)")
    watch = storm_stopwatch(model)
    rows = []
    features = {}
    with torch.inference_mode():  # the temporal encoder's input in that prefill: the projector's output (B, T·N, D)
        sequence = model.model._frame_tokens(inputs["pixel_values_videos"].flatten(0, 1))
        sequence = sequence.reshape(1, -1, sequence.shape[-1])
    for path in available_scan_paths():
        with scan_path(path) as kernels_on:
            model.config.temporal_encoder_config.use_mamba_kernels = kernels_on
            stages = measure_prefill(model, inputs, watch, storm_stages, repeats)
            ttft = stages["time to first token (s)"]
            encoder = model.model.temporal_encoder

            def run_encoder(keep=False):  # the input is copied: the layers update it in place
                with torch.inference_mode():
                    return [chunk.clone() if keep else chunk for _, chunk in encoder.output_chunks(sequence.clone())]

            encoder_time, _ = timed(run_encoder, repeats)
            features[path] = torch.cat(run_encoder(keep=True), dim=1)
            activities = [ProfilerActivity.CUDA] if DEVICE == "cuda" else [ProfilerActivity.CPU]
            with profile(activities=activities) as prof:
                run_encoder()
                sync()
            by_piece, top = kernel_pieces(prof)
            row = {"scan path": path, "frames": frames, "compression": "4× (k=4)", **stages,
                   "temporal encoder alone (s)": encoder_time, "temporal encoder / TTFT": encoder_time / ttft,
                   "pieces": by_piece, "top kernels": top}
            first_path = next(iter(features))
            if path != first_path:
                row[f"output vs {first_path} (relative)"] = relative_error(features[path], features[first_path])
            rows.append(row)
            print({key: value for key, value in row.items() if key not in ("pieces", "top kernels")}, flush=True)
            for piece in by_piece:
                print("   ", piece, flush=True)
    model.config.temporal_encoder_config.use_mamba_kernels = True
    watch.remove()
    del model
    free_memory()
    return rows


def bench_vision(repeats) -> list[dict]:
    from storm_transformers import StormConfig
    from storm_transformers.modeling_storm import patch_embeddings, vision_hidden_state

    config = storm_config()
    vision_config = config.vision_config
    vision_config._attn_implementation = "sdpa"
    from transformers import SiglipVisionModel

    with torch.device(DEVICE):
        tower = SiglipVisionModel._from_config(vision_config, dtype=torch.bfloat16).eval()
    frames, chunk = (128, StormConfig().vision_chunk_size) if not SMOKE else (8, 4)
    size = vision_config.image_size
    pixels = torch.randn(frames, 3, size, size, device=DEVICE, dtype=torch.bfloat16)
    patches = (size // vision_config.patch_size) ** 2
    layers = config.vision_feature_layer % (vision_config.num_hidden_layers + 1)
    width, inner = vision_config.hidden_size, vision_config.intermediate_size
    flops = frames * patches * layers * (8 * width**2 + 4 * width * inner + 4 * patches * width)

    options = {"backend": "eager"} if SMOKE else {}
    compiled_layer = torch.compile(lambda layer, hidden: layer(hidden, None), **options)

    def run(compiled=False):
        def chunk_states(frames_chunk):
            if not compiled:
                return vision_hidden_state(tower, frames_chunk, config.vision_feature_layer)
            hidden = patch_embeddings(tower.embeddings, frames_chunk)
            for layer in tower.encoder.layers[:layers]:
                hidden = compiled_layer(layer, hidden)
            return hidden

        with torch.inference_mode():
            return torch.cat([chunk_states(pixels[start : start + chunk]) for start in range(0, frames, chunk)])

    rows, eager_output = [], None
    for name, speedups, compiled in [("eager", False, False),
                                     ("GELU epilogue, Triton LayerNorm (STORM's defaults on CUDA)", True, False),
                                     ("each layer compiled, default mode", False, True)]:
        vision_kernels(tower, gelu_epilogue=speedups, layer_norm=speedups)
        free_memory()
        first, output = first_call(lambda: run(compiled))
        warm, output = timed(lambda: run(compiled), repeats)
        row = {"vision tower": name, "frames": frames, "first call (s)": first, "warm (s)": warm,
               "TFLOP/s": flops / warm / 1e12}
        if eager_output is None:
            eager_output = output
        else:
            row["largest difference from eager (relative)"] = relative_error(output, eager_output)
        rows.append(row)
        print(row, flush=True)
    tower = None  # (not `del`: run() names it)
    free_memory()
    return rows


def bench_storm(frames_list, repeats) -> list[dict]:
    model = storm_7b(max_positions=256 * 256 + 1024)
    watch = storm_stopwatch(model)
    rows = []
    for frames in frames_list if not SMOKE else [8]:
        for name in COMPRESSIONS:
            inputs = storm_prompt(model, frames, name)
            row = measure_prefill(model, inputs, watch, storm_stages, repeats)
            visual = int((inputs["input_ids"] == model.config.video_token_id).sum())
            rows.append({"model": "STORM", "frames": frames, "compression": name, "visual tokens": visual, **row})
            print(_row_line(rows[-1]), flush=True)
    watch.remove()
    del model
    free_memory()
    return rows


def bench_peers(rounds, repeats) -> list[dict]:
    """The three 128-frame prefills in turn, `rounds` times; ratios per round, then median and spread."""
    storm, llava = storm_7b(), llava_onevision_7b()
    frames = 128 if not SMOKE else 8
    storm_inputs = {name: storm_prompt(storm, frames, name) for name in ("4× (k=4)", "1×")}
    llava_inputs = video_prompt(llava, llava_visual_tokens(llava, frames), frames)
    from storm_transformers import kernels

    kernels.use_compiled_prefill_regions(llava.model.language_model)  # toggled below

    def storm_run(name):
        def run():
            storm.config.temporal_pool_size, storm.config.temporal_sample_rate = COMPRESSIONS[name]
            return prefill(storm, storm_inputs[name])

        return run

    def llava_run(as_storm):  # its SigLIP's MLPs and its LLM's prefill run as STORM's, or as transformers runs them
        def run():
            vision_kernels(llava.model.vision_tower, gelu_epilogue=as_storm, layer_norm=as_storm)
            saved, kernels.COMPILE_REGIONS = kernels.COMPILE_REGIONS, as_storm
            try:
                return prefill(llava, llava_inputs)
            finally:
                kernels.COMPILE_REGIONS = saved

        return run

    runs = {"STORM 4× (k=4)": storm_run("4× (k=4)"), "STORM 1×": storm_run("1×"),
            "LLaVA-OV (eager)": llava_run(False), "LLaVA-OV (as STORM)": llava_run(True)}
    first = {name: first_call(run)[0] for name, run in runs.items()}  # compilations happen here
    times = defaultdict(list)
    rows = []
    for index in range(rounds):
        for name, run in runs.items():
            times[name].append(timed(run, repeats)[0])
        rows.append({"round": index + 1, **{f"{name} TTFT (s)": values[-1] for name, values in times.items()}})
        print(rows[-1], flush=True)
    storm_time = times["STORM 4× (k=4)"]
    for name in runs:
        if name == "STORM 4× (k=4)":
            continue
        ratios = [other / own for other, own in zip(times[name], storm_time)]
        rows.append({"ratio": f"{name} / STORM 4× (k=4)", "median": statistics.median(ratios), "min": min(ratios),
                     "max": max(ratios), "rounds": rounds, "first call of the numerator (s)": first[name]})
        print(rows[-1], flush=True)
    rows.append({"STORM 4× (k=4) TTFT, median over rounds (s)": statistics.median(storm_time),
                 "first call (s)": first["STORM 4× (k=4)"]})
    storm = llava = None  # (not `del`: the closures above name them)
    free_memory()
    return rows


def bench_decode(repeats) -> list[dict]:
    """Decode speed after a 128-frame k=4 prefill. With transformers' SDPA: the dynamic cache (transformers' default),
    the static cache, and the static cache for the LLM alone (transformers' Qwen2ForCausalLM holding STORM's LLM
    weights, a text prompt of the same length). With `storm generate`'s defaults (static cache, the LLM's decode
    steps by `kernels.gqa_decode_attention`, `load_storm`'s default): as they are, and with transformers' deferred
    stop check forced on (the host then does not wait for the GPU at every token; transformers turns it on for MPS
    only; it needs device events: not on the CPU), with the LLM's projections fused (`fused_projections`), and with
    both. For `storm generate`'s defaults, the host's costliest Python functions per token (cProfile)."""
    from storm_transformers.loading import DEFAULT_ATTENTION

    frames, new_tokens = (128, 64) if not SMOKE else (8, 4)
    model, inputs, llm, text = decode_setup(frames)
    context = inputs["input_ids"].shape[1]
    static = {"cache_implementation": "static"}
    sdpa, defaults = {"text_config": "sdpa"}, DEFAULT_ATTENTION
    runs = [("static", sdpa, model, inputs, static, contextlib.nullcontext),
            ("static (storm generate's defaults)", defaults, model, inputs, static, contextlib.nullcontext),
            ("static, stop check deferred", defaults, model, inputs, static, deferred_stop_check),
            ("static, q/k/v and gate/up fused", defaults, model, inputs, static, lambda: fused_projections(model)),
            ("static, fused, stop check deferred", defaults, model, inputs, static,
             lambda: fused_projections(model, defer_stop_check=True)),
            ("static, transformers' flex attention", {"text_config": "flex_attention"}, model, inputs, static,
             contextlib.nullcontext),
            ("static, LLM alone (Qwen2ForCausalLM, same weights, text prompt)", sdpa, llm, text, static,
             contextlib.nullcontext),
            ("dynamic (transformers' default)", sdpa, model, inputs, {}, contextlib.nullcontext)]
    runs = [run for run in runs if DEVICE == "cuda" or "deferred" not in run[0]]  # device events: not on the CPU
    rows, reference = [], None
    for name, attention, runner, prompt, kwargs, patch in runs:
        free_memory()
        row = {"frames": frames, "compression": "4× (k=4)", "context (tokens)": context, "cache": name,
               "LLM attention": attention["text_config"]}
        try:
            model.set_attn_implementation(attention)  # the LLM alone shares STORM's LLM and its config
            with patch():
                first, tokens = first_call(lambda: greedy(runner, prompt, new_tokens, **kwargs))
                ms = decode_ms_per_token(runner, prompt, new_tokens, runs=repeats, **kwargs)
            row.update({f"first generate() of {new_tokens} tokens (s)": first, "decode (ms/token)": ms,
                        "decode (tokens/s)": 1000 / ms})
            tokens = tokens[:, -new_tokens:]
            if name.endswith("defaults)"):
                reference = tokens
                row.update(decode_profile(model, inputs, new_tokens, **static))
            elif reference is not None and runner is model:  # random weights: near-ties may flip in bf16
                row["new tokens equal to the defaults'"] = f"{(tokens == reference).float().mean().item():.0%}"
        except Exception as error:  # an attention this transformers/torch cannot decode with: the row says why
            row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
        rows.append(row)
        print(row, flush=True)
    model = llm = runs = None  # the runs hold the model too; the closures name it (no del)
    free_memory()
    return rows


def decode_setup(frames: int):
    """`(model, inputs, llm, text)` of the decode sections: STORM-7B (random weights), a `frames`-frame k=4 video
    prompt, the LLM alone (`llm_alone`) and a random text prompt as long as the video prompt."""
    model = storm_7b(max_positions=40000)
    inputs = storm_prompt(model, frames, "4× (k=4)")
    context = inputs["input_ids"].shape[1]
    text = {"input_ids": torch.randint(*((1000, 100000) if not SMOKE else (10, 200)), (1, context), device=DEVICE)}
    text["attention_mask"] = torch.ones_like(text["input_ids"])
    return model, inputs, llm_alone(model), text


def llm_alone(model):
    """transformers' Qwen2ForCausalLM around STORM's own LLM and LM head (no copy of the weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(model.config.text_config)
    llm.model, llm.lm_head = model.model.language_model, model.lm_head
    llm.generation_config = model.generation_config
    return llm.eval()


class _FusedLinears(torch.nn.Module):
    """Stands in for the first of several Linear layers that read the same input (q, k and v; gate and up): one
    product with their concatenated weights, whose other parts wait in the others' `_HandedOn` stand-ins until the
    model calls them next, on the same input (transformers' Qwen2 calls q, k, v and gate, up in that order)."""

    def __init__(self, linears: list, handed_on: list):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.cat([linear.weight for linear in linears]), requires_grad=False)
        biases = [linear.bias for linear in linears]
        self.bias = None if biases[0] is None else torch.nn.Parameter(torch.cat(biases), requires_grad=False)
        self.sizes = [linear.out_features for linear in linears]
        self.handed_on = handed_on  # a plain list: not submodules

    def forward(self, x):
        first, *rest = torch.nn.functional.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)
        for module, part in zip(self.handed_on, rest):
            module.part = part
        return first


class _HandedOn(torch.nn.Module):
    """Stands in for a Linear layer whose output `_FusedLinears` computed just before."""

    part = None

    def forward(self, x):
        part, self.part = self.part, None
        return part


@contextlib.contextmanager
def fused_projections(model, defer_stop_check: bool = False):
    """STORM's LLM with each layer's q, k, v projections as one product and its MLP's gate and up projections as one
    (as vLLM's QKVParallelLinear and MergedColumnParallelLinear): 84 instead of 140 GEMVs per decoded token on a
    28-layer Qwen2. An experiment of this benchmark (the model is put back afterwards): the fused weights are copies.
    `defer_stop_check`: also `deferred_stop_check`."""
    groups = []
    for layer in model.model.language_model.layers:
        groups += [(layer.self_attn, ("q_proj", "k_proj", "v_proj")), (layer.mlp, ("gate_proj", "up_proj"))]
    originals = [(owner, {name: getattr(owner, name) for name in names}) for owner, names in groups]
    for owner, linears in originals:
        first, *others = linears
        handed_on = [_HandedOn() for _ in others]
        setattr(owner, first, _FusedLinears(list(linears.values()), handed_on))
        for name, module in zip(others, handed_on):
            setattr(owner, name, module)
    try:
        with deferred_stop_check() if defer_stop_check else contextlib.nullcontext():
            yield
    finally:
        for owner, linears in originals:
            for name, module in linears.items():
                setattr(owner, name, module)


@contextlib.contextmanager
def deferred_stop_check():
    """transformers' `DeferredStopCheck` (generation/utils.py) used on every device; a no-op where it is missing."""
    from transformers.generation import utils

    check = getattr(utils, "DeferredStopCheck", None)
    if check is None:
        yield
        return
    original = check.__dict__["is_supported"]
    check.is_supported = staticmethod(lambda device, cache, cache_is_returned, is_assistant: not is_assistant and (
        cache is None or cache.is_croppable or not cache_is_returned))
    try:
        yield
    finally:
        check.is_supported = original


def decode_profile(model, inputs, new_tokens: int, **generate_kwargs) -> dict:
    """The host's costliest Python functions per decoded token: cProfile's own time in an `new_tokens` generation
    minus that in a 1-token one, over new_tokens − 1 (cProfile slows the host: shares, not timings). With CUDA graphs,
    the time the host waits for the GPU shows as StopCheck's `__call__` (its `bool()` of a device tensor)."""
    import cProfile
    import pstats

    def host_stats(count):
        profiler = cProfile.Profile()
        profiler.enable()
        greedy(model, inputs, count, **generate_kwargs)
        sync()
        profiler.disable()
        return pstats.Stats(profiler).stats  # {(file, line, function): (primitive calls, calls, own s, cumulative s, _)}

    full, one = host_stats(new_tokens), host_stats(1)
    per_token = {}  # what the new_tokens − 1 extra tokens cost: the difference of the two generations
    for key, (_, calls, own, cumulative, _) in full.items():
        _, calls_1, own_1, cumulative_1, _ = one.get(key, (0, 0, 0.0, 0.0, None))
        per_token[key] = [(value - value_1) / (new_tokens - 1) for value, value_1 in
                          ((calls, calls_1), (own, own_1), (cumulative, cumulative_1))]
    top = sorted(per_token.items(), key=lambda item: item[1][1], reverse=True)[:25]
    host = [{"function": f"{Path(file).name}:{line} {function}", "calls per token": calls,
             "own time (ms/token, under cProfile)": 1000 * own,
             "with callees (ms/token, under cProfile)": 1000 * cumulative}
            for (file, line, function), (calls, own, cumulative) in top]
    return {"host functions": host}


def bench_decode_kernels(repeats) -> list[dict]:
    """Where the GPU time of a decode step goes, 128-frame k=4 prefill, `storm generate`'s defaults (static cache,
    `sdpa_gqa_decode`): ms/token and the GPU kernels of one decoded token (torch.profiler; per token = a `new_tokens`
    generation minus a 1-token one, over new_tokens − 1), with transformers' compiled step as it is (CUDA graphs,
    mode "reduce-overhead") and compiled without CUDA graphs (mode "default": the same kernels, each launched by the
    host); then the same step for the LLM alone, with flex attention, and compiled in mode "max-autotune" (Triton
    GEMM templates tried against cuBLAS for every product; first call included)."""
    from transformers import CompileConfig

    from storm_transformers.loading import DEFAULT_ATTENTION

    frames, new_tokens = (128, 32) if not SMOKE else (8, 4)
    model, inputs, llm, text = decode_setup(frames)
    modes = {"reduce-overhead": CompileConfig(mode="reduce-overhead"), "default": CompileConfig(mode="default"),
             "max-autotune": CompileConfig(mode="max-autotune")}
    runs = [("defaults (CUDA graphs)", DEFAULT_ATTENTION, model, inputs, "reduce-overhead", True),
            ("defaults, no CUDA graphs", DEFAULT_ATTENTION, model, inputs, "default", True),
            ("LLM alone, defaults", DEFAULT_ATTENTION, llm, text, "reduce-overhead", False),
            ("flex attention", {"text_config": "flex_attention"}, model, inputs, "reduce-overhead", False),
            ("defaults, compile mode max-autotune", DEFAULT_ATTENTION, model, inputs, "max-autotune", True)]
    rows = []
    for name, attention, runner, prompt, mode, profiled in runs:
        free_memory()
        kwargs = {"cache_implementation": "static", "compile_config": modes[mode]}
        row = {"decode step": name, "LLM attention": attention["text_config"], "compile mode": mode}
        try:
            model.set_attn_implementation(attention)
            first, _ = first_call(lambda: greedy(runner, prompt, new_tokens, **kwargs))
            ms = decode_ms_per_token(runner, prompt, new_tokens, runs=repeats, **kwargs)
            row.update({f"first generate() of {new_tokens} tokens (s)": first, "decode (ms/token)": ms,
                        "decode (tokens/s)": 1000 / ms})
            if profiled:
                row.update(decode_kernels(runner, prompt, new_tokens, **kwargs))
        except Exception as error:  # the row says why
            row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
        rows.append(row)
        print({key: value for key, value in row.items() if key != "kernels"}, flush=True)
        if "kernels" in row:  # now, not only at the end: a later row may not finish within a call's time limit
            print(markdown(row["kernels"]), flush=True)
    del model, llm
    free_memory()
    return rows


def decode_kernels(model, inputs, new_tokens: int, top: int = 30, **generate_kwargs) -> dict:
    """The GPU kernels of one decoded token: torch.profiler's kernel times in a `new_tokens` generation minus those
    in a 1-token one, over new_tokens − 1. Returns the GPU time per token (ms), the kernel launches per token and the
    `top` costliest kernels (calls and µs per token, µs per call). On the CPU (--smoke): the ATen operators' own
    CPU time instead."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    def kernels(count):
        activity = ProfilerActivity.CUDA if DEVICE == "cuda" else ProfilerActivity.CPU
        with profile(activities=[activity]) as prof:
            greedy(model, inputs, count, **generate_kwargs)
            sync()
        if DEVICE == "cuda":
            return {e.key: (e.count, e.device_time_total) for e in prof.key_averages()
                    if e.device_type == DeviceType.CUDA and e.device_time_total > 0}
        return {e.key: (e.count, e.self_cpu_time_total) for e in prof.key_averages() if e.self_cpu_time_total > 0}

    full, one = kernels(new_tokens), kernels(1)
    per_token = {}
    for key, (calls, microseconds) in full.items():
        calls_1, microseconds_1 = one.get(key, (0, 0.0))
        per_token[key] = ((calls - calls_1) / (new_tokens - 1), (microseconds - microseconds_1) / (new_tokens - 1))
    ranked = sorted(per_token.items(), key=lambda item: -item[1][1])
    return {"GPU time (ms/token)": sum(us for _, us in per_token.values()) / 1000,
            "kernels per token": sum(calls for calls, _ in per_token.values()),
            "kernels": [{"kernel": key[:100], "calls per token": calls, "µs per token": us,
                         "µs per call": us / calls if calls else None} for key, (calls, us) in ranked[:top]]}


def bench_speedups(repeats) -> list[dict]:
    """The 128-frame k=4 prefill with STORM's prefill speed-ups switched off one at a time, then all four: the
    LLM's norms, MLPs and RoPE compiled at prefill (`kernels.COMPILE_REGIONS`), the GELU epilogue of the vision tower's
    MLPs (`kernels.use_gelu_epilogue`), its LayerNorms by Triton (`kernels.use_triton_layer_norm`), SigLIP's patch
    convolution as one product (`modeling_storm.patch_embeddings`)."""
    import storm_transformers.modeling_storm as modeling
    from storm_transformers import kernels

    model = storm_7b()
    inputs = storm_prompt(model, 128 if not SMOKE else 8, "4× (k=4)")
    watch = storm_stopwatch(model)
    product, regions_before = modeling.patch_embeddings, kernels.COMPILE_REGIONS
    convolution = lambda embeddings, pixel_values: embeddings(pixel_values)  # noqa: E731  (SigLIP's own)
    rows = []
    for name, regions, epilogue, layer_norm, patches in [
        ("STORM's defaults", True, True, True, product),
        ("without the LLM's compiled regions", False, True, True, product),
        ("without the GELU epilogue", True, False, True, product),
        ("without the Triton LayerNorm", True, True, False, product),
        ("with SigLIP's patch convolution", True, True, True, convolution),
        ("none of the four", False, False, False, convolution),
    ]:
        kernels.COMPILE_REGIONS, modeling.patch_embeddings = regions, patches
        vision_kernels(model.model.vision_tower, gelu_epilogue=epilogue, layer_norm=layer_norm)
        first, _ = first_call(lambda: prefill(model, inputs))
        rows.append({"prefill": name, "first call (s)": first,
                     **measure_prefill(model, inputs, watch, storm_stages, repeats)})
        print(rows[-1], flush=True)
    kernels.COMPILE_REGIONS, modeling.patch_embeddings = regions_before, product
    watch.remove()
    model = None  # (not `del`: a closure above names it)
    free_memory()
    return rows


def bench_fp8(repeats) -> list[dict]:
    from storm_transformers.kernels import quantize_linears_fp8

    model = storm_7b()
    frames = 128 if not SMOKE else 8
    inputs = storm_prompt(model, frames, "4× (k=4)")
    watch = storm_stopwatch(model)
    rows, reference = [], None
    converted = 0
    for precision, module in (("bf16", None), ("FP8: the LLM's linears", model.model.language_model),
                              ("FP8: the LLM's and the vision tower's linears", model.model.vision_tower)):
        if module is not None:
            converted += quantize_linears_fp8(module)
            torch._dynamo.reset()  # the LLM's compiled regions recompile with the FP8 linears
        first, _ = first_call(lambda: prefill(model, inputs))
        row = {"precision": precision, "linears in FP8": converted, "first call (s)": first,
               **measure_prefill(model, inputs, watch, storm_stages, repeats)}
        with torch.inference_mode():
            features = model.model.get_video_features(inputs["pixel_values_videos"]).pooler_output
            logits = model(**inputs, logits_to_keep=1).logits
        if reference is None:
            reference = features, logits
        else:
            row["video features vs bf16 (relative)"] = relative_error(features, reference[0])
            row["last logits vs bf16 (relative)"] = relative_error(logits, reference[1])
            row["same greedy token as bf16"] = bool((logits.argmax(-1) == reference[1].argmax(-1)).all())
        rows.append(row)
        print(row, flush=True)
    watch.remove()
    model = None  # (not `del`: a closure above names it)
    free_memory()
    return rows


def bench_llava(frames_list, repeats) -> list[dict]:
    model = llava_onevision_7b()
    watch = llava_stopwatch(model)
    rows = []
    for frames in frames_list if not SMOKE else [8]:
        visual = llava_visual_tokens(model, frames)
        inputs = video_prompt(model, visual, frames)
        row = measure_prefill(model, inputs, watch, llava_stages, repeats)
        rows.append({"model": "LLaVA-OneVision", "frames": frames, "compression": "1× (196/frame)",
                     "visual tokens": visual, **row})
        print(_row_line(rows[-1]), flush=True)
    watch.remove()
    del model
    free_memory()
    return rows


def bench_profile() -> list[dict]:
    """Where the time of one 128-frame 4× prefill goes: the 20 costliest GPU operations (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    model = storm_7b()
    inputs = storm_prompt(model, 128 if not SMOKE else 8, "4× (k=4)")
    prefill(model, inputs)
    sync()
    with profile(activities=[ProfilerActivity.CUDA] if DEVICE == "cuda" else [ProfilerActivity.CPU]) as prof:
        prefill(model, inputs)
        sync()
    _, top = kernel_pieces(prof, top=20)
    del model
    free_memory()
    return [{key: value for key, value in row.items() if key != "piece"} for row in top]


def bench_cpu(repeats) -> list[dict]:
    from storm_transformers import StormTemporalEncoder, StormTemporalEncoderConfig
    from storm_transformers.selective_scan import selective_scan

    rows = []
    torch.manual_seed(0)
    for tokens in (1024, 2048, 4096, 8192) if not SMOKE else (64, 128):
        inner, state = 512, 16  # width 256, expand 2
        leaves = [torch.randn(1, inner, tokens), torch.rand(1, inner, tokens) * 0.1, -torch.rand(inner, state),
                  torch.randn(1, state, tokens), torch.randn(1, state, tokens)]
        for leaf in leaves:
            leaf.requires_grad_()
        scan_time = _cpu_timed(lambda: selective_scan(*leaves).sum().backward(), repeats)
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
    """Markdown tables of `rows` (nested values left out); a new table wherever the kind of row changes (its first
    column)."""
    rows = [{key: value for key, value in row.items() if not isinstance(value, (list, dict))} for row in rows]
    tables = []
    for row in rows:
        if not tables or next(iter(row), None) != next(iter(tables[-1][0]), None):
            tables.append([])
        tables[-1].append(row)
    return "\n\n".join(_table(table) for table in tables)


def _table(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(column)) for column in columns) + " |")
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 0.01 and value else f"{value:.3f}"
    return "" if value is None else str(value)


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
    import triton

    from storm_transformers.kernels import mamba_kernels

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M %Z"), "smoke": SMOKE}
    if DEVICE == "cuda":
        info["device"] = torch.cuda.get_device_name()
        kernels = mamba_kernels()
        info["mamba_ssm"], info["causal_conv1d"] = kernels.selective_scan_fn is not None, kernels.causal_conv1d_fn is not None
    return info


SECTIONS = ["scan", "encoder", "encoder-profile", "vision", "storm", "peers", "speed-ups", "decode", "decode-kernels",
            "fp8", "llava", "profile", "cpu"]


def main():
    global SMOKE, DEVICE
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmark-results")
    parser.add_argument("--sections", nargs="+", default=[s for s in SECTIONS if s != "cpu"], choices=SECTIONS)
    parser.add_argument("--frames", nargs="+", type=int, default=[8, 32, 64, 128, 256])
    parser.add_argument("--llava-frames", nargs="+", type=int, default=[32, 64, 128])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the peer comparison")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU: test the script (seconds)")
    args = parser.parse_args()
    SMOKE = args.smoke
    if SMOKE:
        DEVICE = "cpu"
        os.environ["TRITON_INTERPRET"] = "1"  # read when the Triton scan is first imported (kernels.py, lazily)
        args.repeats, args.rounds = 1, 2
    elif not torch.cuda.is_available():
        parser.error("the GPU sections need a CUDA GPU; use --smoke to test the script on the CPU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"environment": environment(), "args": vars(args)}
    print(results["environment"], flush=True)
    runners = {
        "scan": lambda: bench_scan(args.repeats),
        "encoder": lambda: bench_encoder(args.repeats),
        "encoder-profile": lambda: bench_encoder_profile(args.repeats),
        "vision": lambda: bench_vision(args.repeats),
        "storm": lambda: bench_storm(args.frames, args.repeats),
        "peers": lambda: bench_peers(args.rounds, args.repeats),
        "decode": lambda: bench_decode(args.repeats),
        "decode-kernels": lambda: bench_decode_kernels(args.repeats),
        "speed-ups": lambda: bench_speedups(args.repeats),
        "fp8": lambda: bench_fp8(args.repeats),
        "llava": lambda: bench_llava(args.llava_frames, args.repeats),
        "profile": bench_profile,
        "cpu": lambda: bench_cpu(args.repeats),
    }
    for section in args.sections:
        print(f"\n# {section}", flush=True)
        start = time.perf_counter()
        results[section] = runners[section]()
        results.setdefault("section seconds", {})[section] = time.perf_counter() - start
        (out / "latency.json").write_text(json.dumps(results, indent=1, default=str))
    if "storm" in results:
        results["ratios"] = ratios(results["storm"], results.get("llava", []))
        (out / "latency.json").write_text(json.dumps(results, indent=1, default=str))
    for section in [*SECTIONS[:5], "ratios", *SECTIONS[5:]]:
        if section in results:
            rows = results[section]
            print(f"\n## {section}\n\n{markdown(rows)}")
            for row in rows:  # nested tables: the encoder's pieces and top kernels
                for key in ("pieces", "top kernels", "host functions", "kernels"):
                    if key in row:
                        print(f"\n{key} ({row.get('scan path') or row.get('decode step', '')}):\n\n{markdown(row[key])}")
    print(f"\nsection times (s): {results['section seconds']}; JSON: {out / 'latency.json'}")


if __name__ == "__main__":
    main()
