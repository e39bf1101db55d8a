"""The run functions of the `storm` subcommands that build checkpoints (their flags are declared in `storm_cli`, which
imports this module only when one of them runs; each imports its own module).

storm fetch-assets [--output assets] [--with-llm]
storm build-tiny-random [--output DIR] [--tokenizer DIR] [--overwrite]
storm convert compose --vision DIR --llm DIR --output DIR [--num-frames N] [--temporal-pool-size K] [--dtype D]
                      [--overwrite] [--push-to-hub REPO]
storm convert vila --input DIR --discard-mm-projector --output DIR [same options]
storm convert gguf --input FILE.gguf --output DIR [--overwrite]
"""


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
        overwrite=args.overwrite,
        push_to_hub_repo=args.push_to_hub,
    )
