"""Training recipes for STORM on TRL's `SFTTrainer` and PEFT LoRA (paper §4.1 stages).

- `storm_transformers.training.data`: conversation rows (JSONL or `datasets`) and `StormDataCollator` (decode, chat template, pad,
  assistant-only labels, unreadable media skipped and counted).
- `storm_transformers.training.modules`: what is trained (`set_trainable_modules`) and the LLM LoRA config (`storm_lora_config`,
  `check_lora_targets`).
- `storm_transformers.training.args`, `storm_transformers.training.sft`: the recipe (`python -m storm_transformers.training.sft`, `storm train`) with its YAML configs in
  `storm_transformers/training/configs/` and accelerate configs in `storm_transformers/training/accelerate/`.

Nothing heavy is imported here.
"""
