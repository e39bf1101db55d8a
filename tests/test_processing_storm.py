import dataclasses

import numpy as np
import pytest
import torch
import transformers
from packaging import version
from PIL import Image
from storm_testing import tiny_config
from transformers import AutoProcessor, AutoTokenizer, AutoVideoProcessor
from video_files import numbered_frames

from storm_transformers import StormConfig, StormForConditionalGeneration, StormProcessor, StormVideoProcessor
from storm_transformers.conversion.checkpoint import add_placeholder_tokens, build_processor


@pytest.fixture(scope="module")
def tokenizer(qwen2_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(qwen2_tokenizer_dir)
    add_placeholder_tokens(tokenizer)
    return tokenizer


def storm_config(tokenizer, **kwargs) -> StormConfig:
    """A tiny config whose vocabulary and placeholder ids are the real Qwen2 tokenizer's."""
    config = tiny_config(**kwargs)
    config.text_config.vocab_size = len(tokenizer)
    config.image_token_id, config.video_token_id = tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>"])
    return config


def video_message(path, text="What happens in this video?"):
    return [{"role": "user", "content": [{"type": "video", "path": str(path)}, {"type": "text", "text": text}]}]


def test_chat_template_renders_chatml_with_the_placeholder(tokenizer, video_path):
    processor = build_processor(storm_config(tokenizer), tokenizer, num_frames=4)
    prompt = processor.apply_chat_template(video_message(video_path), add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|video_pad|>\nWhat happens in this video?<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("frames, k, p, s", [(4, 2, 1, 1), (8, 4, 2, 1), (6, 2, 1, 2), (12, 3, 2, 2)])
def test_placeholder_count_equals_the_model_features_on_a_real_clip(tokenizer, video_path, frames, k, p, s):
    config = storm_config(tokenizer, image_size=64, temporal_pool_size=k, spatial_pool_size=p, temporal_sample_rate=s)
    processor = build_processor(config, tokenizer, num_frames=frames)
    inputs = processor.apply_chat_template(
        video_message(video_path), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert inputs["pixel_values_videos"].shape == (1, frames, 3, 64, 64)
    torch.manual_seed(0)
    model = StormForConditionalGeneration(config).eval()
    features = model.get_video_features(inputs["pixel_values_videos"]).pooler_output
    assert int((inputs["input_ids"] == config.video_token_id).sum()) == features.shape[1]
    assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]


def test_processor_and_model_settings_that_differ_are_reported(tokenizer, video_path):
    config = storm_config(tokenizer, temporal_pool_size=2)
    processor = build_processor(config, tokenizer, num_frames=4)
    processor.temporal_sample_rate = 2  # set on the processor only
    inputs = processor.apply_chat_template(
        video_message(video_path), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    model = StormForConditionalGeneration(config).eval()
    with pytest.raises(ValueError, match=r"4 video placeholder tokens .* 8 feature tokens .*temporal_sample_rate=1"):
        model(**inputs)


def test_save_and_load_through_auto_classes(tokenizer, tmp_path):
    config = storm_config(tokenizer, temporal_pool_size=4, spatial_pool_size=2)
    processor = build_processor(config, tokenizer, num_frames=8)
    config.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is StormProcessor and type(loaded.video_processor) is StormVideoProcessor
    for name in ("patch_size", "downsample_factor", "temporal_pool_size", "spatial_pool_size", "temporal_sample_rate"):
        assert getattr(loaded, name) == getattr(processor, name), name
    assert loaded.video_token_id == config.video_token_id and loaded.chat_template == processor.chat_template
    assert loaded.video_processor.num_frames == 8 and loaded.video_processor.size.height == 32
    assert type(AutoVideoProcessor.from_pretrained(tmp_path)) is StormVideoProcessor


def test_a_saved_processor_equals_its_reload(tokenizer, tmp_path):
    """transformers' `custom_object_save` sets `auto_map` on the processor it saves, which a reload drops."""
    processor = build_processor(storm_config(tokenizer), tokenizer, num_frames=8)
    processor.save_pretrained(tmp_path)
    assert "auto_map" in (tmp_path / "processor_config.json").read_text()  # still written for remote code
    assert processor.to_dict() == StormProcessor.from_pretrained(tmp_path).to_dict()


def test_images_and_several_videos_in_one_batch(tokenizer, videos_dir):
    config = storm_config(tokenizer)
    processor = build_processor(config, tokenizer, num_frames=4)
    conversations = [
        video_message(videos_dir / "bikes.mp4", "Short?"),
        [
            {
                "role": "user",
                "content": [
                    {"type": "video", "path": str(videos_dir / "carphone_pristine.mp4")},
                    {"type": "text", "text": "A much longer question about the video, with more words."},
                ],
            }
        ],
    ]
    inputs = processor.apply_chat_template(
        conversations,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"padding": True, "padding_side": "left"},
    )
    assert inputs["pixel_values_videos"].shape[:2] == (2, 4)
    assert inputs["attention_mask"][0, 0] == 0 and inputs["attention_mask"][1].all()
    per_video = config.num_video_tokens(4)
    assert (inputs["input_ids"] == config.video_token_id).sum(1).tolist() == [per_video, per_video]
    images = processor(
        text=["<|image_pad|>\nhi"], images=[torch.randint(0, 255, (3, 50, 70), dtype=torch.uint8)], return_tensors="pt"
    )
    assert images["pixel_values"].shape == (1, 3, 32, 32)
    assert int((images["input_ids"] == config.image_token_id).sum()) == config.num_image_tokens()


def test_bytes_video_in_a_message(tokenizer, video_path):
    processor = build_processor(storm_config(tokenizer), tokenizer, num_frames=4)
    message = [
        {
            "role": "user",
            "content": [{"type": "video", "video": video_path.read_bytes()}, {"type": "text", "text": "?"}],
        }
    ]
    inputs = processor.apply_chat_template(message, tokenize=True, return_dict=True, return_tensors="pt")
    assert inputs["pixel_values_videos"].shape[1] == 4


@pytest.mark.skipif(
    version.parse(transformers.__version__) < version.parse("5.18"),
    reason="transformers < 5.18 computes assistant masks before expanding media placeholders",
)
def test_assistant_tokens_mask_covers_the_reply_and_its_end_token(tokenizer, video_path):
    processor = build_processor(storm_config(tokenizer), tokenizer, num_frames=4)
    conversation = video_message(video_path) + [
        {"role": "assistant", "content": [{"type": "text", "text": "A rabbit."}]}
    ]
    out = processor.apply_chat_template(
        conversation, tokenize=True, return_dict=True, return_tensors="pt", return_assistant_tokens_mask=True
    )
    marked = out["input_ids"][0][out["assistant_masks"][0].bool()]
    assert processor.decode(marked) == "A rabbit.<|im_end|>"


def test_errors_name_the_problem(tokenizer, video_path):
    config = storm_config(tokenizer, temporal_pool_size=4)
    processor = build_processor(config, tokenizer, num_frames=6)
    with pytest.raises(ValueError, match="num_frames=6 is not a multiple of temporal_pool_size=4.*Sample 4 or 8"):
        processor(text=["<|video_pad|>"], videos=[str(video_path)])
    processor.video_processor.size = {"height": 32, "width": 48}
    with pytest.raises(ValueError, match="square frames"):
        processor(text=["<|video_pad|>"], videos=[str(video_path)], num_frames=4)
    processor.video_processor.size = {"height": 16, "width": 16}
    with pytest.raises(
        ValueError, match=r"frames are 16×16 pixels but the vision tower takes 32×32 \(image_processor"
    ):
        processor(text=["<|video_pad|>"], videos=[str(video_path)], num_frames=4)
    processor.video_processor.size = {"height": 32, "width": 32}
    processor.temporal_sample_rate = 0
    with pytest.raises(ValueError, match="temporal_sample_rate must be a positive int .* got 0"):
        processor(text=["<|video_pad|>"], videos=[str(video_path)], num_frames=4)
    with pytest.raises(ValueError, match="spatial_pool_size must be a positive int .* got 2.0"):
        build_processor(config, tokenizer, num_frames=4).__class__(
            image_processor=processor.image_processor,
            tokenizer=tokenizer,
            video_processor=processor.video_processor,
            spatial_pool_size=2.0,
        )
    bare = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    with pytest.raises(ValueError, match=r"The tokenizer has no '<\|image_pad\|>' token"):
        StormProcessor(
            image_processor=processor.image_processor, tokenizer=bare, video_processor=processor.video_processor
        )


def test_fps_sampling_gives_a_multiple_of_k_frames(tokenizer, video_path):
    config = storm_config(tokenizer, temporal_pool_size=4)
    processor = build_processor(config, tokenizer, num_frames=8)
    inputs = processor(
        text=["<|video_pad|>"], videos=[str(video_path)], fps=1.5, return_metadata=True, return_tensors="pt"
    )
    metadata = inputs["video_metadata"][0]  # 5.28 s at 1.5 fps = 7 frames, floored to 4, spread over the clip
    assert inputs["pixel_values_videos"].shape[1] == 4 and metadata.frames_indices == [0, 33, 66, 99]
    assert int((inputs["input_ids"] == config.video_token_id).sum()) == config.num_video_tokens(4)


def test_mixed_batches_need_no_torchcodec(tokenizer, video_path, tmp_path):
    """A video conversation next to a text-only one; a file next to decoded frames; frame files as one video."""
    config = storm_config(tokenizer)
    processor = build_processor(config, tokenizer, num_frames=4)
    text_only = [{"role": "user", "content": [{"type": "text", "text": "Hello?"}]}]
    inputs = processor.apply_chat_template(
        [video_message(video_path), text_only],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"padding": True},
    )
    assert inputs["pixel_values_videos"].shape[:2] == (1, 4)
    assert (inputs["input_ids"] == config.video_token_id).sum(1).tolist() == [config.num_video_tokens(4), 0]
    frames = numbered_frames(8, 40, 40)
    inputs = processor(
        text=["<|video_pad|>a", "<|video_pad|>b"], videos=[str(video_path), frames], return_tensors="pt"
    )
    assert inputs["pixel_values_videos"].shape == (2, 4, 3, 32, 32)
    paths = []
    for i, frame in enumerate(frames[:4]):
        paths.append(str(tmp_path / f"frame{i}.jpg"))
        Image.fromarray(frame).save(paths[-1])
    message = [{"role": "user", "content": [{"type": "video", "path": paths}, {"type": "text", "text": "?"}]}]
    inputs = processor.apply_chat_template(
        message, tokenize=True, return_dict=True, return_tensors="pt", processor_kwargs={"do_sample_frames": False}
    )
    assert inputs["pixel_values_videos"].shape == (1, 4, 3, 32, 32)  # one video of 4 frames, not 4 videos
    assert int((inputs["input_ids"] == config.video_token_id).sum()) == config.num_video_tokens(4)


def test_videos_of_different_lengths_at_one_fps_run_through_the_model(tokenizer, videos_dir, video_path):
    config = storm_config(tokenizer, temporal_pool_size=4)
    processor = build_processor(config, tokenizer, num_frames=8)
    conversations = [video_message(video_path, "Short?"), video_message(videos_dir / "bikes.mp4", "Long?")]
    inputs = processor.apply_chat_template(
        conversations,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"fps": 1, "padding": True, "return_metadata": True},
    )
    first, second = inputs.pop("video_metadata")  # 5.28 s -> 5 -> 4 frames, 10 s -> 10 -> 8 frames (every 1.25 s)
    assert len(set(first.frames_indices)) == 4 and first.frames_indices[4:] == [first.frames_indices[3]] * 4
    assert second.frames_indices == [0, 31, 63, 94, 125, 156, 188, 219]  # the first is padded to 8
    assert inputs["pixel_values_videos"].shape[:2] == (2, 8)
    assert (inputs["input_ids"] == config.video_token_id).sum(1).tolist() == [config.num_video_tokens(8)] * 2
    model = StormForConditionalGeneration(config).eval()
    with torch.no_grad():
        assert model(**inputs).logits.shape[:2] == inputs["input_ids"].shape


@pytest.mark.parametrize(
    "conversation, message",
    [
        (
            [{"role": "user", "content": {"type": "text", "text": "hi"}}],
            r"conversation, message 0: content must be .*got a dict",
        ),
        ([{"role": "user", "content": 5}], r"content must be a string or a list of parts.*got a int \(5\)"),
        ([{"role": "user", "content": ["hi"]}], r"message 0, part 0 must be a dict \(or an object\) with a 'type'"),
        (["hi"], r"message 0 must be a dict \(or an object\) with 'role' and 'content'"),
        ([[{"role": "user", "content": "a"}], "b"], r"conversation 1 must be a list of messages, got a str"),
    ],
)
def test_malformed_conversations_say_where(tokenizer, conversation, message):
    processor = build_processor(storm_config(tokenizer), tokenizer, num_frames=4)
    with pytest.raises(TypeError, match=message):
        processor.apply_chat_template(conversation, tokenize=True)


def test_a_video_path_that_is_a_number(tokenizer):
    processor = build_processor(storm_config(tokenizer), tokenizer, num_frames=4)
    message = [{"role": "user", "content": [{"type": "video", "path": 5}, {"type": "text", "text": "?"}]}]
    with pytest.raises(TypeError, match=r"videos\[0\]\[0\] is a int \(5\)\. A video is a path"):
        processor.apply_chat_template(message, tokenize=True, return_dict=True)


@pytest.mark.skipif(
    version.parse(transformers.__version__) < version.parse("5.24"),
    reason="transformers 5.24 reads message objects (huggingface/transformers#50773); 5.17 indexes them as dicts",
)
def test_message_objects_are_read_like_dicts(tokenizer):
    """transformers' contract: chat messages and content parts may be objects with the same fields (dataclasses)."""

    @dataclasses.dataclass
    class Part:
        type: str
        text: str

    @dataclasses.dataclass
    class Message:
        role: str
        content: list

    processor = build_processor(storm_config(tokenizer), tokenizer, num_frames=4)
    as_dicts = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}]}]
    as_objects = [Message("user", [Part("text", "What is this?")])]
    template = (
        "{% for m in messages %}{{ m.role }}:"
        "{% for p in m.content %} {{ p.type }}={{ p.text }}{% endfor %}{% endfor %}"
    )
    expected = "user: text=What is this?"
    assert processor.apply_chat_template(as_dicts, tokenize=False, chat_template=template) == expected
    assert processor.apply_chat_template(as_objects, tokenize=False, chat_template=template) == expected
    with pytest.raises(TypeError, match=r"message 0, part 0 must be a dict \(or an object\) with a 'type'"):
        processor.apply_chat_template([Message("user", [object()])], tokenize=False, chat_template=template)


def test_frame_files_are_taken_as_already_sampled(tokenizer, tmp_path):
    """transformers' contract: a video given as frame files is not sampled again; asking to sample raises."""
    processor = build_processor(storm_config(tokenizer), tokenizer, num_frames=2)
    paths = []
    for i, frame in enumerate(numbered_frames(4, 40, 40)):
        paths.append(str(tmp_path / f"frame{i}.png"))
        Image.fromarray(frame).save(paths[-1])
    message = [{"role": "user", "content": [{"type": "video", "path": paths}, {"type": "text", "text": "?"}]}]
    kwargs = {"tokenize": True, "return_dict": True, "return_tensors": "pt"}
    with pytest.raises(ValueError, match=r"video 0 is a list of 4 frame files.*Set `do_sample_frames=False`"):
        processor.apply_chat_template(message, **kwargs)
    inputs = processor.apply_chat_template(message, processor_kwargs={"do_sample_frames": False}, **kwargs)
    assert inputs["pixel_values_videos"].shape == (1, 4, 3, 32, 32)  # all 4 files, not num_frames=2 of them


def test_num_multimodal_tokens_equal_the_expanded_placeholders(tokenizer):
    """`_get_num_multimodal_tokens` (the count serving engines such as vLLM ask for) equals what `__call__` expands,
    for images of any size and videos of any frame count that is a multiple of k."""
    config = storm_config(tokenizer, image_size=64, temporal_pool_size=2, spatial_pool_size=2)
    processor = build_processor(config, tokenizer, num_frames=4)
    image_sizes = [(100, 100), (300, 100), (30, 500)]
    images = [np.zeros((h, w, 3), dtype=np.uint8) for h, w in image_sizes]
    inputs = processor(text=["<|image_pad|>"] * 3, images=images, padding=True, return_tensors="pt")
    counted = (inputs["input_ids"] == config.image_token_id).sum(1).tolist()
    assert processor._get_num_multimodal_tokens(image_sizes=image_sizes)["num_image_tokens"] == counted == [4] * 3
    counted = []  # one call per video: a batch pads its videos to the longest (see StormVideoProcessor)
    for frames in (2, 6):
        inputs = processor(
            text="<|video_pad|>", videos=numbered_frames(frames, 48, 40), do_sample_frames=False, return_tensors="pt"
        )
        counted.append(int((inputs["input_ids"] == config.video_token_id).sum()))
    helper = processor._get_num_multimodal_tokens(video_sizes=[(2, 48, 40), (6, 48, 40)])["num_video_tokens"]
    assert helper == counted == [config.num_video_tokens(2), config.num_video_tokens(6)] == [4, 12]
    with pytest.raises(ValueError, match="num_frames=3 is not a multiple of temporal_pool_size=2"):
        processor._get_num_multimodal_tokens(video_sizes=[(3, 48, 40)])
