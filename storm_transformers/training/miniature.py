"""The paper's core claim in miniature: tiny STORMs trained on synthetic video QA (`synthetic.py`).

One command runs everything (about 9 minutes per seed on one H100 with 16 CPU cores, which the runs need: they are
bound by video decoding; the data are generated on the spot, seeded):

```bash
python -m storm_transformers.training.miniature --output runs/miniature --seeds 0 1 2 \
    --export bi-k4 0 checkpoints/storm-tiny-synthetic
```

For every configuration below and every seed it builds a random tiny STORM (a SigLIP-architecture encoder, the
temporal encoder and a Qwen2-architecture LLM, all from scratch, with the real Qwen2 tokenizer), trains it with the
project's recipe (`sft.py`: stage 1 alignment, then SFT), and evaluates greedy answers on the test split by
question type; `bi-k4` and `bi-k1` are evaluated a second time with test-time temporal sampling s = 2 (at k = 8
one pooled frame is left, so s = 2 would change nothing). Same data, steps
and seeds for every row. Results: `<output>/results.json` and `<output>/results.md`; checkpoints under
`<output>/runs/<config>-seed<seed>/sft`.

| config | temporal encoder | temporal pooling k | paper's counterpart |
|---|---|---|---|
| `linear-k4`, `linear-k8` | none (Linear projector only) | 4, 8 | VILA + T.Pool |
| `uni-k4`, `uni-k8` | 2 uni-directional Mamba layers | 4, 8 | STORM uni-directional (Table 7) |
| `bi-k4`, `bi-k8` | 2 bidirectional Mamba layers | 4, 8 | STORM + T.Pool |
| `bi-k1` | 2 bidirectional Mamba layers | 1 (no pooling) | STORM |

Clips have 8 frames, so at k = 8 every event happens inside one pooling window.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .synthetic import CHANCE, TEMPORAL_TYPES

CONFIGS = {
    "linear-k4": {"layers": 0, "bidirectional": True, "k": 4},
    "linear-k8": {"layers": 0, "bidirectional": True, "k": 8},
    "uni-k4": {"layers": 2, "bidirectional": False, "k": 4},
    "uni-k8": {"layers": 2, "bidirectional": False, "k": 8},
    "bi-k4": {"layers": 2, "bidirectional": True, "k": 4},
    "bi-k8": {"layers": 2, "bidirectional": True, "k": 8},
    "bi-k1": {"layers": 2, "bidirectional": True, "k": 1},
}
DATA_SIZES = {"train": 6000, "validation": 300, "test": 600}
LOAD_LOCK = threading.Lock()  # transformers' model building/loading is not safe from several threads at once
HIDDEN = 48  # LLM and temporal-encoder width: the 152k-row Qwen2 embedding dominates the size (≈ 31 MB in float32)


def miniature_config(layers: int, bidirectional: bool, k: int, vocab_size: int, image_token_id: int, video_token_id: int):
    """The tiny STORM: SigLIP 64 px / patch 8 (4 layers, width 96) → 16 tokens per frame after the 2×2 downsample →
    `layers` Mamba layers of width 48 → temporal pooling k → Qwen2 (2 layers, width 48, tied embeddings)."""
    from storm_transformers import StormConfig

    return StormConfig(
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": 96,
            "intermediate_size": 384,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "patch_size": 8,
            "image_size": 64,
            "vision_use_head": False,
        },
        text_config={
            "model_type": "qwen2",
            "vocab_size": vocab_size,
            "hidden_size": HIDDEN,
            "intermediate_size": 192,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 1024,
            "tie_word_embeddings": True,
        },
        temporal_encoder_config={"num_hidden_layers": layers, "bidirectional": bidirectional, "state_size": 16},
        vision_feature_layer=-1,  # the encoder is trained from scratch: no reason to drop its last layer
        temporal_pool_size=k,
        image_token_id=image_token_id,
        video_token_id=video_token_id,
    )


def build_initial(output_dir: Path, tokenizer_dir: Path, name: str, seed: int) -> Path:
    """A random STORM of configuration `name` with the real Qwen2 tokenizer (the stage-1 starting point)."""
    from storm_transformers.conversion.tiny import random_checkpoint

    settings = CONFIGS[name]

    def config(vocab_size, image_token_id, video_token_id):
        return miniature_config(settings["layers"], settings["bidirectional"], settings["k"], vocab_size,
                                image_token_id, video_token_id)

    return random_checkpoint(
        output_dir,
        tokenizer_dir,
        config,
        seed=seed,
        num_frames=8,
        summary=f"Random initialisation of the miniature STORM `{name}`.",
        origin="`storm_transformers.training.miniature`",
    )


def train(name: str, seed: int, output: Path, data: Path, steps: dict, workers: int, log) -> Path:
    """Stage 1 (alignment) then SFT with `python -m storm_transformers.training.sft` from `<run>/init`; returns the SFT
    output folder."""
    run = output / "runs" / f"{name}-seed{seed}"
    previous = run / "init"
    for stage in ("alignment", "sft"):
        out = run / stage
        command = [
            sys.executable, "-m", "storm_transformers.training.sft",
            "--config", str(Path(__file__).parent / "configs" / f"miniature_{stage}.yaml"),
            "--model_name_or_path", str(previous),
            "--dataset_name", str(data / "train.jsonl"),
            "--output_dir", str(out),
            "--max_steps", str(steps[stage]),
            "--seed", str(seed),
            "--dataloader_num_workers", str(workers),
        ]
        start = time.perf_counter()
        # Runs share the machine's cores: one intra-op thread each (the GPU does the math; the workers decode).
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with open(run / f"{stage}.log", "w") as stream:
            result = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, env=env)
        if result.returncode:
            raise RuntimeError(f"{name} seed {seed}: {stage} failed, see {run / f'{stage}.log'}")
        log(f"{name} seed {seed}: {stage} done in {time.perf_counter() - start:.0f} s")
        previous = out
    return previous


def evaluate(model_dir: Path, data: Path, split: str = "test", temporal_sample_rate: int = 1,
             batch_size: int = 50, device: str | None = None, limit: int | None = None) -> dict:
    """Greedy answers of the checkpoint in `model_dir` on `data/<split>.jsonl`; accuracy overall, on temporal and
    non-temporal questions and per question type (exact match of the lower-cased answer)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import storm_transformers  # noqa: F401

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with LOAD_LOCK:
        model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
        processor = AutoProcessor.from_pretrained(model_dir)
    model.config.temporal_sample_rate = processor.temporal_sample_rate = temporal_sample_rate
    rows = [json.loads(line) for line in (data / f"{split}.jsonl").read_text().splitlines()][:limit]
    correct: dict[str, list[bool]] = {}
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        conversations = [_with_absolute_paths(row["messages"][:1], data) for row in batch]
        inputs = processor.apply_chat_template(
            conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
            processor_kwargs={"num_frames": processor.video_processor.num_frames, "padding": True,
                              "padding_side": "left"},
        ).to(device)
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        answers = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        for row, answer in zip(batch, answers):
            expected = row["messages"][1]["content"][0]["text"]
            correct.setdefault(row["question_type"], []).append(answer.strip().lower() == expected)
    temporal = [hit for kind, hits in correct.items() if kind in TEMPORAL_TYPES for hit in hits]
    static = [hit for kind, hits in correct.items() if kind not in TEMPORAL_TYPES for hit in hits]
    return {
        "accuracy": _mean([hit for hits in correct.values() for hit in hits]),
        "temporal": _mean(temporal),
        "non-temporal": _mean(static),
        "by type": {kind: _mean(hits) for kind, hits in sorted(correct.items())},
        "visual tokens per video": model.config.num_video_tokens(processor.video_processor.num_frames),
        "questions": sum(len(hits) for hits in correct.values()),
    }


def _mean(values) -> float:
    return sum(values) / len(values) if values else math.nan


def _with_absolute_paths(messages: list[dict], root: Path) -> list[dict]:
    return [
        {**message, "content": [{**part, "path": str(root / part["path"])} if "path" in part else part
                                for part in message["content"]]}
        for message in messages
    ]


def latency(name: str, tokenizer_dir: Path, video: Path, temporal_sample_rate: int = 1, repeats: int = 5) -> float:
    """Median seconds of one prefill (time to first token) of configuration `name` on this machine, batch 1, for
    `video` at 8 frames, with test-time temporal sampling s = `temporal_sample_rate` (weights do not matter for
    speed: a random model of the same architecture)."""
    import tempfile

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import storm_transformers  # noqa: F401

    with tempfile.TemporaryDirectory() as tmp:
        folder = build_initial(Path(tmp) / name, tokenizer_dir, name, seed=0)
        model = AutoModelForImageTextToText.from_pretrained(folder).eval()
        processor = AutoProcessor.from_pretrained(folder)
    model.config.temporal_sample_rate = processor.temporal_sample_rate = temporal_sample_rate
    messages = [{"role": "user", "content": [{"type": "video", "path": str(video)}, {"type": "text", "text": "?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            model(**inputs, logits_to_keep=1)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def table(results: dict) -> str:
    """Markdown: one row per configuration (and sampling), mean ± spread over seeds."""
    types = list(CHANCE)
    header = ["config", "s", "visual tokens / video", "seeds", "all", "temporal", "non-temporal", *types]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, runs in results["evaluations"].items():
        name, s = key.rsplit("@s", 1)
        def cell(values):
            values = [v for v in values if not math.isnan(v)]
            if len(values) > 1:
                return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"
            return f"{100 * values[0]:.1f}" if values else "–"
        row = [name, s, str(runs[0]["visual tokens per video"]), str(len(runs)), cell([r["accuracy"] for r in runs]),
               cell([r["temporal"] for r in runs]), cell([r["non-temporal"] for r in runs])]
        row += [cell([r["by type"].get(kind, math.nan) for r in runs]) for kind in types]
        lines.append("| " + " | ".join(row) + " |")
    chance = ["chance", "", "", "", "", "", ""] + [f"{100 * CHANCE[kind]:.1f}" for kind in types]
    lines.append("| " + " | ".join(chance) + " |")
    return "\n".join(lines)


def export(run_dir: Path, results: dict, name: str, seed: int, output_dir: Path, command: str,
           example: tuple[str, str] = ("examples/square_turns_green.mp4", "What colour does the square turn into?")):
    """Copy a trained run into a self-contained checkpoint folder with a model card that states what it knows.

    The card's usage snippet loads `output_dir` as given (a path relative to the repository root for the shipped
    model) and asks `example` = (video, question)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import storm_transformers  # noqa: F401
    from storm_transformers.conversion.checkpoint import write_checkpoint
    from storm_transformers.model_cards import storm_model_card

    model = AutoModelForImageTextToText.from_pretrained(run_dir)
    processor = AutoProcessor.from_pretrained(run_dir)
    scores = next(r for r in results["evaluations"][f"{name}@s1"] if r["seed"] == seed)
    by_type = ", ".join(f"{kind} {100 * value:.0f}%" for kind, value in scores["by type"].items())
    learned = [kind for kind, value in scores["by type"].items() if value >= 0.9]
    guessing = [kind for kind, value in scores["by type"].items() if value < CHANCE[kind] + 0.1]
    settings = CONFIGS[name]
    encoder = (f"{settings['layers']} {'bidirectional' if settings['bidirectional'] else 'uni-directional'} Mamba "
               "layers" if settings["layers"] else "no temporal encoder")
    card = storm_model_card(
        model,
        processor,
        repo_id=str(output_dir),
        summary=(
            "A miniature STORM trained from scratch on synthetic video QA (`storm_transformers.training.synthetic`): "
            f"configuration `{name}` ({encoder}, temporal pooling k = {settings['k']}), seed {seed}. On the 600 "
            f"held-out test clips it answers {100 * scores['accuracy']:.0f}% of the questions ({100 * scores['temporal']:.0f}% "
            f"of those that need temporal order): {by_type}."
        ),
        provenance=(
            f"Trained with `{command}` (storm_transformers/training/miniature.py, about 9 minutes on one H100): a "
            "random STORM with the real Qwen2 tokenizer, stage 1 (alignment: projector and temporal encoder only, "
            f"{results['args']['alignment_steps']} steps) then SFT (everything, {results['args']['sft_steps']} "
            f"steps), batch 16, on {results['args']['train_size']} synthetic 8-frame 64×64 clips (data seed "
            f"{results['args']['data_seed']}). See docs/miniature.md for every configuration and seed."
        ),
        limits=(
            "It knows only its synthetic world: 8-frame clips of one or two coloured shapes (red, green, blue, "
            "yellow; circle, square, triangle) on a textured background, and six question forms (which way a shape "
            "moves, which appears first, how many times one appears, what colour one turns into, what colour or "
            f"shape it is). It answers {' and '.join(learned) or 'no'} questions reliably; on "
            f"{', '.join(guessing) or 'no'} questions it is no better than guessing (its small vision encoder, trained "
            "from scratch in minutes, did not learn shapes or positions). It has never seen a natural video or "
            "image and cannot hold a conversation: on anything else its answers are meaningless. Use it to try "
            "STORM end to end on a CPU."
        ),
        extra_tags=("synthetic-data",),
        example=example,
    )
    return write_checkpoint(output_dir, model, processor, card, overwrite=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train and evaluate the miniature STORMs (see the module docstring).")
    parser.add_argument("--output", default="runs/miniature")
    parser.add_argument("--tokenizer", default="assets/tokenizer", help="folder with ggml-vocab-qwen2.gguf or tokenizer.json")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--train-size", type=int, default=DATA_SIZES["train"])
    parser.add_argument("--test-size", type=int, default=DATA_SIZES["test"])
    parser.add_argument("--alignment-steps", type=int, default=100)
    parser.add_argument("--sft-steps", type=int, default=2500)
    parser.add_argument("--parallel", type=int, default=7, help="training runs at once (CPU-bound: about 2 cores each)")
    parser.add_argument("--export", nargs=3, metavar=("CONFIG", "SEED", "DIR"), help="write that run as a checkpoint")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from storm_transformers.conversion.assets import QWEN2_GGUF
    from storm_transformers.training.synthetic import generate_dataset

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", flush=True)

    tokenizer_dir = Path(args.tokenizer)
    if (tokenizer_dir / QWEN2_GGUF).exists():  # convert the GGUF once, not in every run
        converted = output / "qwen2-tokenizer"
        if not (converted / "tokenizer.json").exists():
            AutoTokenizer.from_pretrained(tokenizer_dir, gguf_file=QWEN2_GGUF).save_pretrained(converted)
        tokenizer_dir = converted
    data = output / "data"
    if not (data / "test.jsonl").exists():
        sizes = {**DATA_SIZES, "train": args.train_size, "test": args.test_size}
        generate_dataset(data, sizes, seed=args.data_seed, workers=os.cpu_count())
    log(f"data in {data}")
    steps = {"alignment": args.alignment_steps, "sft": args.sft_steps}
    workers = max(1, (os.cpu_count() or 2) // args.parallel)
    results = {"args": vars(args), "evaluations": {}, "failed": []}
    lock = threading.Lock()

    def job(name, seed):
        try:
            with LOAD_LOCK:
                build_initial(output / "runs" / f"{name}-seed{seed}" / "init", tokenizer_dir, name, seed)
            folder = train(name, seed, output, data, steps, workers, log)
        except RuntimeError as error:  # one failed run does not stop the others
            log(str(error))
            results["failed"].append(f"{name}-seed{seed}")
            return
        # (d): test-time sampling s = 2 wherever at least 2 pooled frames remain to sample from.
        pooled_frames = 8 // CONFIGS[name]["k"]
        for s in (1, 2) if name.startswith("bi-") and pooled_frames >= 2 else (1,):
            evaluation = evaluate(folder, data, temporal_sample_rate=s)
            with lock:
                results["evaluations"].setdefault(f"{name}@s{s}", []).append({"seed": seed, **evaluation})
                (output / "results.json").write_text(json.dumps(results, indent=1))
            log(f"{name} seed {seed} s={s}: accuracy {evaluation['accuracy']:.3f}, temporal {evaluation['temporal']:.3f}")
        if args.export and (args.export[0], int(args.export[1])) == (name, seed):
            arguments = sys.argv[1:] if argv is None else argv
            command = "python -m storm_transformers.training.miniature " + " ".join(arguments)
            with LOAD_LOCK:
                export(folder, results, name, seed, Path(args.export[2]), command)
            log(f"exported {name} seed {seed} to {args.export[2]}")

    jobs = [(name, seed) for seed in args.seeds for name in args.configs]
    with ThreadPoolExecutor(args.parallel) as pool:
        list(pool.map(lambda pair: job(*pair), jobs))
    (output / "results.json").write_text(json.dumps(results, indent=1))
    (output / "results.md").write_text(table(results) + "\n")
    print(table(results))
    log("done")


if __name__ == "__main__":
    main()
