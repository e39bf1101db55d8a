"""Training recipes for STORM (TRL SFT, PEFT LoRA)."""
