"""A corpus of hostile and unusual inputs, built on the fly and classified by running them (issue 15).

Each `Case` builds its input in a fresh folder and runs it. The outcome is one of:

| outcome | when |
|---|---|
| clear error | `expect="error"`; it raised an error type of `CLEAR_ERRORS` whose message contains every string of `names` (the argument, the value, the file, …) |
| accepted | `expect="accept"`; it returned, and `check(result)` (if given) is true (a decoded video: the indices its frames carry equal those asked for; a warning: the logged text names the file and frames) |
| unclear crash | it raised anything else: another type (IndexError, ZeroDivisionError, AttributeError, a raw UnicodeDecodeError, …), or a message that does not name what `names` lists |
| silent wrong result | it returned although it should have been refused, returned a wrong result (`check` false), or raised `WrongResult` (say, a pickle executed) |
| valid input rejected | `expect="accept"` and it raised |

`tests/test_hostile_inputs.py` runs every case, prints `hostile inputs: N cases, E clear errors, A accepted, U unclear
crashes, S silent wrong results, R valid inputs rejected`, and fails on any U, S or R.

Adding cases is adding data: append `Case(area, name, call, ...)` to `CASES` (or decorate a function with `@case`),
where `call(folder)` builds what it needs under `folder` and runs it. `storm(...)` runs the `storm` command in-process
and turns its output into a result: exit 0 returns the exit status, an error exit raises `CommandError` with its last
line (one line, no traceback, or it is an unclear crash). Video cases write their files with PyAV
(`tests/video_files.py`) from `numbered_frames`, whose pixels carry each frame's index: `read(...)` returns the indices
the decoded frames carry, so a neighbouring frame is a silent wrong result. `captured_warnings()` collects what is
logged (a warning is an accepted outcome whose `check` reads it). `python tests/hostile_inputs.py [AREA ...]` prints
every case with its outcome.
"""

import copy
import functools
import io
import json
import math
import os
import pickle
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "checkpoints" / "storm-tiny-synthetic"
OUTCOMES = ("clear error", "accepted", "unclear crash", "silent wrong result", "valid input rejected")


class CommandError(Exception):
    """The `storm` command ended with an error: its one-line message."""


class WrongResult(Exception):
    """Raised by a case that detects a wrong result it was not asked to return (a pickle that ran, say)."""


def _clear_errors() -> tuple[type, ...]:
    from huggingface_hub.errors import StrictDataclassFieldValidationError  # transformers' config type errors

    return (ValueError, TypeError, OSError, RuntimeError, StrictDataclassFieldValidationError, CommandError)


CLEAR_ERRORS = _clear_errors()
# Subclasses of the types above whose raw messages do not say what is wrong where (the file, the line).
RAW_ERRORS = (UnicodeError, json.JSONDecodeError)


@dataclass(frozen=True)
class Case:
    """One hostile or unusual input.

    Args:
        area: what it exercises ("config", "cli", "checkpoint", "training data", "training args", "conversion", …).
        name: a short description, unique within the area.
        call: `call(folder)` builds the input under the empty `folder` and runs it; returns the result.
        expect: "error" (must be refused) or "accept" (must work).
        names: strings the error message must contain (case-insensitive) for the error to be clear.
        check: for "accept", `check(result)` must be true.
    """

    area: str
    name: str
    call: Callable[[Path], object]
    expect: str = "error"
    names: tuple[str, ...] = ()
    check: Callable[[object], bool] | None = None


CASES: list[Case] = []


def case(area: str, expect: str = "error", names: tuple[str, ...] = (), check=None):
    """Decorator: register `function(folder)` as a case named after the function."""

    def register(function):
        CASES.append(Case(area, function.__name__.replace("_", " "), function, expect, names, check))
        return function

    return register


def classify(case: Case, folder: Path) -> tuple[str, str]:
    """Run `case` in `folder`; return its outcome (one of `OUTCOMES`) and what happened, in one line."""
    try:
        result = case.call(folder)
    except WrongResult as error:
        return "silent wrong result", str(error)
    except Exception as error:  # noqa: BLE001 — classifying every failure is the point
        message = f"{type(error).__name__}: {error}".replace("\n", " ")
        if case.expect == "accept":
            return "valid input rejected", message
        named = all(name.lower() in str(error).lower() for name in case.names)
        clear = isinstance(error, CLEAR_ERRORS) and not isinstance(error, RAW_ERRORS) and named
        return ("clear error" if clear else "unclear crash"), message
    if case.expect == "accept" and (case.check is None or case.check(result)):
        return "accepted", repr(result)[:200].replace("\n", " ")
    return "silent wrong result", f"returned {result!r:.200}"


def run_cases(cases: list[Case], root: Path) -> list[tuple[Case, str, str]]:
    """Classify every case, each in its own folder under `root`."""
    results = []
    for number, item in enumerate(cases):
        folder = root / f"{number:03d}"
        folder.mkdir(parents=True)
        results.append((item, *classify(item, folder)))
    return results


def summary(results) -> str:
    counts = {outcome: sum(result[1] == outcome for result in results) for outcome in OUTCOMES}
    return (
        f"hostile inputs: {len(results)} cases, {counts['clear error']} clear errors, {counts['accepted']} accepted, "
        f"{counts['unclear crash']} unclear crashes, {counts['silent wrong result']} silent wrong results, "
        f"{counts['valid input rejected']} valid inputs rejected"
    )


# ----------------------------------------------------------------------------------------------------------------
# Helpers that cases use


def storm(*argv: str) -> int:
    """Run `storm argv…` in-process: 0 on success, else `CommandError` with the last line it printed to stderr."""
    import storm_cli

    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        try:
            code = storm_cli.main([str(arg) for arg in argv])
        except SystemExit as exit:  # argparse: --help (0) or a bad flag (2)
            code = exit.code
    text = err.getvalue().strip()
    if code == 0:
        return 0
    if "Traceback" in text or not text:
        raise RuntimeError(f"storm exited with {code} and no one-line error: {text[-300:]!r}")  # no names: unclear
    raise CommandError(text.splitlines()[-1])


def checkpoint_copy(folder: Path, source: Path = SHIPPED) -> Path:
    """A copy of a checkpoint folder: small files copied, the big ones linked (a case replaces what it changes)."""
    copy = folder / "checkpoint"
    copy.mkdir()
    for path in source.iterdir():
        if path.stat().st_size > 1_000_000:
            (copy / path.name).symlink_to(path)
        else:
            (copy / path.name).write_bytes(path.read_bytes())
    return copy


def edit_config(folder: Path, **fields) -> Path:
    """A checkpoint copy whose config.json has `fields` replaced."""
    copy = checkpoint_copy(folder)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(config | fields))
    return copy


def load(path, **options) -> object:
    from storm_transformers.loading import load_storm

    return load_storm(path, **options)


def dead_pid() -> int:
    """The PID of a process that has ended."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def jsonl(folder: Path, *lines, raw: bytes | None = None) -> Path:
    """A JSONL file of `lines` (objects, dumped) or the bytes `raw`."""
    path = folder / "train.jsonl"
    path.write_bytes(raw if raw is not None else "\n".join(json.dumps(line) for line in lines).encode() + b"\n")
    return path


def conversations(path: Path):
    from storm_transformers.training.data import load_conversations

    return load_conversations(path)


def user_video(**part):
    return {"role": "user", "content": [{"type": "video", **part}, {"type": "text", "text": "?"}]}


ANSWER = {"role": "assistant", "content": "An answer."}
GOOD_ROW = {"messages": [user_video(path="clip.mp4"), ANSWER]}

# ----------------------------------------------------------------------------------------------------------------
# Model config


def _config(**fields):
    from storm_transformers import StormConfig

    return StormConfig(**fields)


for field, value in [
    ("temporal_pool_size", 0),
    ("temporal_pool_size", -4),
    ("temporal_pool_size", 1.5),
    ("temporal_pool_size", True),
    ("temporal_pool_size", math.nan),
    ("temporal_pool_size", "4"),
    ("spatial_pool_size", 0),
    ("spatial_pool_size", 3),
    ("temporal_sample_rate", 0),
    ("temporal_sample_rate", -1),
    ("temporal_sample_rate", 2.0),
    ("downsample_factor", 0),
    ("vision_feature_layer", 99),
    ("vision_feature_layer", True),
    ("image_token_id", -1),
    ("video_token_id", 10**9),
    ("video_token_id", 151655),  # = image_token_id
]:
    CASES.append(
        Case("config", f"{field}={value!r}", lambda folder, f=field, v=value: _config(**{f: v}), names=(field,))
    )
for field, value in [
    ("state_size", 0),
    ("conv_kernel", -1),
    ("expand", 1.5),
    ("num_hidden_layers", -1),
    ("hidden_size", 0),
    ("time_step_rank", 0),
    ("time_step_rank", "big"),
    ("layer_norm_epsilon", math.nan),
    ("layer_norm_epsilon", 0.0),
    ("initializer_range", math.inf),
    ("bidirectional_merge", "max"),
    ("bidirectional", "yes"),
]:
    CASES.append(
        Case(
            "config",
            f"temporal_encoder_config.{field}={value!r}",
            lambda folder, f=field, v=value: _config(temporal_encoder_config={f: v}),
            names=(field,),
        )
    )
CASES += [
    Case("config", "unknown text_config model_type", lambda folder: _config(text_config={"model_type": "qwen9"}),
         names=("text_config", "qwen9")),
    Case("config", "vision image_size smaller than a patch",
         lambda folder: _config(vision_config={"model_type": "siglip_vision_model", "image_size": 8}),
         names=("image_size", "patch_size")),
    Case("config", "temporal_sample_rate=0 set after construction, then tokens counted",
         lambda folder: (config := _config(), setattr(config, "temporal_sample_rate", 0), config.num_video_tokens(8)),
         names=("temporal_sample_rate=0",)),
    Case("config", "30 frames with k=4", lambda folder: _config().num_video_tokens(30), names=("30", "28 or 32")),
    Case("config", "256 frames, k=4, s=2: 8192 tokens (paper §2.1)",
         lambda folder: _config(temporal_sample_rate=2).num_video_tokens(256), expect="accept",
         check=lambda tokens: tokens == 8192),
    Case("config", "vision_feature_layer=-28: the patch embeddings of 27 layers",
         lambda folder: _config(vision_feature_layer=-28).vision_feature_layer, expect="accept",
         check=lambda layer: layer == -28),
]

# ----------------------------------------------------------------------------------------------------------------
# CLI flags

GENERATE = ("generate", "--video", "clip.mp4", "--prompt", "?")
for flag, value in [
    ("--num-frames", "0"),
    ("--num-frames", "-4"),
    ("--num-frames", "2.5"),
    ("--num-frames", "many"),
    ("--fps", "0"),
    ("--fps", "-1"),
    ("--fps", "nan"),
    ("--fps", "inf"),
    ("--max-new-tokens", "0"),
    ("--temporal-sample-rate", "0"),
    ("--dtype", "banana"),
]:
    CASES.append(
        Case("cli", f"generate {flag} {value}", lambda folder, f=flag, v=value: storm(*GENERATE, f, v),
             names=(flag, value))
    )
CASES += [
    Case("cli", "generate --device banana", lambda folder: storm(*GENERATE, "--device", "banana"),
         names=("device", "banana")),
    Case("cli", "generate --device cuda:99", lambda folder: storm(*GENERATE, "--device", "cuda:99"),
         names=("cuda:99",)),
    Case("cli", "generate --model on a missing folder", lambda folder: storm(*GENERATE, "--model", folder / "nope"),
         names=("nope",)),
    Case("cli", "storm --help", lambda folder: storm("--help"), expect="accept", check=lambda code: code == 0),
    Case("cli", "generate --video on a missing file", lambda folder: storm(
        "generate", "--video", folder / "gone.mp4", "--prompt", "?"), names=("gone.mp4", "not found")),
    Case("cli", "generate --num-frames 1000 on a 35-frame video", lambda folder: storm(
        "generate", "--video", _numbered(folder, "clip.mp4"), "--prompt", "?", "--num-frames", "1000"),
         names=("1000 frames", "only 35")),
]
CONVERT = ("convert", "compose", "--vision", "siglip", "--llm", "llm", "--output", "out")
for flag, value in [
    ("--num-frames", "0"),
    ("--temporal-pool-size", "0"),
    ("--temporal-pool-size", "1.5"),
    ("--dtype", "fp8"),
]:
    CASES.append(
        Case("cli", f"convert compose {flag} {value}", lambda folder, f=flag, v=value: storm(*CONVERT, f, v),
             names=(flag, value))
    )
CASES += [
    Case("cli", "convert compose --num-frames 6 (k=4)",
         lambda folder: storm(*CONVERT[:-1], folder / "out", "--num-frames", "6"), names=("num_frames=6", "4 or 8")),
    Case("cli", "convert compose --push-to-hub 'not a repo id!'",
         lambda folder: storm(*CONVERT[:-1], folder / "out", "--push-to-hub", "not a repo id!"),
         names=("--push-to-hub", "not a repo id!")),
    Case("cli", "convert vila --num-frames 0",
         lambda folder: storm("convert", "vila", "--input", "v", "--output", "o", "--num-frames", "0"),
         names=("--num-frames",)),
    Case("cli", "train --num_frames 0", lambda folder: storm(
        "train", "--model_name_or_path", SHIPPED, "--dataset_name", jsonl(folder, GOOD_ROW), "--num_frames", "0",
        "--output_dir", folder / "run"), names=("num_frames=0",)),
    Case("cli", "train --lora_r 0", lambda folder: storm(
        "train", "--model_name_or_path", SHIPPED, "--dataset_name", jsonl(folder, GOOD_ROW), "--use_peft", "true",
        "--lora_r", "0", "--output_dir", folder / "run"), names=("lora_r=0",)),
]

# ----------------------------------------------------------------------------------------------------------------
# Checkpoint folders (Python: load_storm; the CLI: one line)


def _text_config(folder, **fields):
    """A checkpoint copy whose LLM config has `fields` replaced (the weights no longer fit)."""
    text = json.loads((SHIPPED / "config.json").read_text())["text_config"]
    text.pop("layer_types", None)  # one entry per layer: transformers derives it again
    return edit_config(folder, text_config=text | fields)


def _adapter(folder):
    adapter = folder / "my-lora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "base_model_name_or_path": "runs/sft", "r": 16})
    )
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    return adapter


def _truncated(folder):
    copy = checkpoint_copy(folder)
    (copy / "model.safetensors").unlink()
    (copy / "model.safetensors").write_bytes((SHIPPED / "model.safetensors").read_bytes()[:1_000_000])
    return copy


def _invalid_json(folder):
    copy = checkpoint_copy(folder)
    (copy / "config.json").write_text((copy / "config.json").read_text() + "\n}\n")
    return copy


def _not_utf8(folder):
    copy = checkpoint_copy(folder)
    (copy / "config.json").write_bytes((copy / "config.json").read_bytes().replace(b'"storm"', b'"st\xf6rm"'))
    return copy


def _no_processor(folder):
    copy = checkpoint_copy(folder)
    for name in ("processor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (copy / name).unlink()
    return copy


class _Payload:
    """Unpickling this creates the file `marker`: proof that a pickle ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle_only(folder):
    copy = checkpoint_copy(folder)
    (copy / "model.safetensors").unlink()
    (copy / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(folder / "pickle-ran")))
    return copy


def _missing_shard(folder):
    copy = checkpoint_copy(folder)
    (copy / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    return copy


def _foreign(folder):
    other = folder / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    return other


def _pickle_not_run(load_it):
    def call(folder):
        try:
            return load_it(_pickle_only(folder))
        finally:
            if (folder / "pickle-ran").exists():
                raise WrongResult("the pickle in pytorch_model.bin was executed")

    return call


CHECKPOINTS = [
    ("a PEFT LoRA adapter folder", _adapter, ("PEFT", "merge", "my-lora")),
    ("a llama folder", _foreign, ("'llama'", "not STORM")),
    ("a truncated model.safetensors", _truncated, ("model.safetensors", "truncated")),
    ("config.json with trailing garbage", _invalid_json, ("config.json", "line")),
    ("config.json not UTF-8", _not_utf8, ("config.json", "UTF-8")),
    ("config.json temporal_pool_size 0", lambda folder: edit_config(folder, temporal_pool_size=0),
     ("config.json", "temporal_pool_size")),
    ("config.json temporal_pool_size 1.5", lambda folder: edit_config(folder, temporal_pool_size=1.5),
     ("config.json", "temporal_pool_size")),
    ("config.json without model_type", lambda folder: edit_config(folder, model_type=None), ("model_type",)),
    ("no processor files", _no_processor, ("processor_config.json", "tokenizer")),
    ("config.json with one LLM layer more than the weights", lambda folder: _text_config(folder, num_hidden_layers=3),
     ("do not match", "missing", "layers.2")),
    ("config.json with one LLM layer less than the weights", lambda folder: _text_config(folder, num_hidden_layers=1),
     ("do not match", "unexpected", "layers.1")),
    ("config.json with another LLM MLP width", lambda folder: _text_config(folder, intermediate_size=100),
     ("do not match", "mis-shaped", "mlp")),
    ("config.json whose layer_types disagree with num_hidden_layers",
     lambda folder: edit_config(folder, text_config=json.loads((SHIPPED / "config.json").read_text())["text_config"]
                                | {"num_hidden_layers": 3}), ("config.json", "num_hidden_layers")),
    ("a shard the index names is missing", _missing_shard, ("model-00002-of-00002.safetensors",)),
    ("an empty folder", lambda folder: folder, ("config.json",)),
    ("a file instead of a folder", lambda folder: SHIPPED / "config.json", ("is a file",)),
]
# a real video: `storm generate` reads its index (the budget) before it loads the weights
GENERATE_WITH_VIDEO = ("generate", "--video", str(REPO / "examples" / "square_turns_green.mp4"), "--prompt", "?")
for name, make, names in CHECKPOINTS:
    CASES.append(Case("checkpoint", f"load_storm: {name}", lambda folder, m=make: load(m(folder)), names=names))
    CASES.append(Case("checkpoint", f"storm generate --model: {name}",
                      lambda folder, m=make: storm(*GENERATE_WITH_VIDEO, "--model", m(folder)), names=names))
CASES += [
    Case("checkpoint", "load_storm: pickle pytorch_model.bin only", _pickle_not_run(load), names=("pickle",)),
    Case("checkpoint", "storm generate --model: pickle pytorch_model.bin only",
         _pickle_not_run(lambda path: storm(*GENERATE_WITH_VIDEO, "--model", path)), names=("pickle",)),
    Case("checkpoint", "load_storm: the shipped miniature STORM", lambda folder: load(SHIPPED), expect="accept",
         check=lambda loaded: type(loaded[0]).__name__ == "StormForConditionalGeneration"
         and loaded[1].video_processor.num_frames == 8),
    Case("checkpoint", "load_storm: dtype='banana'", lambda folder: load(SHIPPED, dtype="banana"),
         names=("dtype='banana'",)),
    Case("checkpoint", "load_storm: device='cuda:99'", lambda folder: load(SHIPPED, device="cuda:99"),
         names=("cuda:99",)),
]

# ----------------------------------------------------------------------------------------------------------------
# Training data and arguments

CASES += [
    Case("training data", "a line that is not UTF-8",
         lambda folder: conversations(jsonl(folder, raw=json.dumps(GOOD_ROW).encode() + b"\n" + "{\"messages\": \"caf\u00e9\"}".encode("latin-1"))),
         names=("train.jsonl", "line 2", "UTF-8")),
    Case("training data", "content is a dict",
         lambda folder: conversations(jsonl(folder, {"messages": [{"role": "user", "content": {"text": "?"}}, ANSWER]})),
         names=("line 1", "message 0", "dict")),
    Case("training data", "content is an int",
         lambda folder: conversations(jsonl(folder, {"messages": [{"role": "user", "content": 7}, ANSWER]})),
         names=("line 1", "message 0", "int")),
    Case("training data", "a video path that is an int",
         lambda folder: conversations(jsonl(folder, GOOD_ROW, {"messages": [user_video(path=17), ANSWER]})),
         names=("line 2", "'path'", "17")),
    Case("training data", "a text part whose text is a number",
         lambda folder: conversations(jsonl(folder, {"messages": [
             {"role": "user", "content": [{"type": "text", "text": 3}]}, ANSWER]})), names=("line 1", "text")),
    Case("training data", "a message that is a string",
         lambda folder: conversations(jsonl(folder, {"messages": ["hello", ANSWER]})), names=("line 1", "message 0")),
    Case("training data", "a part that is a string",
         lambda folder: conversations(jsonl(folder, {"messages": [{"role": "user", "content": ["hi"]}, ANSWER]})),
         names=("line 1", "message 0", "'hi'")),
    Case("training data", "a line that is a JSON list",
         lambda folder: conversations(jsonl(folder, [GOOD_ROW])), names=("line 1", "messages")),
    Case("training data", "an empty file", lambda folder: conversations(jsonl(folder, raw=b"\n\n")),
         names=("train.jsonl", "no rows")),
    Case("training data", "an extra column with a string in one row and a number in another",
         lambda folder: conversations(jsonl(folder, GOOD_ROW | {"source": "a"}, GOOD_ROW | {"source": 3})),
         names=("train.jsonl", "different types")),
    Case("training data", "string contents and a system turn",
         lambda folder: conversations(jsonl(folder, {"messages": [
             {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}, ANSWER]}))[0]["messages"],
         expect="accept", check=lambda messages: messages[1]["content"][0]["text"] == "Hi?"),
    Case("training data", "a UTF-8 file with a byte-order mark",
         lambda folder: len(conversations(jsonl(folder, raw=b"\xef\xbb\xbf" + json.dumps(GOOD_ROW).encode()))),
         expect="accept", check=lambda rows: rows == 1),
    Case("training data", "a .json file", lambda folder: _training_data(dataset_name=str(folder / "train.json")),
         names=("train.json", "JSONL")),
]


def _training_data(**fields):
    from storm_transformers.training.sft import load_training_data

    return load_training_data(_data_args(**fields))


def _training_model(model_name_or_path, num_frames=8):
    from storm_transformers.training.sft import load_model_and_processor

    return load_model_and_processor(_model_args(model_name_or_path=str(model_name_or_path)), num_frames)


def _data_args(**fields):
    from storm_transformers.training.args import StormDataArguments

    return StormDataArguments(**({"dataset_name": "train.jsonl"} | fields))


def _model_args(**fields):
    from storm_transformers.training.args import StormModelArguments

    return StormModelArguments(**({"model_name_or_path": str(SHIPPED)} | fields))


for make, field, value in [
    (_data_args, "num_frames", 0),
    (_data_args, "num_frames", 2.5),
    (_data_args, "data_root", "/nonexistent/videos"),
    (_data_args, "dataset_name", ""),
    (_model_args, "temporal_pool_size", 0),
    (_model_args, "spatial_pool_size", -1),
    (_model_args, "temporal_sample_rate", 0),
    (_model_args, "lora_r", 0),
    (_model_args, "lora_alpha", 0),
    (_model_args, "lora_dropout", 1.5),
    (_model_args, "lora_dropout", math.nan),
    (_model_args, "trainable_modules", ["projector"]),
]:
    CASES.append(Case("training args", f"{field}={value!r}", lambda folder, m=make, f=field, v=value: m(**{f: v}),
                      names=(field,)))
CASES += [
    Case("training args", "model_name_or_path: a LoRA adapter folder",
         lambda folder: _training_model(_adapter(folder)), names=("PEFT", "merge")),
    Case("training args", "num_frames=6 with the shipped checkpoint's k=4", lambda folder: _training_model(SHIPPED, 6),
         names=("num_frames=6", "4 or 8")),
]

# ----------------------------------------------------------------------------------------------------------------
# Conversions


def _compose(folder, vision=None, llm=None, output=None, **options):
    from storm_transformers.conversion.compose import compose

    (folder / "siglip").mkdir(exist_ok=True)
    (folder / "llm").mkdir(exist_ok=True)
    return compose(vision or folder / "siglip", llm or folder / "llm", output or folder / "out", **options)


def _gguf(folder, source):
    from storm_transformers.conversion.gguf import convert_gguf

    return convert_gguf(source, folder / "out")


def _stale_staging_removed(folder):
    from storm_transformers.conversion.checkpoint import _staging_prefix, staging_folder

    output = folder / "out"
    stale = folder / (_staging_prefix(output).replace(f"-{os.getpid()}-", f"-{dead_pid()}-") + "x1")
    live = folder / (_staging_prefix(output) + "x2")  # this process: running
    stale.mkdir()
    live.mkdir()
    with redirect_stdout(io.StringIO()), staging_folder(output) as staging:
        (staging / "config.json").write_text("{}")
    return not stale.exists() and live.exists() and (output / "config.json").exists()


CASES += [
    Case("conversion", "compose num_frames=0 (was silently 32)", lambda folder: _compose(folder, num_frames=0),
         names=("num_frames=0",)),
    Case("conversion", "compose num_frames=2.5", lambda folder: _compose(folder, num_frames=2.5),
         names=("num_frames", "2.5")),
    Case("conversion", "compose temporal_pool_size=0", lambda folder: _compose(folder, temporal_pool_size=0),
         names=("temporal_pool_size=0",)),
    Case("conversion", "compose push_to_hub_repo='a/b/c'", lambda folder: _compose(folder, push_to_hub_repo="a/b/c"),
         names=("a/b/c",)),
    Case("conversion", "compose --llm a .gguf file",
         lambda folder: _compose(folder, llm=(folder / "model.gguf", (folder / "model.gguf").write_bytes(b"GGUF"))[0]),
         names=("GGUF", "storm convert gguf --input")),
    Case("conversion", "compose into an existing folder",
         lambda folder: _compose(folder, output=(folder / "mine", (folder / "mine").mkdir())[0]),
         names=("mine", "already exists")),
    Case("conversion", "gguf: a file that is not GGUF",
         lambda folder: _gguf(folder, (folder / "model.gguf", (folder / "model.gguf").write_text("hello"))[0]),
         names=("model.gguf", "not a GGUF")),
    Case("conversion", "gguf: a missing file", lambda folder: _gguf(folder, folder / "nope.gguf"), names=("nope.gguf",)),
    Case("conversion", "a stale staging folder of a killed run is removed, a running one's kept",
         _stale_staging_removed, expect="accept", check=bool),
]


# ----------------------------------------------------------------------------------------------------------------
# Video files: written with PyAV in the case's folder (tests/video_files.py). Every accepted decode is checked frame
# by frame: `numbered_frames` carry their index, which `frame_index` reads back, so a neighbouring frame is a silent
# wrong result, not a pass.

FRAMES = 35  # frames of the numbered test videos (25 fps, 1.4 s)
WANTED = [0, 3, 4, 12, 13, 27, 34]  # spans keyframe intervals, neighbours, both ends


def _videos():
    import video_files

    return video_files


def _decoding():
    from storm_transformers import video_processing_storm

    return video_processing_storm


def _numbered(folder, name, count=FRAMES, **options) -> str:
    """A video of `numbered_frames(count)` (64×96) at `folder/name`, keyframes every 8 frames unless given."""
    files = _videos()
    return files.write_video(folder / name, files.numbered_frames(count), **{"gop_size": 8, **options})


def read(source, indices) -> list[int]:
    """Decode the frames at `indices` of `source` with `read_video_pyav`; the indices the decoded frames carry."""
    frames, metadata = _decoding().read_video_pyav(source, lambda metadata: np.array(indices))
    if metadata.frames_indices != list(indices):
        raise WrongResult(f"metadata.frames_indices {metadata.frames_indices} != asked {list(indices)}")
    return [_videos().frame_index(frame) for frame in frames]


def same_frames(indices=WANTED):
    """`check`: the decoded frames carry exactly the indices asked for."""
    return lambda found: found == list(indices)


class captured_warnings:
    """`with captured_warnings() as log:` collects the warnings logged meanwhile (`log.getvalue()`)."""

    def __enter__(self):
        import logging

        self.stream = io.StringIO()
        self.handler = logging.StreamHandler(self.stream)
        self.handler.setLevel(logging.WARNING)
        logging.getLogger().addHandler(self.handler)
        return self.stream

    def __exit__(self, *exc):
        import logging

        logging.getLogger().removeHandler(self.handler)


def _processor_frames(video, **kwargs):
    """`StormVideoProcessor` (32×32 frames) on `video`: (pixel_values_videos, video_metadata)."""
    from storm_transformers import StormVideoProcessor

    out = StormVideoProcessor(size={"height": 32, "width": 32})(
        video, return_metadata=True, return_tensors="pt", **kwargs
    )
    return out["pixel_values_videos"], out["video_metadata"]


def _sampled_indices(video, **kwargs) -> list[int]:
    """The frame indices the processor sampled from `video` (a numbered video file), checked against the frames."""
    from storm_transformers import StormVideoProcessor

    out = StormVideoProcessor(size={"height": 64, "width": 96})(
        video, return_metadata=True, return_tensors="pt", do_normalize=False, **kwargs
    )
    pixels, metadata = out["pixel_values_videos"][0], out["video_metadata"][0]
    frames = (pixels.permute(0, 2, 3, 1) * 255).round().byte().numpy()  # (T, 64, 96, 3)
    carried = [_videos().frame_index(frame) for frame in frames]
    if carried != metadata.frames_indices:
        raise WrongResult(f"frames carry {carried} but video_metadata.frames_indices says {metadata.frames_indices}")
    return carried


VIDEO_CONTAINERS = [  # name, file, write_video options: each sampled at WANTED and compared with the frames' indices
    ("MPEG-TS, MPEG-2 with B-frames", "clip.ts", {"codec": "mpeg2video", "b_frames": 2}),
    ("MPEG-TS, H.264 with B-frames", "clip.ts", {"b_frames": 3}),
    ("AVI, MPEG-4 ASP with B-frames, keyframes every 3", "clip.avi", {"codec": "mpeg4", "b_frames": 2, "gop_size": 3}),
    ("AVCHD-like .MTS, H.264 with B-frames", "clip.MTS", {"b_frames": 3, "container_format": "mpegts"}),
    ("raw H.264 elementary stream (.h264)", "clip.h264", {"b_frames": 3, "container_format": "h264"}),
    ("MP4, H.264 with B-frames", "clip.mp4", {"b_frames": 3}),
    ("MP4 with faststart, one keyframe", "clip.mp4", {"options": {"movflags": "faststart"}, "gop_size": 250}),
    ("Matroska, H.264 with B-frames", "clip.mkv", {"b_frames": 3}),
    ("WebM, VP9", "clip.webm", {"codec": "libvpx-vp9"}),
    ("MOV, H.264", "clip.mov", {}),
    ("an MP4 named .avi (the suffix lies)", "clip.avi", {"codec": "libx264", "container_format": "mp4"}),
]
for title, filename, options in VIDEO_CONTAINERS:
    CASES.append(Case("video file", f"{title}: frames {WANTED}",
                      lambda folder, f=filename, o=options: read(_numbered(folder, f, **o), WANTED),
                      expect="accept", check=same_frames()))


def _gif(folder) -> str:
    """An animated GIF of the numbered frames (palette: the black/white columns survive)."""
    import av

    frames = _videos().numbered_frames(FRAMES)
    path = folder / "clip.gif"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("gif", rate=25)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "rgb8"
        for i, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return str(path)


def _vfr(folder):
    """A variable-frame-rate MP4 (gaps of 20..120 ms) sampled at fps=10: each frame is the one its time says."""
    times = np.cumsum([0.0, *np.random.default_rng(0).choice([0.02, 0.04, 0.12], FRAMES - 1)])
    path = _videos().write_video(folder / "vfr.mp4", _videos().numbered_frames(FRAMES), timestamps=times, gop_size=8)
    frames, metadata = _decoding().read_video_pyav(
        path, lambda metadata: _decoding().sample_frame_indices(metadata, fps=10)
    )
    carried = [_videos().frame_index(frame) for frame in frames]
    wrong = [(t, times[i]) for t, i in zip(metadata.timestamps, carried) if abs(t - times[i]) > 1e-3]
    if carried != metadata.frames_indices or wrong:
        raise WrongResult(f"frames {carried} for indices {metadata.frames_indices}; (time, frame's time) {wrong}")
    # 10 fps: a frame nearest to each of 0.0, 0.1, 0.2 … s (ties either way), in order
    targets = np.arange(len(carried)) / 10
    nearest = all(abs(times[i] - t) <= abs(times - t).min() + 1e-6 for i, t in zip(carried, targets))
    return nearest and carried == sorted(set(carried)) and len(carried) >= int(times[-1] * 10)  # 2.18 s: >= 21


def _rotated(folder, degrees):
    """A phone video with a display matrix: decoded upright, as players show it."""
    files = _videos()
    frames = np.zeros((4, 32, 48, 3), dtype=np.uint8)
    frames[:, :8, :12] = 255  # a white top-left corner
    path = files.rotate_mp4(files.write_video(folder / "phone.mp4", frames), degrees)
    import av

    with av.open(path) as container:
        stored = next(container.decode(video=0)).to_ndarray(format="rgb24")  # as stored: (32, 48, 3)
    decoded, metadata = _decoding().read_video_pyav(path, lambda metadata: np.array([0]))
    upright = np.rot90(stored, degrees // 90)
    return decoded[0].shape == upright.shape and np.array_equal(decoded[0], upright) and (
        metadata.height, metadata.width) == upright.shape[:2]


def _all_pts_zero(folder):
    path = _videos().write_constant_pts(folder / "pts0.mkv", _videos().numbered_frames(20))
    with captured_warnings() as log:
        found = read(path, [0, 5, 9, 19])
    return found, "pts0.mkv has missing or repeated timestamps" in log.getvalue()


def _resolution_change(folder):
    files = _videos()
    path = files.write_resolution_change(
        folder / "change.ts", files.numbered_frames(30, 64, 96)[:12], files.numbered_frames(30, 32, 48)[12:]
    )
    frames, metadata = _decoding().read_video_pyav(path, lambda metadata: np.array([0, 11, 12, 13, 29]))
    return frames.shape, [files.frame_index(frame) for frame in frames]


def _corrupt_slices(folder):
    files = _videos()
    path = files.write_corrupt_slices(folder / "damaged.mp4", files.textured_frames(20), damaged=(3, 4))
    with captured_warnings() as log:
        _decoding().read_video_pyav(path, lambda metadata: np.array([0, 2, 4, 6, 12]))
    return log.getvalue()


def _bytes_forms(folder, wrap):
    """The encoded bytes of a video, given as `wrap(data)` (memoryview, bytearray, BytesIO, a binary file)."""
    data = Path(_numbered(folder, "clip.mp4", b_frames=3)).read_bytes()
    return read(wrap(data, folder), WANTED)


def _binary_file(data, folder):
    (folder / "copy.mp4").write_bytes(data)
    return open(folder / "copy.mp4", "rb")  # noqa: SIM115 — read_video_pyav reads it; the case folder is removed


def _text_file(folder):
    _numbered(folder, "clip.mp4")
    with open(folder / "clip.mp4", encoding="utf-8") as text:
        return read(text, [0])


def _serve_404(folder):
    """An http URL that answers 404 (a local server; no internet needed)."""
    import http.server
    import threading

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: Handler(*a, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        return read(f"http://127.0.0.1:{server.server_address[1]}/missing.mp4", [0])
    finally:
        server.shutdown()
        server.server_close()


def _served(folder):
    """The same, for a file that is there: accepted with the right frames."""
    import http.server
    import threading

    _numbered(folder, "clip.mp4", b_frames=3)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: Handler(*a, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        return read(f"http://127.0.0.1:{server.server_address[1]}/clip.mp4", WANTED)
    finally:
        server.shutdown()
        server.server_close()


def _truncated_video(folder):
    path = Path(_numbered(folder, "clip.mp4", options={"movflags": "faststart"}))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return read(path, [0, 30])


def _png(folder):
    from PIL import Image

    Image.fromarray(_videos().numbered_frames(1)[0]).save(folder / "still.png")
    return _processor_frames(str(folder / "still.png"), num_frames=8)


def _frame_files(folder, missing=False):
    from PIL import Image

    paths = []
    for i, frame in enumerate(_videos().numbered_frames(8)):
        paths.append(folder / f"{i:04d}.png")
        if not (missing and i == 5):
            Image.fromarray(frame).save(paths[-1])
    return _sampled_indices([str(path) for path in paths], do_sample_frames=False)  # already sampled: all 8 frames


def _frame_files_sampled(folder):
    """Frame files with the default frame sampling on: transformers refuses to sample them again; so do we."""
    _frame_files(folder)
    return _sampled_indices(sorted(str(path) for path in folder.glob("*.png")), num_frames=4)


CASES += [
    Case("video file", "an animated GIF", lambda folder: read(_gif(folder), WANTED), expect="accept",
         check=same_frames()),
    Case("video file", "variable frame rate, fps=10: each frame at its real time", _vfr, expect="accept", check=bool),
    Case("video file", "phone video, display matrix 90°: upright", lambda folder: _rotated(folder, 90),
         expect="accept", check=bool),
    Case("video file", "phone video, display matrix -90°: upright", lambda folder: _rotated(folder, -90),
         expect="accept", check=bool),
    Case("video file", "display matrix 180°: upright", lambda folder: _rotated(folder, 180), expect="accept",
         check=bool),
    Case("video file", "every packet has pts 0: frames in decode order, a warning", _all_pts_zero, expect="accept",
         check=lambda result: result == ([0, 5, 9, 19], True)),
    Case("video file", "resolution change mid-stream (MPEG-TS): the right frames at the first size",
         _resolution_change, expect="accept", check=lambda result: result == ((5, 64, 96, 3), [0, 11, 12, 13, 29])),
    Case("video file", "H.264 with corrupt slices: a warning naming the file and frames", _corrupt_slices,
         expect="accept", check=lambda log: "damaged.mp4" in log and "concealed" in log and "[3, 4]" in log
         and "[4, 6]" in log),
    Case("video file", "a memoryview of the encoded bytes", lambda folder: _bytes_forms(folder, lambda d, f: memoryview(d)),
         expect="accept", check=same_frames()),
    Case("video file", "a bytearray", lambda folder: _bytes_forms(folder, lambda d, f: bytearray(d)), expect="accept",
         check=same_frames()),
    Case("video file", "an io.BytesIO", lambda folder: _bytes_forms(folder, lambda d, f: io.BytesIO(d)),
         expect="accept", check=same_frames()),
    Case("video file", "a binary file object", lambda folder: _bytes_forms(folder, _binary_file), expect="accept",
         check=same_frames()),
    Case("video file", "a pathlib.Path", lambda folder: read(Path(_numbered(folder, "clip.mp4")), WANTED),
         expect="accept", check=same_frames()),
    Case("video file", "a URL that is served", _served, expect="accept", check=same_frames()),
    Case("video file", "a text-mode file object", _text_file, names=("text mode", "'rb'")),
    Case("video file", "a URL that answers 404", _serve_404, names=("missing.mp4", "404")),
    Case("video file", "a URL with nothing listening", lambda folder: read("http://127.0.0.1:9/clip.mp4", [0]),
         names=("http://127.0.0.1:9/clip.mp4", "download")),
    Case("video file", "a 0-byte file", lambda folder: read((folder / "empty.mp4", (folder / "empty.mp4").touch())[0],
                                                        [0]), names=("empty.mp4", "0 bytes")),
    Case("video file", "empty bytes", lambda folder: read(b"", [0]), names=("0 bytes",)),
    Case("video file", "a directory path", lambda folder: read(folder, [0]), names=(str(Path("/")), "folder")),
    Case("video file", "a missing file", lambda folder: read(folder / "nope.mp4", [0]), names=("nope.mp4", "not found")),
    Case("video file", "a text file named .mp4",
         lambda folder: read((folder / "notes.mp4", (folder / "notes.mp4").write_text("hello " * 100))[0], [0]),
         names=("notes.mp4", "not a video")),
    Case("video file", "random bytes", lambda folder: read(np.random.default_rng(0).bytes(5000), [0]),
         names=("5000 bytes", "not a video")),
    Case("video file", "an audio-only WAV file",
         lambda folder: read(_videos().write_audio_only(folder / "speech.wav"), [0]),
         names=("speech.wav", "no video stream")),
    Case("video file", "an MP4 cut in half", _truncated_video, names=("clip.mp4", "truncated")),
    Case("video file", "frame indices past the end", lambda folder: read(_numbered(folder, "clip.mp4"), [0, 35]),
         names=("35", "outside")),
    Case("video file", "a negative frame index", lambda folder: read(_numbered(folder, "clip.mp4"), [-1]),
         names=("-1", "outside")),
    Case("video file", "a PNG path as a video, 8 frames", _png, names=("8 frames", "only 1")),
    Case("video file", "a list of PNG frame files: one already-sampled video", _frame_files, expect="accept",
         check=lambda found: found == list(range(8))),
    Case("video file", "a list of frame files with one missing", lambda folder: _frame_files(folder, missing=True),
         names=("0005.png", "not found")),
]

# ----------------------------------------------------------------------------------------------------------------
# Sampling arguments of the video processor (a 35-frame numbered MP4; the frames sampled are checked)

_CLIP = "clip.mp4"
for argument, value, names in [
    ("num_frames", 0, ("num_frames", "at least 1")),
    ("num_frames", -3, ("num_frames", "-3")),
    ("num_frames", 2.5, ("num_frames", "2.5")),
    ("num_frames", True, ("num_frames", "True")),
    ("num_frames", "8", ("num_frames", "'8'")),
    ("num_frames", 10**6, ("1000000 frames", "only 35")),
    ("fps", 0, ("fps", "0")),
    ("fps", -1, ("fps", "-1")),
    ("fps", math.nan, ("fps", "nan")),
    ("fps", math.inf, ("fps", "inf")),
    ("fps", "2", ("fps", "'2'")),
    ("fps", True, ("fps", "True")),
    ("max_frames", 0, ("max_frames",)),
    ("temporal_pool_size", 0, ("temporal_pool_size",)),
    ("size", {"height": 0, "width": 32}, ("size", "height")),
    ("size", {"height": 32.5, "width": 32}, ("size", "32.5")),
]:
    CASES.append(Case("sampling", f"{argument}={value!r}",
                      lambda folder, a=argument, v=value: _sampled_indices(_numbered(folder, _CLIP), **{a: v}),
                      names=names))
CASES += [
    Case("sampling", "num_frames and fps both", lambda folder: _sampled_indices(
        _numbered(folder, _CLIP), num_frames=8, fps=2), names=("num_frames", "fps", "not both")),
    Case("sampling", "num_frames=8 over 35 frames: uniform, both ends", lambda folder: _sampled_indices(
        _numbered(folder, _CLIP), num_frames=8), expect="accept", check=lambda found: found == [0, 5, 10, 15, 19, 24, 29, 34]),
    Case("sampling", "num_frames=35: every frame", lambda folder: _sampled_indices(
        _numbered(folder, _CLIP), num_frames=35), expect="accept", check=lambda found: found == list(range(35))),
    Case("sampling", "numpy int64 num_frames", lambda folder: _sampled_indices(
        _numbered(folder, _CLIP), num_frames=np.int64(4)), expect="accept", check=lambda found: found == [0, 11, 23, 34]),
    Case("sampling", "fps=5, k=4: floor(1.4 s · 5) = 7 floored to 4 frames", lambda folder: _sampled_indices(
        _numbered(folder, _CLIP), fps=5, temporal_pool_size=4), expect="accept",
         check=lambda found: len(found) == 4 and found[0] == 0 and found == sorted(set(found))),
    Case("sampling", "fps=1 on a 1.4 s video with k=4: k frames, not an error", lambda folder: _sampled_indices(
        _numbered(folder, _CLIP), fps=1, temporal_pool_size=4), expect="accept",
         check=lambda found: len(found) == 4 and found == sorted(set(found))),
    Case("sampling", "fps=1000 (more frames than the video has)", lambda folder: _sampled_indices(
        _numbered(folder, _CLIP), fps=1000), names=("only 35", "lower fps")),
    Case("sampling", "fps=1000 capped by max_frames=8: 8 frames over the whole video", lambda folder: _sampled_indices(
        _numbered(folder, _CLIP), fps=1000, max_frames=8), expect="accept",
         check=lambda found: len(found) == 8 and found[0] == 0 and found[-1] >= 29),
    Case("sampling", "keyframes_only with fewer keyframes than frames asked", lambda folder: _sampled_indices(
        _numbered(folder, _CLIP), num_frames=8, keyframes_only=True), names=("keyframes_only", "5 keyframes")),
    Case("sampling", "keyframes_only: 5 keyframes of a TS file", lambda folder: _sampled_indices(
        _numbered(folder, "clip.ts", b_frames=3), num_frames=5, keyframes_only=True), expect="accept",
         check=lambda found: found == [0, 8, 16, 24, 32]),
    Case("sampling", "do_rescale=False with a video file", lambda folder: _processor_frames(
        _numbered(folder, _CLIP), do_rescale=False, num_frames=4), names=("do_rescale=False", "uint8")),
    Case("sampling", "two video_metadata entries for one video", lambda folder: _processor_frames(
        _numbered(folder, _CLIP), num_frames=4, video_metadata=[{"fps": 25}, {"fps": 25}]),
         names=("1 videos", "2 video_metadata")),
]

# ----------------------------------------------------------------------------------------------------------------
# Decoded frames: arrays, tensors, PIL images (StormVideoProcessor, 32×32 output)


def _pixels(video, **kwargs):
    return _processor_frames(video, **kwargs)[0]


def _grey(value, count=4, shape=(32, 32, 3), dtype=np.uint8):
    return np.full((count, *shape), value, dtype=dtype)


def _normalised(value):
    """`check`: every output pixel equals `value` (0..255) rescaled and normalised (mean = std = 0.5)."""
    return lambda pixels: bool(torch_allclose(pixels, value / 255 * 2 - 1))


def torch_allclose(tensor, value) -> bool:
    return float((tensor - value).abs().max()) < 1e-4


def _pil_frames(modes, sizes=None):
    from PIL import Image

    sizes = sizes or [(32, 32)] * len(modes)
    return [Image.new(mode, size, {"RGB": (100, 100, 100), "RGBA": (100, 100, 100, 7), "L": 100, "P": 0}[mode])
            for mode, size in zip(modes, sizes)]


def _ragged(folder):
    """Two decoded videos of 12 and 20 frames at 10 fps, fps=5, k=2: 6 and 10 frames; the shorter padded by repeating its
    last frame, which its frames_indices list."""
    pixels, metadata = _processor_frames(
        [_grey(50, 12), _grey(150, 20)], fps=5, temporal_pool_size=2, video_metadata=[{"fps": 10}, {"fps": 10}]
    )
    return tuple(pixels.shape), metadata[0].frames_indices, metadata[1].frames_indices


def _path_and_array(folder):
    pixels, metadata = _processor_frames([_numbered(folder, _CLIP), _grey(200, 8)], num_frames=4)
    return tuple(pixels.shape), metadata[0].frames_indices, torch_allclose(pixels[1], 200 / 255 * 2 - 1)


CASES += [
    Case("frames", "uint8 (T, H, W, 3)", lambda folder: _pixels(_grey(100), num_frames=4), expect="accept",
         check=_normalised(100)),
    Case("frames", "uint8 channels first (T, 3, H, W)",
         lambda folder: _pixels(_grey(100).transpose(0, 3, 1, 2), num_frames=4), expect="accept",
         check=_normalised(100)),
    Case("frames", "a torch uint8 tensor", lambda folder: _pixels(__import__("torch").full((4, 32, 32, 3), 100,
         dtype=__import__("torch").uint8), num_frames=4), expect="accept", check=_normalised(100)),
    Case("frames", "a BGR→RGB view (negative strides)", lambda folder: _pixels(_grey(100)[..., ::-1], num_frames=4),
         expect="accept", check=_normalised(100)),
    Case("frames", "float32 in 0..1 with do_rescale=True (was all -1)", lambda folder: _pixels(
        _grey(0.4, dtype=np.float32), num_frames=4), names=("0..1", "do_rescale=False")),
    Case("frames", "float32 in 0..1 with do_rescale=False", lambda folder: _pixels(
        _grey(100 / 255, dtype=np.float32), num_frames=4, do_rescale=False), expect="accept", check=_normalised(100)),
    Case("frames", "float32 in 0..255", lambda folder: _pixels(_grey(100, dtype=np.float32), num_frames=4),
         expect="accept", check=_normalised(100)),
    Case("frames", "float in 0..255 with do_rescale=False", lambda folder: _pixels(
        _grey(100, dtype=np.float32), num_frames=4, do_rescale=False), names=("do_rescale=False", "0..1")),
    Case("frames", "uint16 over 255 (was out of range)", lambda folder: _pixels(
        _grey(40000, dtype=np.uint16), num_frames=4), names=("uint16", "0..255", "// 257")),
    Case("frames", "uint16 within 0..255", lambda folder: _pixels(_grey(100, dtype=np.uint16), num_frames=4),
         expect="accept", check=_normalised(100)),
    Case("frames", "int8 with negative values", lambda folder: _pixels(_grey(-5, dtype=np.int8), num_frames=4),
         names=("int8", "0..255")),
    Case("frames", "float64 with a NaN", lambda folder: _pixels(
        (a := _grey(100, dtype=np.float64), a.__setitem__((0, 0, 0, 0), np.nan))[0], num_frames=4), names=("NaN",)),
    Case("frames", "float with negative values", lambda folder: _pixels(_grey(-0.5, dtype=np.float32), num_frames=4),
         names=("-0.5", "0..255")),
    Case("frames", "bool frames", lambda folder: _pixels(np.ones((4, 32, 32, 3), dtype=bool), num_frames=4),
         names=("bool", "uint8")),
    Case("frames", "complex frames", lambda folder: _pixels(np.ones((4, 32, 32, 3), dtype=np.complex64),
                                                           num_frames=4), names=("complex64",)),
    Case("frames", "an array of strings", lambda folder: _pixels(np.full((4, 32, 32, 3), "a"), num_frames=4),
         names=("<U1", "uint8")),
    Case("frames", "an empty array (0 frames)", lambda folder: _pixels(np.zeros((0, 32, 32, 3), np.uint8)),
         names=("no frames",)),
    Case("frames", "frames of 0×0 pixels", lambda folder: _pixels(np.zeros((4, 0, 0, 3), np.uint8)),
         names=("no pixels",)),
    Case("frames", "an empty list", lambda folder: _pixels([]), names=("no video", "empty")),
    Case("frames", "grayscale (T, H, W): 3-D", lambda folder: _pixels(np.zeros((4, 32, 32), np.uint8)),
         names=("4 dimensions", "(4, 32, 32)")),
    Case("frames", "grayscale (T, H, W, 1)", lambda folder: _pixels(np.zeros((4, 32, 32, 1), np.uint8)),
         names=("3 colour channels", "np.repeat")),
    Case("frames", "RGBA (T, H, W, 4)", lambda folder: _pixels(np.zeros((4, 32, 32, 4), np.uint8)),
         names=("3 colour channels", "[..., :3]")),
    Case("frames", "a 6-D array", lambda folder: _pixels(np.zeros((1, 1, 4, 32, 32, 3), np.uint8)),
         names=("4 dimensions", "(1, 1, 4, 32, 32, 3)")),
    Case("frames", "a 5-D array: a batch of 2 videos", lambda folder: _pixels(
        np.stack([_grey(50), _grey(150)]), num_frames=4), expect="accept",
         check=lambda pixels: pixels.shape == (2, 4, 3, 32, 32) and torch_allclose(pixels[1], 150 / 255 * 2 - 1)),
    Case("frames", "PIL frames of different sizes", lambda folder: _pixels(
        _pil_frames(["RGB"] * 4, [(32, 32)] * 3 + [(48, 32)]), num_frames=4), names=("frame 3", "one size")),
    Case("frames", "PIL RGBA frames (alpha dropped)", lambda folder: _pixels(_pil_frames(["RGBA"] * 4), num_frames=4),
         expect="accept", check=_normalised(100)),
    Case("frames", "PIL grayscale (L) frames", lambda folder: _pixels(_pil_frames(["L"] * 4), num_frames=4),
         expect="accept", check=_normalised(100)),
    Case("frames", "PIL frames of mixed modes (RGB, L, RGBA)", lambda folder: _pixels(
        _pil_frames(["RGB", "L", "RGBA", "RGB"]), num_frames=4), expect="accept", check=_normalised(100)),
    Case("frames", "a single PIL image", lambda folder: _pixels(_pil_frames(["RGB"])[0]),
         names=("single image", "images=")),
    Case("frames", "a list mixing frames and a path", lambda folder: _pixels([_grey(1)[0], "clip.mp4"]),
         names=("mixes", "str")),
    Case("frames", "an int", lambda folder: _pixels(7), names=("int", "7")),
    Case("frames", "a content part dict", lambda folder: _pixels({"type": "video", "path": "clip.mp4"}),
         names=("dict", "'path'")),
    Case("frames", "None inside a batch", lambda folder: _pixels([_grey(1), None]), names=("NoneType",)),
    Case("frames", "more frames asked than the array has", lambda folder: _pixels(_grey(1), num_frames=8),
         names=("8 frames", "only 4")),
    Case("frames", "fps sampling of an array without video_metadata", lambda folder: _pixels(_grey(1, 20), fps=2),
         names=("fps", "video_metadata")),
    Case("frames", "ragged fps batch: 12 and 20 frames at 10 fps, fps=5, k=2 (padded)", _ragged, expect="accept",
         check=lambda result: result == ((2, 10, 3, 32, 32), [0, 2, 4, 6, 8, 10, 10, 10, 10, 10],
                                         list(range(0, 20, 2)))),
    Case("frames", "a batch of a file path and an array", _path_and_array, expect="accept",
         check=lambda result: result == ((2, 4, 3, 32, 32), [0, 11, 23, 34], True)),
    Case("frames", "frames of two sizes in one batch, do_resize=False", lambda folder: _pixels(
        [_grey(1), _grey(1, shape=(48, 48, 3))], num_frames=4, do_resize=False), names=("one frame size", "do_resize")),
]

# ----------------------------------------------------------------------------------------------------------------
# The processor (the shipped checkpoint's) and the model (a tiny one from tests/storm_testing.py)


@functools.cache
def _shipped_processor():
    from storm_transformers import StormProcessor

    return StormProcessor.from_pretrained(SHIPPED)


def _processor(**settings):
    """A copy of the shipped processor (k=4, 64×64 frames, 16 tokens per 4 frames) with `settings` changed."""
    processor = copy.copy(_shipped_processor())
    for name, value in settings.items():
        setattr(processor, name, value)
    return processor


def _chat(conversations, processor=None, **kwargs):
    """`apply_chat_template` of `conversations`, tokenized, with 4 frames per video unless `kwargs` say otherwise."""
    return (processor or _processor()).apply_chat_template(
        conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
        processor_kwargs={"num_frames": 4, "padding": True} | kwargs,
    )  # every processor argument in processor_kwargs: transformers 5.17 drops them all if one is passed outside


def _video_turn(video, text="What happens?"):
    return [{"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": text}]}]


def _video_tokens(inputs) -> list[int]:
    return (inputs["input_ids"] == _shipped_processor().video_token_id).sum(dim=1).tolist()


@functools.cache
def _tiny_model():
    from storm_testing import tiny_config

    from storm_transformers import StormForConditionalGeneration

    return StormForConditionalGeneration(tiny_config()).eval()


def _forward(**changes):
    """A forward pass of the tiny model (32×32 frames, k=2, 4 tokens per pooled frame) on 4 frames, with `changes`
    to the inputs (each a function of the default value, or a value)."""
    import torch
    from storm_testing import video_inputs

    model = _tiny_model()
    inputs = video_inputs(model.config, num_frames=4)
    for key, change in changes.items():
        inputs[key] = change(inputs[key]) if callable(change) else change
    with torch.no_grad():
        return model(**inputs).logits


def _config_changed(**fields):
    """Run `_forward` with `fields` set on the model's config (restored after)."""
    config = _tiny_model().config
    saved = {name: getattr(config, name) for name in fields}
    try:
        for name, value in fields.items():
            setattr(config, name, value)
        return _forward()
    finally:
        for name, value in saved.items():
            setattr(config, name, value)


CASES += [
    Case("processor", "a video conversation and a text-only one in one batch",
         lambda folder: _video_tokens(_chat([_video_turn(_grey(9, 8)), [{"role": "user", "content": "Hi?"}]])),
         expect="accept", check=lambda tokens: tokens == [16, 0]),
    Case("processor", "a batch of a file path and an array",
         lambda folder: _video_tokens(_chat([_video_turn(_numbered(folder, _CLIP)), _video_turn(_grey(9, 8))])),
         expect="accept", check=lambda tokens: tokens == [16, 16]),
    Case("processor", "temporal_sample_rate=0", lambda folder: _chat([_video_turn(_grey(9, 8))],
                                                                     _processor(temporal_sample_rate=0)),
         names=("temporal_sample_rate", "0")),
    Case("processor", "temporal_pool_size=1.5", lambda folder: _chat([_video_turn(_grey(9, 8))],
                                                                     _processor(temporal_pool_size=1.5)),
         names=("temporal_pool_size", "1.5")),
    Case("processor", "6 frames with k=4", lambda folder: _chat([_video_turn(_grey(9, 8))], num_frames=6),
         names=("6", "4 or 8")),
    Case("processor", "num_frames=0", lambda folder: _chat([_video_turn(_grey(9, 8))], num_frames=0),
         names=("num_frames", "at least 1")),
    Case("processor", "non-square frame size", lambda folder: _chat([_video_turn(_grey(9, 8))],
                                                                    size={"height": 64, "width": 32}),
         names=("square", "64×32")),
    Case("processor", "a frame size the vision tower does not take", lambda folder: _chat(
        [_video_turn(_grey(9, 8))], size={"height": 32, "width": 32}), names=("32×32", "64×64")),
    Case("processor", "two video placeholders in the text, one video", lambda folder: _processor()(
        text="<|video_pad|> and <|video_pad|>", videos=[_grey(9, 8)], num_frames=4), names=("2 <|video_pad|>", "1 video")),
    Case("processor", "a video placeholder in the text, no video", lambda folder: _processor()(
        text="<|video_pad|>?"), names=("<|video_pad|>", "no videos")),
    Case("processor", "a video and no placeholder in the text", lambda folder: _processor()(
        text="What happens?", videos=[_grey(9, 8)], num_frames=4), names=("0 <|video_pad|>", "1 video")),
    Case("processor", "an image placeholder in the text, no image", lambda folder: _processor()(
        text="<|image_pad|> and a video <|video_pad|>", videos=[_grey(9, 8)], num_frames=4),
         names=("<|image_pad|>", "no images")),
    Case("processor", "content that is a dict", lambda folder: _chat(
        [[{"role": "user", "content": {"type": "text", "text": "?"}}]]), names=("message 0", "dict")),
    Case("processor", "a message without a role", lambda folder: _chat([[{"content": "Hi"}]]),
         names=("message 0", "'role'")),
    Case("processor", "a part without a type", lambda folder: _chat([[{"role": "user", "content": [{"text": "?"}]}]]),
         names=("part 0", "'type'")),
    Case("model", "the right inputs", lambda folder: _forward().shape, expect="accept",
         check=lambda shape: tuple(shape)[:2] == (1, 3 + 8 + 2)),
    Case("model", "pixels at the wrong resolution (48 px, the tower takes 32)", lambda folder: _forward(
        pixel_values_videos=lambda p: p.new_zeros(1, 4, 3, 48, 48)), names=("48", "32")),
    Case("model", "non-square pixels", lambda folder: _forward(
        pixel_values_videos=lambda p: p.new_zeros(1, 4, 3, 32, 40)), names=("32", "40")),
    Case("model", "uint8 pixel_values_videos (not normalised)", lambda folder: _forward(
        pixel_values_videos=lambda p: (p * 0).byte()), names=("uint8", "pixel_values_videos")),
    Case("model", "float64 pixel_values_videos: cast to the tower's dtype", lambda folder: torch_allclose(_forward(
        pixel_values_videos=lambda p: p.double()), _forward()), expect="accept", check=bool),
    Case("model", "channels-last pixel_values_videos", lambda folder: _forward(
        pixel_values_videos=lambda p: p.permute(0, 1, 3, 4, 2).contiguous()), names=("(1, 4, 32, 32, 3)",)),
    Case("model", "4-D pixel_values_videos", lambda folder: _forward(pixel_values_videos=lambda p: p[0]),
         names=("pixel_values_videos", "(4, 3, 32, 32)")),
    Case("model", "3 frames with k=2", lambda folder: _forward(pixel_values_videos=lambda p: p[:, :3]),
         names=("3", "2 or 4")),
    Case("model", "one placeholder too many", lambda folder: _forward(
        input_ids=lambda ids: __import__("torch").cat([ids, ids[:, 3:4]], 1)), names=("9", "8", "placeholder")),
    Case("model", "placeholders but no pixels", lambda folder: _forward(pixel_values_videos=None),
         names=("placeholder", "pixel_values_videos")),
    Case("model", "temporal_sample_rate=0 on the config after loading",
         lambda folder: _config_changed(temporal_sample_rate=0), names=("temporal_sample_rate",)),
    Case("model", "temporal_pool_size=0 on the config after loading",
         lambda folder: _config_changed(temporal_pool_size=0), names=("temporal_pool_size",)),
]

# ----------------------------------------------------------------------------------------------------------------
# Training rows whose videos are missing or unreadable (the collator of `storm train`)


def _collate(folder, video, strict):
    from storm_transformers.training.data import StormDataCollator

    collator = StormDataCollator(_processor(), num_frames=4, data_root=folder, strict=strict)
    with captured_warnings() as log:
        batch = collator([{"messages": [user_video(path=video), ANSWER]}])
    return batch, collator.num_skipped, log.getvalue()


def _skipped_row(video):
    def check(result):
        batch, skipped, log = result
        return skipped == 1 and bool((batch["labels"] == -100).all()) and video in log

    return check


CASES += [
    Case("training data", "a row whose video is missing (strict)", lambda folder: _collate(folder, "gone.mp4", True),
         names=("gone.mp4", "not found")),
    Case("training data", "a row whose video is missing: skipped with a warning, no loss",
         lambda folder: _collate(folder, "gone.mp4", False), expect="accept", check=_skipped_row("gone.mp4")),
    Case("training data", "a row whose video is a text file (strict)", lambda folder: _collate(
        folder, (folder / "bad.mp4", (folder / "bad.mp4").write_text("no video"))[0].name, True),
         names=("bad.mp4", "not a video")),
    Case("training data", "a row whose video has fewer frames than num_frames (strict)", lambda folder: _collate(
        folder, Path(_numbered(folder, "short.mp4", count=3)).name, True), names=("short.mp4", "only 3")),
    Case("training data", "a row with a good video: labelled", lambda folder: _collate(
        folder, Path(_numbered(folder, _CLIP)).name, True), expect="accept",
         check=lambda result: result[1] == 0 and bool((result[0]["labels"] != -100).any())
         and tuple(result[0]["pixel_values_videos"].shape) == (1, 4, 3, 64, 64)),
]


def _sigterm_removes_staging(folder):
    """SIGTERM while a conversion writes: the staging folder is removed, as on Ctrl-C (the signal goes to this
    process; `staging_folder` turns it into KeyboardInterrupt while it writes)."""
    import signal

    from storm_transformers.conversion.checkpoint import staging_folder

    output = folder / "out"
    try:
        with redirect_stdout(io.StringIO()), staging_folder(output) as staging:
            (staging / "config.json").write_text("{}")
            if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
                raise WrongResult("SIGTERM still has its default action while writing (it would kill the process)")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs before this returns
    except KeyboardInterrupt:
        pass
    return not output.exists() and not list(folder.iterdir())


CASES += [
    Case("conversion", "SIGTERM while writing removes the staging folder (as Ctrl-C)", _sigterm_removes_staging,
         expect="accept", check=bool),
]


def main(areas: list[str]) -> int:
    import tempfile

    cases = [item for item in CASES if not areas or item.area in areas]
    with tempfile.TemporaryDirectory() as root:
        results = run_cases(cases, Path(root))
    for item, outcome, message in results:
        print(f"{outcome:20} {item.area:14} {item.name}: {message[:160]}")
    print(summary(results))
    return int(any(outcome not in ("clear error", "accepted") for _, outcome, _ in results))


if __name__ == "__main__":
    sys.path[:0] = [str(REPO), str(REPO / "tests")]
    sys.exit(main(sys.argv[1:]))

CASES += [
    Case("video file", "a list of frame files, sampled again", lambda folder: _frame_files_sampled(folder),
         names=("already sampled", "do_sample_frames=False")),
]
