"""Write small real H.264 videos with PyAV for decoder tests (keyframe spacing, variable frame rate, containers)."""

from fractions import Fraction

import av
import numpy as np


def numbered_frames(count: int, height: int = 64, width: int = 96) -> np.ndarray:
    """Flat grey frames whose brightness encodes their index: frame i is 10 + 7·i (count <= 35)."""
    return np.stack([np.full((height, width, 3), 10 + 7 * i, dtype=np.uint8) for i in range(count)])


def frame_index(frame: np.ndarray) -> int:
    """Index of a decoded `numbered_frames` frame (H.264 shifts the grey level by a few units)."""
    return round((float(frame.mean()) - 10) / 7)


def write_video(path, frames: np.ndarray, fps: int = 25, timestamps=None, gop_size: int = 12, options=None) -> str:
    """Encode `frames` (T, H, W, 3) uint8 with libx264 (mpeg4 for .avi) into `path`.

    `timestamps` (seconds, increasing) makes a variable-frame-rate video; otherwise frames are 1/fps apart.
    `gop_size` is the keyframe interval in frames. `options` are container options (e.g. movflags=faststart).
    """
    with av.open(str(path), "w", options=options or {}) as container:
        codec = "mpeg4" if str(path).endswith(".avi") else "libx264"
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = gop_size
        if codec == "libx264":
            stream.codec_context.options = {"crf": "1", "preset": "ultrafast", "keyint_min": str(gop_size)}
        time_base = Fraction(1, 1000) if timestamps is not None else Fraction(1, fps)
        stream.codec_context.time_base = time_base
        for i, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts = round(timestamps[i] / time_base) if timestamps is not None else i
            frame.time_base = time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return str(path)


def write_audio_only(path, seconds: float = 1.0, rate: int = 16000) -> str:
    """A WAV file with a sine tone and no video stream."""
    samples = (np.sin(np.arange(int(seconds * rate)) * 0.05) * 3000).astype(np.int16)[None]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = rate
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return str(path)
