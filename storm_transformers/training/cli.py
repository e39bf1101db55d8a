"""`storm train`: the SFT recipe (`sft.py`) as a `storm` subcommand (declared in `storm_cli`, which imports this
module only when the command runs).

    storm train --config storm_transformers/training/configs/sft_lora.yaml --model_name_or_path DIR \
        --dataset_name FILE.jsonl [--flag value …]

Everything after `train` goes to the recipe's `TrlParser`; `storm train --help` lists the arguments.
"""


def train_command(args) -> None:
    from .sft import main, parse_args

    main(*parse_args(args.args, prog="storm train"))
