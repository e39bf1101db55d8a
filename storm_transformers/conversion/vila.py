"""Convert a checkpoint in VILA's layout (NVlabs/VILA, the codebase STORM was built on) into STORM's native layout.

VILA (`llava/model/llava_arch.py`, `save_pretrained`) saves a model as four parts:

    config.json     LlavaConfig: llm_cfg, vision_tower_cfg, mm_projector_cfg, mm_vision_select_layer, ...
    llm/            the LLM (e.g. Qwen2ForCausalLM) with its tokenizer and chat template
    vision_tower/   a SiglipVisionModel (keys `vision_model.*`) and its image processor
    mm_projector/   the projector: config.json (`mm_projector_type`) and `layers.{i}.*` weights

Every weight key, and where it goes:

| VILA key | STORM key |
|---|---|
| `llm/model.*` | `model.language_model.*`, copied exactly (embedding rows grow for the placeholders) |
| `llm/lm_head.weight` | `lm_head.weight`, copied exactly |
| `vision_tower/vision_model.{embeddings,encoder,post_layernorm}.*` | `model.vision_tower.*`, copied exactly (transformers ≥ 5 has no `vision_model.` level) |
| `vision_tower/vision_model.head.*` | not used: SigLIP's attention-pooling head (STORM reads `hidden_states[vision_feature_layer]`) |
| `mm_projector/layers.*` | not converted (below); allowed only with `discard_mm_projector=True` (`--discard-mm-projector`) |
| — | `model.multi_modal_projector.linear.*`, `model.temporal_encoder.*`: new, random (paper §4.1) |

Any other key in the three folders, or a missing one, is an error that lists it. The LLM and the vision tower are read
with transformers (`.sources`) and mapped by `.compose` (`LLM_KEY_MAPPING`, `VISION_KEY_MAPPING`); the projector's
keys are read here (`VILA_PROJECTOR_KEYS`).

What cannot map: VILA's projector is an MLP (for NVILA `mlp_downsample_2x2_fix`: 2×2 downsample, LayerNorm(4C),
Linear(4C→D), GELU, Linear(D→D)); STORM replaces it by downsample + Linear + the Mamba temporal encoder (paper §3.1,
Fig. 6), trained from random weights (§4.1). No STORM weight reproduces that MLP. Its first Linear has the shape of
STORM's (4C→D) and reads the same 2×2 channel order, but it was trained on LayerNorm-ed inputs and feeds a GELU and a
second Linear: copied alone it computes neither VILA's projection nor the paper's initialisation. So nothing of the
projector is kept, and the conversion makes you say so rather than drop trained weights silently.

Config fields:

| VILA `config.json` | STORM |
|---|---|
| `mm_vision_select_layer` | `vision_feature_layer` |
| `mm_vision_select_feature` | must be `cls_patch` (all tokens; SigLIP has no class token to drop) |
| `num_video_frames` | the processor's default `num_frames` (unless given; a multiple of k) |
| `hidden_size`, `mm_hidden_size` | must equal the LLM's and the vision tower's widths |
| `s2`, `dynamic_s2`, `ps3` | must be off: STORM encodes each frame once, at the tower's resolution |
| `mm_projector_cfg` / `mm_projector/config.json` | `mm_projector_type` is reported |
| everything else (training settings, `image_aspect_ratio`, `fps`, `chat_template`, media encoders, ...) | not used |

VILA's own media tokens (`<image>`, `<vila/video>`, ...) stay in the vocabulary, unused; STORM's placeholders are
`<|image_pad|>` / `<|video_pad|>` (already in Qwen2-VL's tokenizer, else added).
"""

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from .checkpoint import check_repo_id, prepare_output_dir, push_to_hub
from .compose import DEFAULT_NUM_FRAMES, check_frames, compose_checkpoint
from .sources import load_llm, load_vision_tower, refuse_overwriting_sources, resolve_source, source_license

VILA_PARTS = ("llm", "vision_tower", "mm_projector")
VILA_SUBCONFIGS = ("llm_cfg", "vision_tower_cfg", "mm_projector_cfg")
VILA_PROJECTOR_KEYS = r"^layers\."  # nn.Sequential (or a single nn.Linear for "linear") under `layers`
MULTI_SCALE_FIELDS = ("s2", "dynamic_s2", "ps3")


def read_vila_config(folder: Path) -> dict:
    """VILA's `config.json`, checked for what STORM can convert.

    Raises:
        FileNotFoundError: no `config.json` or a missing `llm/`, `vision_tower/` or `mm_projector/`.
        ValueError: not a VILA config, `mm_vision_select_feature` other than `cls_patch`, or multi-scale vision
        (S2, dynamic S2, PS3) on.
    """
    missing = [name for name in ("config.json", *VILA_PARTS) if not (folder / name).exists()]
    if missing:
        raise FileNotFoundError(
            f"{folder} is not a complete VILA checkpoint: it has no {', no '.join(missing)} (VILA's layout is "
            "config.json + llm/ + vision_tower/ + mm_projector/)."
        )
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    absent = [key for key in VILA_SUBCONFIGS if key not in config]
    if absent:
        raise ValueError(f"{folder}/config.json is not a VILA config: it lacks {', '.join(absent)}.")
    feature = config.get("mm_vision_select_feature") or "cls_patch"
    if feature != "cls_patch":
        raise ValueError(
            f"mm_vision_select_feature={feature!r} in {folder}/config.json: STORM uses every vision token, as VILA's "
            "'cls_patch' does; a SigLIP tower has no class token to drop."
        )
    multi_scale = [name for name in MULTI_SCALE_FIELDS if config.get(name)]
    if multi_scale:
        raise ValueError(
            f"{folder}/config.json turns on multi-scale vision ({', '.join(multi_scale)}); STORM encodes each frame "
            "once at the vision tower's resolution, so this checkpoint's vision features cannot be reproduced."
        )
    return config


def projector_keys(folder: Path) -> tuple[str, list[str]]:
    """`mm_projector_type` and the weight keys of VILA's `mm_projector/` folder.

    Raises:
        FileNotFoundError: no weights. ValueError: keys that are not VILA projector keys (listed).
    """
    config_path = folder / "config.json"
    projector_type = (
        json.loads(config_path.read_text(encoding="utf-8")).get("mm_projector_type", "unknown")
        if config_path.is_file()
        else "unknown"
    )
    keys = []
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as weights:
            keys.extend(weights.keys())
    if not keys:
        raise FileNotFoundError(f"{folder} has no projector weights (*.safetensors).")
    unknown = [key for key in keys if not re.match(VILA_PROJECTOR_KEYS, key)]
    if unknown:
        raise ValueError(
            f"{folder} holds keys that are not VILA projector weights (`layers.*`): {', '.join(unknown)}."
        )
    return projector_type, sorted(keys)


def check_widths(vila_config: dict, vision_model, language_model, folder: Path) -> None:
    """VILA's `hidden_size` / `mm_hidden_size` must be the LLM's / vision tower's widths.

    Raises:
        ValueError: a width that differs (both numbers named).
    """
    for field, part, width in (
        ("hidden_size", "llm/", language_model.config.hidden_size),
        ("mm_hidden_size", "vision_tower/", vision_model.config.hidden_size),
    ):
        if vila_config.get(field) is not None and vila_config[field] != width:
            raise ValueError(
                f"{folder}/config.json says {field}={vila_config[field]} but {part} has width {width}: the parts do "
                "not belong together. Re-export the VILA checkpoint."
            )


def convert_vila(
    vila: str | Path,
    output_dir: str | Path,
    *,
    discard_mm_projector: bool = False,
    num_frames: int | None = None,
    temporal_pool_size: int = 4,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    push_to_hub_repo: str | None = None,
    verification_video: str | None = None,
    seed: int = 0,
) -> Path:
    """Convert the VILA checkpoint `vila` (folder or Hub id) into a STORM checkpoint in `output_dir` (see the module
    docstring).

    Args:
        discard_mm_projector: confirm that VILA's projector weights are not converted (required: they cannot be).
        num_frames: the processor's default frames per video; VILA's `num_video_frames` (else 32) when None.
        Others: as `storm_transformers.conversion.compose.compose`.

    Raises:
        FileExistsError, FileNotFoundError, ValueError, RuntimeError: as `compose`; also an incomplete VILA layout,
        unsupported VILA settings, widths that disagree, or a projector not explicitly discarded. Nothing is written.
    """
    output_dir = prepare_output_dir(output_dir, overwrite)
    if num_frames is not None:
        check_frames(num_frames, temporal_pool_size)
    check_repo_id(push_to_hub_repo)
    folder, hub_id = resolve_source(vila, "VILA checkpoint")
    refuse_overwriting_sources(output_dir, [folder])
    vila_config = read_vila_config(folder)
    projector_type, dropped = projector_keys(folder / "mm_projector")
    if not discard_mm_projector:
        raise ValueError(
            f"VILA's {projector_type!r} projector ({len(dropped)} tensors: {', '.join(dropped)}) has no STORM "
            "counterpart: STORM's downsample + Linear + Mamba temporal encoder start from random weights "
            "(paper §4.1) "
            "and are trained in stage 1. Pass --discard-mm-projector (discard_mm_projector=True) to convert the "
            "vision tower and the LLM without it."
        )
    if num_frames is None:
        num_frames = vila_config.get("num_video_frames") or DEFAULT_NUM_FRAMES
        check_frames(num_frames, temporal_pool_size)
    print(f"loading the LLM and the vision tower of the VILA checkpoint {folder}")
    language_model, tokenizer = load_llm(folder / "llm", dtype)
    vision_model, unused = load_vision_tower(folder / "vision_tower", language_model.dtype)
    check_widths(vila_config, vision_model, language_model, folder)
    name = hub_id or folder.name
    summary = (
        f"**Not trained yet: the projector and the temporal encoder of this checkpoint have random weights.** It is "
        f"a STORM converted by `storm convert vila` from the VILA checkpoint `{name}`: its vision tower and LLM, "
        f"without VILA's `{projector_type}` projector, which STORM replaces. It is the starting point of STORM's "
        "stage-1 training; until then its answers about videos and images are noise."
    )
    output_dir = compose_checkpoint(
        vision_model,
        language_model,
        tokenizer,
        output_dir,
        names=(f"{name}/vision_tower", f"{name}/llm"),
        num_frames=num_frames,
        temporal_pool_size=temporal_pool_size,
        vision_feature_layer=vila_config.get("mm_vision_select_layer", -2),
        unused_vision_keys=unused,
        extra_rows=[
            (
                "VILA projector (`mm_projector/`)",
                f"not converted: `{projector_type}`, {len(dropped)} tensors "
                f"({', '.join(f'`{key}`' for key in dropped)})",
            )
        ],
        overwrite=overwrite,
        verification_video=verification_video,
        seed=seed,
        card_fields={
            "summary": summary,
            "origin": "`storm convert vila --discard-mm-projector`",
            "base_model": [hub_id] if hub_id else [],
            "license": source_license([folder]),
            "repo_id": push_to_hub_repo,
        },
    )
    if push_to_hub_repo:
        push_to_hub(output_dir, push_to_hub_repo)
    return output_dir
