"""Streaming STORM (issue 12): the session's answers and visual tokens equal the offline model's; budget; sources; CLI."""

import functools
import json

import av
import numpy as np
import pytest
import torch
from storm_testing import tiny_config
from transformers import AutoModelForImageTextToText, AutoProcessor
from trl import SFTConfig

from storm_transformers import StormForConditionalGeneration
from storm_transformers.cli import main as storm
from storm_transformers.streaming import StormStreamingSession, read_questions
from storm_transformers.training.args import StormDataArguments, StormModelArguments
from storm_transformers.training.miniature import build_initial
from storm_transformers.training.sft import main as sft
from storm_transformers.training.synthetic import generate_dataset

QUESTION = "What happens in the video?"


@pytest.fixture(scope="module")
def uni_checkpoint(tmp_path_factory, qwen2_tokenizer_dir):
    """The miniature uni-directional STORM (`uni-k4`: 2 causal Mamba layers, k = 4, 16 tokens per frame, 64 px) with
    random weights and the real Qwen2 tokenizer."""
    return build_initial(tmp_path_factory.mktemp("uni") / "storm-uni", qwen2_tokenizer_dir, "uni-k4", seed=0)


@functools.cache
def load(checkpoint, temporal_sample_rate=1):
    """Model and processor (loaded once per setting; tests do not change them), the weights redrawn with a larger
    scale so that greedy answers vary with the video (at initialisation this tiny LLM answers every video with the
    same token)."""
    model = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0, 0.2)
    model.config.temporal_sample_rate = processor.temporal_sample_rate = temporal_sample_rate
    return model, processor


def video(num_frames, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (num_frames, 64, 64, 3), dtype=np.uint8)


def offline(model, processor, frames, question=QUESTION, max_new_tokens=6):
    """Greedy answer ids and visual features of the offline model, inputs built by the processor's chat template."""
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=text, videos=[frames], return_tensors="pt", do_sample_frames=False)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        features = model.get_video_features(inputs["pixel_values_videos"]).pooler_output[0]
    return output[0, inputs["input_ids"].shape[1] :], features


def stream(session, frames, chunk):
    return torch.cat([session.append(frames[start : start + chunk]) for start in range(0, len(frames), chunk)])


@pytest.mark.parametrize("chunk, temporal_sample_rate", [(1, 1), (3, 1), (3, 2), (16, 2)])  # frames per append;
def test_streamed_answer_and_features_equal_the_offline_model(uni_checkpoint, chunk, temporal_sample_rate):
    model, processor = load(uni_checkpoint, temporal_sample_rate)  # 3 divides neither 16 frames nor k = 4
    frames = video(16)
    session = StormStreamingSession(model, processor)
    streamed = stream(session, frames, chunk)
    answer = session.ask(QUESTION, max_new_tokens=6, do_sample=False)
    expected_ids, expected_features = offline(model, processor, frames)
    torch.testing.assert_close(streamed, expected_features, rtol=0, atol=1e-5)
    assert answer.token_ids.tolist() == expected_ids.tolist()
    assert answer.frames == 16 and answer.text == processor.decode(expected_ids, skip_special_tokens=True).strip()
    other_ids, _ = offline(model, processor, video(16, seed=1))
    assert other_ids.tolist() != expected_ids.tolist()  # the answer depends on the frames: the comparison can fail


def test_questions_leave_no_trace_and_the_stream_continues(uni_checkpoint):
    model, processor = load(uni_checkpoint)
    frames = video(16)
    session = StormStreamingSession(model, processor)
    session.append(frames[:8])
    cached = session.cache.get_seq_length()
    first = session.ask("Is there a dog?", max_new_tokens=5, do_sample=False)
    again = session.ask("Is there a dog?", max_new_tokens=5, do_sample=False)
    assert session.cache.get_seq_length() == cached == session.tokens_cached
    assert first.token_ids.tolist() == again.token_ids.tolist()
    assert first.token_ids.tolist() == offline(model, processor, frames[:8], "Is there a dog?", 5)[0].tolist()
    session.append(frames[8:])  # the next frames continue right after the last visual token
    answer = session.ask(QUESTION, max_new_tokens=6, do_sample=False)
    assert answer.token_ids.tolist() == offline(model, processor, frames)[0].tolist()


def test_reports_count_frames_tokens_and_the_context_left(uni_checkpoint):
    model, processor = load(uni_checkpoint)
    session = StormStreamingSession(model, processor)
    prefix = session.tokens_cached
    assert session.append(video(6)).shape == (16, 48)  # one group of k = 4 frames: 16 tokens; 2 frames wait
    assert (session.frames_seen, session.frames_encoded, session.video_tokens) == (6, 4, 16)
    assert session.append(video(1)).shape == (0, 48)  # 3 frames waiting: still no group
    assert session.append(video(1)).shape == (16, 48)
    assert (session.frames_seen, session.frames_encoded, session.tokens_cached) == (8, 8, prefix + 32)
    assert session.context_remaining == 1024 - prefix - 32
    assert "frames_seen=8" in repr(session)


def test_a_full_context_is_an_error_that_says_what_to_do(uni_checkpoint, tmp_path):
    model, processor = load(uni_checkpoint)
    session = StormStreamingSession(model, processor, reserve_tokens=100)
    room = (1024 - 100 - session.tokens_cached) // 16 * 4  # frames whose tokens fit
    session.append(video(room))
    with pytest.raises(ValueError, match=r"context is full: .* 4 more frames would add 16 visual tokens.*Ask your questions now"):
        session.append(video(4))
    assert session.frames_seen == room and session.frames_encoded == room  # nothing was added
    assert session.ask(QUESTION, max_new_tokens=8, do_sample=False).frames == room  # the reserve is for questions
    _write_mjpeg(tmp_path / "clip.mkv", video(4))
    with pytest.raises(ValueError, match="context is full"):
        session.append(tmp_path / "clip.mkv")
    session.reserve_tokens = 0  # make room: the file is read again from its first frame
    assert session.append(tmp_path / "clip.mkv").shape == (16, 48) and session.frames_seen == room + 4
    with pytest.raises(ValueError, match=r"max_new_tokens=500 do not fit"):
        session.ask(QUESTION, max_new_tokens=500)


def test_a_bidirectional_model_refuses_to_stream():
    model = StormForConditionalGeneration(tiny_config())
    with pytest.raises(ValueError, match=r"backward scan runs from the end of the video.*bidirectional=False"):
        StormStreamingSession(model, processor=None)


def _write_mjpeg(path, frames, fps=8):
    """Every frame coded on its own (MJPEG in Matroska), so a longer file starts with the same bytes per frame."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mjpeg", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuvj444p"
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode(None))


def _decoded(path):
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def test_a_file_that_grows_is_read_from_where_it_was_left(uni_checkpoint, tmp_path):
    model, processor = load(uni_checkpoint)
    frames = video(16)
    _write_mjpeg(tmp_path / "first_half.mkv", frames[:8])
    _write_mjpeg(tmp_path / "whole.mkv", frames)
    growing = tmp_path / "growing.mkv"
    growing.write_bytes((tmp_path / "first_half.mkv").read_bytes())
    session = StormStreamingSession(model, processor)
    first = session.append(growing)
    growing.write_bytes((tmp_path / "whole.mkv").read_bytes())  # the recording went on
    second = session.append(growing, max_frames=5)
    third = session.append(growing)
    assert session.frames_seen == 16
    assert session.append(growing).shape == (0, 48)  # nothing new
    reference = StormStreamingSession(model, processor).append(_decoded(tmp_path / "whole.mkv"))
    torch.testing.assert_close(torch.cat([first, second, third]), reference, rtol=0, atol=1e-5)


def test_a_pyav_container_is_read_on_and_sampled_at_fps(uni_checkpoint, tmp_path):
    model, processor = load(uni_checkpoint)
    frames = video(16)
    _write_mjpeg(tmp_path / "clip.mkv", frames, fps=8)
    session = StormStreamingSession(model, processor, fps=2)  # every 4th frame of an 8 fps video
    with av.open(str(tmp_path / "clip.mkv")) as container:
        parts = [session.append(container, max_frames=1) for _ in range(4)]
        assert session.append(container).shape == (0, 48)
    assert session.frames_seen == 4
    reference = StormStreamingSession(model, processor).append(_decoded(tmp_path / "clip.mkv")[::4])
    torch.testing.assert_close(torch.cat(parts), reference, rtol=0, atol=1e-5)


def test_storm_stream_plays_a_real_clip_and_answers_at_the_times(uni_checkpoint, videos_dir, tmp_path, capsys):
    questions = tmp_path / "questions.jsonl"
    rows = [{"time": 4.0, "question": "What happens?"}, {"time": 1.0, "question": "Who is there?"},
            {"time": 60.0, "question": "How does it end?"}]
    questions.write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = ["stream", "--model", str(uni_checkpoint), "--video", str(videos_dir / "bikes.mp4"),
            "--questions", str(questions), "--fps", "2", "--speed", "0", "--max-new-tokens", "4"]
    assert storm(args) == 0
    out = capsys.readouterr().out
    assert out.index("Q: Who is there?") < out.index("Q: What happens?") < out.index("Q: How does it end?")
    # bikes.mp4 is 10 s at 25 fps; 2 fps keeps frames at 0, 0.5, … 9.5 s: before 1 s 2 frames (no group of 4
    # yet), before 4 s 8 frames, at the end 20.
    assert [line.split("; ")[1].split(" frames")[0] for line in out.splitlines() if "ms;" in line] == ["0", "8", "20"]
    assert "streamed 20 frames (20 encoded)" in out


def test_storm_stream_explains_bad_input(tiny_checkpoint, uni_checkpoint, videos_dir, tmp_path, capsys):
    questions = tmp_path / "questions.jsonl"
    questions.write_text('{"time": 1.0, "question": "Why?"}\n{"when": 2}\n')
    with pytest.raises(ValueError, match=r'questions.jsonl, line 2: expected \{"time"'):
        read_questions(questions)
    questions.write_text('{"time": 1.0, "question": "Why?"}\n')
    bikes = str(videos_dir / "bikes.mp4")
    assert storm(["stream", "--model", str(tiny_checkpoint), "--video", bikes, "--questions", str(questions)]) == 1
    assert "bidirectional=False" in capsys.readouterr().err
    assert storm(["stream", "--model", str(uni_checkpoint), "--video", str(tmp_path / "none.mp4"), "--questions", str(questions)]) == 1
    assert "Could not open" in capsys.readouterr().err


def test_a_uni_directional_model_trained_with_the_recipe_streams(uni_checkpoint, tmp_path):
    """Issue 12, item 5: nothing new for training. `training.sft` on synthetic clips with the uni-directional
    miniature (`bidirectional: false`), then the trained model streams with the offline model's answers."""
    data = generate_dataset(tmp_path / "data", {"train": 4})["train"]
    trainer = sft(
        StormDataArguments(dataset_name=str(data), num_frames=8),
        StormModelArguments(model_name_or_path=str(uni_checkpoint)),
        SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
                  save_strategy="no", report_to="none", bf16=False, use_cpu=True, disable_tqdm=True),
    )
    assert trainer.state.global_step == 2
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "sft").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "sft")
    assert model.config.temporal_encoder_config.bidirectional is False
    frames = _decoded(tmp_path / "data" / json.loads(data.read_text().splitlines()[0])["messages"][0]["content"][0]["path"])
    session = StormStreamingSession(model, processor)
    stream(session, frames, 3)
    answer = session.ask(QUESTION, max_new_tokens=4, do_sample=False)
    assert answer.token_ids.tolist() == offline(model, processor, frames, max_new_tokens=4)[0].tolist()
