"""Loading a STORM checkpoint folder with one clear error per problem: `check_checkpoint` and `load_storm`.

`storm generate`, `storm train` and Python users go through the same checks before transformers reads anything:

| the folder | error |
|---|---|
| does not exist, or is a file | `FileNotFoundError` naming the path |
| a PEFT (LoRA) adapter (`adapter_config.json`) | `ValueError`: how to load it on its base model or merge it |
| no `config.json` | `FileNotFoundError` |
| `config.json` that is not JSON (or not UTF-8) | `ValueError` with the line and column |
| another model (`model_type` other than `"storm"`) | `ValueError` naming the model type |
| STORM settings that `StormConfig` refuses | `ValueError` / `TypeError` with the field, the value and the fix |
| pickle weights only (`pytorch_model.bin`, `*.pt`, …) | `ValueError`: never unpickled (loading pickle can run code) |
| no weights, a shard the index names missing, a truncated or corrupt safetensors file | `FileNotFoundError` / `ValueError` naming the file |
| weights that do not fit the config (missing, unexpected or mis-shaped keys) | `ValueError` listing them (transformers would initialise missing ones at random and only log it) |
| no processor files (`processor_config.json`, tokenizer) | `FileNotFoundError` saying where they come from |

Weights are read only from safetensors (`from_pretrained(..., use_safetensors=True)`). Errors transformers raises
while loading are re-raised as `ValueError` / `OSError` that name the folder.
"""

import json
import os
import re
from contextlib import contextmanager
from pathlib import Path

from .kernels import GQA_DECODE_ATTENTION

CONFIG = "config.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
DTYPES = ("auto", "float32", "bfloat16", "float16")
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
LOADING_PROBLEMS = {"missing": "missing_keys", "unexpected": "unexpected_keys", "mis-shaped": "mismatched_keys"}
# `load_storm`'s attention when none is asked for: transformers' default (SDPA) everywhere, except that the LLM's
# decode steps read its grouped-query KV cache once per key/value head (kernels.gqa_decode_attention).
DEFAULT_ATTENTION = {"text_config": GQA_DECODE_ATTENTION}


@contextmanager
def loading_report_off():
    """Silence transformers' table of missing/unexpected keys (and other loading warnings) while the caller checks
    every key itself and reports (or refuses) them in its own terms."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)


def check_checkpoint(path: str | os.PathLike) -> Path:
    """Check that `path` is a complete STORM checkpoint folder, without loading any weights.

    Args:
        path: a local folder, or a Hub id (`org/name`) that is downloaded first (safetensors and JSON files only).

    Returns:
        `Path`: the folder.

    Raises:
        FileNotFoundError: no such folder, no `config.json`, no weights, a missing shard, or no processor files.
        ValueError: a PEFT adapter folder, a `config.json` that is not valid JSON or not a STORM config (another
        `model_type`, or STORM settings `StormConfig` refuses), pickle weights only, or a truncated/corrupt
        safetensors file. TypeError: a `config.json` field of the wrong type.
    """
    folder = _local_folder(path)
    if (folder / "adapter_config.json").is_file():
        raise ValueError(_adapter_message(folder))
    if not (folder / CONFIG).is_file():
        raise FileNotFoundError(f"No STORM checkpoint in {folder}: it has no {CONFIG}.")
    config = _read_json(folder / CONFIG)
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "storm":
        what = f"a {model_type!r} model" if model_type else "a config without a model_type"
        architectures = ", ".join(config.get("architectures") or []) if isinstance(config, dict) else ""
        raise ValueError(
            f"{folder} holds {what}{f' ({architectures})' if architectures else ''}, not STORM (model_type 'storm'). "
            "Pass a STORM checkpoint; to build one from a SigLIP vision model and an LLM, use `storm convert compose`."
        )
    _check_config(folder)
    _check_weights(folder)
    _check_processor_files(folder)
    return folder


def load_storm(path: str | os.PathLike, *, dtype="auto", device=None, attn_implementation: str | None = None):
    """The STORM model and processor in `path`, after `check_checkpoint`.

    Args:
        path: checkpoint folder or Hub id.
        dtype: `"auto"` (the checkpoint's), `"float32"`, `"bfloat16"`, `"float16"` or a `torch.dtype`.
        device: where to put the model (`"cpu"`, `"cuda"`, `"cuda:1"`, `"mps"`, a `torch.device`); None keeps it on
            the CPU.
        attn_implementation: as `from_pretrained` (`"sdpa"`, `"eager"`, `"flash_attention_2"`, or a dict by
            sub-config); None: `DEFAULT_ATTENTION`, SDPA with the LLM's decode steps computed per key/value head
            (`kernels.gqa_decode_attention`: the same result; 111 → 135 tokens/s on an H200 at 128 frames,
            docs/benchmarks.md).

    Returns:
        `(StormForConditionalGeneration, StormProcessor)`, the model in eval mode.

    Raises:
        Everything `check_checkpoint` raises; ValueError: an unknown `dtype` or `device`, a device that is not
        available, or an error of transformers while loading (re-raised with the folder).
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import storm_transformers  # noqa: F401  (registers STORM with the Auto classes)

    dtype = check_dtype(dtype)
    device = check_device(device) if device is not None else None
    folder = check_checkpoint(path)
    try:
        processor = AutoProcessor.from_pretrained(folder)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise ValueError(f"Could not load the processor in {folder}: {error}") from error
    try:
        with loading_report_off():  # a key that does not fit is our error below, not transformers' warning table
            model, info = AutoModelForImageTextToText.from_pretrained(
                folder,
                dtype=dtype,
                use_safetensors=True,
                attn_implementation=DEFAULT_ATTENTION if attn_implementation is None else attn_implementation,
                output_loading_info=True,
                ignore_mismatched_sizes=True,  # mis-shaped keys: listed by our error below
            )
    except (OSError, ValueError, TypeError, RuntimeError, KeyError) as error:
        raise ValueError(f"Could not load the STORM weights in {folder}: {error}") from error
    problems = {kind: sorted(map(_key_text, info[key])) for kind, key in LOADING_PROBLEMS.items() if info.get(key)}
    if problems:  # transformers would initialise missing weights at random and only log it
        listed = "; ".join(f"{kind}: {', '.join(keys[:5])}{' …' if len(keys) > 5 else ''}" for kind, keys in problems.items())
        raise ValueError(
            f"The weights in {folder} do not match its config.json ({listed}). Re-download or re-save the checkpoint."
        )
    if device is not None:
        model = model.to(device)
    return model.eval(), processor


def check_dtype(dtype):
    """`dtype` if it is `"auto"`, a dtype name of `DTYPES` or a floating `torch.dtype`.

    Raises:
        ValueError: anything else (the message lists the names that work).
    """
    import torch

    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if dtype in DTYPES:
        return dtype
    raise ValueError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)} (auto: the checkpoint's own dtype).")


def check_device(device):
    """`device` as a `torch.device` that exists on this machine.

    Raises:
        ValueError: not a device name torch knows, or a device that is not available here (no CUDA GPU, an index
        past the last GPU, no MPS).
    """
    import torch

    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"device={str(device)!r} is not a torch device ({str(error).splitlines()[0]}). Use cpu, cuda, cuda:1, mps, …"
        ) from None
    if device.type == "cpu":
        return device
    module = getattr(torch, device.type, None)
    available = getattr(module, "is_available", lambda: False)()
    if not available:
        raise ValueError(f"device={str(device)!r}: there is no {device.type} device on this machine. Use cpu.")
    count = getattr(module, "device_count", lambda: 1)()
    if device.index is not None and device.index >= count:
        raise ValueError(
            f"device={str(device)!r}: this machine has {count} {device.type} device(s), numbered from 0."
        )
    return device


def _key_text(entry) -> str:
    """A missing/unexpected key, or a mis-shaped one with its shapes `(key, in the file, from the config)`."""
    if isinstance(entry, tuple) and len(entry) == 3:
        key, stored, expected = entry
        return f"{key} {tuple(stored)} in the file, {tuple(expected)} from the config"
    return str(entry)


def _local_folder(path) -> Path:
    folder = Path(path)
    if folder.is_dir():
        return folder
    if folder.exists():
        raise FileNotFoundError(f"{folder} is a file; pass the checkpoint folder (the one with {CONFIG}).")
    if HUB_ID.fullmatch(str(path)) and not str(path).startswith((".", "/")):
        from huggingface_hub import snapshot_download

        try:  # JSON, safetensors, tokenizer and template files: never pickle
            patterns = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "README.md"]
            return Path(snapshot_download(str(path), allow_patterns=patterns))
        except Exception as error:  # offline, unknown or gated repo: all mean the same to the user
            raise FileNotFoundError(
                f"{path} is neither a local folder nor a model that could be downloaded from the Hub "
                f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})."
            ) from None
    raise FileNotFoundError(f"No such checkpoint folder: {folder}.")


def _adapter_message(folder: Path) -> str:
    try:
        base = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        base = None
    base = base or "BASE"
    return (
        f"{folder} is a PEFT (LoRA) adapter, not a full checkpoint: it holds the adapter weights for the base model "
        f"{base}. Load it on that model with `PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained("
        f"'{base}'), '{folder}')`, or merge it into a full checkpoint (`.merge_and_unload().save_pretrained(OUT)` "
        "and the processor's `save_pretrained(OUT)`; README, LoRA) and pass OUT."
    )


def _read_json(path: Path):
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text (byte {error.start}): restore or re-save it.") from None
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}): restore or "
            "re-save it (save_pretrained)."
        ) from None


def _check_config(folder: Path) -> None:
    from huggingface_hub.errors import StrictDataclassError

    from .configuration_storm import StormConfig

    try:
        StormConfig.from_pretrained(folder)
    except StrictDataclassError as error:  # @strict: a field of the wrong type, or fields that disagree
        cause = error.__cause__ or error
        kind = TypeError if isinstance(cause, TypeError) else ValueError
        raise kind(f"{folder / CONFIG}: {cause}. Fix the value in the file.") from None
    except (ValueError, TypeError) as error:
        raise type(error)(f"{folder / CONFIG}: {error}") from None


def _check_weights(folder: Path) -> None:
    from safetensors import SafetensorError, safe_open

    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        content = _read_json(index)
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        files = sorted({folder / name for name in weight_map.values()}) if isinstance(weight_map, dict) else []
        missing = [path.name for path in files if not path.is_file()]
        if missing or not files:
            raise FileNotFoundError(
                f"{index} names weight files that are not in the folder ({', '.join(missing) or 'none listed'}): "
                "the download or copy is incomplete."
            )
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(path.name for pattern in PICKLE_WEIGHTS for path in folder.glob(pattern))
        if pickles:
            raise ValueError(
                f"{folder} has only pickle weights ({', '.join(pickles)}), which STORM never loads: unpickling can run "
                "code. Re-save the model as safetensors (save_pretrained) where you trust the file, or use a "
                "safetensors copy of the checkpoint."
            )
        raise FileNotFoundError(f"{folder} has no weights (model.safetensors or {SAFETENSORS_INDEX} and its shards).")
    for path in files:
        try:
            with safe_open(path, framework="pt"):
                pass
        except SafetensorError as error:
            raise ValueError(f"{path} is truncated or corrupt ({error}): download or copy it again.") from None


def _check_processor_files(folder: Path) -> None:
    missing = [
        " or ".join(names)
        for names in (PROCESSOR_FILES, TOKENIZER_FILES)
        if not any((folder / name).is_file() for name in names)
    ]
    if missing:
        raise FileNotFoundError(
            f"{folder} has the model but no processor files ({'; '.join(missing)}), which set the frame size, the "
            "placeholders and the chat template. Save the processor of the checkpoint this one was made from into "
            "it: `AutoProcessor.from_pretrained(SOURCE).save_pretrained(folder)`."
        )


__all__ = ["check_checkpoint", "check_device", "check_dtype", "load_storm", "loading_report_off"]
