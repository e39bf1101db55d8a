"""`storm train`: the SFT recipe (`training/sft.py`) as a `storm` subcommand (registered by `storm_cli`).

    storm train --config training/configs/sft_lora.yaml --model_name_or_path DIR --dataset_name FILE.jsonl \
        [--flag value …]

Everything after `train` goes to the recipe's `TrlParser`; `storm train --help` lists the arguments.
"""

import argparse


def train_command(args) -> None:
    from .sft import main, parse_args

    main(*parse_args(args.args, prog="storm train"))


def register(commands) -> None:
    """Add `train` to the `storm` subcommands."""
    # prefix_chars="\0": no argument is an option here, so `--config`, `--help`, … all reach the recipe's parser.
    train = commands.add_parser(
        "train", help="fine-tune STORM (TRL SFT; YAML configs in training/configs)", add_help=False, prefix_chars="\0"
    )
    train.add_argument("args", nargs=argparse.REMAINDER)
    train.set_defaults(run=train_command)
