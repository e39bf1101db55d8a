"""Streaming STORM (issue 12): constant work per frame, sustained ingest rate, question latency.

Sections (`--sections`, default: `cpu` without a GPU, `gpu` with one):

- `cpu`: the miniature uni-directional STORM (`storm_transformers.training.miniature` sizes: SigLIP 64 px, 16 tokens
  per frame, 2 causal Mamba layers of width 48, Qwen2 2 layers; random weights, float32) streaming random 64×64
  frames, k = 4 frames per append, on the CPU: CPU time (one thread, `time.process_time`) per appended chunk around
  frame 16 and around frame 2048 (median of the 32 chunks from there), and the part of it spent in the LLM's forward
  over the new tokens. The visual pipeline's work per chunk is constant (each layer continues from its carried
  state); the LLM's attention over its growing KV cache is not, as in any LLM.
- `gpu`: STORM-7B sizes with a uni-directional temporal encoder (`StormConfig(temporal_encoder_config={"bidirectional":
  False})`), random weights, bf16, SDPA, 448×448 uint8 frames at 1 fps, k = 4 frames per append, spatial pooling p = 2
  and temporal sampling s = 2 (3600 frames → 28,800 visual tokens, inside Qwen2-7B's 32k context; with p = 2 alone it
  would be 57,600): sustained ingest rate (frames/s over the whole stream, preprocessing on the GPU included), time
  per append early and late in the stream, and question → first answer token latency (`ask(..., max_new_tokens=1)`,
  median of 3) after 60 frames (1 minute) and after 3600 frames (1 hour); peak GPU memory. The ingest rate is
  measured for each `--frames-per-append` (default 4 and 32: a live source hands over what arrived since the last
  call; bigger appends run the vision tower and the LLM on more frames per launch).
  `--smoke` runs this section's code on the CPU with the miniature model and 64 frames, in seconds.

Both need the Qwen2 tokenizer of `storm fetch-assets` (`--tokenizer`, default `assets/tokenizer`; a saved
tokenizer folder works too). Run from the repository root:

    PYTHONPATH=. python benchmarks/streaming.py --out results/streaming               # gpu on a GPU machine (~2 min)
    PYTHONPATH=. python benchmarks/streaming.py --sections cpu --out results/streaming
    PYTHONPATH=. python benchmarks/streaming.py --smoke --out /tmp/streaming

Writes `streaming.json` into --out and prints a markdown table per section.
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from storm_transformers import StormConfig, StormForConditionalGeneration
from storm_transformers.streaming import StormStreamingSession

QUESTION = "What has happened so far in the video?"


def tokenizer_and_ids(folder: str):
    """The Qwen2 tokenizer (from the GGUF of `storm fetch-assets`, or a saved tokenizer) with the placeholders added."""
    from transformers import AutoTokenizer

    from storm_transformers.conversion.assets import QWEN2_GGUF
    from storm_transformers.conversion.checkpoint import add_placeholder_tokens

    path = Path(folder)
    if (path / QWEN2_GGUF).exists():
        tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=QWEN2_GGUF)
    elif (path / "tokenizer.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(path)
    else:
        raise SystemExit(f"No Qwen2 tokenizer in {path}: run `storm fetch-assets` or pass --tokenizer.")
    return tokenizer, add_placeholder_tokens(tokenizer)


def build(kind: str, tokenizer, ids, device: str, max_positions: int, attention: str = "sdpa"):
    """A streaming session's model and processor: `"tiny"` (the miniature uni-k4) or `"7b"`, random weights."""
    from storm_transformers.conversion.checkpoint import build_processor, chat_generation_config
    from storm_transformers.training.miniature import miniature_config

    image_id, video_id = ids
    if kind == "tiny":
        config = miniature_config(2, False, 4, len(tokenizer), image_id, video_id)
        dtype = torch.float32
    else:
        config = StormConfig(temporal_encoder_config={"bidirectional": False}, spatial_pool_size=2,
                             temporal_sample_rate=2, image_token_id=image_id, video_token_id=video_id)
        dtype = torch.bfloat16
    config.text_config.max_position_embeddings = max_positions
    config._attn_implementation = attention
    with torch.device(device):
        model = StormForConditionalGeneration._from_config(config, dtype=dtype).eval()
    model.generation_config = chat_generation_config(tokenizer)
    return model, build_processor(config, tokenizer, num_frames=8)


def frames(count: int, side: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, side, side, 3), dtype=np.uint8)


def synchronize(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def timed_appends(session, total: int, side: int, device: str, clock=time.perf_counter, per_append=None) -> list[float]:
    """Append `total` random frames, `per_append` (default k) at a time; seconds per append (wall time, or `clock`)."""
    per_append = per_append or session.model.config.temporal_pool_size
    times = []
    for start in range(0, total, per_append):
        batch = frames(min(per_append, total - start), side, start)
        synchronize(device)
        began = clock()
        session.append(batch)
        synchronize(device)
        times.append(clock() - began)
    return times


def question_latency(session, device: str, repeats: int = 3) -> float:
    """Median seconds from `ask` to the first answer token (one new token), after a warm-up question."""
    session.ask(QUESTION, max_new_tokens=1)
    samples = []
    for _ in range(repeats):
        synchronize(device)
        began = time.perf_counter()
        session.ask(QUESTION, max_new_tokens=1)
        synchronize(device)
        samples.append(time.perf_counter() - began)
    return statistics.median(samples)


def bench_cpu(tokenizer, ids) -> list[dict]:
    """CPU time (`time.process_time`, one intra-op thread, so that other processes on the machine do not count) per
    appended chunk of 4 frames, around frame 16 and around frame 2048, and the part of it in the LLM's forward."""
    torch.set_num_threads(1)
    model, processor = build("tiny", tokenizer, ids, "cpu", max_positions=2176 // 4 * 16 + 1024)
    session = StormStreamingSession(model, processor)
    prefix, llm_times, llm_forward = session.tokens_cached, [], session._llm_forward

    def timed_llm_forward(**inputs):
        began = time.process_time()
        llm_forward(**inputs)
        llm_times.append(time.process_time() - began)

    session._llm_forward = timed_llm_forward
    times = timed_appends(session, 2176, 64, "cpu", clock=time.process_time)  # chunk i: frames 4i .. 4i+3
    rows = []
    for frame in (16, 2048):
        window = slice(frame // 4, frame // 4 + 32)  # the 32 chunks from that frame on
        total, llm = statistics.median(times[window]), statistics.median(llm_times[window])
        rows.append({"frames before the chunk": frame, "tokens cached before": prefix + frame // 4 * 16,
                     "CPU time per chunk of 4 frames (ms)": 1000 * total, "of which the LLM (ms)": 1000 * llm,
                     "the rest: preprocessing, vision, temporal encoder, pooling (ms)": 1000 * (total - llm)})
    rows.append({"frames before the chunk": "ratio 2048 / 16", **{
        key: rows[1][key] / rows[0][key] for key in rows[0] if key.endswith("(ms)")}})
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def bench_gpu(tokenizer, ids, smoke: bool, frames_per_append: list[int]) -> list[dict]:
    """The stream of the first `frames_per_append` value with its questions, then the sustained ingest rate of a
    fresh stream of the same length for each value (a live source hands over what arrived since the last call)."""
    device = "cpu" if smoke else "cuda"
    kind, side, total, minute = ("tiny", 64, 64, 16) if smoke else ("7b", 448, 3600, 60)
    model, processor = build(kind, tokenizer, ids, device, max_positions=32768)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    session = StormStreamingSession(model, processor, reserve_tokens=128)
    for per_append in frames_per_append:  # warm-up (kernels, allocator, shapes), then fresh sessions
        timed_appends(session, 2 * per_append, side, device, per_append=per_append)
    session = StormStreamingSession(model, processor, reserve_tokens=128)
    per_append = frames_per_append[0]
    rows = []
    first = timed_appends(session, minute, side, device, per_append=per_append)
    rows.append({"after": f"{minute} frames (1 min at 1 fps)" if not smoke else f"{minute} frames",
                 "tokens cached": session.tokens_cached, "question → first token (ms)": 1000 * question_latency(session, device)})
    rest = timed_appends(session, total - minute, side, device, per_append=per_append)
    rows.append({"after": f"{total} frames (1 h at 1 fps)" if not smoke else f"{total} frames",
                 "tokens cached": session.tokens_cached, "question → first token (ms)": 1000 * question_latency(session, device)})
    for index, per_append in enumerate(frames_per_append):
        if index:
            session = StormStreamingSession(model, processor, reserve_tokens=128)
            times = timed_appends(session, total, side, device, per_append=per_append)
        else:
            times = first + rest
        rows.append({
            "after": f"ingest, {per_append} frames per append",
            "frames/s sustained": total / sum(times),
            "ms per append, first 10%": 1000 * statistics.median(times[: max(1, len(times) // 10)]),
            "ms per append, last 10%": 1000 * statistics.median(times[-max(1, len(times) // 10) :]),
            "peak memory (GiB)": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
        })
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [row.get(column) for column in columns]
        lines.append("| " + " | ".join(f"{c:.2f}" if isinstance(c, float) else ("" if c is None else str(c)) for c in cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmark-results/streaming")
    parser.add_argument("--sections", nargs="+", choices=["cpu", "gpu"])
    parser.add_argument("--tokenizer", default="assets/tokenizer")
    parser.add_argument("--smoke", action="store_true", help="the gpu section on the CPU with the miniature model")
    parser.add_argument("--frames-per-append", nargs="+", type=int, default=[4, 32],
                        help="gpu: frames handed to each append (multiples of k); the first also gets the questions")
    args = parser.parse_args(argv)
    sections = args.sections or (["gpu"] if torch.cuda.is_available() or args.smoke else ["cpu"])
    import transformers

    results = {"environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                               "python": platform.python_version(), "threads": torch.get_num_threads(),
                               "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"},
               "args": vars(args)}
    tokenizer, ids = tokenizer_and_ids(args.tokenizer)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for section in sections:
        results[section] = bench_cpu(tokenizer, ids) if section == "cpu" else bench_gpu(tokenizer, ids, args.smoke, args.frames_per_append)
        (out / "streaming.json").write_text(json.dumps(results, indent=1))
    for section in sections:
        print(f"\n## {section}{' (smoke, CPU)' if section == 'gpu' and args.smoke else ''}\n\n{markdown(results[section])}")
    return results


if __name__ == "__main__":
    main()
