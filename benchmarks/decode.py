"""Video decoding benchmark: `StormVideoProcessor`'s decoder on 10-minute and 1-hour 720p H.264 videos.

The registries ship no long video, so `--build` makes them from the real clips of `storm fetch-assets`:
- 10 minutes: Big Buck Bunny (1280×720), bikes (640×272) and carphone (176×144), each scaled to 1280×720, played one
  after the other and looped to 10 minutes at 25 fps (15000 frames), encoded with libx264 (`--preset`, `--keyint`
  frames between keyframes, CRF 23, yuv420p) into `long_720p_k{keyint}.mp4`;
- 1 hour: that encode's packets six times over, each copy's timestamps shifted by 10 minutes, remuxed (no
  re-encoding: seconds, not minutes) into `long_720p_k{keyint}_1h.mp4` (90000 frames). Every copy starts with an
  IDR frame and x264's GOPs are closed, so the joins decode like any keyframe.

Usage (from the repository root; the script imports the repository's packages, not an installed copy):
    python benchmarks/decode.py --build [--keyint 250] [--preset veryfast] [--out-dir assets]
    python benchmarks/decode.py --video assets/long_720p_k250.mp4 [--num-frames 128] [--repeats 3]
    python benchmarks/decode.py --fps 1 --video assets/long_720p_k250.mp4 assets/long_720p_k250_1h.mp4 [--processor]

Prints, for `--num-frames` uniform sampling, exact and keyframes-only: frames and keyframes in the video, the time to
index the video and decode the sampled frames at 448×448 (median of --repeats), the time of a whole
`StormVideoProcessor` call, and how far the sampled frames are from the uniform target times. With `--fps`: the time
to decode one frame per 1/fps seconds at 448×448 (exact timestamps, k = 4 multiple, the processor's max_frames),
frames per second of video decoded, the decoding threads, and the peak resident memory of a fresh process doing only
that (and its memory right after the imports); `--processor` adds a whole `StormVideoProcessor(fps=...)` call
(float32 `pixel_values_videos`: 2.3 MiB per frame) in another fresh process.
"""

import argparse
import functools
import itertools
import multiprocessing
import resource
import statistics
import sys
import time
from pathlib import Path

import av
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's storm_transformers

FPS, SECONDS, SIZE, HOUR_COPIES = 25, 600, (1280, 720), 6


def build(output: Path, keyint: int, preset: str, assets: Path) -> Path:
    clips = [assets / "videos" / name for name in ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")]
    frames = []
    for clip in clips:
        with av.open(str(clip)) as container:
            frames += [frame.reformat(*SIZE, format="yuv420p").to_ndarray() for frame in container.decode(video=0)]
    with av.open(str(output), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = *SIZE, "yuv420p"
        stream.codec_context.gop_size = keyint
        stream.codec_context.options = {"preset": preset, "crf": "23", "keyint_min": str(min(keyint, 25))}
        for index in range(FPS * SECONDS):
            frame = av.VideoFrame.from_ndarray(frames[index % len(frames)], format="yuv420p")  # a new frame each time:
            frame.pts = index  # the encoder keeps references to the frames in its lookahead
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return output


def build_hour(ten_minutes: Path, output: Path) -> Path:
    """Remux the packets of `ten_minutes` `HOUR_COPIES` times in a row, timestamps shifted by its duration."""
    with av.open(str(ten_minutes)) as source:
        template = source.streams.video[0]
        packets = [packet for packet in source.demux(template) if packet.size]
        times = [(packet.pts, packet.dts, packet.time_base) for packet in packets]  # muxing rebases them in place
        pts = sorted(p for p, _, _ in times)
        span = (
            pts[-1] - pts[0] + min(b - a for a, b in itertools.pairwise(pts))
        )  # 10 minutes, in the stream's time base
        with av.open(str(output), "w") as container:
            stream = container.add_stream_from_template(template)
            for copy in range(HOUR_COPIES):
                for packet, (pts, dts, time_base) in zip(packets, times):
                    packet.pts, packet.dts, packet.time_base = pts + copy * span, dts + copy * span, time_base
                    packet.stream = stream
                    container.mux(packet)
    return output


def measure(video: Path, num_frames: int, repeats: int, keyframes_only: bool) -> dict:
    """Decode `num_frames` frames at 448×448 (as the processor asks) and time it; also the full processor call."""
    from storm_transformers import StormVideoProcessor, read_video_pyav, sample_frame_indices

    sample = functools.partial(sample_frame_indices, num_frames=num_frames, keyframes_only=keyframes_only)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        frames, metadata = read_video_pyav(str(video), sample, size=(448, 448))
        times.append(time.perf_counter() - start)
    assert frames.shape[0] == num_frames and np.all(np.diff(metadata.timestamps) > 0)
    processor = StormVideoProcessor(num_frames=num_frames, keyframes_only=keyframes_only)
    start = time.perf_counter()
    processor(str(video), return_tensors="pt")
    processor_time = time.perf_counter() - start
    targets = np.linspace(metadata.frame_timestamps[0], metadata.frame_timestamps[-1], num_frames)
    offset = np.abs(np.asarray(metadata.timestamps) - targets)
    return {
        "video": video.name,
        "frames": metadata.total_num_frames,
        "keyframes": len(metadata.keyframe_indices),
        "sampling": "keyframes_only" if keyframes_only else "exact",
        "decode (s)": statistics.median(times),
        "processor call (s)": processor_time,
        "mean |t - target| (s)": float(offset.mean()),
        "max |t - target| (s)": float(offset.max()),
    }


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def _fps_child(video: str, fps: float, processor: bool) -> dict:
    """In a fresh process: decode (or process) `video` at `fps`; time and peak memory."""
    from storm_transformers import StormVideoProcessor, read_video_pyav, sample_frame_indices
    from storm_transformers import video_processing_storm as decoding

    after_imports = _peak_rss_mb()
    start = time.perf_counter()
    if processor:
        out = StormVideoProcessor()(video, fps=fps, temporal_pool_size=4, return_metadata=True, return_tensors="pt")
        frames, metadata = out["pixel_values_videos"][0], out["video_metadata"][0]
    else:
        max_frames = StormVideoProcessor.max_frames
        sample = functools.partial(sample_frame_indices, fps=fps, temporal_pool_size=4, max_frames=max_frames)
        frames, metadata = read_video_pyav(video, sample, size=(448, 448))
    seconds = time.perf_counter() - start
    return {
        "video": Path(video).name,
        "call": "StormVideoProcessor" if processor else "read_video_pyav",
        "frames in video": metadata.total_num_frames,
        "sampled": len(frames),
        "time (s)": seconds,
        "video frames / s": metadata.total_num_frames / seconds,
        "threads": decoding.DECODE_THREADS,
        "peak RSS (MiB)": _peak_rss_mb(),
        "RSS after imports (MiB)": after_imports,
        "output (MiB)": frames.nbytes / 2**20,
    }


def measure_fps(video: Path, fps: float, processor: bool) -> dict:
    with multiprocessing.get_context("spawn").Pool(1) as pool:  # peak memory of this measurement alone
        return pool.apply(_fps_child, (str(video), fps, processor))


def _print(row: dict) -> None:
    print(" | ".join(f"{k}: {v:.2f}" if isinstance(v, float) else f"{k}: {v}" for k, v in row.items()), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--build", action="store_true", help="build the 10-minute and 1-hour videos")
    parser.add_argument("--keyint", type=int, default=250)
    parser.add_argument("--preset", default="veryfast")
    parser.add_argument("--assets", default="assets", help="folder with videos/ from storm fetch-assets")
    parser.add_argument("--out-dir", help="where --build writes (default: --assets)")
    parser.add_argument("--video", nargs="+")
    parser.add_argument("--num-frames", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fps", type=float, help="measure fps sampling (time and peak memory) instead")
    parser.add_argument("--processor", action="store_true", help="with --fps: also a whole processor call")
    args = parser.parse_args()
    if args.build:
        out_dir = Path(args.out_dir or args.assets)
        out_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        ten = build(out_dir / f"long_720p_k{args.keyint}.mp4", args.keyint, args.preset, Path(args.assets))
        print(f"built {ten} in {time.perf_counter() - start:.0f} s", flush=True)
        start = time.perf_counter()
        hour = build_hour(ten, out_dir / f"long_720p_k{args.keyint}_1h.mp4")
        print(
            f"built {hour} ({hour.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - start:.0f} s", flush=True
        )
    for video in args.video or []:
        if args.fps:
            _print(measure_fps(Path(video), args.fps, processor=False))
            if args.processor:
                _print(measure_fps(Path(video), args.fps, processor=True))
            continue
        for keyframes_only in (False, True):
            _print(measure(Path(video), args.num_frames, args.repeats, keyframes_only))


if __name__ == "__main__":
    main()
