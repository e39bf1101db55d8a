"""Reading the inputs of a conversion: source folders (or Hub ids), their models and tokenizer, with every check
that can fail before anything is written.

- `resolve_source`: a local folder, or a Hub id fetched with `huggingface_hub.snapshot_download`.
- `load_vision_tower` / `load_llm`: the SigLIP vision model and the causal LM (+ tokenizer) loaded with transformers;
  a missing, unexpected or mis-shaped key is an error that lists it (transformers' own report is silenced).
- `check_chat_template`: the LLM's chat template must render a conversation exactly as STORM's ChatML template.
- `check_normalisation`: the vision model's image processor must normalise as STORM's (SigLIP mean = std = 0.5).
- `refuse_overwriting_sources`, `source_license`: the output folder and the card's licence.
"""

import json
import re
from pathlib import Path

import torch
from huggingface_hub import ModelCard
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, SiglipVisionModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from storm_transformers import StormVideoProcessor, default_chat_template
from storm_transformers.loading import loading_report_off

from .verification import VERIFY_CONVERSATION

SIGLIP_TYPES = ("siglip_vision_model", "siglip")
# Keys of a full SiglipModel that loading its vision half leaves out, on purpose.
SIGLIP_TEXT_KEYS = r"^(text_model\.|logit_scale$|logit_bias$)"


def resolve_source(name_or_path: str | Path, what: str) -> tuple[Path, str | None]:
    """A local folder as is, or a Hub id (`org/name`, not a local path) downloaded with `snapshot_download`.

    Returns the folder and the Hub id (None for a local folder).

    Raises:
        FileNotFoundError: neither a folder nor a Hub id that could be downloaded.
    """
    path = Path(name_or_path)
    if path.is_dir():
        return path, None
    text = str(name_or_path)
    if path.exists():
        hint = (
            f" It is a GGUF file: dequantise it into a folder first, `storm convert gguf --input {text} --output DIR`, "
            "and pass DIR."
            if path.suffix.lower() == ".gguf"
            else " Pass the folder that holds config.json and the weights."
        )
        raise FileNotFoundError(f"The {what} {text} is a file.{hint}")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", text):
        raise FileNotFoundError(f"The {what} folder {text} does not exist.")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text)), text
    except Exception as error:  # offline, unknown repo, gated, ...: all mean the same to the user
        raise FileNotFoundError(
            f"The {what} {text} is neither a local folder nor a model that could be downloaded from the Hub "
            f"({type(error).__name__}: {error}). Check the path, or download it first (`hf download {text}`)."
        ) from None


def _require_files(folder: Path, what: str) -> None:
    missing = [] if (folder / "config.json").is_file() else ["config.json"]
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        missing.append("weights (*.safetensors or *.bin)")
    if missing:
        gguf = sorted(folder.glob("*.gguf"))
        hint = (
            f" It holds a GGUF file: dequantise it with `storm convert gguf --input {gguf[0]} --output DIR` and pass DIR."
            if gguf
            else " Save the model there with save_pretrained, or point to the folder that has them."
        )
        raise FileNotFoundError(f"The {what} folder {folder} has no {' and no '.join(missing)}.{hint}")


def _check_loading(info: dict, source: Path, not_used: str | None = None) -> list[str]:
    """Raise on missing, unexpected or mis-shaped keys of a transformers load; return the unexpected keys that match
    `not_used` (left out on purpose)."""
    skipped = sorted(key for key in info["unexpected_keys"] if not_used and re.match(not_used, key))
    problems = {
        "missing": sorted(info["missing_keys"]),
        "unexpected": sorted(set(info["unexpected_keys"]) - set(skipped)),
        "mis-shaped": sorted(map(str, info["mismatched_keys"])),
    }
    listed = "; ".join(f"{kind}: {', '.join(keys)}" for kind, keys in problems.items() if keys)
    if listed:
        raise ValueError(
            f"The weights in {source} do not match its config.json ({listed}). Fix or re-save the folder."
        )
    return skipped


def load_vision_tower(folder: Path, dtype) -> tuple[SiglipVisionModel, list[str]]:
    """The SigLIP vision model in `folder` (a `SiglipVisionModel`, or the vision half of a `SiglipModel`), in `dtype`,
    and the keys left out (a `SiglipModel`'s text tower).

    Raises:
        FileNotFoundError: no config/weights. ValueError: not a SigLIP (STORM's projector needs SigLIP's square grid of
        patch tokens without a class token), or weights that do not match the config.
    """
    _require_files(folder, "vision model")
    model_type = AutoConfig.from_pretrained(folder).model_type
    if model_type not in SIGLIP_TYPES:
        swapped = (
            " It looks like an LLM: did you swap --vision and --llm?"
            if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            else ""
        )
        raise ValueError(
            f"The vision model in {folder} is a {model_type!r}, not SigLIP ({' or '.join(SIGLIP_TYPES)}). STORM's "
            f"2×2 downsample needs SigLIP's square grid of patch tokens with no class token.{swapped}"
        )
    check_normalisation(folder)
    with loading_report_off():
        model, info = SiglipVisionModel.from_pretrained(
            folder,
            dtype=dtype,
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # mis-shaped: our error
        )
    text_tower = _check_loading(info, folder, SIGLIP_TEXT_KEYS if model_type == "siglip" else None)
    return model.eval(), text_tower


def check_normalisation(folder: Path) -> None:
    """STORM's processors normalise frames with SigLIP's mean = std = 0.5; a vision folder whose image processor says
    otherwise was trained on other inputs.

    Raises:
        ValueError: `preprocessor_config.json` in `folder` has another `image_mean` / `image_std` (both shown).
    """
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return
    saved = json.loads(path.read_text(encoding="utf-8"))
    ours = {"image_mean": StormVideoProcessor.image_mean, "image_std": StormVideoProcessor.image_std}
    for field, value in ours.items():
        if field in saved and not torch.allclose(
            torch.tensor(saved[field], dtype=torch.float64), torch.tensor(value, dtype=torch.float64)
        ):
            raise ValueError(
                f"{path} normalises images with {field}={saved[field]}, but STORM's processors use {value} "
                "(SigLIP's). "
                "This vision model expects other inputs; use a SigLIP trained with mean = std = 0.5."
            )


def load_llm(folder: Path, dtype):
    """The causal LM in `folder` and its tokenizer; `dtype=None` keeps the stored dtype.

    Raises:
        FileNotFoundError: no config/weights/tokenizer. ValueError: not a causal LM, weights that do not match the
        config, or a chat template missing or not ChatML (see the module docstring).
    """
    _require_files(folder, "LLM")
    config = AutoConfig.from_pretrained(folder)
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        hint = (
            " It is a vision-language model: pass its language model alone, saved as a causal LM (as VILA does "
            "for Qwen2-VL's)."
            if hasattr(config, "vision_config")
            else ""
        )
        hint = hint or (
            " It looks like the vision model: did you swap --vision and --llm?"
            if config.model_type in SIGLIP_TYPES
            else ""
        )
        raise ValueError(
            f"The LLM in {folder} is a {config.model_type!r}, which AutoModelForCausalLM cannot load.{hint}"
        )
    if getattr(config, "quantization_config", None):
        raise ValueError(
            f"The LLM in {folder} is quantized ({config.quantization_config.get('quant_method')}); STORM "
            "copies its weights exactly, so it needs the unquantized checkpoint."
        )
    if not (folder / "tokenizer_config.json").is_file() and not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"The LLM folder {folder} has no tokenizer (tokenizer.json / tokenizer_config.json). "
            "Save the LLM's tokenizer there with save_pretrained."
        )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    check_chat_template(tokenizer, folder)
    with loading_report_off():
        model, info = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype or "auto", output_loading_info=True, ignore_mismatched_sizes=True
        )
    _check_loading(info, folder)
    return model.eval(), tokenizer


def check_chat_template(tokenizer, source) -> None:
    """The LLM's chat template must render `VERIFY_CONVERSATION` exactly as STORM's ChatML template does.

    Raises:
        ValueError: no chat template, or one that formats conversations differently (both renderings are shown).
    """
    if not tokenizer.chat_template:
        raise ValueError(
            f"The tokenizer in {source} has no chat template, so it is not known how this LLM expects conversations "
            "(is it a base model?). Use its instruct/chat version, or set a ChatML chat template on the tokenizer "
            "and save it there."
        )
    kwargs = {"add_generation_prompt": True, "tokenize": False}
    theirs = tokenizer.apply_chat_template(VERIFY_CONVERSATION, **kwargs)
    ours = tokenizer.apply_chat_template(VERIFY_CONVERSATION, chat_template=default_chat_template(), **kwargs)
    if theirs != ours:
        raise ValueError(
            f"The chat template in {source} formats conversations differently from STORM's ChatML template "
            f"(<|im_start|>role ... <|im_end|>), which the processor uses for video and image messages:\n"
            f"  LLM:   {theirs!r}\n  STORM: {ours!r}\nUse a ChatML LLM (Qwen2, Qwen2.5, Qwen2-VL's LLM, SmolLM2)."
        )


def refuse_overwriting_sources(output_dir: Path, sources: list[Path]) -> None:
    """`--overwrite` deletes the old output folder: refuse when that would delete a source.

    Raises:
        ValueError: `output_dir` is a source folder or contains one.
    """
    output = output_dir.resolve()
    for source in sources:
        if output == source.resolve() or output in source.resolve().parents:
            raise ValueError(
                f"The output folder {output_dir} is (or contains) the source {source}. Choose another one."
            )


def source_license(folders: list[Path]) -> str:
    """The licence the sources' model cards declare if they agree, else "other" (explained in the card)."""
    declared = set()
    for folder in folders:
        card = folder / "README.md"
        declared.add(ModelCard.load(card).data.license if card.is_file() else None)
    return declared.pop() if len(declared) == 1 and None not in declared else "other"
