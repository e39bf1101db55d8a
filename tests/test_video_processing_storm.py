import functools
import http.server
import io
import logging
import threading
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from video_files import frame_index, numbered_frames, write_audio_only, write_video

from storm_transformers import StormVideoProcessor, read_video_pyav, sample_frame_indices
from storm_transformers.video_processing_storm import StormVideoMetadata, StormVideoProcessorKwargs


def decode_all(path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def test_real_clip_gives_the_requested_frames_with_increasing_timestamps(video_path):
    processor = StormVideoProcessor()
    out = processor(str(video_path), num_frames=8, return_metadata=True, return_tensors="pt")
    pixels, metadata = out["pixel_values_videos"], out["video_metadata"][0]
    assert pixels.shape == (1, 8, 3, 448, 448) and pixels.dtype == torch.float32
    assert -1.0 <= pixels.min() and pixels.max() <= 1.0  # SigLIP normalisation: mean = std = 0.5
    assert (metadata.total_num_frames, metadata.width, metadata.height) == (132, 1280, 720)
    assert metadata.fps == pytest.approx(25.0)
    timestamps = metadata.timestamps
    assert len(timestamps) == 8 and all(b > a for a, b in zip(timestamps, timestamps[1:]))
    assert timestamps[0] == 0.0 and timestamps[-1] == pytest.approx(131 / 25)  # first and last frame included
    assert metadata.frames_indices == [0, 19, 37, 56, 75, 94, 112, 131]


def test_fps_sampling_takes_one_frame_per_interval(videos_dir):
    out = StormVideoProcessor()(str(videos_dir / "bikes.mp4"), fps=2, return_metadata=True, return_tensors="pt")
    assert out["pixel_values_videos"].shape[1] == 20  # 10 s at 2 fps
    assert out["video_metadata"][0].timestamps[:3] == pytest.approx([0.0, 0.5, 1.0], abs=0.02 + 1e-9)  # half a frame
    with pytest.raises(ValueError, match="either num_frames or fps"):
        StormVideoProcessor()(str(videos_dir / "bikes.mp4"), fps=2, num_frames=8)


def test_seeking_decoder_returns_exactly_the_sequentially_decoded_frames(tmp_path):
    path = write_video(tmp_path / "gop5.mp4", numbered_frames(30), gop_size=5)  # 6 keyframes
    reference = decode_all(path)
    for indices in ([0, 29], [3, 4, 12, 13, 27], [1, 7, 8, 22], list(range(30)), [17, 17, 2]):
        frames, metadata = read_video_pyav(path, lambda metadata, indices=indices: np.array(indices))
        assert metadata.frames_indices == indices
        for frame, index in zip(frames, indices):
            assert np.array_equal(frame, reference[index])
            assert frame_index(frame) == index


def test_keyframes_only_sampling_decodes_distinct_keyframes_in_order(tmp_path, video_path):
    path = write_video(tmp_path / "gop5.mp4", numbered_frames(30), gop_size=5)  # keyframes 0, 5, ..., 25
    reference = decode_all(path)
    out = StormVideoProcessor(size={"height": 32, "width": 32})(
        path, num_frames=4, keyframes_only=True, return_metadata=True, return_tensors="pt"
    )
    metadata = out["video_metadata"][0]
    assert metadata.keyframe_indices == [0, 5, 10, 15, 20, 25]
    # targets at frames 0, 9.67, 19.33, 29 -> nearest distinct keyframes in order
    assert list(metadata.frames_indices) == [0, 10, 20, 25]
    frames, _ = read_video_pyav(path, functools.partial(sample_frame_indices, num_frames=6, keyframes_only=True))
    assert all(np.array_equal(frame, reference[i]) for frame, i in zip(frames, [0, 5, 10, 15, 20, 25]))
    with pytest.raises(ValueError, match="the video has 1 keyframes, fewer than the 2 frames asked"):
        StormVideoProcessor()(str(video_path), num_frames=2, keyframes_only=True)
    with pytest.raises(ValueError, match="needs an encoded video"):
        StormVideoProcessor()(numbered_frames(10), num_frames=2, keyframes_only=True)


def test_variable_frame_rate_is_sampled_by_time(tmp_path):
    times = [0.0, 0.1, 0.2, 1.0, 2.5, 3.0]
    path = write_video(tmp_path / "vfr.mp4", numbered_frames(6), timestamps=times)
    frames, metadata = read_video_pyav(path, functools.partial(sample_frame_indices, num_frames=4))
    # targets 0, 1, 2, 3 s -> nearest frames at 0.0, 1.0, 2.5, 3.0 s (index sampling would give 0, 2, 3, 5)
    assert metadata.frames_indices == [0, 3, 4, 5]
    assert metadata.timestamps == pytest.approx([0.0, 1.0, 2.5, 3.0])
    assert [frame_index(frame) for frame in frames] == [0, 3, 4, 5]


@pytest.mark.parametrize("suffix", [".mkv", ".avi"])
def test_other_containers_including_ones_without_a_frame_count(tmp_path, suffix):
    path = write_video(tmp_path / f"clip{suffix}", numbered_frames(30))
    with av.open(path) as container:
        header_count = container.streams.video[0].frames
    frames, metadata = read_video_pyav(path, functools.partial(sample_frame_indices, num_frames=3))
    assert metadata.total_num_frames == 30 and (suffix != ".mkv" or header_count == 0)
    assert [frame_index(frame) for frame in frames] == [0, 14, 29]  # 14.5 rounds to the earlier frame


def test_bytes_file_objects_and_paths(video_path):
    processor = StormVideoProcessor(size={"height": 32, "width": 32}, num_frames=4)
    reference = processor(str(video_path), return_tensors="pt")["pixel_values_videos"]
    data = Path(video_path).read_bytes()
    with open(video_path, "rb") as handle:
        for source in (Path(video_path), data, bytearray(data), handle):
            torch.testing.assert_close(processor(source, return_tensors="pt")["pixel_values_videos"], reference)
    batch = processor([str(video_path), data], return_tensors="pt")["pixel_values_videos"]
    assert batch.shape == (2, 4, 3, 32, 32)


def test_http_url(videos_dir):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(videos_dir))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/bikes.mp4"
        out = StormVideoProcessor(num_frames=4)(url, return_metadata=True, return_tensors="pt")
        assert out["video_metadata"][0].total_num_frames == 250
        with pytest.raises(ValueError, match="Could not download"):
            StormVideoProcessor()(f"http://127.0.0.1:{server.server_port}/missing.mp4")
    finally:
        server.shutdown()


def test_decoded_arrays_are_sampled_uniformly_including_both_ends():
    video = numbered_frames(10)
    out = StormVideoProcessor(size={"height": 32, "width": 32})(
        video, num_frames=4, return_metadata=True, return_tensors="pt"
    )
    assert out["video_metadata"][0].frames_indices == [0, 3, 6, 9]
    out = StormVideoProcessor()(video, do_sample_frames=False, return_tensors="pt")
    assert out["pixel_values_videos"].shape[1] == 10


def test_metadata_timestamps_fall_back_to_fps():
    metadata = StormVideoMetadata(total_num_frames=10, fps=5.0, frames_indices=[0, 5])
    assert metadata.timestamps == [0.0, 1.0]


@pytest.fixture
def bad_files(tmp_path, video_path, videos_dir):
    data = Path(video_path).read_bytes()  # moov atom at the end: a cut file cannot be opened
    faststart = write_video(tmp_path / "faststart.mp4", numbered_frames(30), options={"movflags": "faststart"})
    faststart_data = Path(faststart).read_bytes()
    files = {
        "empty.mp4": b"",
        "cut.mp4": data[: len(data) // 2],
        "cut_faststart.mp4": faststart_data[: len(faststart_data) // 2],
        "notes.mp4": b"these are not the frames you are looking for\n" * 50,
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    write_audio_only(tmp_path / "tone.wav")
    return tmp_path


@pytest.mark.parametrize(
    "name, error, message",
    [
        ("missing.mp4", FileNotFoundError, "Video file not found"),
        ("empty.mp4", ValueError, r"is empty \(0 bytes\)"),
        ("cut.mp4", ValueError, "truncated, corrupt or not a video"),
        ("cut_faststart.mp4", ValueError, "truncated: its header lists 30 frames but only"),
        ("notes.mp4", ValueError, "truncated, corrupt or not a video"),
        ("tone.wav", ValueError, "contains no video stream"),
        (".", ValueError, "is a folder, not a video file"),
    ],
)
def test_bad_files_raise_clear_errors(bad_files, name, error, message):
    with pytest.raises(error, match=message):
        StormVideoProcessor()(str(bad_files / name))


def test_more_frames_than_the_video_has(video_path):
    with pytest.raises(ValueError, match="Asked for 200 frames but the video has only 132"):
        StormVideoProcessor()(str(video_path), num_frames=200)


# --- decoded frames: every form is checked and says what was expected ---------------------------------------------


def small_processor(**kwargs) -> StormVideoProcessor:
    return StormVideoProcessor(size={"height": 16, "width": 16}, **kwargs)


def pixels(video, **kwargs) -> torch.Tensor:
    return small_processor()(video, return_tensors="pt", **kwargs)["pixel_values_videos"]


def test_every_form_of_decoded_frames_gives_the_same_pixels(tmp_path):
    video = numbered_frames(4, 32, 48)  # (T, H, W, 3) uint8
    reference = pixels(video, do_sample_frames=False)
    assert reference.shape == (1, 4, 3, 16, 16)
    files = []
    for i, frame in enumerate(video):
        files.append(tmp_path / f"{i:04d}.png")
        Image.fromarray(frame).save(files[-1])
    same = {
        "channels first": video.transpose(0, 3, 1, 2),
        "torch tensor": torch.from_numpy(video),
        "int64": video.astype(np.int64),
        "list of PIL frames": [Image.fromarray(frame) for frame in video],
        "list of arrays": list(video),
        "list of frame files": [str(path) for path in files],
        "reversed-channel view": np.ascontiguousarray(video[..., ::-1])[..., ::-1],  # BGR -> RGB, negative strides
        "a batch (5-D)": video[None],
    }
    for form, value in same.items():
        torch.testing.assert_close(pixels(value, do_sample_frames=False), reference, msg=form)
    float_frames = {"float 0..255": video.astype(np.float32), "float 0..1": video.astype(np.float64) / 255}
    for (form, value), do_rescale in zip(float_frames.items(), (True, False)):
        out = pixels(value, do_sample_frames=False, do_rescale=do_rescale)
        torch.testing.assert_close(out, reference, atol=2 / 255, rtol=0, msg=form)  # uint8 resizing rounds


@pytest.mark.parametrize(
    "video, kwargs, error, message",
    [
        (numbered_frames(4).astype(np.float32) / 255, {}, ValueError, r"0\.\.255; got 0\.039.*pass do_rescale=False"),
        (
            numbered_frames(4).astype(np.uint16) * 257,
            {},
            ValueError,
            r"0\.\.255 \(uint8 RGB\); got torch.uint16 .*16-bit",
        ),
        (
            numbered_frames(4).astype(np.float32),
            {"do_rescale": False},
            ValueError,
            r"do_rescale=False must be in 0\.\.1",
        ),
        (numbered_frames(4), {"do_rescale": False}, ValueError, "integer frames .* need do_rescale=True"),
        (numbered_frames(4) > 100, {}, TypeError, "dtype bool are not pixels"),
        (numbered_frames(4).astype(np.complex64), {}, TypeError, "dtype complex64 are not pixels"),
        (np.full((4, 8, 8, 3), np.nan, dtype=np.float32), {}, ValueError, "768 pixel values are NaN or infinite"),
        (np.zeros((0, 8, 8, 3), dtype=np.uint8), {}, ValueError, "no frames or no pixels"),
        (np.zeros((4, 8, 8, 4), dtype=np.uint8), {}, ValueError, r"3 colour channels.*RGBA: frames\[\.\.\., :3\]"),
        (
            np.zeros((8, 8, 3), dtype=np.uint8),
            {},
            ValueError,
            r"4 dimensions.*got shape \(8, 8, 3\)\. For a single frame",
        ),
        (np.array([["a"] * 3] * 4, dtype=object).reshape(4, 1, 1, 3), {}, TypeError, "dtype object are not pixels"),
        (
            [Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8)), Image.new("RGB", (9, 8))],
            {},
            ValueError,
            r"frame 0 is \(8, 8, 3\) but frame 2 is \(8, 9, 3\)",
        ),
        (Image.new("RGB", (8, 8)), {}, TypeError, "is a single image"),
        (7, {}, TypeError, r"videos is a int \(7\)"),
        ([[{"path": "clip.mp4"}]], {}, TypeError, r"videos\[0\]\[0\] is a dict .*'video' or 'path' key"),
        (["a.jpg", "b.mp4"], {}, ValueError, r"mixes image files with other items \(str at videos\[1\]\)"),
        ([], {}, ValueError, "No video given"),
    ],
    ids=[
        "float 0..1 rescaled twice",
        "uint16",
        "float 0..255 without rescale",
        "uint8 without rescale",
        "bool",
        "complex",
        "NaN",
        "empty",
        "RGBA",
        "one frame",
        "object",
        "mixed-size PIL frames",
        "one PIL image",
        "int path",
        "dict",
        "frame files mixed with a video",
        "no video",
    ],
)
def test_hostile_decoded_frames_get_clear_errors(video, kwargs, error, message):
    with pytest.raises(error, match=message):
        small_processor()(video, num_frames=2, **kwargs)


def test_memoryview_and_text_mode_file_objects(video_path, tmp_path):
    reference = pixels(str(video_path), num_frames=2)
    torch.testing.assert_close(pixels(memoryview(Path(video_path).read_bytes()), num_frames=2), reference)
    with (
        open(video_path, encoding="latin-1") as text,
        pytest.raises(TypeError, match="text mode.*open\\(path, 'rb'\\)"),
    ):
        small_processor()(text, num_frames=2)
    with pytest.raises(TypeError, match="text mode"):
        small_processor()(io.StringIO("not a video"), num_frames=2)
    with pytest.raises(ValueError, match="video files decode to uint8"):
        small_processor()(str(video_path), num_frames=2, do_rescale=False)
    with pytest.raises(FileNotFoundError, match="frame file not found"):
        small_processor()([str(tmp_path / "0001.jpg"), str(tmp_path / "0002.jpg")], do_sample_frames=False)


def test_a_batch_mixing_files_arrays_and_empty_samples(video_path):
    out = small_processor()([[str(video_path)], [], [numbered_frames(6)]], num_frames=4, return_tensors="pt")
    assert out["pixel_values_videos"].shape == (2, 4, 3, 16, 16)


def test_videos_with_different_frame_counts_are_padded_with_their_last_frame(caplog):
    short, long = numbered_frames(10), numbered_frames(30)  # 2 s and 6 s at 5 fps
    metadata = [{"fps": 5, "total_num_frames": 10}, {"fps": 5, "total_num_frames": 30}]
    with caplog.at_level(logging.WARNING):
        out = small_processor()(
            [short, long], fps=1, video_metadata=metadata, return_metadata=True, return_tensors="pt"
        )
    assert "different frame counts ([2, 6])" in caplog.text
    pixels, (first, second) = out["pixel_values_videos"], out["video_metadata"]
    assert pixels.shape == (2, 6, 3, 16, 16)
    assert first.frames_indices == [0, 5, 5, 5, 5, 5] and second.frames_indices == [0, 5, 10, 15, 20, 25]
    torch.testing.assert_close(pixels[0, 2:], pixels[0, 1:2].expand(4, -1, -1, -1))


# --- arguments are checked where they enter ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"num_frames": 0}, ValueError, "num_frames must be at least 1, got 0"),
        ({"num_frames": -2}, ValueError, "num_frames must be at least 1, got -2"),
        ({"num_frames": 2.5}, TypeError, r"num_frames must be a whole number of frames \(int\), got 2.5"),
        ({"num_frames": True}, TypeError, r"num_frames must be a whole number of frames \(int\), got True"),
        ({"fps": 0}, ValueError, "fps must be a positive, finite number of frames per second, got 0"),
        ({"fps": -1}, ValueError, "fps must be a positive, finite number .* got -1"),
        ({"fps": float("nan")}, ValueError, "fps must be a positive, finite number .* got nan"),
        ({"fps": float("inf")}, ValueError, "fps must be a positive, finite number .* got inf"),
        ({"fps": True}, TypeError, "fps must be a number of frames per second, got True"),
        ({"fps": "2"}, TypeError, "fps must be a number of frames per second, got '2'"),
        ({"fps": 1, "num_frames": 4}, ValueError, "either num_frames or fps, not both"),
        ({"max_frames": 0, "fps": 1}, ValueError, "max_frames must be at least 1"),
        ({"temporal_pool_size": 0, "fps": 1}, ValueError, "temporal_pool_size must be at least 1"),
        ({"size": {"height": 0, "width": 16}}, ValueError, "size must give a positive height and width"),
        ({"size": {"height": -3, "width": 16}}, ValueError, "size must give a positive height and width"),
    ],
)
def test_bad_arguments_name_the_argument_and_the_value(kwargs, error, message):
    with pytest.raises(error, match=message):
        small_processor()(numbered_frames(10), video_metadata={"fps": 5, "total_num_frames": 10}, **kwargs)


def test_numpy_integers_are_counts():
    assert pixels(numbered_frames(10), num_frames=np.int64(4)).shape[1] == 4


def metadata_of(seconds: float, fps: float = 25.0) -> StormVideoMetadata:
    count = round(seconds * fps)
    return StormVideoMetadata(total_num_frames=count, fps=fps, frame_timestamps=[i / fps for i in range(count)])


@pytest.mark.parametrize(
    "seconds, fps, k, max_frames, count, first_times",
    [
        (10, 2, 4, None, 20, [0.0, 0.5, 1.0]),  # already a multiple of k: exactly every 1/fps
        (10, 1.5, 4, None, 12, [0.0, 0.84, 1.68]),  # 15 floored to 12, spread over the 10 s
        (2, 1, 4, None, 4, [0.0, 0.48, 1.0]),  # shorter than k/fps: k frames
        (3600, 1, 4, 3600, 3600, [0.0, 1.0, 2.0]),  # one hour at 1 fps
        (7200, 1, 4, 3602, 3600, [0.0, 2.0, 4.0]),  # two hours: capped at max_frames floored to k, spread
    ],
)
def test_fps_sampling_gives_a_multiple_of_k_between_k_and_max_frames(seconds, fps, k, max_frames, count, first_times):
    indices = sample_frame_indices(metadata_of(seconds), fps=fps, temporal_pool_size=k, max_frames=max_frames)
    assert len(indices) == count and len(set(indices.tolist())) == count
    assert [i / 25 for i in indices[:3]] == pytest.approx(first_times, abs=0.02 + 1e-9)
    assert indices[-1] / 25 >= seconds - seconds / count - 0.04  # the samples reach the end of the video


def test_fps_sampling_through_the_processor_defaults_to_max_frames(caplog):
    processor = small_processor()
    assert "max_frames (`int`, *optional*, defaults to 3600)" in StormVideoProcessorKwargs.__doc__
    assert processor.max_frames == 3600 and "`max_frames` = 3600" in StormVideoProcessor.__doc__
    video = numbered_frames(30)  # 6 s at 5 fps
    with caplog.at_level(logging.WARNING):
        out = processor(
            video, fps=5, max_frames=8, temporal_pool_size=4, video_metadata={"fps": 5}, return_tensors="pt"
        )
    assert out["pixel_values_videos"].shape[1] == 8 and "capped at max_frames=8" in caplog.text
