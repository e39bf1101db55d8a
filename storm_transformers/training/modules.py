"""What a STORM training run trains: whole components (paper §4.1 stages) and LoRA adapters on the LLM (PEFT).

Components, by their attribute names in `StormForConditionalGeneration`:

| name | modules | paper |
|---|---|---|
| `vision_tower` | `model.vision_tower` (SigLIP) | image encoder |
| `multi_modal_projector` | `model.multi_modal_projector` (2×2 downsample + Linear) | temporal projector, part 1 |
| `temporal_encoder` | `model.temporal_encoder` (Mamba layers) | temporal projector, part 2 |
| `language_model` | `model.language_model` and `lm_head` | LLM |

Stage 1 (alignment) trains the projector and the temporal encoder; stage 2 (SFT) and 3 (long video) train all four, or
LoRA adapters on the LLM plus the projector and temporal encoder in full.
"""

import re

import torch

TRAINABLE_MODULES = ("vision_tower", "multi_modal_projector", "temporal_encoder", "language_model")
ALIGNMENT_MODULES = ("multi_modal_projector", "temporal_encoder")
# PEFT full-matches a string target against module names such as `model.language_model.layers.0.self_attn.q_proj`.
# Anchored on the LLM: SigLIP also has q/k/v_proj (and out_proj, fc1/fc2), Mamba has in/x/dt/out_proj.
LLM_LORA_TARGETS = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


def check_trainable_modules(names, use_peft: bool = False) -> tuple[str, ...]:
    """Validate a list of component names (see the module docstring) and return it as a tuple.

    Raises:
        ValueError: an unknown or repeated name; `language_model` together with `use_peft` (the LLM then learns
        through its LoRA adapters, not in full).
    """
    names = tuple(names)
    unknown = [name for name in names if name not in TRAINABLE_MODULES]
    if unknown or len(set(names)) != len(names):
        raise ValueError(
            f"trainable_modules={list(names)} must list distinct names from {list(TRAINABLE_MODULES)}"
            + (f"; unknown: {unknown}." if unknown else ".")
        )
    if use_peft and "language_model" in names:
        raise ValueError(
            "trainable_modules contains 'language_model' and use_peft is set: with LoRA the LLM learns through its "
            "adapters. Remove 'language_model' (the other modules are trained in full and saved with the adapter) "
            "or drop use_peft for full fine-tuning."
        )
    return names


def components(model) -> dict[str, list[torch.nn.Module]]:
    """The modules of each trainable component of a `StormForConditionalGeneration`."""
    inner = model.model
    return {
        "vision_tower": [inner.vision_tower],
        "multi_modal_projector": [inner.multi_modal_projector],
        "temporal_encoder": [inner.temporal_encoder],
        "language_model": [inner.language_model, model.lm_head],
    }


def set_trainable_modules(model, trainable_modules) -> dict[str, int]:
    """Freeze `model` except the components in `trainable_modules` (`requires_grad`; frozen weights get no gradient
    and no optimizer state, so they stay bit-identical).

    Args:
        model (`StormForConditionalGeneration`)
        trainable_modules (`list[str]`): names from `TRAINABLE_MODULES`.

    Returns:
        `dict[str, int]`: trainable parameters per component (0 for frozen ones).

    Raises:
        ValueError: see `check_trainable_modules`.
    """
    names = check_trainable_modules(trainable_modules)
    model.requires_grad_(False)
    counts = {}
    for name, modules in components(model).items():
        for module in modules:
            module.requires_grad_(name in names)
        unique = {id(p): p for module in modules for p in module.parameters() if p.requires_grad}
        counts[name] = sum(p.numel() for p in unique.values())
    return counts


def storm_lora_config(
    trainable_modules=ALIGNMENT_MODULES,
    r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.05,
    target_modules: str | list[str] = LLM_LORA_TARGETS,
):
    """PEFT `LoraConfig` for STORM: LoRA adapters on `target_modules` (default: the LLM's attention and MLP
    projections, `LLM_LORA_TARGETS`), and the `trainable_modules` trained in full and saved with the adapter
    (`modules_to_save`).

    `target_modules` follows PEFT: a string is a regex that must match a whole module name; a list matches names
    exactly or by their ending (`"q_proj"` also hits SigLIP's). Check it against the model with `check_lora_targets`.

    Raises:
        ValueError: see `check_trainable_modules`.
    """
    from peft import LoraConfig

    names = check_trainable_modules(trainable_modules, use_peft=True)
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=target_modules,
        modules_to_save=list(names) or None,
        bias="none",
        task_type="CAUSAL_LM",
    )


def check_lora_targets(model, config) -> dict[str, int]:
    """Check that every LoRA target of `config` matches modules of `model` (PEFT's own check only fails when all of
    them match nothing, and silently drops a list entry that matches nothing).

    Returns:
        `dict[str, int]`: number of targeted modules per component (`lm_head` counted under its own name).

    Raises:
        ValueError: a target (the regex, or one list entry) that matches no module; the message shows example names.
    """
    from peft.tuners.tuners_utils import check_target_module_exists

    names = [name for name, _ in model.named_modules() if name]
    targets = [config.target_modules] if isinstance(config.target_modules, str) else sorted(config.target_modules)
    for target in targets:
        probe = type(config)(target_modules=target if isinstance(config.target_modules, str) else [target])
        if not any(check_target_module_exists(probe, name) for name in names):
            examples = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)][-3:]
            raise ValueError(
                f"LoRA target {target!r} matches no module of the model. A single string is a regex that must match "
                f"the whole module name (e.g. {LLM_LORA_TARGETS!r} for the LLM's projections); list entries match a "
                f"name or its ending. Linear layers are named like {examples}."
            )
    counts: dict[str, int] = {}
    for name in names:
        if check_target_module_exists(config, name):
            component = re.sub(r"^model\.", "", name).split(".")[0]
            counts[component] = counts.get(component, 0) + 1
    return counts


__all__ = [
    "ALIGNMENT_MODULES",
    "LLM_LORA_TARGETS",
    "TRAINABLE_MODULES",
    "check_lora_targets",
    "check_trainable_modules",
    "components",
    "set_trainable_modules",
    "storm_lora_config",
]
