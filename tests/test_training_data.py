"""The training collator on real videos: assistant-only labels, batching, unreadable media, bad conversations."""

import base64
import json
import re

import pytest
import torch
import transformers
from packaging import version
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from video_files import numbered_frames, write_video

from storm_transformers.training.data import (
    IGNORE_INDEX,
    StormDataCollator,
    assistant_only_labels,
    check_conversation,
    load_conversations,
)

NUM_FRAMES = 4  # k = 4 in the tiny checkpoint: one pooled frame of 16 tokens per video


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    return AutoProcessor.from_pretrained(tiny_checkpoint)


def video_turns(video, question="What happens?", answer="A bike ride."):
    return [
        {"role": "user", "content": [{"type": "video", "path": str(video)}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]


def labelled_segments(labels: torch.Tensor, processor) -> list[str]:
    """Decoded runs of consecutive labelled positions."""
    keep = (labels != IGNORE_INDEX).tolist() + [False]
    segments, start = [], None
    for index, kept in enumerate(keep):
        if kept and start is None:
            start = index
        elif not kept and start is not None:
            segments.append(processor.decode(labels[start:index]))
            start = None
    return segments


def test_labels_are_the_assistant_replies_of_the_rendered_template(processor, videos_dir):
    conversation = video_turns(videos_dir / "bikes.mp4") + [
        {"role": "user", "content": [{"type": "text", "text": "And then?"}]},
        {"role": "assistant", "content": "They ride on."},
    ]
    row = StormDataCollator(processor, NUM_FRAMES).encode(conversation)
    rendered = processor.apply_chat_template(conversation, tokenize=False)
    expanded = rendered.replace("<|video_pad|>", "<|video_pad|>" * 16)
    assert processor.decode(row["input_ids"]) == expanded
    assert labelled_segments(row["labels"], processor) == ["A bike ride.<|im_end|>", "They ride on.<|im_end|>"]
    labelled = row["labels"] != IGNORE_INDEX
    assert torch.equal(row["labels"][labelled], row["input_ids"][labelled])
    assert not labelled[row["input_ids"] == processor.video_token_id].any()
    assert row["pixel_values_videos"].shape == (1, NUM_FRAMES, 3, 64, 64)

    # The {% generation %} blocks of the template, as transformers marks them (text only: right on every version).
    text_only = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]
    marked = processor.apply_chat_template(
        text_only, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids = torch.tensor(marked["input_ids"])
    assert torch.equal(
        assistant_only_labels(ids, processor.tokenizer) != IGNORE_INDEX, torch.tensor(marked["assistant_masks"]).bool()
    )


@pytest.mark.skipif(
    version.parse(transformers.__version__) < version.parse("5.18"),
    reason="transformers < 5.18 computes assistant masks before expanding media placeholders",
)
def test_labels_equal_transformers_assistant_mask_with_a_video(processor, videos_dir):
    conversation = video_turns(videos_dir / "carphone_pristine.mp4")
    row = StormDataCollator(processor, NUM_FRAMES).encode(conversation)
    marked = processor.apply_chat_template(
        conversation,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        return_assistant_tokens_mask=True,
        processor_kwargs={"num_frames": NUM_FRAMES},
    )
    assert torch.equal(marked["input_ids"][0], row["input_ids"])
    assert torch.equal(marked["assistant_masks"][0].bool(), row["labels"] != IGNORE_INDEX)


def test_a_batch_of_video_image_bytes_and_text_rows_trains(tiny_checkpoint, processor, videos_dir, tmp_path):
    image = tmp_path / "frame.png"
    Image.fromarray(numbered_frames(1, 40, 60)[0]).save(image)
    rows = [
        {"messages": video_turns(videos_dir / "bikes.mp4", "A longer question about what the people in it do?")},
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "path": str(image)},
                        {"type": "image", "base64": base64.b64encode(image.read_bytes()).decode()},
                        {"type": "text", "text": "?"},
                    ],
                },
                {"role": "assistant", "content": "Grey."},
            ]
        },
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "video", "video": (videos_dir / "carphone_pristine.mp4").read_bytes()}],
                },
                {"role": "assistant", "content": "A car."},
            ]
        },
        {"messages": [{"role": "user", "content": "Only text."}, {"role": "assistant", "content": "Fine."}]},
    ]
    sampling = AutoProcessor.from_pretrained(tiny_checkpoint)
    sampling.temporal_sample_rate = 2  # an inference setting: the collator must not apply it, nor change it
    batch = StormDataCollator(sampling, NUM_FRAMES)(rows)
    assert sampling.temporal_sample_rate == 2
    assert batch["pixel_values_videos"].shape == (2, NUM_FRAMES, 3, 64, 64)
    assert batch["pixel_values"].shape == (2, 3, 64, 64)
    lengths = batch["attention_mask"].sum(1)
    assert lengths.max() == batch["input_ids"].shape[1] and lengths.min() < lengths.max()
    for row, length in enumerate(lengths.tolist()):  # right padding: pad ids, no attention, no labels
        assert (batch["input_ids"][row, length:] == processor.tokenizer.pad_token_id).all()
        assert (batch["labels"][row, length:] == IGNORE_INDEX).all() and batch["attention_mask"][row, :length].all()
    assert (batch["input_ids"] == processor.video_token_id).sum(1).tolist() == [16, 0, 16, 0]  # 4 frames / k=4 × 16
    assert (batch["input_ids"] == processor.image_token_id).sum(1).tolist() == [0, 32, 0, 0]
    assert [labelled_segments(labels, processor) for labels in batch["labels"]] == [
        ["A bike ride.<|im_end|>"],
        ["Grey.<|im_end|>"],
        ["A car.<|im_end|>"],
        ["Fine.<|im_end|>"],
    ]
    model = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint).train()
    assert torch.isfinite(model(**batch).loss)


@pytest.fixture
def bad_media(tmp_path, videos_dir):
    """Rows whose media cannot be used, with the error each one gives."""
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes((videos_dir / "bikes.mp4").read_bytes()[:4000])
    (tmp_path / "empty.mp4").write_bytes(b"")
    write_video(tmp_path / "short.mp4", numbered_frames(3))
    return {
        "missing.mp4": "Video file not found",
        "empty.mp4": "is empty",
        "truncated.mp4": "truncated|corrupt",
        "short.mp4": "Asked for 4 frames but the video has only 3",
    }


def test_unreadable_media_rows_are_skipped_with_a_warning_and_counted(
    processor, videos_dir, tmp_path, bad_media, caplog
):
    collator = StormDataCollator(processor, NUM_FRAMES, data_root=tmp_path)
    good = {"messages": video_turns(videos_dir / "carphone_distorted.mp4")}
    image_row = {
        "messages": [
            {"role": "user", "content": [{"type": "image", "path": "missing.png"}]},
            {"role": "assistant", "content": "?"},
        ]
    }
    rows = [good] + [{"messages": video_turns(name)} for name in bad_media] + [image_row]
    batch = collator(rows)
    assert collator.num_skipped == len(bad_media) + 1
    assert batch["pixel_values_videos"].shape[0] == 1 + len(bad_media)  # skipped rows keep blank frames
    assert (batch["labels"][0] != IGNORE_INDEX).any() and (batch["labels"][1:] == IGNORE_INDEX).all()
    warnings = [record.getMessage() for record in caplog.records if "Skipping a training row" in record.getMessage()]
    assert len(warnings) == len(bad_media) + 1
    for name, reason in bad_media.items():
        assert any(name in warning and re.search(reason, warning) for warning in warnings), name
    assert "Image file not found" in warnings[-1] and "5 rows skipped so far" in warnings[-1]


def test_skipped_rows_are_counted_across_data_loader_workers(processor, tmp_path):
    collator = StormDataCollator(processor, NUM_FRAMES, data_root=tmp_path)
    rows = [{"messages": video_turns("missing.mp4")}] * 4
    loader = torch.utils.data.DataLoader(rows, batch_size=1, num_workers=2, collate_fn=collator)
    assert len(list(loader)) == 4
    assert collator.num_skipped == 4


def test_strict_mode_raises_the_media_error(processor, tmp_path, bad_media):
    collator = StormDataCollator(processor, NUM_FRAMES, data_root=tmp_path, strict=True)
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        collator([{"messages": video_turns("missing.mp4")}])
    for name in ("empty.mp4", "truncated.mp4", "short.mp4"):
        with pytest.raises(ValueError, match=bad_media[name]):
            collator([{"messages": video_turns(name)}])
    assert collator.num_skipped == 0


@pytest.mark.parametrize(
    "messages, error",
    [
        ([{"role": "user", "content": "Hi"}], "no assistant turn"),
        ([{"role": "user", "content": [{"type": "video", "path": "a.mp4"}]}], "no assistant turn"),
        ([{"role": "assistant", "content": [{"type": "video", "path": "a.mp4"}]}], "in an assistant turn"),
        (
            [{"role": "user", "content": [{"type": "audio", "path": "a.wav"}]}, {"role": "assistant", "content": "x"}],
            "unknown content part .*'audio'",
        ),
        (
            [{"role": "user", "content": [{"type": "video"}]}, {"role": "assistant", "content": "x"}],
            "has no video / url / path",
        ),
        ([{"role": "bot", "content": "x"}], "role in"),
        ([], "non-empty list"),
    ],
)
def test_bad_conversations_are_rejected_with_the_reason(messages, error):
    with pytest.raises(ValueError, match=error):
        check_conversation(messages)


def test_frames_incompatible_with_k_are_rejected_up_front(processor):
    with pytest.raises(ValueError, match="num_frames=6 is not a multiple of temporal_pool_size=4.*Sample 4 or 8"):
        StormDataCollator(processor, 6)


def test_load_conversations_from_jsonl_with_a_data_root(processor, videos_dir, tmp_path):
    rows = [
        {
            "messages": [
                {"role": "user", "content": [{"type": "video", "path": "bikes.mp4"}, {"type": "text", "text": "?"}]},
                {"role": "assistant", "content": "Bikes."},
            ],
            "source": "a",
        },
        {
            "messages": [{"role": "user", "content": "Text only."}, {"role": "assistant", "content": "Yes."}],
            "source": "b",
        },
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    dataset = load_conversations(path)
    assert len(dataset) == 2 and dataset["source"] == ["a", "b"]
    assert dataset[1]["messages"][1]["content"] == [{"type": "text", "text": "Yes.", "path": None}]
    batch = StormDataCollator(processor, NUM_FRAMES, data_root=videos_dir)(list(dataset))
    assert batch["pixel_values_videos"].shape[0] == 1
    assert [labelled_segments(labels, processor) for labels in batch["labels"]] == [
        ["Bikes.<|im_end|>"],
        ["Yes.<|im_end|>"],
    ]

    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"messages": [{"role": "user", "content": "?"}]}) + "\n")
    with pytest.raises(ValueError, match=r"train.jsonl, line 2: The conversation has no assistant turn"):
        load_conversations(path)
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match="train.jsonl, line 1: Expecting property name"):
        load_conversations(path)
    with pytest.raises(FileNotFoundError, match="Conversation file not found"):
        load_conversations(tmp_path / "nope.jsonl")
