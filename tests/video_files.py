"""Write small real videos with PyAV for decoder tests: containers and codecs (H.264 with B-frames in MP4, MKV,
MPEG-TS and raw `.h264`, VP9 in WebM, MPEG-2 in MPEG-TS, MPEG-4 ASP in AVI), keyframe spacing, variable frame rate,
and hostile files (display-matrix rotation, all pts 0, a resolution change mid-stream, corrupt slices)."""

import math
import struct
from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def numbered_frames(count: int, height: int = 64, width: int = 96) -> np.ndarray:
    """Frames that carry their index i (count <= 35): the top half shows i in binary as six black/white columns
    (most significant bit left), the bottom half is grey 10 + 7·i. Lossy codecs keep both readable."""
    frames = np.empty((count, height, width, 3), dtype=np.uint8)
    columns = np.arange(width) * 6 // width  # bit of each pixel column, 0 = most significant
    for i in range(count):
        bits = (i >> (5 - columns)) & 1
        frames[i, : height // 2] = np.where(bits, 235, 16)[None, :, None]
        frames[i, height // 2 :] = 10 + 7 * i
    return frames


def frame_index(frame: np.ndarray) -> int:
    """Index of a decoded `numbered_frames` frame, read from its binary columns."""
    height, width = frame.shape[:2]
    top = frame[: height // 2].mean(axis=(0, 2))  # (W,)
    bits = [int(top[(2 * b + 1) * width // 12] > 128) for b in range(6)]  # the middle of each column
    return int("".join(map(str, bits)), 2)


def _codec_options(codec: str, b_frames: int, gop_size: int) -> dict:
    """High-quality, fast settings; fixed keyframe interval (no scene-cut keyframes: every numbered frame is a cut)."""
    if codec == "libx264":
        return {
            "crf": "1",
            "preset": "ultrafast" if not b_frames else "fast",
            "x264-params": f"bframes={b_frames}:b-adapt=0:keyint={gop_size}:min-keyint={gop_size}:scenecut=0",
        }
    if codec in ("mpeg2video", "mpeg4"):
        return {"qscale": "2", "sc_threshold": "1000000000"}
    if codec == "libvpx-vp9":
        return {"crf": "10", "deadline": "realtime", "cpu-used": "8"}
    return {}


def write_video(
    path,
    frames: np.ndarray,
    fps: int = 25,
    timestamps=None,
    gop_size: int = 12,
    options=None,
    codec: str | None = None,
    b_frames: int = 0,
    container_format: str | None = None,
) -> str:
    """Encode `frames` (T, H, W, 3) uint8 into `path`.

    `codec` defaults to mpeg4 for .avi and libx264 otherwise; `b_frames` is the most B-frames in a row (so pts and
    dts orders differ). `timestamps` (seconds, increasing) makes a variable-frame-rate video; otherwise frames are
    1/fps apart. `gop_size` is the keyframe interval in frames. `options` are container options (e.g.
    movflags=faststart); `container_format` forces the muxer (e.g. "h264" for a raw elementary stream).
    """
    codec = codec or ("mpeg4" if str(path).endswith(".avi") else "libx264")
    with av.open(str(path), "w", format=container_format, options=options or {}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = gop_size
        if b_frames and codec != "libx264":
            stream.codec_context.max_b_frames = b_frames
        stream.codec_context.options = _codec_options(codec, b_frames, gop_size)
        time_base = Fraction(1, 1000) if timestamps is not None else Fraction(1, fps)
        stream.codec_context.time_base = time_base
        for i, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts = round(timestamps[i] / time_base) if timestamps is not None else i
            frame.time_base = time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return str(path)


def _encode_h264(frames: np.ndarray, fps: int, gop_size: int) -> list[av.Packet]:
    """H.264 packets (Annex B, parameter sets in-band) of `frames`, pts = frame index."""
    codec = av.CodecContext.create("libx264", "w")
    codec.width, codec.height, codec.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
    codec.time_base = Fraction(1, fps)
    codec.gop_size = gop_size
    codec.options = _codec_options("libx264", 0, gop_size)
    packets = []
    for i, array in enumerate(frames):
        frame = av.VideoFrame.from_ndarray(array, format="rgb24")
        frame.pts = i
        packets += codec.encode(frame)
    return packets + codec.encode(None)


def write_resolution_change(path, first: np.ndarray, second: np.ndarray, fps: int = 25) -> str:
    """An MPEG-TS H.264 stream whose frame size changes mid-way: `first` (T1, H1, W1, 3) then `second` (T2, H2, W2, 3),
    each encoded on its own (a new keyframe and SPS at the change), timestamps continuing."""
    with av.open(str(path), "w", format="mpegts") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = first.shape[2], first.shape[1], "yuv420p"
        offset = 0
        for frames in (first, second):
            for packet in _encode_h264(frames, fps, gop_size=len(frames)):
                packet.pts, packet.dts = packet.pts + offset, packet.dts + offset
                packet.time_base, packet.stream = Fraction(1, fps), stream
                container.mux(packet)
            offset += len(frames)
    return str(path)


def write_constant_pts(path, frames: np.ndarray, fps: int = 25) -> str:
    """A Matroska H.264 file whose packets all carry pts = dts = 0 (a broken muxer's output)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.options = _codec_options("libx264", 0, 12)
        for array in frames:
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            for packet in stream.encode(frame):
                packet.pts = packet.dts = 0
                container.mux(packet)
        for packet in stream.encode(None):
            packet.pts = packet.dts = 0
            container.mux(packet)
    return str(path)


def rotate_mp4(path, degrees: int) -> str:
    """Give an MP4 written by `write_video` a display matrix that turns it `degrees` counterclockwise when played, as
    phones do for portrait videos (the track header's matrix, as FFmpeg's `-display_rotation` writes it)."""
    data = bytearray(Path(path).read_bytes())
    box = data.index(b"tkhd")
    version = data[box + 4]
    matrix_at = box + 4 + 4 + (32 if version == 1 else 20) + 16
    c, s = round(math.cos(math.radians(degrees))), round(math.sin(math.radians(degrees)))
    matrix = [c << 16, -s << 16, 0, s << 16, c << 16, 0, 0, 0, 1 << 30]
    data[matrix_at : matrix_at + 36] = struct.pack(">9i", *matrix)
    Path(path).write_bytes(bytes(data))
    return str(path)


def write_corrupt_slices(path, frames: np.ndarray, damaged: tuple[int, ...], gop_size: int = 10) -> str:
    """An MP4 of `frames` (H.264, 4 slices per frame, no B-frames) with 40 bytes flipped in the middle of the packets
    of frames `damaged`, so that the decoder meets broken slices and conceals them."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.gop_size = gop_size
        params = f"slices=4:bframes=0:keyint={gop_size}:min-keyint={gop_size}:scenecut=0"
        stream.codec_context.options = {"preset": "ultrafast", "crf": "18", "x264-params": params}
        for i, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with av.open(str(path)) as container:
        spans = [(packet.pos, packet.size) for packet in container.demux(video=0) if packet.size]
    data = bytearray(Path(path).read_bytes())
    for i in damaged:
        pos, size = spans[i]
        data[pos + size // 3 : pos + size // 3 + 40] = bytes(
            b ^ 0x5A for b in data[pos + size // 3 : pos + size // 3 + 40]
        )
    Path(path).write_bytes(bytes(data))
    return str(path)


def textured_frames(count: int, height: int = 64, width: int = 96, seed: int = 0) -> np.ndarray:
    """Random-texture frames, each shifted 3 px further right: content that takes many bits, so every slice of a
    frame has data to damage."""
    texture = np.random.default_rng(seed).integers(0, 256, (height, width, 3)).astype(np.uint8)
    return np.stack([np.roll(texture, 3 * i, axis=1) for i in range(count)])


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
