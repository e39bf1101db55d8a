"""STORM video processor: PyAV decoding by timestamps, uniform or fixed-fps frame sampling, SigLIP preprocessing.

transformers' default video loading needs torchcodec and a system FFmpeg, and trusts container frame counts; this
processor decodes with PyAV (FFmpeg is in its wheel), indexes the frames it can actually read, samples by
presentation time, and checks that every decoded frame is the one its timestamp says. PyAV is needed only to decode
files: decoded frames (arrays, tensors, PIL images) work without it, so a checkpoint folder's copy of this file loads
where PyAV is not installed, and decoding a file there raises an `ImportError` that says `pip install av`.

Shape legend: T frames, H × W frame height × width (pixels), B videos in a batch.
"""

import base64
import binascii
import bisect
import contextlib
import functools
import io
import math
import numbers
import os
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import ChannelDimension, PILImageResampling, is_pil_image, load_image
from transformers.processing_utils import VideosKwargs
from transformers.utils import logging
from transformers.video_processing_utils import BaseVideoProcessor
from transformers.video_utils import VideoMetadata

try:  # optional: transformers' `check_imports` skips imports inside `try`, so remote code loads without PyAV
    import av
    from av.video.reformatter import VideoReformatter
except ImportError:
    av = VideoReformatter = None

logger = logging.get_logger(__name__)

URL_TIMEOUT_S = 60
# Threads that decode separate stretches of a long video at once (each opens its own container): the cores this
# process may run on, at most 32. A stretch decoded alone gets them as FFmpeg decoding threads instead.
DECODE_THREADS = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 32)
# Frames smaller than this (coded width × height) decode with one FFmpeg thread: starting threads and filling the
# frame-threading pipeline costs more than it saves (8 frames of 64×64 H.264: 4 ms with 1 thread, 9 ms with 16).
THREADED_DECODE_PIXELS = 256 * 256
# Frames normalised at once by `StormVideoProcessor._preprocess` (bounds the float32 temporaries).
PREPROCESS_CHUNK = 64
# A list of paths or URLs with these suffixes is one video given frame by frame.
FRAME_FILE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


@dataclass
class StormVideoMetadata(VideoMetadata):
    """`VideoMetadata` with the presentation time of every frame of the stream, so that `timestamps` are the real
    times of the sampled frames (seconds from the first frame), also for variable-frame-rate videos.

    frame_timestamps (`list[float]`, *optional*): time in seconds of each of the `total_num_frames` frames.
    keyframe_indices (`list[int]`, *optional*): indices of the frames that are keyframes (decodable on their own).
    """

    frame_timestamps: list[float] | None = None
    keyframe_indices: list[int] | None = None

    @property
    def timestamps(self) -> list[float]:
        if self.frame_timestamps is None or self.frames_indices is None:
            return super().timestamps
        return [self.frame_timestamps[i] for i in self.frames_indices]


# ----------------------------------------------------------------------------------------------------------------
# What a video is: the forms a caller may pass, flattened to one list per batch
# ----------------------------------------------------------------------------------------------------------------


def _is_encoded_video(video) -> bool:
    """A video file: a path or URL (`str`, `os.PathLike`), its bytes (`bytes`, `bytearray`, `memoryview`) or an open
    file object."""
    return isinstance(video, (str, os.PathLike, bytes, bytearray, memoryview, io.IOBase))


def _is_frame_file(item) -> bool:
    """A path, URL or data URI of an image file: one frame of a video given as a list of frame files."""
    if not isinstance(item, (str, os.PathLike)):
        return False
    text = os.fspath(item)
    if text.startswith("data:image/"):
        return True
    path = urllib.parse.urlparse(text).path if text.startswith(("http://", "https://")) else text
    return path.lower().endswith(FRAME_FILE_SUFFIXES)


def _is_frame(item) -> bool:
    """One decoded frame: a PIL image, or an array/tensor with 3 dimensions."""
    return is_pil_image(item) or (isinstance(item, (np.ndarray, torch.Tensor)) and item.ndim == 3)


def _flatten_videos(videos, where: str = "videos") -> list:
    """The videos of a (possibly nested, per-sample) batch as a flat list, each one of:

    - an encoded video: path, http(s) URL, base64 data URI, bytes, `bytearray`, `memoryview` or binary file object;
    - decoded frames: an array or tensor `(T, H, W, 3)` / `(T, 3, H, W)`, or a list of frames (PIL images or 3-D
      arrays/tensors), or a list of frame files (image paths/URLs, e.g. `["0001.jpg", "0002.jpg"]`).

    A 5-D array is a batch of videos. Empty lists (a text-only conversation of a batch) hold no video.

    Raises:
        TypeError: something that is not a video (a number, a dict, a single image). ValueError: a list mixing frames
        with videos, an array that is not 4-D or 5-D.
    """
    if _is_encoded_video(videos):
        return [videos]
    if isinstance(videos, (np.ndarray, torch.Tensor)):
        if videos.ndim in (4, 5):
            return list(videos) if videos.ndim == 5 else [videos]
        hint = " For a single frame pass array[None]; pass still images with images=." if videos.ndim == 3 else ""
        raise ValueError(
            f"{where}: an array video has 4 dimensions, (frames, height, width, 3) or (frames, 3, height, width) (5 "
            f"for a batch of videos); got shape {tuple(videos.shape)}.{hint}"
        )
    if isinstance(videos, (list, tuple)):
        for is_kind, kind in ((_is_frame, "frames (PIL images or 3-D arrays)"), (_is_frame_file, "image files")):
            matches = [is_kind(item) for item in videos]
            if videos and all(matches):
                return [list(videos)]  # one video, frame by frame
            if any(matches):
                raise ValueError(
                    f"{where} mixes {kind} with other items ({type(videos[matches.index(False)]).__name__} at "
                    f"{where}[{matches.index(False)}]). A list of {kind} is one video, given frame by frame; pass "
                    "each video as its own list (or file, or array)."
                )
        return [video for i, item in enumerate(videos) for video in _flatten_videos(item, f"{where}[{i}]")]
    if is_pil_image(videos):
        raise TypeError(
            f"{where} is a single image. A video is a list of frames (PIL images) or a file; pass still images with "
            "images=."
        )
    hint = (
        " (a chat message's content part? pass the value of its 'video' or 'path' key)"
        if isinstance(videos, dict)
        else ""
    )
    raise TypeError(
        f"{where} is a {type(videos).__name__} ({str(videos)[:80]}){hint}. A video is a path or URL (str), bytes, a "
        "binary file object, an array or tensor of frames (T, H, W, 3), or a list of frames (PIL images, arrays or "
        "image files)."
    )


# ----------------------------------------------------------------------------------------------------------------
# Decoded frames: checked and laid out as (T, 3, H, W)
# ----------------------------------------------------------------------------------------------------------------


def _stack_frames(frames: list, where: str) -> np.ndarray | torch.Tensor:
    """One video from a list of frames: PIL images (converted to RGB), frame files, or 3-D arrays/tensors."""
    if _is_frame_file(frames[0]):
        frames = [_load_frame_file(path, where) for path in frames]
    if is_pil_image(frames[0]):
        frames = [np.asarray(frame.convert("RGB")) for frame in frames]
    shapes = [tuple(frame.shape) for frame in frames]
    for i, shape in enumerate(shapes):
        if shape != shapes[0]:
            raise ValueError(
                f"{where}: the frames of one video must have one size; frame 0 is {shapes[0]} but frame {i} is {shape}. "
                "Resize them to one size first."
            )
    return torch.stack(frames) if isinstance(frames[0], torch.Tensor) else np.stack([np.asarray(f) for f in frames])


def _load_frame_file(path, where: str):
    path = os.fspath(path)
    if not path.startswith(("http://", "https://", "data:")) and not os.path.isfile(path):
        raise FileNotFoundError(f"{where}: frame file not found: {path}.")
    return load_image(path)


def _frames_tensor(video, where: str, do_rescale: bool, data_format=None) -> torch.Tensor:
    """Decoded frames as a `(T, 3, H, W)` tensor, `uint8` (`do_rescale=True`) or `float32` in 0..1, checked.

    Accepted: integer frames in 0..255 (any integer dtype) with `do_rescale=True`, float frames in 0..255 with
    `do_rescale=True` or in 0..1 with `do_rescale=False`; channels last `(T, H, W, 3)` or first `(T, 3, H, W)`
    (`data_format` decides when given).

    Raises:
        TypeError: bool, complex or non-numeric frames. ValueError: wrong number of dimensions or channels, no frames
        or no pixels, NaN/inf, values out of range for the dtype and `do_rescale`.
    """
    frames = _stack_frames(video, where) if isinstance(video, list) else video
    if isinstance(frames, np.ndarray):
        if frames.dtype.kind not in "uif":
            raise TypeError(
                f"{where}: frames of dtype {frames.dtype} are not pixels. Pass uint8 RGB frames (0..255), or float "
                "frames in 0..1 with do_rescale=False."
            )
        if any(stride < 0 for stride in frames.strides):  # e.g. a BGR -> RGB view, frames[..., ::-1]
            frames = frames.copy()
        frames = torch.from_numpy(frames)
    if frames.dtype == torch.bool or frames.is_complex():
        raise TypeError(
            f"{where}: frames of dtype {frames.dtype} are not pixels. Pass uint8 RGB frames (0..255), or float frames "
            "in 0..1 with do_rescale=False (a mask: mask.astype(np.uint8) * 255)."
        )
    if frames.ndim != 4:
        raise ValueError(
            f"{where}: a video has 4 dimensions (frames, height, width, 3); got shape {tuple(frames.shape)}."
        )
    if frames.numel() == 0:
        raise ValueError(f"{where}: the video has no frames or no pixels (shape {tuple(frames.shape)}).")
    frames = _channels_first(frames, where, data_format)
    return _checked_values(frames, where, do_rescale)


def _channels_first(frames: torch.Tensor, where: str, data_format) -> torch.Tensor:
    """`(T, 3, H, W)` view of channels-last or channels-first frames."""
    if data_format is not None:
        last = ChannelDimension(data_format) == ChannelDimension.LAST
    elif frames.shape[-1] == 3 or frames.shape[1] == 3:
        last = frames.shape[-1] == 3
    else:
        raise ValueError(
            f"{where}: frames need 3 colour channels (RGB), last (T, H, W, 3) or second (T, 3, H, W); got shape "
            f"{tuple(frames.shape)}. Grey frames: np.repeat(frames, 3, axis=-1); RGBA: frames[..., :3]."
        )
    channels = frames.shape[-1] if last else frames.shape[1]
    if channels != 3:
        raise ValueError(
            f"{where}: frames need 3 colour channels (RGB); got {channels} (shape {tuple(frames.shape)})."
        )
    return frames.permute(0, 3, 1, 2) if last else frames


def _checked_values(frames: torch.Tensor, where: str, do_rescale: bool) -> torch.Tensor:
    """uint8 or float32 frames whose values suit `do_rescale` (see `_frames_tensor`)."""
    dtype = frames.dtype
    if not frames.is_floating_point():
        if not do_rescale:
            raise ValueError(
                f"{where}: integer frames (0..255) need do_rescale=True (the default); do_rescale=False expects float "
                "frames in 0..1."
            )
        if dtype == torch.uint8:  # in range by its type: no pass over the pixels
            return frames
        frames = frames.long()  # torch has no min/max for uint16/32/64
        low, high = float(frames.min()), float(frames.max())
        if low < 0 or high > 255:
            hint = " 16-bit frames: frames // 257 gives uint8." if high > 255 else ""
            raise ValueError(
                f"{where}: integer frames must be in 0..255 (uint8 RGB); got {dtype} values {low:g}..{high:g}.{hint}"
            )
        return frames.to(torch.uint8)
    low, high = float(frames.min()), float(frames.max())
    if not torch.isfinite(frames).all():
        bad = int((~torch.isfinite(frames)).sum())
        raise ValueError(f"{where}: {bad} pixel values are NaN or infinite. Pass finite frames.")
    if do_rescale and (low < 0 or high > 255 or 0 < high <= 1):
        fix = "pass do_rescale=False for frames in 0..1" if 0 <= low and high <= 1 else "pass values in 0..255"
        raise ValueError(
            f"{where}: float frames with do_rescale=True (the default) must be in 0..255; got {low:g}..{high:g}: {fix}."
        )
    if not do_rescale and (low < 0 or high > 1):
        raise ValueError(
            f"{where}: float frames with do_rescale=False must be in 0..1; got {low:g}..{high:g}. Pass frames in "
            "0..255 with do_rescale=True (the default), or divide them by 255."
        )
    return frames.float()


# ----------------------------------------------------------------------------------------------------------------
# Encoded videos: opening, indexing by demuxing, decoding the sampled frames
# ----------------------------------------------------------------------------------------------------------------


def _describe(source) -> str:
    """How error messages name a video: a path or URL as it is; bytes, file objects and data URIs by what they are
    (never their content, which can be megabytes and is the caller's data)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    if isinstance(source, str) and source.startswith("data:"):
        media_type = source[5:].partition(",")[0].partition(";")[0][:64] or "no media type"
        return f"<data URI, {media_type}, {len(source)} characters>"
    if isinstance(source, io.IOBase):
        return f"<file object {getattr(source, 'name', '')}>".replace(" >", ">")
    return str(source)


def _load_source(source) -> str | bytes:
    """A path (str) or the encoded bytes of `source` (path, http(s) URL, base64 data URI, bytes or binary file
    object), checked, so that the video can be opened several times (one container per decoding thread)."""
    name = _describe(source)
    if isinstance(source, io.TextIOBase):
        raise TypeError(
            f"The video file object {name} is open in text mode. Open it in binary mode: open(path, 'rb')."
        )
    if isinstance(source, str) and source.startswith("data:"):
        source = _decode_data_uri(source, name)
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(source, timeout=URL_TIMEOUT_S) as response:
                source = response.read()
        except OSError as error:
            raise ValueError(
                f"Could not download the video {name}: {error}. Check the URL or pass a local file."
            ) from None
    if isinstance(source, io.IOBase):
        source = source.read()
    if isinstance(source, (bytes, bytearray, memoryview)):
        if not len(source):
            raise ValueError("The video is empty (0 bytes). Pass the bytes of a whole video file.")
        return bytes(source)
    if os.path.isdir(source):
        raise ValueError(f"{name} is a folder, not a video file. Pass the path of the video file itself.")
    if not os.path.isfile(source):
        hint = "" if os.path.isabs(source) else f" (relative paths start at {os.getcwd()})"
        raise FileNotFoundError(f"Video file not found: {name}. Check the path{hint}.")
    if os.path.getsize(source) == 0:
        raise ValueError(f"The video file {name} is empty (0 bytes). Re-download or re-export it.")
    return os.fspath(source)


def _decode_data_uri(uri: str, name: str) -> bytes:
    """The bytes of a base64 data URI (RFC 2397: `data:video/mp4;base64,AAAA...`; whitespace in the payload is
    ignored). The media type is not checked: PyAV reads what the bytes are.

    Raises:
        ValueError: a data URI that is not base64-encoded, or whose payload is not valid base64 (the message names the
        URI by its media type and length, never its content).
    """
    header, comma, payload = uri.partition(",")
    if not comma or not header.endswith(";base64"):
        raise ValueError(
            f"The video {name} is not a base64 data URI. Send the file's bytes as data:video/mp4;base64,<base64>."
        )
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except binascii.Error as error:
        raise ValueError(
            f"The video {name} does not hold valid base64 ({error}). Encode the whole file, e.g. "
            "base64.b64encode(open(path, 'rb').read()).decode()."
        ) from None


@contextlib.contextmanager
def _open_container(data: str | bytes, name: str, threads: int = 0) -> Iterator["av.container.InputContainer"]:
    """Open a path or encoded bytes from `_load_source` with PyAV; its first video stream decodes with `threads`
    FFmpeg threads (0: as many as cores), frame- and slice-parallel ("AUTO": not slice-only, which would switch off
    the H.264 error concealment that flags damaged frames). On exit the decoder is drained before the container
    closes: see `_drain`.

    Raises:
        ImportError: PyAV is not installed (every file or bytes video is decoded through here).
        ValueError: the data is not a readable video."""
    if av is None:
        raise ImportError(
            f"Decoding the video {name} needs PyAV, which is not installed: `pip install av`. Decoded frames (an "
            "array or tensor (T, H, W, 3), or a list of PIL images) need no PyAV."
        )
    try:
        container = av.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    except av.error.FFmpegError as error:
        raise ValueError(
            f"Could not read {name} as a video ({error.strerror}). The file is truncated, corrupt or not a video "
            "(a complete MP4/WebM/MKV/AVI… file is expected)."
        ) from None
    with container:
        if container.streams.video:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            stream.codec_context.thread_count = threads
        try:
            yield container
        finally:
            _drain(container)


def _drain(container: "av.container.InputContainer") -> None:
    """Flush the video decoder to its end. A frame-threaded FFmpeg decoder freed mid-stream (we stop after the last
    sampled frame) is freed while Python holds the GIL; when PyAV's log callback is on (`av.logging.set_level`, which
    torchvision<0.22 calls on import), its threads wait for the GIL and the process hangs (PyAV-Org/PyAV#1849).
    Flushing lets the threads finish first, with the GIL released."""
    if not container.streams.video or not container.streams.video[0].codec_context.is_open:
        return
    try:
        container.streams.video[0].codec_context.decode(None)
    except av.error.FFmpegError:
        pass  # a damaged stream's last frames: they were not wanted


@dataclass
class _FrameIndex:
    """The frames of a video stream in presentation order, read by demuxing only.

    `pts` holds their presentation timestamps (stream time base), sorted; it is `None` when the stream has no usable
    timestamps (a raw elementary stream such as `.h264`, or packets whose pts are missing or repeated): frames are
    then numbered in the order the decoder returns them, and the whole stream is decoded from its start.
    `keyframes` are positions in that order; `seek_targets[j]` is the timestamp `container.seek` must get to land on
    keyframe j (its pts for containers that seek on pts, MP4 and Matroska; its dts for those that seek on dts,
    MPEG-TS, AVI and most others).
    """

    count: int
    timestamps: list[float]
    keyframes: list[int]
    pts: list[int] | None = None
    seek_targets: list[int] | None = None

    def keyframe_before(self, position: int) -> int:
        """Index in `keyframes` of the last keyframe at or before frame `position` (0 if none)."""
        return max(bisect.bisect_right(self.keyframes, position) - 1, 0)


def _seeks_on_pts(container) -> bool:
    # FFmpeg's Matroska demuxer seeks on its cues, which hold pts, without setting AVFMT_SEEK_TO_PTS.
    return bool(container.format.flags & av.format.Flags.seek_to_pts.value) or container.format.name.startswith(
        "matroska"
    )


def _demux(container, stream, name: str, decode_first: bool = False) -> tuple[list[tuple], "av.VideoFrame | None"]:
    """`(pts, dts, is_keyframe)` of every packet of `stream`, by demuxing it; with `decode_first`, the packets are also
    decoded until the first frame comes out (`_first_frame`), which is returned too (one pass over the file gives the
    index and the display geometry); else nothing is decoded and the frame is None."""
    packets, first, decoding = [], None, decode_first
    try:
        for packet in container.demux(stream):
            if decoding:
                first, decoding = _first_frame(stream, packet)
            if packet.size:  # an empty packet flushes the demuxer at the end
                packets.append((packet.pts, packet.dts, packet.is_keyframe))
    except av.error.FFmpegError as error:
        raise ValueError(
            f"Could not read the frames of {name} ({error.strerror}): the file is corrupt or truncated."
        ) from None
    return packets, first


def _index_frames(container, stream, name: str, packets: list[tuple]) -> _FrameIndex:
    """Index the frames of `stream` from its `packets` (`_demux`)."""
    if not packets:
        raise ValueError(f"{name} has a video stream but no frames. Re-export the video.")
    if stream.frames and len(packets) < stream.frames:
        raise ValueError(
            f"{name} is truncated: its header lists {stream.frames} frames but only {len(packets)} can be read. "
            "Re-download or re-export the file."
        )
    pts = [p for p, _, _ in packets]
    if None in pts or len(set(pts)) < len(pts):
        return _decode_order_index(stream, packets, name)
    order = sorted(pts)
    position = {p: i for i, p in enumerate(order)}
    on_pts = _seeks_on_pts(container)
    keyframes = sorted((position[p], p if d is None or on_pts else d) for p, d, key in packets if key)
    keyframes = keyframes or [(0, order[0])]
    time_base = float(stream.time_base)
    return _FrameIndex(
        count=len(order),
        timestamps=[(p - order[0]) * time_base for p in order],
        keyframes=[i for i, _ in keyframes],
        pts=order,
        seek_targets=[target for _, target in keyframes],
    )


def _decode_order_index(stream, packets: list, name: str) -> _FrameIndex:
    """Index of a stream without usable timestamps: one frame per packet, timed at the stream's nominal rate."""
    rate = float(stream.average_rate or stream.guessed_rate or 0) or 1.0
    reason = "no timestamps" if all(p is None for p, _, _ in packets) else "missing or repeated timestamps"
    timing = (
        f"its nominal {rate:g} fps" if stream.average_rate or stream.guessed_rate else "1 fps (its rate is unknown)"
    )
    logger.warning_once(
        f"{name} has {reason} (a raw elementary stream, or a damaged file): its frames are taken in decode order and "
        f"timed at {timing}."
    )
    return _FrameIndex(
        count=len(packets),
        timestamps=[i / rate for i in range(len(packets))],
        keyframes=[i for i, (_, _, key) in enumerate(packets) if key] or [0],
    )


def _display_transform(frame) -> str | None:
    """How a player turns `frame` upright from its display matrix (phone videos), following FFmpeg's `autorotate`
    (fftools): None (nothing to do), or one of "cclock", "clock", "cclock_flip", "clock_flip", "hflip", "vflip",
    "rot180". Rotations that are not multiples of 90° are not applied (warned about)."""
    side_data = frame.side_data.get("DISPLAYMATRIX")
    if side_data is None:
        return None
    m = np.frombuffer(bytes(side_data), dtype=np.int32).astype(float) / 65536  # 3×3, row-major, 16.16 fixed point
    # av_display_rotation_get: the angle the matrix turns the picture counterclockwise; players turn by minus that.
    rotation = -math.degrees(math.atan2(m[1] / math.hypot(m[1], m[4]), m[0] / math.hypot(m[0], m[3])))
    theta = -round(rotation)
    theta -= 360 * math.floor(theta / 360 + 0.9 / 360)
    if abs(theta - 90) < 1:
        return "cclock_flip" if m[3] > 0 else "clock"
    if abs(theta - 270) < 1:
        return "clock_flip" if m[3] < 0 else "cclock"
    if abs(theta - 180) < 1:
        return {(True, True): "rot180", (True, False): "hflip", (False, True): "vflip"}.get((m[0] < 0, m[4] < 0))
    if abs(theta) > 1:
        logger.warning_once(f"A video's display matrix rotates by {theta:.0f}°, not a multiple of 90°: not applied.")
        return None
    return "vflip" if m[4] < 0 else None


_ORIENT = {  # (H, W, 3) -> upright, as FFmpeg's transpose / hflip / vflip filters
    "clock": lambda a: np.rot90(a, -1),
    "cclock": lambda a: np.rot90(a, 1),
    "cclock_flip": lambda a: a.transpose(1, 0, 2),
    "clock_flip": lambda a: np.rot90(a, -1)[::-1],
    "hflip": lambda a: a[:, ::-1],
    "vflip": lambda a: a[::-1],
    "rot180": lambda a: a[::-1, ::-1],
}


_TRANSPOSING = ("clock", "cclock", "cclock_flip", "clock_flip")


class _FrameWriter:
    """Turns decoded frames into upright RGB `uint8` arrays `(height, width, 3)` (FFmpeg's swscale, bicubic; frames of
    another size, e.g. after a resolution change mid-stream, are scaled to it too; `transform` from
    `_display_transform`) and writes them to their slot of `out`; remembers the positions of frames the decoder
    concealed errors in."""

    def __init__(self, out: np.ndarray, transform: str | None):
        self.out = out
        self.transform = transform
        height, width = out.shape[1:3]
        self.scaled = (height, width) if transform not in _TRANSPOSING else (width, height)  # before turning
        self.reformatter = VideoReformatter()  # keeps its swscale context from frame to frame
        self.concealed: set[int] = set()

    def write(self, slot: int, frame) -> None:
        height, width = self.scaled
        rgb = self.reformatter.reformat(frame, format="rgb24", width=width, height=height, interpolation="BICUBIC")
        array = rgb.to_ndarray()  # (H, W, 3)
        self.out[slot] = _ORIENT[self.transform](array) if self.transform else array

    def check(self, position: int, frame) -> None:
        """Note `frame` (at `position`) if the decoder had to conceal damaged data in it."""
        if frame.is_corrupt:
            self.concealed.add(position)


def _decode_by_timestamp(container, stream, wanted: list[int], index: _FrameIndex, writer: _FrameWriter, name: str):
    """Decode the frames at positions `wanted` (sorted, distinct) of a stream indexed by pts into `writer`.

    Seeks to the keyframe before each target whenever that keyframe lies beyond the decoding position, and accepts
    a frame only if its pts is the one wanted. If the decoder does not return that frame after a seek (a container
    that landed after the keyframe, an open GOP whose leading frames need the previous one), decoding restarts from
    an earlier keyframe, and from the first one as a last resort.

    Raises:
        ValueError: a wanted frame that the decoder never returns (a truncated or corrupt file).
    """
    done, retries = 0, 0
    keep = {index.pts[position] for position in wanted}  # the decoder may skip other frames that nothing references
    while done < len(wanted):
        start = 0 if retries > 2 else max(index.keyframe_before(wanted[done]) - retries, 0)
        container.seek(index.seek_targets[start], stream=stream, backward=True)
        try:
            reached = _decode_run(container, stream, wanted, done, index, writer, start, lone=not retries, keep=keep)
        except av.error.FFmpegError as error:
            raise ValueError(
                f"Could not decode {name} ({error.strerror}): the file is corrupt or truncated."
            ) from None
        if reached > done:
            done, retries = reached, 0
        elif start == 0:
            raise ValueError(
                f"Could not decode frame {wanted[done]} (at {index.timestamps[wanted[done]]:.3f} s) of {name}: the "
                "decoder does not return it. The file is truncated or corrupt; re-download or re-export it."
            )
        else:
            retries += 1


def _decode_run(
    container, stream, wanted, done: int, index: _FrameIndex, writer: _FrameWriter, start: int, lone: bool, keep: set
) -> int:
    """Decode on from a seek to keyframe `start` (an index in `index.keyframes`); returns how many of `wanted` are
    done after this run. It stops at the end of the stream, when the next wanted frame is better reached by seeking,
    or when the decoder skips past a wanted frame."""
    keyframe = index.keyframe_before(wanted[done])
    alone = done + 1 == len(wanted) or index.keyframe_before(wanted[done + 1]) != keyframe
    if lone and alone and index.keyframes[keyframe] == wanted[done]:  # a lone keyframe: decode that frame only
        frame = _decode_keyframe(container, stream, index.pts[wanted[done]])
        if frame is not None:
            writer.check(wanted[done], frame)
            writer.write(done, frame)
            return done + 1
        container.seek(index.seek_targets[start], stream=stream, backward=True)
    first = index.keyframes[start]  # frames before it, decoded after a seek that landed early, may lack references
    for frame in _decode_skipping(container, stream, keep):
        if frame.pts is None:
            continue
        position = bisect.bisect_left(index.pts, frame.pts)
        if position >= first:
            writer.check(position, frame)
        if position < wanted[done]:
            continue
        if position > wanted[done] or index.pts[position] != frame.pts:  # the wanted frame did not come out
            return done
        writer.write(done, frame)
        done += 1
        if done == len(wanted):
            return done
        if index.keyframes[index.keyframe_before(wanted[done])] > position:
            return done  # cheaper to seek to the next target's keyframe than to decode up to it
    return done


def _decode_skipping(container, stream, wanted_pts: set[int]):
    """Decoded frames from the container's position on; the decoder skips the frames that are neither wanted (their
    pts is not in `wanted_pts`) nor referenced by others (FFmpeg's `skip_frame="NONREF"`, set packet by packet): the wanted frames and every frame
    they predict from decode exactly as in a full decode, in about half the time for B-frame streams."""
    codec = stream.codec_context
    for packet in container.demux(stream):
        codec.skip_frame = "DEFAULT" if packet.pts is None or packet.pts in wanted_pts else "NONREF"
        yield from codec.decode(packet)  # the last, empty packet drains the decoder


def _decode_keyframe(container, stream, pts: int):
    """Decode only the keyframe at `pts` (the container must be positioned on it): send its packet, drain the decoder.
    Returns None if the first packet read is not that keyframe or the decoder returns another frame."""
    stream.codec_context.skip_frame = "DEFAULT"
    for packet in container.demux(stream):
        if packet.pts != pts:
            return None
        decoded = [*stream.codec_context.decode(packet), *stream.codec_context.decode(None)]
        return decoded[0] if decoded and decoded[0].pts == pts else None
    return None


def _decode_in_order(container, stream, wanted: list[int], writer: _FrameWriter, name: str) -> int:
    """Decode the whole stream from its start, numbering frames in the order the decoder returns them (presentation
    order), and write the frames at positions `wanted`. Returns the number of frames decoded."""
    slots = {position: slot for slot, position in enumerate(wanted)}
    count = 0
    try:
        for frame in container.decode(stream):
            writer.check(count, frame)
            if count in slots:
                writer.write(slots[count], frame)
            count += 1
    except av.error.FFmpegError as error:
        raise ValueError(f"Could not decode {name} ({error.strerror}): the file is corrupt or truncated.") from None
    return count


def _split_by_keyframe(wanted: list[int], index: _FrameIndex, parts: int) -> list[tuple[int, list[int]]]:
    """Split the sorted positions `wanted` into up to `parts` runs of about equal length that never cut a keyframe
    interval in two (each run is decoded on its own, from its own keyframes); each run comes with its offset in
    `wanted`."""
    group = [index.keyframe_before(position) for position in wanted]
    runs, start = [], 0
    for end in np.linspace(0, len(wanted), parts + 1)[1:].round().astype(int):
        while 0 < end < len(wanted) and group[end] == group[end - 1]:
            end += 1
        if end > start:
            runs.append((start, wanted[start:end]))
            start = end
    return runs


def _first_frame(stream, packet) -> tuple["av.VideoFrame | None", bool]:
    """Decode `packet` (the empty last one drains the decoder): the first frame that comes out, or None, and whether to
    go on decoding (no frame yet). A decoder error ends it with no frame: the geometry is then the coded one
    (`_display_geometry`)."""
    try:
        frames = stream.codec_context.decode(packet)
    except av.error.FFmpegError:
        return None, False
    return (frames[0], False) if frames else (None, True)


def _display_geometry(frame, stream) -> tuple[int, int, str | None]:
    """(height, width) of the first `frame` as a player shows it, and the `_display_transform` that turns the stream's
    frames upright; the stream's coded size and no transform when no frame could be decoded (`frame` None)."""
    if frame is None:
        return stream.codec_context.height, stream.codec_context.width, None
    transform = _display_transform(frame)
    height, width = (frame.width, frame.height) if transform in _TRANSPOSING else (frame.height, frame.width)
    return height, width, transform


def read_video_pyav(
    source, sample_indices_fn=None, size: tuple[int, int] | None = None
) -> tuple[np.ndarray, StormVideoMetadata]:
    """Decode the sampled frames of one video with PyAV.

    Frames are indexed by demuxing the whole stream (container headers can misreport the frame count), the sampler
    picks indices from that index and only the picked frames are decoded: seeking keyframe to keyframe (on pts or dts,
    as the container seeks), in parallel stretches for long videos, and every frame is checked to carry the
    presentation timestamp it was wanted for. Streams without usable timestamps (raw `.h264`, all pts equal) are
    decoded from the start, numbering frames in decoder output order, with a warning. Frames are turned upright as
    the display matrix says (phone videos), scaled to one size while they are decoded (a resolution change
    mid-stream included), and a warning names the frames the decoder concealed errors in (corrupt slices).

    Args:
        source (`str`, `os.PathLike`, `bytes`, `memoryview` or binary file object): local path, http(s) URL, base64
            data URI (`data:video/mp4;base64,...`) or encoded bytes.
        sample_indices_fn (`Callable[[StormVideoMetadata], np.ndarray]`, *optional*): returns the frame indices to
            keep; all frames when `None`.
        size (`tuple[int, int]`, *optional*): `(height, width)` to scale the frames to while converting them to RGB
            (FFmpeg's swscale, bicubic): much less memory and time than full-resolution frames for long videos.
            Defaults to the size of the first frame as displayed.

    Returns:
        `tuple[np.ndarray, StormVideoMetadata]`: frames `(num_frames, height, width, 3)` uint8 RGB, and metadata with
        `frames_indices`, `frame_timestamps` (seconds), `keyframe_indices`, `fps` (average, from the timestamps), the
        displayed width and height of the source, and duration (seconds).

    Raises:
        FileNotFoundError: missing file. TypeError: a text-mode file object. ValueError: empty, truncated, corrupt or
        non-video input, no video stream, or a frame the decoder does not return.
    """
    name = _describe(source)
    data = _load_source(source)
    # One decoding thread to index: with frame threading the first frame would wait for a packet per thread.
    with _open_container(data, name, threads=1) as container:
        index, (coded_height, coded_width), first = _read_index(container, name, decode_first=True)
        height, width, transform = _display_geometry(first, container.streams.video[0])
        del first  # read once: its side_data keeps the frame alive until Python's cycle collector runs
        for _ in range(2):  # a second pass only if a stream without timestamps decodes to more or fewer frames
            metadata = _metadata(index, width, height)
            indices = np.asarray(sample_indices_fn(metadata=metadata)) if sample_indices_fn else np.arange(index.count)
            if indices.size and (indices.min() < 0 or indices.max() >= index.count):
                raise ValueError(f"Frame indices {indices.tolist()} are outside the {index.count} frames of {name}.")
            wanted, inverse = np.unique(indices, return_inverse=True)  # decode each frame once, in stream order
            out = np.empty((len(wanted), *(size or (height, width)), 3), dtype=np.uint8)  # (T, H, W, 3)
            concealed = (
                _decode(data, name, index, wanted.tolist(), out, transform, coded_height * coded_width, container)
                if len(wanted)
                else set()
            )
            if concealed is not None:
                break
            index = _recount(data, name, index)
    _warn_concealed(name, concealed, wanted.tolist(), index)
    metadata.frames_indices = indices.tolist()
    frames = out if np.array_equal(wanted, indices) else out[inverse.reshape(-1)]
    return frames, metadata


def read_video_metadata(source) -> StormVideoMetadata:
    """The metadata of a video file from its container only: the stream is demuxed to index its frames (presentation
    timestamps, keyframes), and no frame is decoded. What `read_video_pyav` gives a sampler, so that the frames a
    sampling will take (and the visual tokens they make: `processing_storm.video_token_budget`) are known before any
    decoding; 0.2 s for a 10-minute 720p video, 2.3 s for an hour (docs/benchmarks.md).

    Args:
        source (`str`, `os.PathLike`, `bytes`, `memoryview` or binary file object): as `read_video_pyav`.

    Returns:
        `StormVideoMetadata`: `total_num_frames`, `frame_timestamps` (seconds from the first frame),
        `keyframe_indices`, `fps` (average, from the timestamps) and `duration` (seconds) as `read_video_pyav` gives
        them; `width` × `height` are the stream's coded size (before a display matrix turns it; decoding gives the
        displayed size); `frames_indices` is `None` (nothing sampled yet). For a stream without timestamps (raw
        `.h264`) the count is that of its packets, which decoding may correct.

    Raises:
        FileNotFoundError: missing file. TypeError: a text-mode file object. ValueError: empty, truncated, corrupt or
        non-video input, or no video stream.
    """
    name = _describe(source)
    with _open_container(_load_source(source), name) as container:
        index, (height, width), _ = _read_index(container, name)
    return _metadata(index, width, height)


def _read_index(container, name: str, decode_first: bool = False):
    """`(index, (height, width), first frame)`: the frame index of the container's first video stream (by demuxing),
    its coded size, and with `decode_first` its first decoded frame (else None; see `_demux`)."""
    if not container.streams.video:
        raise ValueError(f"{name} contains no video stream (audio-only or not a video file).")
    stream = container.streams.video[0]
    packets, first = _demux(container, stream, name, decode_first)
    coded = (stream.codec_context.height, stream.codec_context.width)
    return _index_frames(container, stream, name, packets), coded, first


def _metadata(index: _FrameIndex, width: int, height: int) -> StormVideoMetadata:
    span = index.timestamps[-1]
    fps = (index.count - 1) / span if span > 0 else 1.0
    return StormVideoMetadata(
        total_num_frames=index.count,
        fps=fps,
        width=width,
        height=height,
        duration=index.count / fps,
        video_backend="pyav",
        frame_timestamps=index.timestamps,
        keyframe_indices=index.keyframes,
    )


def _decoding_threads() -> int:
    """Threads one video may decode with: `DECODE_THREADS`, or 1 inside a `torch.utils.data.DataLoader` worker, where
    the workers are the parallelism (a 16-core machine running 16 workers that each start 16 FFmpeg threads per clip
    spends its time switching threads)."""
    return 1 if torch.utils.data.get_worker_info() is not None else DECODE_THREADS


def _decode(
    data, name: str, index: _FrameIndex, wanted: list[int], out: np.ndarray, transform, coded_pixels: int,
    opened=None,
) -> set[int] | None:
    """Decode the frames at positions `wanted` into `out`; returns the positions of the frames decoded with
    concealed errors, or None if a stream without timestamps did not decode to `index.count` frames. Long runs are
    split into stretches decoded at once (`_decoding_threads`); one stretch decodes with FFmpeg's threads (0: as many
    as cores) unless that is 1 or the frames (`coded_pixels`, width × height) are small. A single stretch on one
    thread seeks and decodes in `opened` (the container that indexed the stream with one thread) instead of opening
    the data again (an open probes the stream: ~1 ms, more than decoding a small clip)."""
    budget = _decoding_threads()
    single = 1 if budget == 1 or coded_pixels < THREADED_DECODE_PIXELS else 0
    if index.pts is None:
        with _open_container(data, name, single) as container:
            writer = _FrameWriter(out, transform)
            count = _decode_in_order(container, container.streams.video[0], wanted, writer, name)
        return writer.concealed if count == index.count else None
    parts = _split_by_keyframe(wanted, index, budget)
    threads = max(1, budget // len(parts)) if len(parts) > 1 else single

    def decode(part, container=None) -> set[int]:
        start, positions = part
        with _open_container(data, name, threads) if container is None else contextlib.nullcontext(container) as c:
            writer = _FrameWriter(out[start : start + len(positions)], transform)
            _decode_by_timestamp(c, c.streams.video[0], positions, index, writer, name)  # seeks first
        return writer.concealed

    if len(parts) == 1:
        return decode(parts[0], opened if threads == 1 else None)
    with ThreadPoolExecutor(len(parts)) as pool:  # PyAV releases the GIL while decoding
        return set().union(*pool.map(decode, parts))


def _recount(data, name: str, index: _FrameIndex) -> _FrameIndex:
    """The index of a stream without timestamps, with the frame count the decoder gives."""
    with _open_container(data, name) as container:
        stream = container.streams.video[0]
        count = sum(1 for _ in container.decode(stream))
    if not count:
        raise ValueError(f"{name} has a video stream but no frame can be decoded. Re-export the video.")
    step = index.timestamps[1] if index.count > 1 else 1.0
    return _FrameIndex(
        count=count,
        timestamps=[i * step for i in range(count)],
        keyframes=[k for k in index.keyframes if k < count] or [0],
    )


def _warn_concealed(name: str, concealed: set[int], wanted: list[int], index: _FrameIndex) -> None:
    """Warn about sampled frames that are damaged: concealed by the decoder, or decoded after such a frame from the
    same keyframe (they predict from it)."""
    if not concealed:
        return
    affected = [
        position
        for position in wanted
        if any(index.keyframes[index.keyframe_before(position)] <= damaged <= position for damaged in concealed)
    ]
    if affected:
        times = ", ".join(f"{index.timestamps[p]:.2f}" for p in affected[:10])
        logger.warning(
            f"{name}: the decoder concealed damaged data (corrupt slices) in frames {sorted(concealed)[:10]}; the "
            f"sampled frames {affected[:10]} (at {times} s) are or follow them and show the damage. Re-download or "
            "re-encode the video to get clean frames."
        )


# ----------------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------------


def _check_count(name: str, value, minimum: int = 1) -> int:
    """`value` as an `int` >= `minimum`; a bool, float or anything else is a `TypeError`/`ValueError` naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a whole number of frames (int), got {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}.")
    return int(value)


def _check_fps(fps) -> float:
    if isinstance(fps, bool) or not isinstance(fps, numbers.Real):
        raise TypeError(f"fps must be a number of frames per second, got {fps!r} ({type(fps).__name__}).")
    if not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a positive, finite number of frames per second, got {fps}. E.g. fps=1.")
    return float(fps)


def sample_frame_indices(
    metadata: VideoMetadata,
    num_frames: int | None = None,
    fps: float | None = None,
    keyframes_only: bool = False,
    temporal_pool_size: int = 1,
    max_frames: int | None = None,
) -> np.ndarray:
    """Indices of the frames nearest to uniformly spaced times.

    `num_frames`: that many times spread evenly from the first to the last frame (both included, as VILA's
    `np.linspace`). `fps`: `floor(duration · fps)` frames, floored to a multiple of `temporal_pool_size` (k), at
    least k and at most `max_frames` (floored to a multiple of k); one frame every `1/fps` seconds from the first
    frame when that count needs no flooring, else the count spread evenly over the whole video (a rate a little below
    or, for videos shorter than k/fps, above `fps`; `metadata.timestamps` gives the real times).
    Times come from `metadata.frame_timestamps` when known (variable frame rate), else from frame indices.
    `keyframes_only`: choose among keyframes only (`metadata.keyframe_indices`), distinct and in time order, as close
    to the target times as possible: only those frames need decoding, which makes long videos many times faster to
    sample; each sampled time moves by up to about half a keyframe interval.

    Raises:
        ValueError: both or neither of `num_frames` / `fps`; a count or rate that is zero, negative, NaN or infinite;
        more frames asked than the video (or, with `keyframes_only`, its keyframes) has; fps sampling of a video whose
        frame rate is unknown. TypeError: a count that is not an int (a bool, a float), an fps that is not a number.
    """
    if (num_frames is None) == (fps is None):
        raise ValueError(f"Pass exactly one of num_frames or fps (got num_frames={num_frames}, fps={fps}).")
    total = metadata.total_num_frames
    times = getattr(metadata, "frame_timestamps", None)
    if fps is not None:
        targets, num_frames = _fps_targets(metadata, _check_fps(fps), temporal_pool_size, max_frames)
        times = np.asarray(times if times is not None else np.arange(total) / metadata.fps)
        targets = times[0] + targets
    else:
        num_frames = _check_count("num_frames", num_frames)
        times = np.asarray(times if times is not None else np.arange(total, dtype=float))
        targets = np.linspace(times[0], times[-1], num_frames)
    if num_frames > total:
        raise ValueError(
            f"Asked for {num_frames} frames but the video has only {total}. Use num_frames<={total} or a lower fps"
            + (
                " (decoded frames: do_sample_frames=False keeps them all)."
                if getattr(metadata, "video_backend", None) != "pyav"
                else "."
            )
        )
    if keyframes_only:
        keyframes = getattr(metadata, "keyframe_indices", None)
        if keyframes is None:
            raise ValueError("keyframes_only=True needs an encoded video (a path, URL or bytes), not decoded frames.")
        if len(keyframes) < num_frames:
            raise ValueError(
                f"keyframes_only=True: the video has {len(keyframes)} keyframes, fewer than the {num_frames} frames "
                "asked. Sample fewer frames, or sample exactly (keyframes_only=False)."
            )
        keyframes = np.asarray(keyframes)
        return keyframes[_match_in_order(targets, times[keyframes])]
    right = np.clip(np.searchsorted(times, targets), 1, max(total - 1, 1))
    left = right - 1
    nearest = np.where(np.abs(targets - times[left]) <= np.abs(times[right] - targets), left, right)
    return nearest.clip(0, total - 1)


def _fps_targets(metadata: VideoMetadata, fps: float, k: int, max_frames: int | None) -> tuple[np.ndarray, int]:
    """Target times (seconds from the first frame) and count of fps sampling; see `sample_frame_indices`."""
    if not metadata.fps:
        raise ValueError(
            "Sampling at fps needs the video's frame rate: pass video_metadata with fps, a file path, or num_frames."
        )
    k = _check_count("temporal_pool_size", k)
    duration = metadata.total_num_frames / metadata.fps
    exact = int(duration * fps + 1e-9)
    count = max(k, exact - exact % k)
    if max_frames is not None and count > max_frames:
        count = max(k, _check_count("max_frames", max_frames) // k * k)
        logger.warning_once(
            f"fps sampling is capped at max_frames={max_frames} frames per video: a video longer than "
            f"{max_frames / fps:.0f} s at fps={fps:g} gets {count} frames spread over its whole length (a lower rate; "
            "video_metadata.timestamps gives the times). Raise max_frames or lower fps to choose."
        )
    step = 1 / fps if count == exact else duration / count
    return np.arange(count) * step, count


def _match_in_order(targets: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Indices of distinct `candidates`, one per target, in increasing order, minimising the summed time distance.

    Dynamic programming over (target, candidate) pairs, O(len(targets) · len(candidates)); both arrays are sorted
    times and there are at least as many candidates as targets.
    """
    cost = np.abs(targets[:, None] - candidates[None, :])  # (n, m)
    n, m = cost.shape
    total = np.full((n, m), np.inf)
    total[0] = cost[0]
    for i in range(1, n):
        best_before = np.minimum.accumulate(total[i - 1])  # best total with target i-1 on a candidate <= j
        total[i, 1:] = best_before[:-1] + cost[i, 1:]
    chosen = np.empty(n, dtype=int)
    chosen[-1] = int(np.argmin(total[-1]))
    for i in range(n - 2, -1, -1):
        chosen[i] = int(np.argmin(total[i, : chosen[i + 1]]))
    return chosen


# ----------------------------------------------------------------------------------------------------------------
# The video processor
# ----------------------------------------------------------------------------------------------------------------


class StormVideoProcessorKwargs(VideosKwargs, total=False):
    """`VideosKwargs` plus:

    keyframes_only (`bool`, *optional*, defaults to `False`):
        Sample keyframes only (see `sample_frame_indices`): much faster on long videos, frame times approximate.
    temporal_pool_size (`int`, *optional*, defaults to 1):
        k of temporal pooling: `fps` sampling gives a multiple of k frames, at least k. `StormProcessor` passes its
        own (the model's).
    max_frames (`int`, *optional*, defaults to 3600):
        Most frames `fps` sampling takes from one video (floored to a multiple of k); longer videos get that many
        frames spread over their whole length. Explicit `num_frames` is not capped.
    """

    keyframes_only: bool
    temporal_pool_size: int
    max_frames: int


class StormVideoProcessor(BaseVideoProcessor):
    r"""
    Video processor of STORM (`AutoVideoProcessor`): decodes, samples, resizes and normalizes frames for SigLIP.

    Accepts paths, http(s) URLs, base64 data URIs (`data:video/mp4;base64,...`), encoded bytes (`bytes`, `memoryview`)
    or binary file objects, and decoded videos: arrays/tensors `(T, H, W, 3)` or `(T, 3, H, W)` (uint8 0..255; float
    0..255, or 0..1 with `do_rescale=False`), lists of frames (PIL images, arrays) and lists of frame files (image
    paths or URLs: one video, already sampled, so it needs `do_sample_frames=False`, as in transformers). A batch may
    mix them, nest them per sample, and include samples without videos. Frames are sampled either as `num_frames`
    uniformly over the whole duration or at `fps` frames per second (one of the two; `fps` wins over the default
    `num_frames`; with k = `temporal_pool_size` the fps count is a multiple of k, at least k, at most `max_frames`),
    by timestamp; with `keyframes_only=True` among keyframes only, which decodes one frame per sample (long videos).

    Output: `pixel_values_videos` of shape `(num_videos, num_frames, 3, size["height"], size["width"])`, and
    `video_metadata` (indices, timestamps in seconds, fps) with `return_metadata=True`. Videos of one batch with
    different frame counts (fps sampling of videos of different lengths) are padded to the longest by repeating their
    last frame, and their `video_metadata.frames_indices` list that frame again (a warning says so once).

    Defaults: 448×448 bicubic resize without keeping the aspect ratio (done while decoding for encoded videos),
    rescale to [0, 1], normalize with mean = std = 0.5 (PaliGemma SigLIP), 32 frames; `max_frames` = 3600 (one hour
    at fps=1).
    """

    resample = PILImageResampling.BICUBIC
    image_mean = [0.5, 0.5, 0.5]
    image_std = [0.5, 0.5, 0.5]
    size = {"height": 448, "width": 448}
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    do_sample_frames = True
    num_frames = 32
    max_frames = 3600
    keyframes_only = False
    valid_kwargs = StormVideoProcessorKwargs
    model_input_names = ["pixel_values_videos"]

    def preprocess(self, videos, **kwargs) -> BatchFeature:
        """Decode, sample and normalise `videos` (see the class docstring); returns `pixel_values_videos` (B, T, 3, H, W).

        Raises:
            TypeError / ValueError: an argument or a video that is not valid, with what was expected; ValueError for
            frame files with `do_sample_frames` on.
        """
        kwargs = self._checked_kwargs(kwargs)
        videos = _flatten_videos(videos)
        if not videos:
            raise ValueError("No video given (an empty list). Pass a video file, frames, or a list of them.")
        given = _per_video_metadata(kwargs.pop("video_metadata", None), len(videos))
        sample = None
        if kwargs.get("do_sample_frames", self.do_sample_frames) is not False:
            names = ("num_frames", "fps", "keyframes_only", "temporal_pool_size", "max_frames")
            sample = functools.partial(self.sample_frames, **{name: kwargs.get(name) for name in names})
        frames, metadata = [], []
        for i, (video, known) in enumerate(zip(videos, given)):
            clip, info = self._load(video, f"video {i}", known, sample, kwargs)
            frames.append(clip)
            metadata.append(info)
        _pad_frame_counts(frames, metadata)
        kwargs.update(video_metadata=metadata, do_sample_frames=False, input_data_format=ChannelDimension.FIRST)
        return super().preprocess(frames, **kwargs)

    def _load(self, video, where: str, known, sample, kwargs) -> tuple[torch.Tensor, VideoMetadata]:
        """The sampled frames of one video `(T, 3, H, W)` and its metadata."""
        do_rescale = kwargs.get("do_rescale", self.do_rescale)
        if _is_encoded_video(video):
            if do_rescale is False:
                raise ValueError(
                    "do_rescale=False expects float frames in 0..1, but video files decode to uint8 frames in 0..255: "
                    "keep do_rescale=True (the default)."
                )
            frames, metadata = read_video_pyav(video, sample, size=self._decode_size(kwargs))
            return torch.from_numpy(frames).permute(0, 3, 1, 2), metadata
        if sample is not None and isinstance(video, list) and _is_frame_file(video[0]):
            # transformers' contract (BaseVideoProcessor): frame files are frames already sampled
            raise ValueError(
                f"{where} is a list of {len(video)} frame files, which are taken as already sampled. Sampling frames "
                "from a list of images is not supported! Set `do_sample_frames=False` to use these frames as they are "
                "(their count must be a multiple of temporal_pool_size)."
            )
        frames = _frames_tensor(video, where, do_rescale is not False, kwargs.get("input_data_format"))
        metadata = StormVideoMetadata(
            total_num_frames=len(frames),
            fps=(known or {}).get("fps"),
            height=frames.shape[2],
            width=frames.shape[3],
            frames_indices=list(range(len(frames))),
        )
        if sample is not None:
            indices = np.asarray(sample(metadata=metadata))
            metadata.frames_indices = indices.tolist()
            frames = frames[torch.from_numpy(indices)]
        return frames, metadata

    def _checked_kwargs(self, kwargs: dict) -> dict:
        """`kwargs` with the sampling counts, rate and size checked (numpy integers become ints); an explicit `fps`
        replaces the default `num_frames`."""
        kwargs = dict(kwargs)
        for name in ("num_frames", "max_frames", "temporal_pool_size"):
            if kwargs.get(name) is not None:
                kwargs[name] = _check_count(name, kwargs[name])
        if kwargs.get("fps") is not None:
            _check_fps(kwargs["fps"])
            if kwargs.get("num_frames") is not None:
                raise ValueError(
                    f"Pass either num_frames or fps, not both (got num_frames={kwargs['num_frames']}, fps={kwargs['fps']})."
                )
            kwargs["num_frames"] = None  # an explicit fps replaces the default num_frames
        self._decode_size(kwargs)  # checks the size
        return kwargs

    def _decode_size(self, kwargs) -> tuple[int, int] | None:
        """`(height, width)` the frames will be resized to, so that decoding can scale them right away.

        Raises:
            ValueError: a size whose height or width is not a positive int.
        """
        size = kwargs.get("size") or self.size
        if not kwargs.get("do_resize", self.do_resize) or size is None:
            return None
        if isinstance(size, dict):
            height, width = size.get("height"), size.get("width")
        else:
            height, width = getattr(size, "height", None), getattr(size, "width", None)
        if height is None and width is None:
            return None
        for value in (height, width):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(
                    f"size must give a positive height and width in pixels, e.g. {{'height': 448, 'width': 448}}; got {size}."
                )
        return int(height), int(width)

    def sample_frames(
        self,
        metadata: VideoMetadata,
        num_frames=None,
        fps=None,
        keyframes_only: bool | None = None,
        temporal_pool_size: int | None = None,
        max_frames: int | None = None,
        **kwargs,
    ):
        """Frame indices to keep; see `sample_frame_indices`. Defaults: the processor's `num_frames`, `keyframes_only`,
        `max_frames` and `temporal_pool_size` (1 if unset)."""
        if num_frames is None and fps is None:
            num_frames = self.num_frames
        return sample_frame_indices(
            metadata,
            num_frames=num_frames,
            fps=fps,
            keyframes_only=self.keyframes_only if keyframes_only is None else keyframes_only,
            temporal_pool_size=temporal_pool_size or getattr(self, "temporal_pool_size", None) or 1,
            max_frames=self.max_frames if max_frames is None else max_frames,
        )

    def _preprocess(
        self,
        videos: list[torch.Tensor],
        do_resize: bool,
        size,
        resample,
        do_center_crop: bool,
        crop_size,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean,
        image_std,
        return_tensors=None,
        **kwargs,
    ) -> BatchFeature:
        """transformers' resize → center crop → rescale + normalise, `PREPROCESS_CHUNK` frames at a time into one
        preallocated `(B, T, 3, H, W)` float32 tensor, so that a long video never has a second full-length copy.

        Raises:
            ValueError: videos whose frames end up with different sizes (`do_resize=False`).
        """
        pixels = None
        for b, video in enumerate(videos):  # (T, 3, H, W) each, same T (padded before)
            for start in range(0, len(video), PREPROCESS_CHUNK):
                chunk = video[start : start + PREPROCESS_CHUNK]
                if do_resize:
                    chunk = self.resize(chunk, size=size, resample=resample)
                if do_center_crop:
                    chunk = self.center_crop(chunk, crop_size)
                chunk = self.rescale_and_normalize(
                    chunk, do_rescale, rescale_factor, do_normalize, image_mean, image_std
                )
                if pixels is None:
                    pixels = torch.empty(
                        (len(videos), len(video), *chunk.shape[1:]), dtype=chunk.dtype, device=chunk.device
                    )
                if chunk.shape[1:] != pixels.shape[2:]:
                    raise ValueError(
                        f"The videos of one batch must have one frame size: video 0 has {tuple(pixels.shape[3:])}, video "
                        f"{b} {tuple(chunk.shape[2:])}. Keep do_resize=True (the default) to resize them to size."
                    )
                pixels[b, start : start + len(chunk)] = chunk.to(pixels.dtype)
        return BatchFeature(
            data={"pixel_values_videos": pixels if return_tensors else list(pixels)}, tensor_type=return_tensors
        )


def _per_video_metadata(video_metadata, count: int) -> list:
    """The caller's `video_metadata` (for decoded frames: their `fps`) as one dict (or None) per video."""
    if video_metadata is None:
        return [None] * count
    if not isinstance(video_metadata, (list, tuple)):
        video_metadata = [video_metadata]
    if video_metadata and isinstance(video_metadata[0], (list, tuple)):
        video_metadata = [entry for entries in video_metadata for entry in entries]
    if len(video_metadata) != count:
        raise ValueError(f"Got {count} videos but {len(video_metadata)} video_metadata entries; pass one per video.")
    return [entry if isinstance(entry, dict) or entry is None else vars(entry) for entry in video_metadata]


def _pad_frame_counts(frames: list[torch.Tensor], metadata: list[VideoMetadata]) -> None:
    """Pad every video of a batch to the longest by repeating its last frame (in place); the metadata lists it."""
    longest = max(len(clip) for clip in frames)
    if all(len(clip) == longest for clip in frames):
        return
    logger.warning_once(
        f"The videos of one batch have different frame counts ({[len(clip) for clip in frames]}): the shorter ones are "
        f"padded to {longest} by repeating their last frame (video_metadata.frames_indices lists it). Sample with "
        "num_frames, or process such videos one at a time, to avoid padding."
    )
    for i, clip in enumerate(frames):
        extra = longest - len(clip)
        if extra:
            frames[i] = torch.cat([clip, clip[-1:].expand(extra, *clip.shape[1:])])
            metadata[i].frames_indices = [*metadata[i].frames_indices, *[metadata[i].frames_indices[-1]] * extra]


__all__ = [
    "StormVideoMetadata",
    "StormVideoProcessor",
    "StormVideoProcessorKwargs",
    "read_video_metadata",
    "read_video_pyav",
    "sample_frame_indices",
]
