"""The decoded frame is the one its timestamp says, in every container and codec (files written with PyAV here):
seeking on pts or dts, B-frames, raw elementary streams, broken timestamps, rotation, resolution changes, damage."""

import logging
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from video_files import (
    frame_index,
    numbered_frames,
    rotate_mp4,
    textured_frames,
    write_constant_pts,
    write_corrupt_slices,
    write_resolution_change,
    write_video,
)

from storm_transformers import StormVideoProcessor, read_video_pyav
from storm_transformers import video_processing_storm as decoding

REPO = Path(__file__).resolve().parents[1]
FRAMES = 35
# name: (file suffix, write_video arguments). Keyframes every 8 frames (unless given), so samples need seeking.
CONTAINERS = {
    "mp4 h264 b-frames": (".mp4", {"b_frames": 3}),
    "mkv h264 b-frames": (".mkv", {"b_frames": 3}),
    "webm vp9": (".webm", {"codec": "libvpx-vp9"}),
    "mpeg-ts mpeg2 b-frames": (".ts", {"codec": "mpeg2video", "b_frames": 2}),
    "mpeg-ts h264 b-frames": (".ts", {"b_frames": 3}),
    "avchd-like .MTS h264 b-frames": (".MTS", {"b_frames": 3, "container_format": "mpegts"}),
    "avi mpeg4-asp b-frames": (".avi", {"codec": "mpeg4", "b_frames": 2, "gop_size": 3}),  # keyframe pts > next dts
    "raw h264 elementary stream": (".h264", {"b_frames": 3, "container_format": "h264"}),
}
SAMPLES = ([0, 34], [3, 4, 12, 13, 27], [1, 7, 8, 22, 33], list(range(FRAMES)), [17, 17, 2], [24], [9, 30])


def straight_decode(path) -> list[np.ndarray]:
    """Every frame, decoded in order from the start, no seeking."""
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("containers")
    written = {}
    for i, (name, (suffix, arguments)) in enumerate(CONTAINERS.items()):
        if arguments.get("codec", "libx264") not in av.codecs_available:
            continue
        arguments = {"gop_size": 8, **arguments}
        written[name] = write_video(folder / f"clip{i}{suffix}", numbered_frames(FRAMES), **arguments)
    return written


@pytest.mark.parametrize("threads", [1, 3], ids=["one stretch", "parallel stretches"])
@pytest.mark.parametrize("name", CONTAINERS)
def test_sampled_frames_equal_the_straight_decode(videos, name, threads, monkeypatch):
    if name not in videos:
        pytest.skip(f"this PyAV wheel has no {CONTAINERS[name][1]['codec']} encoder")
    monkeypatch.setattr(decoding, "DECODE_THREADS", threads)
    reference = straight_decode(videos[name])
    assert [frame_index(frame) for frame in reference] == list(range(FRAMES))  # neighbours are told apart
    for indices in SAMPLES:
        frames, metadata = read_video_pyav(videos[name], lambda metadata, indices=indices: np.array(indices))
        assert metadata.total_num_frames == FRAMES and metadata.frames_indices == indices
        assert [frame_index(frame) for frame in frames] == indices
        for frame, index in zip(frames, indices):
            np.testing.assert_array_equal(frame, reference[index])
    assert metadata.timestamps == pytest.approx([i / 25 for i in indices], abs=1e-6)


def test_processor_samples_mpeg_ts_and_avi_by_time(videos):
    processor = StormVideoProcessor(size={"height": 32, "width": 48})
    for name in ("mpeg-ts h264 b-frames", "avi mpeg4-asp b-frames"):
        out = processor(videos[name], num_frames=8, return_metadata=True, return_tensors="pt")
        assert out["video_metadata"][0].frames_indices == [0, 5, 10, 15, 19, 24, 29, 34]


def test_keyframes_only_in_a_container_that_seeks_on_dts(videos):
    frames, metadata = read_video_pyav(
        videos["mpeg-ts h264 b-frames"],
        lambda metadata: decoding.sample_frame_indices(metadata, num_frames=5, keyframes_only=True),
    )
    assert metadata.keyframe_indices == [0, 8, 16, 24, 32]
    assert [frame_index(frame) for frame in frames] == [0, 8, 16, 24, 32]


@pytest.mark.parametrize("degrees, turns", [(90, 1), (-90, -1), (180, 2)])
def test_display_matrix_rotation_is_applied_as_players_do(tmp_path, degrees, turns):
    frames = np.zeros((4, 32, 48, 3), dtype=np.uint8)
    frames[:, :8, :12] = 255  # a white top-left corner
    path = rotate_mp4(write_video(tmp_path / "phone.mp4", frames), degrees)
    stored = straight_decode(path)[0]  # as stored: (32, 48, 3), corner top-left
    decoded, metadata = read_video_pyav(path, lambda metadata: np.array([0]))
    upright = np.rot90(stored, turns)  # counterclockwise `degrees`, FFmpeg's -display_rotation convention
    np.testing.assert_array_equal(decoded[0], upright)
    assert (metadata.height, metadata.width) == upright.shape[:2]
    scaled, _ = read_video_pyav(path, lambda metadata: np.array([0]), size=(40, 40))
    corner = {1: (39, 0), -1: (0, 39), 2: (39, 39)}[turns]  # where the top-left corner goes
    assert scaled.shape == (1, 40, 40, 3) and scaled[0, corner[0], corner[1]].mean() > 200 > scaled[0, 0, 0].mean()


def test_packets_that_all_have_pts_zero_are_indexed_in_decode_order(tmp_path, caplog):
    path = write_constant_pts(tmp_path / "pts0.mkv", numbered_frames(20))
    with av.open(path) as container:
        assert {packet.pts for packet in container.demux(video=0) if packet.size} == {0}
    reference = straight_decode(path)
    with caplog.at_level(logging.WARNING):
        frames, metadata = read_video_pyav(path, lambda metadata: np.array([0, 5, 9, 19]))
    assert [frame_index(frame) for frame in frames] == [0, 5, 9, 19]
    assert all(np.array_equal(frame, reference[i]) for frame, i in zip(frames, [0, 5, 9, 19]))
    assert metadata.timestamps == pytest.approx([0.0, 0.2, 0.36, 0.76])  # nominal 25 fps
    assert "pts0.mkv has missing or repeated timestamps" in caplog.text


def test_raw_h264_stream_is_timed_at_its_nominal_rate(videos):
    frames, metadata = read_video_pyav(
        videos["raw h264 elementary stream"],
        lambda metadata: decoding.sample_frame_indices(metadata, fps=5),
    )
    assert metadata.fps == pytest.approx(25) and metadata.frames_indices == [0, 5, 10, 15, 20, 25, 30]
    assert [frame_index(frame) for frame in frames] == [0, 5, 10, 15, 20, 25, 30]


def test_resolution_change_mid_stream(tmp_path):
    frames = numbered_frames(30, 64, 96)
    small = numbered_frames(30, 32, 48)
    path = write_resolution_change(tmp_path / "change.ts", frames[:12], small[12:])
    with av.open(path) as container:
        stored = list(container.decode(video=0))
    assert (stored[11].height, stored[12].height) == (64, 32)
    indices = [0, 11, 12, 13, 20, 29]
    decoded, metadata = read_video_pyav(path, lambda metadata: np.array(indices))
    assert decoded.shape == (6, 64, 96, 3) and (metadata.height, metadata.width) == (64, 96)  # the first frame's size
    assert [frame_index(frame) for frame in decoded] == indices
    for frame, index in zip(decoded, indices):
        expected = stored[index].reformat(width=96, height=64, format="rgb24", interpolation="BICUBIC").to_ndarray()
        np.testing.assert_array_equal(frame, expected)


def test_concealed_decoding_errors_are_named(tmp_path, caplog):
    path = write_corrupt_slices(tmp_path / "damaged.mp4", textured_frames(20), damaged=(3, 4))
    with caplog.at_level(logging.WARNING):
        read_video_pyav(path, lambda metadata: np.array([0, 12, 19]))  # clean frames: after the next keyframe
    assert "concealed" not in caplog.text
    with caplog.at_level(logging.WARNING):
        read_video_pyav(path, lambda metadata: np.array([0, 2, 4, 6, 12]))
    assert "damaged.mp4: the decoder concealed damaged data (corrupt slices) in frames [3, 4]" in caplog.text
    assert "the sampled frames [4, 6] (at 0.16, 0.24 s)" in caplog.text


def test_decoding_with_pyavs_log_callback_on_does_not_hang(tmp_path):
    """PyAV's log callback (`av.logging.set_level`; torchvision<0.22 turns it on when imported) and a frame-threaded
    decoder closed mid-stream deadlock unless the decoder is drained first (PyAV-Org/PyAV#1849; CI hung here). A
    subprocess, so that a regression fails on its timeout instead of hanging the suite."""
    path = write_video(tmp_path / "clip.mp4", numbered_frames(FRAMES), gop_size=8)
    script = (
        "import av, sys\n"
        "av.logging.set_level(av.logging.ERROR)\n"
        "from storm_transformers import read_video_pyav\n"
        "for _ in range(5):\n"
        "    frames, _ = read_video_pyav(sys.argv[1], lambda metadata: [0, 3, 17])\n"
        "print(frames.shape)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(3, 64, 96, 3)"


class _DecodingThreads(torch.utils.data.Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, index):
        return decoding._decoding_threads()


def test_dataloader_workers_decode_with_one_thread_each():
    """Inside a DataLoader worker a video decodes with one thread (the workers are the parallelism); outside, with
    the cores of the process."""
    assert decoding._decoding_threads() == decoding.DECODE_THREADS
    loader = torch.utils.data.DataLoader(_DecodingThreads(), num_workers=1, batch_size=None)
    assert list(loader) == [1]


@pytest.mark.parametrize(("height", "width", "threads"), [(64, 96, 1), (256, 320, 0)], ids=["small", "large"])
def test_small_frames_decode_with_one_ffmpeg_thread(tmp_path, monkeypatch, height, width, threads):
    """Frames under THREADED_DECODE_PIXELS decode with one FFmpeg thread (threads cost more than they save there);
    larger ones with FFmpeg's default (0: as many as cores). The frames are the same either way."""
    path = write_video(tmp_path / "clip.mp4", numbered_frames(12, height, width))
    opened = []
    original = decoding._open_container

    def recording(data, name, threads=0):
        opened.append(threads)
        return original(data, name, threads)

    monkeypatch.setattr(decoding, "DECODE_THREADS", 4)
    monkeypatch.setattr(decoding, "_open_container", recording)
    frames, _ = read_video_pyav(path, lambda metadata: np.arange(12))
    assert opened[-1] == threads  # the container the frames were decoded from
    assert [frame_index(frame) for frame in frames] == list(range(12))
