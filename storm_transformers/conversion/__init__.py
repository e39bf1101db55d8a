"""Building STORM checkpoints: fetch assets, the tiny random default, composing from a SigLIP + an LLM, VILA layout."""
