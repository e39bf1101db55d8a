"""Typed arguments of the STORM SFT recipe (`sft.py`), parsed together with TRL's `SFTConfig` from a YAML file and the
command line by `trl.TrlParser`. Names follow TRL's `ScriptArguments` / `ModelConfig` where they exist.
"""

from dataclasses import dataclass, field
from pathlib import Path

from storm_transformers.configuration_storm import check_count

from .modules import LLM_LORA_TARGETS, TRAINABLE_MODULES, check_trainable_modules


@dataclass
class StormDataArguments:
    """
    Training data of the recipe.

    Parameters:
        dataset_name (`str`):
            A JSONL file of conversations (`{"messages": [...]}` per line), or a dataset name or folder that
            `datasets.load_dataset` reads, with a `messages` column.
        dataset_config (`str`, *optional*):
            Configuration name passed to `datasets.load_dataset`.
        dataset_train_split (`str`, *optional*, defaults to `"train"`):
            Split to train on (`datasets.load_dataset` datasets only).
        data_root (`str`, *optional*):
            Folder that relative video/image paths start from. Defaults to the JSONL file's folder, or the working
            directory for other datasets.
        num_frames (`int`, *optional*, defaults to 32):
            Frames T sampled uniformly from every video (paper: 32 for SFT, 128 for long-video fine-tuning). A multiple
            of `temporal_pool_size`.
        strict (`bool`, *optional*, defaults to `False`):
            Stop at the first missing or unreadable video/image instead of skipping the row with a warning.

    Raises:
        ValueError, TypeError: an empty `dataset_name`, `num_frames` that is not an integer >= 1.
        FileNotFoundError: a `data_root` that is not a folder.
    """

    dataset_name: str = field(
        metadata={"help": "JSONL file of conversations, or a dataset for datasets.load_dataset."}
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "Configuration name for datasets.load_dataset."}
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    data_root: str | None = field(
        default=None,
        metadata={"help": "Folder that relative media paths start from (default: the JSONL file's folder)."},
    )
    num_frames: int = field(
        default=32, metadata={"help": "Frames sampled uniformly per video; a multiple of temporal_pool_size."}
    )
    strict: bool = field(
        default=False, metadata={"help": "Stop at the first unreadable video/image instead of skipping the row."}
    )

    def __post_init__(self):
        if not isinstance(self.dataset_name, str) or not self.dataset_name.strip():
            raise ValueError(f"dataset_name={self.dataset_name!r}: give a JSONL file or a datasets dataset name.")
        check_count("num_frames", self.num_frames, fix="Frames sampled per video, a multiple of temporal_pool_size.")
        if self.data_root is not None and not Path(self.data_root).is_dir():
            raise FileNotFoundError(f"data_root={self.data_root!r} is not a folder.")


@dataclass
class StormModelArguments:
    """
    Starting checkpoint, what is trained, and the video compression settings.

    Parameters:
        model_name_or_path (`str`):
            STORM checkpoint folder (e.g. from `storm convert compose` for stage 1, or a previous stage's output).
        dtype (`str`, *optional*, defaults to `"float32"`):
            Dtype the weights are loaded in (`"auto"` keeps the checkpoint's). `"float32"` keeps fp32 master weights
            while `SFTConfig.bf16` runs the compute in bf16 autocast: use it for full training. `"bfloat16"` halves
            the memory of frozen weights: use it with LoRA, whose adapters PEFT keeps in float32.
        attn_implementation (`str`, *optional*):
            Attention of the LLM and vision tower (`"sdpa"`, `"flash_attention_2"`, …); default: transformers'.
        trainable_modules (`list[str]`, *optional*):
            Components trained in full, from `vision_tower`, `multi_modal_projector`, `temporal_encoder`,
            `language_model`; all others are frozen. Default: all four, or `multi_modal_projector` and
            `temporal_encoder` with `use_peft` (saved with the adapter). Stage 1 (alignment):
            `multi_modal_projector temporal_encoder`.
        temporal_pool_size (`int`, *optional*):
            k of temporal average pooling (paper Eq. 6-7), in training and in the saved config. Default: the
            checkpoint's.
        spatial_pool_size (`int`, *optional*):
            p of spatial average pooling (p×p tokens). Default: the checkpoint's.
        temporal_sample_rate (`int`, *optional*):
            s of test-time temporal sampling (paper Eq. 8) written into the saved config and processor. Training never
            samples. Default: the checkpoint's.
        use_peft (`bool`, *optional*, defaults to `False`):
            Train LoRA adapters (PEFT) instead of the full LLM.
        lora_r (`int`, *optional*, defaults to 16):
            LoRA rank.
        lora_alpha (`int`, *optional*, defaults to 32):
            LoRA alpha (scaling alpha / r).
        lora_dropout (`float`, *optional*, defaults to 0.05):
            LoRA dropout.
        lora_target_modules (`list[str]`, *optional*):
            LoRA targets. One value is a regex that must match whole module names; several values match names or
            their endings (PEFT's rules). Default: the LLM's attention and MLP projections (`LLM_LORA_TARGETS`). A
            target that matches nothing is an error.

    Raises:
        ValueError, TypeError: a pooling/sampling size or `lora_r` / `lora_alpha` that is not an integer >= 1,
        `lora_dropout` outside [0, 1), unknown or repeated `trainable_modules`.
    """

    model_name_or_path: str = field(metadata={"help": "STORM checkpoint folder to start from."})
    dtype: str = field(
        default="float32",
        metadata={
            "help": "Dtype the weights are loaded in: float32 (fp32 master weights, bf16 autocast) for full "
            "training, bfloat16 for LoRA, auto = the checkpoint's.",
            "choices": ["auto", "bfloat16", "float16", "float32"],
        },
    )
    attn_implementation: str | None = field(default=None, metadata={"help": "sdpa, flash_attention_2, eager, …"})
    trainable_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": f"Components trained in full, from {list(TRAINABLE_MODULES)}; the rest is frozen. Default: all, "
            "or multi_modal_projector temporal_encoder with use_peft."
        },
    )
    temporal_pool_size: int | None = field(
        default=None, metadata={"help": "k of temporal pooling (default: checkpoint's)."}
    )
    spatial_pool_size: int | None = field(
        default=None, metadata={"help": "p of spatial pooling (default: checkpoint's)."}
    )
    temporal_sample_rate: int | None = field(
        default=None,
        metadata={"help": "s of test-time temporal sampling saved for inference (default: checkpoint's)."},
    )
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters on the LLM instead of the full LLM."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "LoRA targets: one regex (full match) or several names/suffixes. Default: LLM projections."},
    )

    def __post_init__(self):
        for name in ("temporal_pool_size", "spatial_pool_size", "temporal_sample_rate"):
            if getattr(self, name) is not None:
                check_count(name, getattr(self, name), fix="1 = off; leave it unset to keep the checkpoint's.")
        check_count("lora_r", self.lora_r, fix="The LoRA rank, e.g. 16.")
        check_count("lora_alpha", self.lora_alpha, fix="The LoRA scale is alpha / r, e.g. 32.")
        dropout = self.lora_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"lora_dropout={dropout!r} must be a probability in [0, 1), e.g. 0.05.")
        if self.trainable_modules is None:
            self.trainable_modules = (
                ["multi_modal_projector", "temporal_encoder"] if self.use_peft else list(TRAINABLE_MODULES)
            )
        check_trainable_modules(self.trainable_modules, use_peft=self.use_peft)
        if self.lora_target_modules is None:
            self.lora_target_modules = LLM_LORA_TARGETS
        elif isinstance(self.lora_target_modules, list) and len(self.lora_target_modules) == 1:
            self.lora_target_modules = self.lora_target_modules[0]  # as TRL's ModelConfig: one value is a regex


def storm_sft_config(training_args):
    """Set the `SFTConfig` fields that STORM's collator needs (hf-conventions §7.1) and return `training_args`:
    `remove_unused_columns=False` (the collator reads `messages`), `dataset_kwargs={"skip_prepare_dataset": True}`
    (TRL must not tokenize the rows) and `max_length=None` (nothing is truncated; a video cut short would break the
    placeholder count).

    Raises:
        ValueError: `packing=True` or `padding_free=True`, which STORM's video batches do not support.
    """
    if training_args.packing or training_args.padding_free:
        raise ValueError("packing and padding_free are not supported for video batches; set both to false.")
    training_args.remove_unused_columns = False
    training_args.dataset_kwargs = {**(training_args.dataset_kwargs or {}), "skip_prepare_dataset": True}
    training_args.max_length = None
    return training_args


__all__ = ["StormDataArguments", "StormModelArguments", "storm_sft_config"]
