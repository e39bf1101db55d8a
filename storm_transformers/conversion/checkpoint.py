"""Pieces shared by everything that writes a STORM checkpoint folder (tiny default, compose, VILA conversion, training).

- `add_placeholder_tokens`: the tokenizer gains the image/video placeholders (as special tokens).
- `build_processor`: a `StormProcessor` whose pooling/sampling settings are read from the model config, so the
  placeholder expansion and the model's feature count come from the same numbers.
- `write_checkpoint`: model + processor + generation config + card (and the code files and `auto_map` that every STORM
  `save_pretrained` writes) written to a staging folder next to the output (`staging_folder`), verified there, and
  renamed into place at the end, so an interrupted or failed run never leaves a half-written checkpoint.
- `push_to_hub`: upload a finished checkpoint folder as one commit (`check_repo_id` first, before any slow work).

Staging folders are named `.{output name}.partial-{host}-{pid}-{random}`. Ctrl-C, SIGTERM and errors remove them; a
run killed outright (SIGKILL, power loss) cannot, so the next run into the same output removes every staging folder
of that output whose process is no longer running on this host, and says so.
"""

import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

from transformers import GenerationConfig, SiglipImageProcessor

from storm_transformers import StormConfig, StormProcessor, StormVideoProcessor

IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
MAX_SHARD_SIZE = "5GB"


def add_placeholder_tokens(tokenizer) -> tuple[int, int]:
    """Add `<|image_pad|>` / `<|video_pad|>` as special tokens when the tokenizer lacks them (Qwen2-VL tokenizers
    already have them). Returns their ids `(image_token_id, video_token_id)`."""
    missing = [token for token in (IMAGE_TOKEN, VIDEO_TOKEN) if token not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    image_id, video_id = tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, VIDEO_TOKEN])
    return image_id, video_id


def build_processor(config: StormConfig, tokenizer, num_frames: int) -> StormProcessor:
    """The processor that matches `config`: frame size and patch size from the vision config, pooling and sampling
    from the STORM fields, placeholders `<|image_pad|>` / `<|video_pad|>`, `num_frames` frames per video by default."""
    side = config.vision_config.image_size
    size = {"height": side, "width": side}
    return StormProcessor(
        image_processor=SiglipImageProcessor(size=size),
        tokenizer=tokenizer,
        video_processor=StormVideoProcessor(size=size, num_frames=num_frames),
        image_token=IMAGE_TOKEN,
        video_token=VIDEO_TOKEN,
        patch_size=config.vision_config.patch_size,
        downsample_factor=config.downsample_factor,
        temporal_pool_size=config.temporal_pool_size,
        spatial_pool_size=config.spatial_pool_size,
        temporal_sample_rate=config.temporal_sample_rate,
    )


def chat_generation_config(tokenizer, max_new_tokens: int = 256) -> GenerationConfig:
    """Greedy decoding that stops at `<|im_end|>` (end of a ChatML turn) or the tokenizer's EOS."""
    stop = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
    stop = [token_id for token_id in dict.fromkeys(stop) if token_id is not None]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[-1]
    return GenerationConfig(eos_token_id=stop, pad_token_id=pad, do_sample=False, max_new_tokens=max_new_tokens)


def prepare_output_dir(output_dir: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output folder unless `overwrite` (checked before any slow work starts)."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{output_dir} already exists. Choose another output folder or pass overwrite=True.")
    return output_dir


def _staging_prefix(output_dir: Path) -> str:
    return f".{output_dir.name}.partial-{socket.gethostname()}-{os.getpid()}-"


def _process_running(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there: never call a folder stale
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # running, as another user
        return True
    return True


def remove_stale_staging(output_dir: str | Path) -> list[Path]:
    """Remove the staging folders of `output_dir` left by runs on this host whose process has ended (killed with
    SIGKILL, say), printing one line for each. Folders of running processes, of other hosts, and anything else are
    left alone. Returns the folders removed."""
    output_dir = Path(output_dir)
    pattern = re.compile(rf"\.{re.escape(output_dir.name)}\.partial-{re.escape(socket.gethostname())}-(\d+)-[^-]+")
    removed = []
    for path in sorted(output_dir.parent.glob(f".{output_dir.name}.partial-*")):
        match = pattern.fullmatch(path.name)
        if match and path.is_dir() and not _process_running(int(match[1])):
            shutil.rmtree(path, ignore_errors=True)
            print(f"removed {path}: the staging folder of an interrupted run (process {match[1]} is no longer running)")
            removed.append(path)
    return removed


@contextmanager
def _sigterm_as_interrupt():
    """While writing, SIGTERM raises KeyboardInterrupt, as Ctrl-C does, so the staging folder is removed. Only where
    SIGTERM still has its default action (an application's own handler, such as the `storm` command's, is kept)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"terminated by signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextmanager
def staging_folder(output_dir: str | Path, overwrite: bool = False):
    """Yield an empty staging folder next to `output_dir`; when the block ends without an error it replaces
    `output_dir`, otherwise (an error, Ctrl-C, SIGTERM) it is removed and an existing `output_dir` stays as it was.
    Stale staging folders of killed runs are removed first (`remove_stale_staging`).

    Raises:
        FileExistsError: `output_dir` exists and `overwrite` is False. Whatever the block raises.
    """
    output_dir = prepare_output_dir(output_dir, overwrite)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(output_dir)
    staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(output_dir), dir=output_dir.parent))
    try:
        with _sigterm_as_interrupt():
            staging.chmod(0o755)  # mkdtemp makes it private
            yield staging
            if output_dir.exists():
                shutil.rmtree(output_dir)
            os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_checkpoint(
    output_dir, model, processor, card=None, overwrite: bool = False, verify=None
) -> Path:
    """Save `model` (safetensors, 5 GB shards, current key names, with its code files and `auto_map`), `processor`
    (also with its code) and `card` (a `huggingface_hub.ModelCard`) into `output_dir` atomically: everything is
    written to a temporary sibling folder that replaces `output_dir` at the end.

    Args:
        verify: called with the temporary folder once it is complete, before it is moved into place; whatever it
            raises aborts the write.

    Raises:
        FileExistsError: `output_dir` exists and `overwrite` is False. Anything `verify` raises. In every case (and on
        Ctrl-C or SIGTERM) the staging folder is removed and an existing `output_dir` is left as it was.
    """
    with staging_folder(output_dir, overwrite) as staging:
        model.save_pretrained(staging, max_shard_size=MAX_SHARD_SIZE, save_original_format=False)
        processor.save_pretrained(staging)
        if card is not None:
            card.save(staging / "README.md")
        if verify is not None:
            verify(staging)
    return Path(output_dir)


def check_repo_id(repo_id: str | None) -> None:
    """Refuse a Hub repository id that cannot exist (before any slow work; None: no upload).

    Raises:
        ValueError: not `name` or `namespace/name` of letters, digits, `-`, `_`, `.` (huggingface_hub's rules).
    """
    if repo_id is None:
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(
            f"push_to_hub_repo (--push-to-hub) {repo_id!r} is not a Hub repository id ({error}). Use you/model-name."
        ) from None


def push_to_hub(folder, repo_id: str) -> str:
    """Upload the finished checkpoint `folder` to the Hub model repository `repo_id` (created if needed) in one
    commit, with huggingface_hub's `upload_folder`. Returns the commit URL.

    Raises:
        RuntimeError: the upload failed (not logged in, no write access, no network, …): one line with the reason,
        and how to upload the folder, which is complete, later.
    """
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, repo_type="model", folder_path=str(folder), commit_message="Upload STORM checkpoint"
        )
    except Exception as error:  # network, authentication, permissions: huggingface_hub and httpx errors alike
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RuntimeError(
            f"Could not upload {folder} to the Hub repository {repo_id} ({type(error).__name__}: {reason}). The "
            f"checkpoint in {folder} is complete: upload it later with `hf upload {repo_id} {folder}`."
        ) from None
    print(f"uploaded {folder} to https://huggingface.co/{repo_id}")
    return commit.commit_url
