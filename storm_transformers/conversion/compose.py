"""Compose a STORM checkpoint from a SigLIP vision model and a decoder LLM: the starting point of stage-1 training.

Paper §4.1: STORM starts from PaliGemma's SigLIP vision encoder and the LLM of Qwen2-VL; the projector and the Mamba
temporal encoder start from random weights and are trained from stage 1 (alignment) on. `storm convert compose` builds
exactly that from two local folders (or Hub ids), any sizes:

| STORM key | source | how |
|---|---|---|
| `model.vision_tower.{embeddings,encoder,post_layernorm}.*` | vision folder: `SiglipVisionModel` (or the vision half of a `SiglipModel`) | copied exactly |
| — | vision: `head.*` (attention-pooling head), a `SiglipModel`'s `text_model.*`, `logit_scale`, `logit_bias` | not used: STORM reads `hidden_states[vision_feature_layer]`; listed in the report |
| `model.language_model.*` | LLM folder (`AutoModelForCausalLM`: Qwen2, Qwen2.5, Qwen2-VL's LLM, Llama, ...): `model.*` | copied exactly; the embedding rows grow for new placeholder tokens |
| `lm_head.weight` | LLM: `lm_head.weight` | copied exactly (tied to the embeddings if the LLM ties them) |
| `model.multi_modal_projector.linear.*` | — | random (normal, std 0.02; bias 0): the model's own `_init_weights` |
| `model.temporal_encoder.*` | — | random: mamba_ssm's init (S4D-real A, D = 1, Δ log-uniform in [1e-3, 0.1], LayerNorm 1/0) |

The source models are loaded with transformers, so any format `from_pretrained` reads works; a missing, unexpected or
mis-shaped key in either source, and any source key the table does not name, is an error that lists it.

Tokenizer and chat template: the LLM's tokenizer gains `<|image_pad|>` / `<|video_pad|>` as special tokens if it lacks
them (Qwen2.5 and Qwen2-VL tokenizers have them), the embeddings and `lm_head` grow to a multiple of 64 rows with
transformers' `resize_token_embeddings` (new rows drawn from the old rows' mean and covariance), and the processor gets
STORM's ChatML template (`storm_transformers/chat_template.jinja`, with generation markers for assistant-only losses).
The LLM's own chat template must render a text-only conversation exactly as STORM's does, so the LLM keeps the format
it was instruction-tuned with: Qwen2/2.5, Qwen2-VL and SmolLM2 pass; a tokenizer without a chat template (a base
model) or with another format (Llama-3's headers, Mistral's `[INST]`) is refused. STORM's default system prompt is
"You are a helpful assistant." (VILA's and Qwen2's); give a system message to use another.

Verification (`storm_transformers.conversion.verification`) then checks the written checkpoint against the two sources.
"""

import math
import re
from pathlib import Path

import torch

from storm_transformers import StormConfig, StormForConditionalGeneration, get_num_visual_tokens
from storm_transformers.loading import loading_report_off
from storm_transformers.model_cards import storm_model_card

from .checkpoint import (
    add_placeholder_tokens,
    build_processor,
    chat_generation_config,
    check_repo_id,
    prepare_output_dir,
    push_to_hub,
    write_checkpoint,
)
from .sources import (
    load_llm,
    load_vision_tower,
    refuse_overwriting_sources,
    resolve_source,
    source_license,
)
from .verification import TOLERANCE, reference_outputs, verify_checkpoint

VOCAB_MULTIPLE = 64
DEFAULT_NUM_FRAMES = 32  # the paper trains on 32 frames (§4.1)
VERIFY_FRAMES = 4  # at least; rounded up to a multiple of k
# Source state-dict key (as transformers loads the source) → STORM key; None: not used by STORM (reported).
VISION_KEY_MAPPING = {
    r"^(embeddings|encoder|post_layernorm)\.": r"model.vision_tower.\1.",
    r"^head\.": None,
}
LLM_KEY_MAPPING = {
    r"^model\.": "model.language_model.",
    r"^lm_head\.weight$": "lm_head.weight",
}
NEW_MODULES = ("model.multi_modal_projector.", "model.temporal_encoder.")  # initialised, not copied


def map_keys(state_dict: dict, mapping: dict[str, str | None], source: str) -> tuple[dict, list[str]]:
    """Rename `state_dict` keys with the first matching `mapping` row (regex → replacement, None = not used).

    Returns the renamed state dict and the keys that are not used.

    Raises:
        ValueError: keys no row matches (all listed).
    """
    renamed, unused, unmatched = {}, [], []
    for key, tensor in state_dict.items():
        pattern = next((pattern for pattern in mapping if re.search(pattern, key)), None)
        if pattern is None:
            unmatched.append(key)
        elif mapping[pattern] is None:
            unused.append(key)
        else:
            renamed[re.sub(pattern, mapping[pattern], key)] = tensor
    if unmatched:
        raise ValueError(f"{len(unmatched)} keys of the {source} have no place in STORM: {', '.join(unmatched)}.")
    return renamed, unused


def assemble(config: StormConfig, state_dict: dict, dtype) -> StormForConditionalGeneration:
    """A STORM with `state_dict` loaded and every other weight initialised by the model's own `_init_weights`
    (transformers' `from_pretrained` with `state_dict`, so the new modules get exactly the init a fresh model has).

    Raises:
        ValueError: `state_dict` has keys STORM lacks or tensors of the wrong shape, or leaves out anything other than
        the projector and the temporal encoder.
    """
    with loading_report_off():
        model, info = StormForConditionalGeneration.from_pretrained(
            None, config=config, state_dict=state_dict, dtype=dtype, output_loading_info=True
        )
    missing = [key for key in info["missing_keys"] if not key.startswith(NEW_MODULES)]
    if missing or info["unexpected_keys"] or info["mismatched_keys"]:
        raise ValueError(
            "The composed weights do not fit STORM: missing "
            f"{sorted(missing)}, unexpected {sorted(info['unexpected_keys'])}, "
            f"mis-shaped {sorted(info['mismatched_keys'])}."
        )
    return model.eval()


def grow_embeddings(llm, tokenizer) -> tuple[int, int]:
    """Resize the LLM's input and output embeddings to hold every token of `tokenizer` (rounded up to a multiple of
    64; never shrunk). Returns the row counts before and after."""
    before = llm.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > before:
        llm.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=VOCAB_MULTIPLE)
    return before, llm.get_input_embeddings().weight.shape[0]


def check_frames(num_frames: int, temporal_pool_size: int) -> None:
    """Fail before any slow step on frame settings STORM would refuse later.

    Raises:
        TypeError: a setting that is not an integer. ValueError: `temporal_pool_size` < 1, or `num_frames` not a
        positive multiple of it (the message says what works).
    """
    get_num_visual_tokens(num_frames, grid_size=1, temporal_pool_size=temporal_pool_size)


def storm_config(vision_config, text_config, **storm_fields) -> StormConfig:
    """`StormConfig` around copies of the two source configs (the SigLIP pooling head off: STORM never uses it)."""
    vision = vision_config.to_dict() | {"vision_use_head": False}
    return StormConfig(vision_config=vision, text_config=text_config.to_dict(), **storm_fields)


def compose_checkpoint(
    vision_model,
    language_model,
    tokenizer,
    output_dir: Path,
    *,
    names: tuple[str, str],
    num_frames: int,
    temporal_pool_size: int,
    vision_feature_layer: int = -2,
    unused_vision_keys: list[str] = (),
    extra_rows: list[tuple[str, str]] = (),
    overwrite: bool,
    verification_video: str | None,
    seed: int,
    card_fields: dict,
) -> Path:
    """Everything after loading the sources, shared by `compose` and the VILA conversion: reference outputs,
    placeholder tokens and embedding growth, the key mapping, the new modules, processor, card, then the verified
    atomic write.

    `names` are how the card and the report name the (vision, LLM) sources; `unused_vision_keys` are source keys left
    out when loading; `extra_rows` are more (part, source) rows for the report; `card_fields` hold the card's summary,
    origin (the command), base_model, license and repo_id (None: the folder name).
    """
    verify_frames = temporal_pool_size * math.ceil(VERIFY_FRAMES / temporal_pool_size)
    reference = reference_outputs(
        vision_model, language_model, tokenizer, vision_feature_layer, verify_frames, verification_video
    )
    torch.manual_seed(seed)
    vocab_before = len(tokenizer)
    image_token_id, video_token_id = add_placeholder_tokens(tokenizer)
    rows = grow_embeddings(language_model, tokenizer)
    config = storm_config(
        vision_model.config,
        language_model.config,
        vision_feature_layer=vision_feature_layer,
        temporal_pool_size=temporal_pool_size,
        image_token_id=image_token_id,
        video_token_id=video_token_id,
    )
    vision_state, unused = map_keys(vision_model.state_dict(), VISION_KEY_MAPPING, "vision model")
    llm_state, _ = map_keys(language_model.state_dict(), LLM_KEY_MAPPING, "LLM")
    unused = [*unused_vision_keys, *unused]
    model = assemble(config, vision_state | llm_state, language_model.dtype)
    model.generation_config = chat_generation_config(tokenizer)
    processor = build_processor(config, tokenizer, num_frames)
    added = len(tokenizer) > vocab_before
    facts = _report(model, names, len(vision_state), len(llm_state), unused, rows, added, seed, extra_rows)
    card = storm_model_card(
        model,
        processor,
        repo_id=card_fields["repo_id"] or output_dir.name,
        summary=card_fields["summary"],
        provenance=f"Made by {card_fields['origin']}.\n\n{facts}\n\n{_licence_note(card_fields['license'])}",
        limits=_limits(config),
        base_model=card_fields["base_model"] or None,
        base_model_relation="finetune" if card_fields["base_model"] else None,
        license=card_fields["license"],
        extra_tags=("random-weights",),
    )
    return write_checkpoint(
        output_dir,
        model,
        processor,
        card,
        overwrite=overwrite,
        verify=lambda folder: verify_checkpoint(folder, reference),
    )


def _report(model, names, num_vision, num_llm, unused, rows, added, seed, extra_rows) -> str:
    """Print what was copied, dropped and initialised; return it as the card's Markdown table."""
    config = model.config
    vision, text, encoder = config.vision_config, config.text_config, config.temporal_encoder_config
    projector = model.model.multi_modal_projector.linear
    unused_text = f"; not used: {_summarise(unused)}" if unused else ""
    tokens = "added to the tokenizer" if added else "already in the tokenizer"
    lines = [
        (
            "vision tower (`model.vision_tower`)",
            f"`{names[0]}` (SigLIP, {vision.num_hidden_layers} layers, width {vision.hidden_size}, "
            f"{vision.image_size} px, patch {vision.patch_size}): {num_vision} tensors copied exactly{unused_text}",
        ),
        (
            "LLM (`model.language_model`, `lm_head`)",
            f"`{names[1]}` ({text.model_type}, {text.num_hidden_layers} layers, "
            f"width {text.hidden_size}): {num_llm} tensors copied exactly; embedding rows {rows[0]} → {rows[1]}",
        ),
        (
            "projector (`model.multi_modal_projector`)",
            f"new, random: Linear {projector.in_features} → {projector.out_features}",
        ),
        (
            "temporal encoder (`model.temporal_encoder`)",
            f"new, random: {encoder.num_hidden_layers} Mamba layers, mamba_ssm init",
        ),
        (
            "placeholders",
            f"`<|image_pad|>` = {config.image_token_id}, `<|video_pad|>` = {config.video_token_id}, {tokens}",
        ),
        *extra_rows,
    ]
    for part, source in lines:
        print(f"{part}: {source}")
    tolerance = TOLERANCE[model.dtype]
    cells = [(part, source.replace("|", "\\|")) for part, source in lines]  # `<|...|>` inside a Markdown table
    table = "\n".join(f"| {part} | {source} |" for part, source in cells)
    return (
        f"| STORM part | from |\n|---|---|\n{table}\n\nThe new weights come from torch seed {seed}. At conversion "
        "the written checkpoint was checked against its sources: the vision tower's hidden states and the text-only "
        f"logits agree within {tolerance:g} ({str(model.dtype).removeprefix('torch.')})."
    )


def _summarise(keys: list[str]) -> str:
    """`head.*` (11 tensors), `logit_scale`: keys grouped by their first component."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(key.split(".")[0], []).append(key)
    return ", ".join(
        f"`{prefix}.*` ({len(group)} tensors)" if len(group) > 1 else f"`{group[0]}`"
        for prefix, group in groups.items()
    )


def _licence_note(license: str) -> str:
    if license == "other":
        return (
            "Licence: the sources' model cards declare no common licence, so each source's own licence applies to "
            "its weights here; check them before use or redistribution."
        )
    return f"Licence: {license}, as declared by the sources' model cards."


def _limits(config: StormConfig) -> str:
    return (
        "The projector and the temporal encoder are untrained: run STORM's stage-1 training (alignment) before using "
        "this checkpoint on videos or images; until then its visual answers are noise. Conversations use ChatML with "
        'the default system prompt "You are a helpful assistant.". Videos need a multiple of '
        f"k = {config.temporal_pool_size} frames."
    )


def compose(
    vision: str | Path,
    llm: str | Path,
    output_dir: str | Path,
    *,
    num_frames: int | None = None,
    temporal_pool_size: int = 4,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    push_to_hub_repo: str | None = None,
    verification_video: str | None = None,
    seed: int = 0,
) -> Path:
    """Build a STORM checkpoint from a SigLIP vision model and a ChatML causal LM (see the module docstring).

    Args:
        vision: folder (or Hub id) of a `SiglipVisionModel` or `SiglipModel`.
        llm: folder (or Hub id) of a causal LM with its tokenizer.
        output_dir: folder to create; it appears only once complete and verified.
        num_frames: the processor's default frames per video, a multiple of `temporal_pool_size` (None: 32, the
            paper's training frame count).
        temporal_pool_size: k of temporal average pooling (paper Eq. 6-7; 4 in the paper's pooled models, 1 = off).
        dtype: dtype of the checkpoint (`"float32"`, `"bfloat16"`, ...); None keeps the LLM's stored dtype, and the
            vision tower is loaded in it too.
        overwrite: replace an existing `output_dir`.
        push_to_hub_repo: upload the finished folder to this Hub repository.
        verification_video: a video file for the verification; fixed random frames when None.
        seed: torch seed of the new weights and of the new embedding rows.

    Raises:
        FileExistsError: `output_dir` exists and not `overwrite`. FileNotFoundError: a source is missing or incomplete.
        ValueError: a source that is not SigLIP / not a ChatML causal LM, weights that do not match their config, or
        bad STORM settings (checked before any source is read). TypeError: a setting that is not an integer.
        RuntimeError: verification failed, or the upload (the checkpoint is then complete on disk). In every other
        case nothing is written.
    """
    output_dir = prepare_output_dir(output_dir, overwrite)
    num_frames = DEFAULT_NUM_FRAMES if num_frames is None else num_frames
    check_frames(num_frames, temporal_pool_size)
    check_repo_id(push_to_hub_repo)
    vision_dir, vision_id = resolve_source(vision, "vision model")
    llm_dir, llm_id = resolve_source(llm, "LLM")
    refuse_overwriting_sources(output_dir, [vision_dir, llm_dir])
    print(f"loading the LLM from {llm_dir} and the vision model from {vision_dir}")
    language_model, tokenizer = load_llm(llm_dir, dtype)
    vision_model, unused_vision_keys = load_vision_tower(vision_dir, language_model.dtype)
    names = (vision_id or vision_dir.name, llm_id or llm_dir.name)
    summary = (
        "**Not trained yet: the projector and the temporal encoder of this checkpoint have random weights.** It is a "
        f"STORM composed from the vision model `{names[0]}` and the LLM `{names[1]}` by `storm convert compose`: the "
        "starting point of STORM's stage-1 training. Until then its answers about videos and images are noise; given "
        f"a text-only prompt it answers exactly as `{names[1]}` does."
    )
    output_dir = compose_checkpoint(
        vision_model,
        language_model,
        tokenizer,
        output_dir,
        names=names,
        num_frames=num_frames,
        temporal_pool_size=temporal_pool_size,
        unused_vision_keys=unused_vision_keys,
        overwrite=overwrite,
        verification_video=verification_video,
        seed=seed,
        card_fields={
            "summary": summary,
            "origin": "`storm convert compose`",
            "base_model": [name for name in (vision_id, llm_id) if name],
            "license": source_license([vision_dir, llm_dir]),
            "repo_id": push_to_hub_repo,
        },
    )
    if push_to_hub_repo:
        push_to_hub(output_dir, push_to_hub_repo)
    return output_dir
