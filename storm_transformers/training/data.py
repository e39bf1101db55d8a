"""Training data for STORM: conversations with videos and images → padded model inputs with assistant-only labels.

Rows use the Hugging Face conversational format (TRL's "messages" datasets): a `messages` list of
`{"role": "system" | "user" | "assistant", "content": str | [parts]}` where user parts are
`{"type": "text", "text": ...}`, `{"type": "video", "path": ...}` or `{"type": "image", "path": ...}` (`video` /
`image` / `url` instead of `path` also work, as in transformers' `apply_chat_template`). Relative paths start at a
data root.

- `load_conversations`: a JSONL file of such rows → `datasets.Dataset`, checked row by row.
- `check_conversation`: the structural checks (an assistant turn, known part types, media only in user turns).
- `assistant_only_labels`: labels that cover the assistant replies only, found in the token ids (ChatML).
- `StormDataCollator`: decodes media, applies the chat template, pads, builds the labels; for `SFTTrainer` or any
  PyTorch `DataLoader`.
"""

import copy
import functools
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers.image_utils import load_image

from storm_transformers import get_num_visual_tokens, read_video_pyav

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
# Keys that hold a part's media, in the order transformers' `apply_chat_template` reads them.
MEDIA_KEYS = {"video": ("video", "url", "path"), "image": ("image", "url", "path", "base64")}
# ChatML, the template `StormProcessor` ships: an assistant reply is the text after this header up to `<|im_end|>`.
ASSISTANT_HEADER = "<|im_start|>assistant\n"
END_OF_TURN = "<|im_end|>"


def check_conversation(messages) -> None:
    """Raise if `messages` cannot be a training row.

    Args:
        messages (`list[dict]`): one conversation, `{"role", "content"}` dicts.

    Raises:
        ValueError: not a list of messages; a message that is not a dict, or with a role other than
        system/user/assistant; content that is neither a string nor a list of `{"type": ...}` parts; a text part whose
        `text` is not a string; a part type other than text/image/video; a video/image part without a source, or whose
        path/URL is not a string; a video/image in an assistant turn (the template only renders text there); no
        assistant turn (nothing to learn from). The message names the message (by index) and the part.
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"`messages` must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r:.200}.")
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise ValueError(f"Message {index} needs a role in {ROLES}, got {message!r:.200}.")
        content = message.get("content")
        if not isinstance(content, (str, list)) and content is not None:
            raise ValueError(
                f"Message {index} ({role}) has content of type {type(content).__name__} ({content!r:.100}); use a "
                "string or a list of parts such as {'type': 'text', 'text': ...}."
            )
        for part in [] if isinstance(content, str) else content or []:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise ValueError(f"Message {index} ({role}): the text part {part!r:.200} needs a string 'text'.")
                continue
            if kind not in MEDIA_KEYS:
                raise ValueError(
                    f"Message {index} ({role}): unknown content part {part!r:.200}; parts are dicts with 'type' "
                    "'text', 'image' or 'video'."
                )
            if role == "assistant":
                raise ValueError(
                    f"A {kind} in an assistant turn (message {index}) is not supported (the chat template renders only "
                    "text there). Put videos and images in user turns."
                )
            key, source = _media_entry(part)
            if source is None:
                raise ValueError(f"The {kind} part {part!r:.200} has no {' / '.join(MEDIA_KEYS[kind])} entry.")
            if isinstance(source, (bool, int, float, dict)) or (key in ("path", "url") and not isinstance(source, str)):
                raise ValueError(
                    f"Message {index} ({role}): the {kind} part's {key!r} is {source!r:.100} "
                    f"({type(source).__name__}); give the file's path or URL as a string."
                )
    if not any(message["role"] == "assistant" for message in messages):
        raise ValueError(
            "The conversation has no assistant turn, so it has no tokens to train on. Add the expected answer as "
            "{'role': 'assistant', 'content': ...} or drop the row."
        )


def load_conversations(path: str | os.PathLike):
    """Read a JSONL file with one `{"messages": [...], ...}` row per line into a `datasets.Dataset`.

    The file is UTF-8 (a byte-order mark is allowed). String contents become `[{"type": "text", "text": ...}]`, since
    an Arrow column holds one type; other columns are kept. Media paths are left as written: relative ones are
    resolved by `StormDataCollator(data_root=...)`.

    Raises:
        FileNotFoundError: no such file. ValueError: a line that is not UTF-8 or not valid JSON, a line without
        `messages`, a row that fails `check_conversation`, an empty file, or other columns whose types differ between
        rows; the message gives the file and the line number.
    """
    from datasets import Dataset

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Conversation file not found: {path}. Pass a JSONL file with one row per line.")
    rows = []
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"{path}, line {number}: not UTF-8 text (byte {raw[error.start]:#04x} at position {error.start} "
                    "of the line). Save the file as UTF-8."
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or "messages" not in row:
                    raise ValueError(f"each line must be a JSON object with 'messages', got {line.strip()!r:.200}.")
                check_conversation(row["messages"])
            except ValueError as error:  # json.JSONDecodeError is a ValueError
                raise ValueError(f"{path}, line {number}: {error}") from None
            row["messages"] = [_with_list_content(message) for message in row["messages"]]
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} has no rows.")
    try:
        return Dataset.from_list(rows)
    except (ValueError, TypeError) as error:  # pyarrow's ArrowInvalid / ArrowTypeError
        raise ValueError(
            f"{path}: the rows cannot form one table ({type(error).__name__}: {str(error).splitlines()[0]}): a key "
            "holds values of different types in different rows (say a string in one and a number in another). Make "
            "each column one type, or keep only 'messages'."
        ) from None


def _with_list_content(message: dict) -> dict:
    content = message.get("content")
    if content is None or isinstance(content, str):
        content = [{"type": "text", "text": content or ""}]
    return {**message, "content": content}


def _media_entry(part: dict) -> tuple[str, object] | tuple[None, None]:
    """`(key, value)` of the part's media, read in transformers' key order."""
    return next(((key, part[key]) for key in MEDIA_KEYS[part["type"]] if part.get(key) is not None), (None, None))


def _token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def assistant_spans(input_ids: torch.Tensor, tokenizer) -> list[tuple[int, int]]:
    """`[start, stop)` index ranges of the assistant replies in one row of ChatML token ids: from the token after
    `<|im_start|>assistant\\n` up to and including the next `<|im_end|>` (to the end of the row if there is none).

    Args:
        input_ids (`torch.Tensor` of shape `(sequence_length,)`): token ids, placeholders expanded or not.
        tokenizer: the processor's tokenizer (Qwen2's, or any with the ChatML special tokens).
    """
    header = torch.tensor(_token_ids(tokenizer, ASSISTANT_HEADER))
    end_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if len(input_ids) < len(header):
        return []
    windows = input_ids.unfold(0, len(header), 1)  # (L - h + 1, h)
    starts = ((windows == header).all(dim=1).nonzero().flatten() + len(header)).tolist()
    ends = (input_ids == end_id).nonzero().flatten().tolist()
    spans = []
    for start in starts:
        stop = next((end + 1 for end in ends if end >= start), len(input_ids))
        spans.append((start, stop))
    return spans


def assistant_only_labels(input_ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """Next-token labels that cover only the assistant replies (and their `<|im_end|>`, so the model learns to stop).

    The spans are found in the token ids (`assistant_spans`), not with `return_assistant_tokens_mask`, which
    transformers < 5.18 computes before expanding the video placeholders.

    Args:
        input_ids (`torch.Tensor` of shape `(batch_size, sequence_length)` or `(sequence_length,)`)
        tokenizer: the processor's tokenizer.

    Returns:
        `torch.Tensor` of the same shape: `input_ids` inside assistant replies, -100 everywhere else (system and user
        turns, visual placeholders, padding).
    """
    rows = input_ids.unsqueeze(0) if input_ids.dim() == 1 else input_ids
    labels = torch.full_like(rows, IGNORE_INDEX)
    for row, row_labels in zip(rows, labels):
        for start, stop in assistant_spans(row, tokenizer):
            row_labels[start:stop] = row[start:stop]
    return labels.view_as(input_ids)


class StormDataCollator:
    r"""
    Collator for STORM supervised fine-tuning: conversation rows → padded model inputs with assistant-only labels.

    Per row it decodes each video (`num_frames` frames spread uniformly over the whole video, first and last included,
    with `StormVideoProcessor.sample_frames`, scaled to the processor's frame size while decoding) and image; the
    processor's chat template then renders and tokenizes the whole batch in one call, expands the placeholders (with
    `temporal_sample_rate=1`: the model never samples while training) and right-pads the rows to the longest one; the
    assistant replies of each row are labelled (`assistant_only_labels`).

    A row whose video or image is missing, unreadable, or shorter than `num_frames` frames is skipped: a warning names
    the file and the reason, `num_skipped` counts it, and the row stays in the batch with blank frames and no labels,
    so it adds nothing to the loss and every process still runs every module (as FSDP and DDP expect). With
    `strict=True` the error is raised instead.

    Args:
        processor (`StormProcessor`): the checkpoint's processor; it is not modified (a shallow copy gets
            `temporal_sample_rate=1`).
        num_frames (`int`): frames per video T. Every video of a batch must have the same T
            (`pixel_values_videos` is one tensor), and T must be a multiple of `processor.temporal_pool_size` (k).
        data_root (`str` or `os.PathLike`, *optional*): folder that relative media paths start from (default: the
            working directory). URLs, absolute paths, bytes and decoded frames are used as they are.
        strict (`bool`, *optional*, defaults to `False`): raise on unreadable media instead of skipping the row.

    Call: `collator(examples)` with a list of rows that have a `messages` column. Returns a dict of tensors:
        - `input_ids`, `attention_mask`, `labels` of shape `(batch_size, sequence_length)`;
        - `pixel_values_videos` of shape `(num_videos, num_frames, 3, height, width)` if the batch has videos;
        - `pixel_values` of shape `(num_images, 3, height, width)` if it has images.

    Raises:
        ValueError: `num_frames` not a multiple of k (at construction); a tokenizer without a pad token; a row that
        fails `check_conversation`, or whose assistant turns the chat template does not render as ChatML.
    """

    def __init__(self, processor, num_frames: int, data_root: str | os.PathLike | None = None, strict: bool = False):
        # Raises the project's error for T not a multiple of k, with the frame counts that work.
        get_num_visual_tokens(num_frames, grid_size=1, temporal_pool_size=processor.temporal_pool_size)
        if processor.tokenizer.pad_token_id is None:
            raise ValueError(
                "The tokenizer has no pad token. Set one, e.g. processor.tokenizer.pad_token = '<|endoftext|>'."
            )
        self.processor = copy.copy(processor)
        self.processor.temporal_sample_rate = 1
        self.num_frames = num_frames
        self.data_root = Path(data_root) if data_root is not None else None
        self.strict = strict
        # In shared memory, so that DataLoader worker processes add to the same count.
        self._skipped = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def num_skipped(self) -> int:
        """Rows skipped so far for unreadable media, by this collator and its copies in DataLoader workers."""
        return int(self._skipped)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        return self._encode([example["messages"] for example in examples])

    def encode(self, messages: list[dict]) -> dict[str, torch.Tensor]:
        """One row: 1-D `input_ids`, `attention_mask`, `labels`, plus the row's `pixel_values_videos` /
        `pixel_values` (first dimension: its number of videos / images)."""
        row = self._encode([messages])
        one_row = ("input_ids", "attention_mask", "labels")  # (1, L) -> (L,)
        return {key: value[0] if key in one_row else value for key, value in row.items()}

    def _encode(self, conversations: list[list[dict]]) -> dict[str, torch.Tensor]:
        """The batch: media decoded row by row (a row whose media fail gets blanks and no labels), then one call of
        the processor's chat template for all rows (its per-call work, ~1.5 ms, paid once per batch), right-padded."""
        loaded, blank = [], []
        for messages in conversations:
            check_conversation(messages)
            messages, failure = self._load_media(messages)
            loaded.append(messages)
            blank.append(failure is not None)
        tokenizer = self.processor.tokenizer
        inputs = self.processor.apply_chat_template(
            loaded,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            processor_kwargs={"num_frames": self.num_frames, "padding": True, "padding_side": "right"},
        )
        input_ids = inputs["input_ids"]  # (B, L), right-padded
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for row, (messages, blanked) in enumerate(zip(loaded, blank)):
            length = int(inputs["attention_mask"][row].sum())
            ids = input_ids[row, :length]
            turns = sum(message["role"] == "assistant" for message in messages)
            spans = assistant_spans(ids, tokenizer)
            if len(spans) != turns:
                raise ValueError(
                    f"The conversation has {turns} assistant turns but {len(spans)} were found in the rendered tokens "
                    f"(expected ChatML: {ASSISTANT_HEADER!r} … {END_OF_TURN!r}). Use the chat template that "
                    "StormProcessor ships."
                )
            if not blanked:  # as assistant_only_labels does, from the spans found once
                for start, stop in spans:
                    labels[row, start:stop] = ids[start:stop]
        batch = {"input_ids": input_ids, "attention_mask": inputs["attention_mask"], "labels": labels}
        batch.update({key: inputs[key] for key in ("pixel_values_videos", "pixel_values") if key in inputs})
        return batch

    def _load_media(self, messages: list[dict]) -> tuple[list[dict], Exception | None]:
        """Copy of `messages` with every video/image decoded (blank where that fails), and the first failure."""
        failure = None
        loaded = []
        for message in messages:
            content = message.get("content")
            if isinstance(content, str) or content is None:
                loaded.append(message)
                continue
            parts = []
            for part in content:
                part = {key: value for key, value in part.items() if value is not None}  # Arrow fills absent keys
                kind = part["type"]
                if kind in MEDIA_KEYS:
                    source = self._resolve(*_media_entry(part))
                    try:
                        media = self._decode(kind, source)
                    except (OSError, ValueError) as error:  # FileNotFoundError is an OSError
                        failure = failure or _naming_source(error, source)
                        media = self._blank(kind)
                    part = {"type": kind, kind: media}
                parts.append(part)
            loaded.append({**message, "content": parts})
        if failure is not None:
            self._skip(failure)
        return loaded, failure

    def _resolve(self, key: str, source):
        """A local path becomes a `Path` (relative ones start at `data_root`); URLs, base64, bytes, frames: kept."""
        is_path = isinstance(source, (str, os.PathLike)) and key in ("path", "video", "image")
        if not is_path or str(source).startswith(("http://", "https://", "data:")):
            return source
        return self.data_root / source if self.data_root is not None else Path(source)

    def _decode(self, kind: str, source):
        if kind == "image":
            if isinstance(source, Path) and not source.is_file():
                raise FileNotFoundError(f"Image file not found: {source}.")
            return load_image(str(source) if isinstance(source, Path) else source)
        if isinstance(source, (str, os.PathLike, bytes, bytearray)):
            video_processor = self.processor.video_processor
            sample = functools.partial(video_processor.sample_frames, num_frames=self.num_frames)
            # Scaled to the processor's frame size while decoding, as the video processor does for encoded videos.
            frames, _ = read_video_pyav(source, sample, size=video_processor._decode_size({}))
            return frames
        return source  # decoded frames: the video processor samples them

    def _blank(self, kind: str):
        if kind == "image":
            return Image.new("RGB", (16, 16))
        return np.zeros((self.num_frames, 16, 16, 3), dtype=np.uint8)

    def _skip(self, error: Exception) -> None:
        if self.strict:
            raise error
        self._skipped += 1
        logger.warning(
            f"Skipping a training row (no loss from it): {error} [{self.num_skipped} rows skipped so far by this "
            "collator; pass strict=True to stop at the first unreadable file instead]"
        )


def _naming_source(error: Exception, source) -> Exception:
    """`error`, or one of the same type whose message starts with the file it is about if it does not name it."""
    name = str(source) if isinstance(source, (str, os.PathLike)) else f"<{type(source).__name__} video>"
    if name in str(error):
        return error
    try:
        named = type(error)(f"{name}: {error}")
    except TypeError:  # an exception type that needs more arguments
        named = ValueError(f"{name}: {error}")
    named.__cause__ = error
    return named


__all__ = [
    "StormDataCollator",
    "assistant_only_labels",
    "assistant_spans",
    "check_conversation",
    "load_conversations",
]
