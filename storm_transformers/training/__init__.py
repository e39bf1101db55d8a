"""Training recipes for STORM on TRL's `SFTTrainer` and PEFT LoRA (paper §4.1 stages).

- `.data`: conversation rows (JSONL or `datasets`) and `StormDataCollator` (decode, chat template, pad,
  assistant-only labels, unreadable media skipped and counted).
- `.modules`: what is trained (`set_trainable_modules`) and the LLM LoRA config (`storm_lora_config`,
  `check_lora_targets`).
- `.args`, `.sft`: the recipe (`python -m storm_transformers.training.sft`, `storm train`) with its YAML configs in
  `configs/` and accelerate configs in `accelerate/`.

Nothing heavy is imported here.
"""
