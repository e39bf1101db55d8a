"""Training recipes for STORM on TRL's `SFTTrainer` and PEFT LoRA (paper §4.1 stages).

- `training.data`: conversation rows (JSONL or `datasets`) and `StormDataCollator` (decode, chat template, pad,
  assistant-only labels, unreadable media skipped and counted).
- `training.modules`: what is trained (`set_trainable_modules`) and the LLM LoRA config (`storm_lora_config`,
  `check_lora_targets`).
- `training.args`, `training.sft`: the recipe (`python -m training.sft`, `storm train`) with its YAML configs in
  `training/configs/` and accelerate configs in `training/accelerate/`.

Nothing heavy is imported here.
"""
