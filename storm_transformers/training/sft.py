"""STORM supervised fine-tuning on TRL's `SFTTrainer`: the paper's three stages (§4.1) and LoRA, from one script.

Arguments: `StormDataArguments`, `StormModelArguments` (`args.py`) and TRL's `SFTConfig`, from a YAML file (`--config`)
and/or the command line (the command line wins). Run as `storm train ...`, `python -m storm_transformers.training.sft
...` or, on several GPUs, `accelerate launch --config_file storm_transformers/training/accelerate/fsdp.yaml -m
storm_transformers.training.sft ...`.

# Stage 1, alignment: vision tower and LLM frozen; downsample + Linear and the temporal encoder trained
```bash
storm train --config storm_transformers/training/configs/alignment.yaml \
    --model_name_or_path storm-init --dataset_name data/alignment.jsonl --output_dir runs/alignment
```

# Stage 2, SFT: everything trained, 32 frames, temporal pooling k = 4 (8 GPUs, FSDP)
```bash
accelerate launch --config_file storm_transformers/training/accelerate/fsdp.yaml --num_processes 8 \
    -m storm_transformers.training.sft --config storm_transformers/training/configs/sft.yaml \
    --model_name_or_path runs/alignment --dataset_name data/sft.jsonl --output_dir runs/sft
```

# Stage 3, long video: 128 frames, k = 4
```bash
accelerate launch --config_file storm_transformers/training/accelerate/fsdp.yaml --num_processes 8 \
    -m storm_transformers.training.sft --config storm_transformers/training/configs/long_video.yaml \
    --model_name_or_path runs/sft --dataset_name data/long_video.jsonl --output_dir runs/long_video
```

# LoRA on your own videos (one GPU)
```bash
storm train --config storm_transformers/training/configs/sft_lora.yaml \
    --model_name_or_path runs/long_video --dataset_name my_videos/train.jsonl --output_dir runs/my_lora
```

Resume an interrupted run with `--resume_from_checkpoint runs/sft/checkpoint-500`. The output folder holds the model
(or the LoRA adapter), the processor, the generation config and a model card.
"""

import logging
import sys
from contextlib import contextmanager
from pathlib import Path

from .args import StormDataArguments, StormModelArguments, storm_sft_config

POOLING_FIELDS = ("temporal_pool_size", "spatial_pool_size", "temporal_sample_rate")
logger = logging.getLogger(__name__)


def main(data_args: StormDataArguments, model_args: StormModelArguments, training_args):
    """Train as the arguments say; save the final model (or adapter), processor and card; return the trainer."""
    import torch
    from trl import SFTTrainer

    from .data import StormDataCollator
    from .modules import check_lora_targets, set_trainable_modules, storm_lora_config

    training_args = storm_sft_config(training_args)
    dataset, data_root = load_training_data(data_args)  # bad rows stop the run before the model loads
    model, processor = load_model_and_processor(model_args, data_args.num_frames)
    collator = StormDataCollator(processor, data_args.num_frames, data_root=data_root, strict=data_args.strict)
    peft_config = None
    if model_args.use_peft:
        peft_config = storm_lora_config(
            model_args.trainable_modules,
            r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            lora_dropout=model_args.lora_dropout,
            target_modules=model_args.lora_target_modules,
        )
        check_lora_targets(model, peft_config)
    else:
        set_trainable_modules(model, model_args.trainable_modules)

    with hub_errors_in_one_line(training_args, "before training"):  # push_to_hub: the repository is created here
        trainer = SFTTrainer(
            model=model,
            args=training_args,
            data_collator=collator,
            train_dataset=dataset,
            processing_class=processor,
            peft_config=peft_config,
        )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    generation = trainer.model.generation_config
    if isinstance(generation.eos_token_id, list):  # transformers < 5.24 adds the tokenizer's EOS again on alignment
        generation.eos_token_id = list(dict.fromkeys(generation.eos_token_id))
    with hub_errors_in_one_line(training_args, f"after training; the model is saved in {training_args.output_dir}"):
        trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        card = training_model_card(trainer.model, processor, data_args, model_args, training_args, len(dataset))
        card.save(Path(training_args.output_dir) / "README.md")
    skipped = torch.tensor(collator.num_skipped, device=trainer.accelerator.device)
    skipped = int(trainer.accelerator.reduce(skipped, reduction="sum"))  # over all processes
    trainer.accelerator.print(f"Saved {training_args.output_dir}. Rows skipped for unreadable media: {skipped}.")
    return trainer


@contextmanager
def hub_errors_in_one_line(training_args, when: str):
    """With `push_to_hub`, turn a network or Hub error (no connection, not logged in, no access) into one
    `RuntimeError` line that says `when` it happened; any other error passes unchanged."""
    try:
        yield
    except Exception as error:
        hub_error = type(error).__module__.split(".")[0].startswith(("httpx", "httpcore", "huggingface_hub", "requests"))
        if not training_args.push_to_hub or not hub_error:
            raise
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        repo = training_args.hub_model_id or Path(training_args.output_dir).name
        raise RuntimeError(
            f"Could not reach the Hub repository {repo} {when} ({type(error).__name__}: {reason}). Check the "
            "connection and `hf auth login`, or train without --push_to_hub and upload later with `hf upload`."
        ) from None


def load_model_and_processor(model_args: StormModelArguments, num_frames: int):
    """The STORM model and processor of `model_args.model_name_or_path`, with the pooling/sampling overrides applied to
    both and `num_frames` as the processor's default frame count (saved with the final model).

    Raises:
        FileNotFoundError, ValueError, TypeError: a folder `storm_transformers.loading.check_checkpoint` refuses (an
        adapter, another model, pickle or truncated weights, no processor files, …). ValueError: `num_frames` is
        not a multiple of k, p does not divide the token grid, or the checkpoint's processor and config disagree on
        k, p or s.
    """
    import torch
    from transformers import AutoConfig

    from storm_transformers import get_num_visual_tokens
    from storm_transformers.loading import check_checkpoint, load_storm

    path = check_checkpoint(model_args.model_name_or_path)
    stored = AutoConfig.from_pretrained(path).dtype
    if model_args.dtype == "float32" and stored in (torch.bfloat16, torch.float16, "bfloat16", "float16"):
        logger.warning(
            f"Loading the {stored} weights of {path} as float32 (fp32 master weights, bf16 compute with "
            "SFTConfig.bf16): twice the memory of the checkpoint. Pass --dtype bfloat16 to keep them in bfloat16 "
            "(e.g. for LoRA)."
        )
    model, processor = load_storm(path, dtype=model_args.dtype, attn_implementation=model_args.attn_implementation)
    for name in POOLING_FIELDS:
        value = getattr(model_args, name)
        if value is not None:
            setattr(model.config, name, value)
            setattr(processor, name, value)
        if getattr(processor, name) != getattr(model.config, name):
            raise ValueError(
                f"{path}: the processor has {name}={getattr(processor, name)} but the model config "
                f"{getattr(model.config, name)}. Pass --{name} to set both."
            )
    config = model.config
    get_num_visual_tokens(  # validates num_frames against k and p against the grid
        num_frames,
        grid_size=config.token_grid_size,
        temporal_pool_size=config.temporal_pool_size,
        spatial_pool_size=config.spatial_pool_size,
    )
    processor.video_processor.num_frames = num_frames
    return model, processor


def load_training_data(data_args: StormDataArguments):
    """`(dataset, data_root)`: a `.jsonl` file through `load_conversations` (data root: its folder), anything else
    through `datasets.load_dataset`, every row checked with `check_conversation` up front.

    Raises:
        ValueError: a `.json` file (JSONL is expected), a row that fails `check_conversation` (with its line or index),
        or a dataset without `messages`.
    """
    from datasets import load_dataset

    from .data import check_conversation, load_conversations

    name = data_args.dataset_name
    if name.endswith(".json"):
        raise ValueError(f"{name}: pass the conversations as JSONL, one {{'messages': [...]}} object per line.")
    if name.endswith(".jsonl"):
        root = data_args.data_root if data_args.data_root is not None else Path(name).parent
        return load_conversations(name), root
    dataset = load_dataset(name, data_args.dataset_config, split=data_args.dataset_train_split)
    if "messages" not in dataset.column_names:
        raise ValueError(f"{name} has no 'messages' column (columns: {dataset.column_names}).")
    for index, messages in enumerate(dataset["messages"]):
        try:
            check_conversation(messages)
        except ValueError as error:
            raise ValueError(f"{name}, row {index}: {error}") from None
    return dataset, data_args.data_root


def training_model_card(model, processor, data_args, model_args, training_args, num_rows: int):
    """The STORM model card of a training run (`model_cards.storm_model_card`): what was trained on what, from which
    checkpoint, with which frames/pooling and hyper-parameters."""
    from storm_transformers.model_cards import storm_model_card

    from .modules import TRAINABLE_MODULES

    adapter = hasattr(model, "get_base_model")
    base = model.get_base_model() if adapter else model
    start = model_args.model_name_or_path
    trained = ", ".join(model_args.trainable_modules) or "nothing"
    frozen = ", ".join(name for name in TRAINABLE_MODULES if name not in model_args.trainable_modules) or "nothing"
    if adapter:
        lora = f"LoRA (r={model_args.lora_r}, alpha={model_args.lora_alpha}) on `{model_args.lora_target_modules}`"
        what = f"{lora}; trained in full and saved with the adapter: {trained}"
    else:
        what = f"trained: {trained}; frozen: {frozen}"
    config = base.config
    provenance = (
        f"Fine-tuned from `{start}` with storm-transformers' TRL SFT recipe (`storm_transformers.training.sft`): "
        f"{what}. "
        f"Data: `{data_args.dataset_name}` ({num_rows} rows), {data_args.num_frames} frames per video, temporal "
        f"pooling k={config.temporal_pool_size}, spatial pooling p={config.spatial_pool_size}; loss on assistant "
        f"tokens only. {training_args.num_train_epochs} epochs (max_steps={training_args.max_steps}), learning rate "
        f"{training_args.learning_rate}, per-device batch {training_args.per_device_train_batch_size} × gradient "
        f"accumulation {training_args.gradient_accumulation_steps}, seed {training_args.seed}."
    )
    if adapter:
        provenance += (
            " Load with `PeftModel.from_pretrained(base_model, this_folder)`; `merge_and_unload()` gives a plain "
            "`StormForConditionalGeneration`."
        )
    is_hub_id = not Path(start).exists() and start.count("/") == 1
    card = storm_model_card(
        base,
        processor,
        repo_id=Path(training_args.output_dir).name,
        summary=f"STORM fine-tuned on `{data_args.dataset_name}`" + (" (LoRA adapter)." if adapter else "."),
        provenance=provenance,
        limits="Quality depends on the training data and steps above; evaluate on your task before use.",
        base_model=[start] if is_hub_id else None,
        base_model_relation=("adapter" if adapter else "finetune") if is_hub_id else None,
    )
    if adapter:
        card.data.library_name = "peft"
    return card


def make_parser(prog: str | None = None):
    """`TrlParser` over `StormDataArguments`, `StormModelArguments` and `SFTConfig` (YAML via `--config`)."""
    from trl import SFTConfig, TrlParser

    return TrlParser((StormDataArguments, StormModelArguments, SFTConfig), prog=prog)


def parse_args(args: list[str] | None = None, prog: str | None = None):
    """The recipe's `(data_args, model_args, training_args)` from `args` (default: `sys.argv[1:]`) and `--config`.

    On a machine without an accelerator (no CUDA, MPS, XPU, … device), `--use_cpu true --bf16 false` are put first,
    so that training runs on the CPU in float32 without the user knowing about `use_cpu` (transformers refuses the
    configs' `bf16: true` there otherwise); a one-line notice says so. Flags given on the command line still win.
    """
    args = list(sys.argv[1:] if args is None else args)
    if not _accelerator_available() and not {"-h", "--help"} & set(args):
        print("No GPU or other accelerator found: training on the CPU in float32 (use_cpu=True, bf16=False).")
        args = ["--use_cpu", "true", "--bf16", "false", *args]
    return make_parser(prog).parse_args_and_config(args)


def _accelerator_available() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


if __name__ == "__main__":
    main(*parse_args())
