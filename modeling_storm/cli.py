"""The `storm` command.

    storm generate --video FILE --prompt TEXT [--model DIR] [--num-frames N | --fps F] [--max-new-tokens M]
                   (default model: the miniature STORM trained on synthetic clips, checkpoints/storm-tiny-synthetic)
    storm stream --model DIR --video FILE --questions Q.jsonl [--speed X] [--fps F]      (streaming.py)
    storm fetch-assets [--output assets] [--with-llm]          (conversion/cli.py)
    storm build-tiny-random [--output assets/storm-tiny-random]
    storm train --config training/configs/sft_lora.yaml [--flag value …]      (training/cli.py)

Each package adds its subcommands with a `register(subparsers)` function; `main` only parses and dispatches.
"""

import argparse
import sys
import time
from pathlib import Path

import conversion.cli
import training.cli

from . import streaming

# The miniature STORM that ships in the repository (docs/miniature.md); found from an editable install or a clone.
DEFAULT_MODEL = str(Path(__file__).resolve().parents[1] / "checkpoints" / "storm-tiny-synthetic")


def generate(args) -> str:
    """Answer `args.prompt` about `args.video` with the checkpoint in `args.model`, printing what went in."""
    import torch
    from huggingface_hub import ModelCard
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import processing_storm  # noqa: F401  (registers the processors; imports modeling_storm too)

    model_dir = Path(args.model)
    if not (model_dir / "config.json").exists():
        hint = (
            " The default checkpoint ships in the repository's checkpoints/ folder: install from a clone "
            "(`pip install -e .`) or pass --model."
            if args.model == DEFAULT_MODEL
            else ""
        )
        raise SystemExit(f"No STORM checkpoint in {model_dir} (no config.json).{hint}")
    card = model_dir / "README.md"
    if card.exists() and "random-weights" in (ModelCard.load(card).data.tags or []):
        print(f"NOTE: {model_dir} has random (untrained) weights: the answer below is noise, not understanding.")

    start = time.perf_counter()
    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=args.dtype).to(args.device).eval()
    if args.temporal_sample_rate is not None:
        model.config.temporal_sample_rate = processor.temporal_sample_rate = args.temporal_sample_rate
    loaded = time.perf_counter()

    messages = [{"role": "user", "content": [{"type": "video", "path": args.video}, {"type": "text", "text": args.prompt}]}]
    sampling = {"fps": args.fps} if args.fps is not None else {"num_frames": args.num_frames or processor.video_processor.num_frames}
    inputs = processor.apply_chat_template(
        messages,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={**sampling, "return_metadata": True},
    )
    metadata = inputs.pop("video_metadata")[0]
    inputs = inputs.to(model.device)
    prepared = time.perf_counter()

    # On a GPU, a static KV cache, with which transformers compiles the decode step (CUDA graphs): ~5x the tokens/s,
    # after a compilation on the first call (docs/benchmarks.md). Not in the generation config: transformers then
    # refuses a cache passed in by the caller (StormStreamingSession passes one).
    fast_decoding = {"cache_implementation": "static"} if model.device.type == "cuda" else {}
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, **fast_decoding)
    done = time.perf_counter()

    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    answer = processor.decode(new_tokens, skip_special_tokens=True).strip()
    frames = len(metadata.frames_indices)
    times = metadata.timestamps
    visual = int((inputs["input_ids"] == model.config.video_token_id).sum())
    config = model.config
    print(f"video: {args.video} ({metadata.width}×{metadata.height}, {metadata.total_num_frames} frames, {metadata.fps:.2f} fps)")
    print(f"frames decoded: {frames}, at {times[0]:.2f} … {times[-1]:.2f} s")
    print(
        f"visual tokens sent to the LLM: {visual} (k={config.temporal_pool_size} temporal pooling, "
        f"p={config.spatial_pool_size} spatial pooling, s={config.temporal_sample_rate} temporal sampling); "
        f"prompt {inputs['input_ids'].shape[1]} tokens"
    )
    print(
        f"time: load {loaded - start:.2f} s, decode + preprocess {prepared - loaded:.2f} s, "
        f"generate {done - prepared:.2f} s ({len(new_tokens)} new tokens), total {done - start:.2f} s"
    )
    print(f"answer: {answer}")
    return answer


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="storm", description="STORM video LLM for transformers.")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="answer a question about a video")
    gen.add_argument("--model", default=DEFAULT_MODEL, help=f"checkpoint folder (default: {DEFAULT_MODEL})")
    gen.add_argument("--video", required=True, help="path, http(s) URL of a video file")
    gen.add_argument("--prompt", required=True)
    frames = gen.add_mutually_exclusive_group()
    frames.add_argument("--num-frames", type=int, help="frames sampled uniformly (default: the processor's)")
    frames.add_argument("--fps", type=float, help="sample this many frames per second instead")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temporal-sample-rate", type=int, help="test-time temporal sampling s (model and processor)")
    gen.add_argument("--device", default="cuda" if _cuda() else "cpu")
    gen.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, …")
    gen.set_defaults(run=generate)
    conversion.cli.register(commands)
    training.cli.register(commands)
    streaming.register(commands)
    return parser


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as error:
        print(f"storm {args.command}: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
