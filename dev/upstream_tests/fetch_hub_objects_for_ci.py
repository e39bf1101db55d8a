"""Stand-in for transformers' utils/fetch_hub_objects_for_ci.py (not in its sdist): the mixins' Hub images and videos
as local files, since tests here run offline. Images and the tiny clip are generated on first use (the sizes and the
clip's 12 frames at 10 fps are what the testers in this folder expect); the two longer clips are the repository's
test assets (`storm fetch-assets`)."""

import os
from pathlib import Path

import av
import numpy as np
from PIL import Image

FIXTURES = Path(os.environ.get("STORM_UPSTREAM_DIR", "/tmp/storm-upstream-tests")) / "fixtures"
ASSETS = Path(os.environ["STORM_ASSETS"])


def _image(name: str, size: tuple[int, int]) -> Path:
    path = FIXTURES / name
    if not path.exists():
        pixels = np.random.default_rng(len(name)).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
    return path


def _clip(name: str, frames: int = 12, fps: int = 10, size: tuple[int, int] = (320, 240)) -> Path:
    path = FIXTURES / name
    if not path.exists():
        with av.open(str(path), "w") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = *size, "yuv420p"
            for index in range(frames):
                array = np.full((size[1], size[0], 3), 20 * index, dtype=np.uint8)
                container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
            container.mux(stream.encode(None))
    return path


def url_to_local_path(url: str) -> str:
    FIXTURES.mkdir(parents=True, exist_ok=True)
    name = os.path.basename(url)
    local = {
        "coco_sample.png": lambda: _image(name, (640, 480)),
        "australia.jpg": lambda: _image(name, (400, 300)),
        "tiny_video_320x240.mp4": lambda: _clip(name),
        "big_buck_bunny_320x240_10s.mp4": lambda: ASSETS / "videos" / "bigbuckbunny.mp4",
        "sample_demo_1_320x240.mp4": lambda: ASSETS / "videos" / "bikes.mp4",
    }
    return str(local[name]()) if name in local else url
