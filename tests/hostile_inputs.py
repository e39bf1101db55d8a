"""A corpus of hostile and unusual inputs, built on the fly and classified by running them (issue 15).

Each `Case` builds its input in a fresh folder and runs it. The outcome is one of:

| outcome | when |
|---|---|
| clear error | `expect="error"`; it raised an error type of `CLEAR_ERRORS` whose message contains every string of `names` (the argument, the value, the file, …) |
| accepted | `expect="accept"`; it returned, and `check(result)` (if given) is true |
| unclear crash | it raised anything else: another type (IndexError, ZeroDivisionError, AttributeError, a raw UnicodeDecodeError, …), or a message that does not name what `names` lists |
| silent wrong result | it returned although it should have been refused, returned a wrong result (`check` false), or raised `WrongResult` (say, a pickle executed) |
| valid input rejected | `expect="accept"` and it raised |

`tests/test_hostile_inputs.py` runs every case, prints `hostile inputs: N cases, E clear errors, A accepted, U unclear
crashes, S silent wrong results, R valid inputs rejected`, and fails on any U, S or R.

Adding cases is adding data: append `Case(area, name, call, ...)` to `CASES` (or decorate a function with `@case`),
where `call(folder)` builds what it needs under `folder` and runs it. `storm(...)` runs the `storm` command in-process
and turns its output into a result: exit 0 returns the exit status, an error exit raises `CommandError` with its last
line (one line, no traceback, or it is an unclear crash). `python tests/hostile_inputs.py [AREA ...]` prints every case
with its outcome.
"""

import io
import json
import math
import os
import pickle
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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
for name, make, names in CHECKPOINTS:
    CASES.append(Case("checkpoint", f"load_storm: {name}", lambda folder, m=make: load(m(folder)), names=names))
    CASES.append(Case("checkpoint", f"storm generate --model: {name}",
                      lambda folder, m=make: storm(*GENERATE, "--model", m(folder)), names=names))
CASES += [
    Case("checkpoint", "load_storm: pickle pytorch_model.bin only", _pickle_not_run(load), names=("pickle",)),
    Case("checkpoint", "storm generate --model: pickle pytorch_model.bin only",
         _pickle_not_run(lambda path: storm(*GENERATE, "--model", path)), names=("pickle",)),
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
