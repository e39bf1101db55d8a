"""STORM video processor: PyAV decoding by timestamps, uniform or fixed-fps frame sampling, SigLIP preprocessing.

transformers' default video loading needs torchcodec and a system FFmpeg, and trusts container frame counts; this
processor decodes with PyAV (FFmpeg is in its wheel), indexes the frames it can actually read, and samples by
presentation time.
"""

import bisect
import functools
import io
import os
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import av
import numpy as np
from av.video.reformatter import VideoReformatter
from transformers.image_utils import PILImageResampling
from transformers.processing_utils import VideosKwargs
from transformers.video_processing_utils import BaseVideoProcessor
from transformers.video_utils import VideoMetadata

URL_TIMEOUT_S = 60
# Threads that decode separate stretches of a long video at once (each opens its own container).
DECODE_THREADS = min(os.cpu_count() or 1, 8)


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


def _is_encoded_video(video) -> bool:
    return isinstance(video, (str, os.PathLike, bytes, bytearray, io.IOBase))


def _describe(source) -> str:
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    if isinstance(source, io.IOBase):
        return "<file object>"
    return str(source)


def _load_source(source) -> str | bytes:
    """A path (str) or the encoded bytes of `source` (path, http(s) URL, bytes or binary file object), checked, so
    that the video can be opened several times (one container per decoding thread)."""
    name = _describe(source)
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(source, timeout=URL_TIMEOUT_S) as response:
                source = response.read()
        except OSError as error:
            raise ValueError(f"Could not download the video {name}: {error}. Check the URL or pass a local file.") from None
    if isinstance(source, io.IOBase):
        source = source.read()
    if isinstance(source, (bytes, bytearray)):
        if not source:
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


def _open_container(data: str | bytes, name: str) -> av.container.InputContainer:
    """Open a path or encoded bytes from `_load_source` with PyAV."""
    try:
        return av.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    except av.error.FFmpegError as error:
        raise ValueError(
            f"Could not read {name} as a video ({error.strerror}). The file is truncated, corrupt or not a video "
            "(a complete MP4/WebM/MKV/AVI… file is expected)."
        ) from None


def _index_frames(container, stream, name: str) -> tuple[list[int], list[int]]:
    """Presentation timestamps of all frames and of the keyframes, read by demuxing (no decoding)."""
    pts, keyframes = [], []
    try:
        for packet in container.demux(stream):
            time = packet.pts if packet.pts is not None else packet.dts
            if time is None:  # flush packet at the end of the stream
                continue
            pts.append(time)
            if packet.is_keyframe:
                keyframes.append(time)
    except av.error.FFmpegError as error:
        raise ValueError(f"Could not read the frames of {name} ({error.strerror}): the file is corrupt or truncated.") from None
    if not pts:
        raise ValueError(f"{name} has a video stream but no frames. Re-export the video.")
    if stream.frames and len(pts) < stream.frames:
        raise ValueError(
            f"{name} is truncated: its header lists {stream.frames} frames but only {len(pts)} can be read. "
            "Re-download or re-export the file."
        )
    pts.sort()
    return pts, sorted(keyframes) or [pts[0]]


def _decode_frames(container, stream, wanted: list[int], keyframes: list[int], name: str, scale: dict) -> dict[int, np.ndarray]:
    """Decode the frames with presentation timestamps `wanted` (sorted), seeking to the keyframe before a target
    whenever that keyframe lies beyond the current decoding position. Returns {pts: RGB uint8 array (H, W, 3)}, scaled
    with `scale` (`VideoReformatter.reformat` arguments)."""
    frames: dict[int, np.ndarray] = {}
    reformatter = VideoReformatter()  # keeps its swscale context from frame to frame

    def convert(frame) -> np.ndarray:
        return reformatter.reformat(frame, format="rgb24", **scale).to_ndarray()

    next_idx, position = 0, None

    def keyframe_before(pts):
        return keyframes[max(bisect.bisect_right(keyframes, pts) - 1, 0)]

    try:
        while next_idx < len(wanted):
            keyframe = keyframe_before(wanted[next_idx])
            container.seek(keyframe, stream=stream, backward=True)
            alone = next_idx + 1 == len(wanted) or keyframe_before(wanted[next_idx + 1]) > wanted[next_idx]
            if wanted[next_idx] == keyframe and alone:  # a lone keyframe: decode that one frame and nothing after it
                frame = _decode_keyframe(container, stream, keyframe)
                if frame is not None:
                    frames[keyframe] = convert(frame)
                    next_idx += 1
                    continue
                container.seek(keyframe, stream=stream, backward=True)
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                position = frame.pts
                while next_idx < len(wanted) and wanted[next_idx] <= position:
                    frames[wanted[next_idx]] = convert(frame)
                    next_idx += 1
                if next_idx == len(wanted):
                    break
                if keyframe_before(wanted[next_idx]) > position:  # cheaper to jump to the next target's keyframe
                    break
            else:
                if next_idx < len(wanted):
                    raise ValueError(
                        f"{name} ended before the frame at pts {wanted[next_idx]} (stream time base "
                        f"{stream.time_base}) could be decoded: the file is truncated or corrupt."
                    )
    except av.error.FFmpegError as error:
        raise ValueError(f"Could not decode {name} ({error.strerror}): the file is corrupt or truncated.") from None
    return frames


def _decode_keyframe(container, stream, pts: int) -> av.VideoFrame | None:
    """Decode only the keyframe at `pts` (the container must be positioned on it): send its packet, drain the decoder.
    Returns None if the first packet read is not that keyframe."""
    for packet in container.demux(stream):
        if packet.pts != pts:
            return None
        decoded = [*stream.codec_context.decode(packet), *stream.codec_context.decode(None)]
        return decoded[0] if decoded else None
    return None


def read_video_pyav(
    source, sample_indices_fn=None, size: tuple[int, int] | None = None
) -> tuple[np.ndarray, StormVideoMetadata]:
    """Decode the sampled frames of one video with PyAV.

    Frames are indexed by demuxing the whole stream (container headers can misreport the frame count), the sampler
    picks indices from that index and only the picked frames are decoded, seeking keyframe to keyframe.

    Args:
        source (`str`, `os.PathLike`, `bytes` or binary file object): local path, http(s) URL or encoded bytes.
        sample_indices_fn (`Callable[[StormVideoMetadata], np.ndarray]`, *optional*): returns the frame indices to
            keep; all frames when `None`.
        size (`tuple[int, int]`, *optional*): `(height, width)` to scale the frames to while converting them to RGB
            (FFmpeg's swscale, bicubic): much less memory and time than full-resolution frames for long videos.

    Returns:
        `tuple[np.ndarray, StormVideoMetadata]`: frames `(num_frames, height, width, 3)` uint8 RGB, and metadata with
        `frames_indices`, `frame_timestamps` (seconds), `keyframe_indices`, `fps` (average, from the timestamps),
        the source's width and height, and duration.

    Raises:
        FileNotFoundError: missing file. ValueError: empty, truncated, corrupt or non-video input, or no video stream.
    """
    name = _describe(source)
    data = _load_source(source)
    scale = {} if size is None else {"height": size[0], "width": size[1], "interpolation": "BICUBIC"}
    with _open_container(data, name) as container:
        if not container.streams.video:
            raise ValueError(f"{name} contains no video stream (audio-only or not a video file).")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        pts, keyframes = _index_frames(container, stream, name)
        time_base = float(stream.time_base)
        frame_timestamps = [(p - pts[0]) * time_base for p in pts]
        span = frame_timestamps[-1]
        fps = (len(pts) - 1) / span if span > 0 else float(stream.average_rate or 1)
        keyframe_set = set(keyframes)
        metadata = StormVideoMetadata(
            total_num_frames=len(pts),
            fps=fps,
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            duration=len(pts) / fps,
            video_backend="pyav",
            frame_timestamps=frame_timestamps,
            keyframe_indices=[i for i, p in enumerate(pts) if p in keyframe_set],
        )
        indices = np.arange(len(pts)) if sample_indices_fn is None else np.asarray(sample_indices_fn(metadata=metadata))
        wanted = sorted({pts[i] for i in indices})
        parts = _split_by_keyframe(wanted, keyframes, DECODE_THREADS)
        if len(parts) == 1:  # one stretch: decode it in this container
            decoded = _decode_frames(container, stream, wanted, keyframes, name, scale)

    def decode(part: list[int]) -> dict[int, np.ndarray]:
        with _open_container(data, name) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            return _decode_frames(container, stream, part, keyframes, name, scale)

    if len(parts) > 1:
        with ThreadPoolExecutor(len(parts)) as pool:  # PyAV releases the GIL while decoding
            decoded = {pts: frame for part in pool.map(decode, parts) for pts, frame in part.items()}
    metadata.frames_indices = indices.tolist()
    return np.stack([decoded[pts[i]] for i in indices]), metadata


def _split_by_keyframe(wanted: list[int], keyframes: list[int], parts: int) -> list[list[int]]:
    """Split the sorted `wanted` timestamps into up to `parts` runs of about equal length that never cut a keyframe
    interval in two (each run is decoded on its own, from its own keyframes)."""
    group = [bisect.bisect_right(keyframes, pts) for pts in wanted]  # keyframe interval of each wanted frame
    runs, start = [], 0
    for end in np.linspace(0, len(wanted), parts + 1)[1:].round().astype(int):
        while 0 < end < len(wanted) and group[end] == group[end - 1]:
            end += 1
        if end > start:
            runs.append(wanted[start:end])
            start = end
    return runs


def sample_frame_indices(
    metadata: VideoMetadata, num_frames: int | None = None, fps: float | None = None, keyframes_only: bool = False
) -> np.ndarray:
    """Indices of the frames nearest to uniformly spaced times.

    `num_frames`: that many times spread evenly from the first to the last frame (both included, as VILA's
    `np.linspace`). `fps`: one frame every `1/fps` seconds from the first frame, `max(1, int(duration * fps))` frames.
    Times come from `metadata.frame_timestamps` when known (variable frame rate), else from frame indices.
    `keyframes_only`: choose among keyframes only (`metadata.keyframe_indices`), distinct and in time order, as close
    to the target times as possible: only those frames need decoding, which makes long videos many times faster to
    sample; each sampled time moves by up to about half a keyframe interval (`metadata.timestamps` gives the real ones).

    Raises:
        ValueError: both or neither of `num_frames` / `fps`; more frames asked than the video (or, with
        `keyframes_only`, its keyframes) has; fps sampling of a video whose frame rate is unknown.
    """
    if (num_frames is None) == (fps is None):
        raise ValueError(f"Pass exactly one of num_frames or fps (got num_frames={num_frames}, fps={fps}).")
    total = metadata.total_num_frames
    times = getattr(metadata, "frame_timestamps", None)
    if fps is not None:
        if metadata.fps is None and times is None:
            raise ValueError(
                "Sampling at fps needs the video's frame rate: pass video_metadata with fps, a file path, or num_frames."
            )
        video_fps = metadata.fps
        times = np.asarray(times if times is not None else np.arange(total) / video_fps)
        num_frames = max(1, int(total / video_fps * fps))
        targets = times[0] + np.arange(num_frames) / fps
    else:
        times = np.asarray(times if times is not None else np.arange(total, dtype=float))
        targets = np.linspace(times[0], times[-1], num_frames)
    if num_frames > total:
        raise ValueError(
            f"Asked for {num_frames} frames but the video has only {total}. Use num_frames<={total} or a lower fps."
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


class StormVideosKwargs(VideosKwargs, total=False):
    """`VideosKwargs` plus:

    keyframes_only (`bool`, *optional*, defaults to `False`):
        Sample keyframes only (see `sample_frame_indices`): much faster on long videos, frame times approximate.
    """

    keyframes_only: bool


class StormVideoProcessor(BaseVideoProcessor):
    r"""
    Video processor of STORM (`AutoVideoProcessor`): decodes, samples, resizes and normalizes frames for SigLIP.

    Accepts paths, http(s) URLs, encoded bytes, or already decoded videos (arrays `(T, H, W, 3)`, tensors, lists of
    PIL frames). Frames are sampled either as `num_frames` uniformly over the whole duration or at `fps` frames per
    second (one of the two; `fps` wins over the default `num_frames`), by timestamp; with `keyframes_only=True`
    among keyframes only, which decodes one frame per sample (long videos). Output: `pixel_values_videos`
    of shape `(num_videos, num_frames, 3, size["height"], size["width"])`, and `video_metadata` (indices, timestamps
    in seconds, fps) with `return_metadata=True`.

    Defaults: 448×448 bicubic resize without keeping the aspect ratio (done while decoding for encoded videos),
    rescale to [0, 1], normalize with mean = std = 0.5 (PaliGemma SigLIP), 32 frames.
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
    keyframes_only = False
    valid_kwargs = StormVideosKwargs
    model_input_names = ["pixel_values_videos"]

    def preprocess(self, videos, **kwargs):
        if kwargs.get("fps") is not None:
            if kwargs.get("num_frames") is not None:
                raise ValueError(
                    f"Pass either num_frames or fps, not both (got num_frames={kwargs['num_frames']}, fps={kwargs['fps']})."
                )
            kwargs["num_frames"] = None  # an explicit fps replaces the default num_frames
        encoded = _flatten_encoded_videos(videos)
        if encoded is not None:  # decode and sample here; transformers then preprocesses the decoded frames
            sample = None
            if kwargs.get("do_sample_frames", self.do_sample_frames):
                sample = functools.partial(
                    self.sample_frames,
                    num_frames=kwargs.get("num_frames"),
                    fps=kwargs.get("fps"),
                    keyframes_only=kwargs.get("keyframes_only"),
                )
            decoded = [read_video_pyav(video, sample, size=self._decode_size(kwargs)) for video in encoded]
            videos = [frames for frames, _ in decoded]
            kwargs.update(video_metadata=[metadata for _, metadata in decoded], do_sample_frames=False)
        return super().preprocess(videos, **kwargs)

    def _decode_size(self, kwargs) -> tuple[int, int] | None:
        """`(height, width)` the frames will be resized to, so that decoding can scale them right away."""
        size = kwargs.get("size") or self.size
        if not kwargs.get("do_resize", self.do_resize) or size is None:
            return None
        height, width = (size.get("height"), size.get("width")) if isinstance(size, dict) else (size.height, size.width)
        return (height, width) if height and width else None

    def sample_frames(
        self, metadata: VideoMetadata, num_frames=None, fps=None, keyframes_only: bool | None = None, **kwargs
    ):
        """Frame indices to keep; see `sample_frame_indices`."""
        if num_frames is None and fps is None:
            num_frames = self.num_frames
        keyframes_only = self.keyframes_only if keyframes_only is None else keyframes_only
        return sample_frame_indices(metadata, num_frames=num_frames, fps=fps, keyframes_only=keyframes_only)


def _flatten_encoded_videos(videos) -> list | None:
    """Flat list of the encoded videos in a (possibly nested, per-sample) batch, or None if it holds decoded frames."""
    if _is_encoded_video(videos):
        return [videos]
    if not isinstance(videos, (list, tuple)) or not videos:
        return None
    flat = [_flatten_encoded_videos(item) for item in videos]
    return None if any(item is None for item in flat) else [video for item in flat for video in item]


__all__ = ["StormVideoProcessor", "StormVideoMetadata", "StormVideosKwargs", "read_video_pyav", "sample_frame_indices"]
