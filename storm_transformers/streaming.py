"""Streaming STORM: frames in as they arrive, answers at any moment (issue 12).

The paper's uni-directional STORM (§3.2, Table 7) exists "to reuse prior states for constant-time computation as new
frames arrive": its temporal encoder is causal, so each layer's scan state (SSM state h and the last `conv_kernel - 1`
convolution inputs) summarises every frame before, and the LLM's KV cache holds every visual token before. A
`StormStreamingSession` keeps both: every group of k frames costs the same (vision tower, one chunk of the scan,
pooling, one LLM forward over its tokens), and a question costs only its own tokens.

    session = StormStreamingSession(model, processor)   # a uni-directional STORM and its processor
    session.append(frames)                              # numpy / torch / PIL frames, a PyAV container or a file path
    answer = session.ask("What happens?", max_new_tokens=32)
    print(answer.text, session.frames_seen, session.tokens_cached, session.context_remaining)

Exact: after N frames, the answer is the offline model's on the same N frames and prompt (`tests/test_streaming.py`).
"""

import copy
import os
import time
from dataclasses import dataclass

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter
from transformers import DynamicCache

from .modeling_storm import CACHE_NAME, StormForConditionalGeneration

# Shape legend: T frames, N tokens per frame after the downsample, N' after spatial pooling, D LLM width.


@dataclass
class StormStreamingAnswer:
    """An answer of `StormStreamingSession.ask`.

    Attributes:
        text (`str`): the decoded answer, special tokens skipped.
        token_ids (`torch.LongTensor` of shape `(num_new_tokens,)`): the generated token ids.
        frames (`int`): frames the answer is based on (whole groups of k frames encoded so far).
        seconds (`float`): wall time from the question to the end of the answer.
    """

    text: str
    token_ids: torch.LongTensor
    frames: int
    seconds: float


class StormStreamingSession:
    r"""A live video stream into a uni-directional STORM: append frames as they arrive, ask questions at any moment.

    The LLM sees the same token sequence as for an offline video, built by the processor's chat template:
    `<prefix>` (system turn and the start of the user turn, up to the video placeholder), then the video's visual
    tokens, then `\n<question><|im_end|>\n<|im_start|>assistant\n`. The prefix goes into the KV cache when the session
    starts; every group of k frames adds its pooled tokens at the next positions; a question is appended after them,
    answered with `generate`, and then rolled back (`DynamicCache.crop` to the stream's length): no copy of the cache
    is made, so memory stays that of the stream, and the next frames continue right after the last visual token.

    Args:
        model (`StormForConditionalGeneration`): a STORM whose temporal encoder is uni-directional
            (`temporal_encoder_config.bidirectional=False`) or absent. The session puts it in eval mode (temporal
            sampling s applies, as at inference).
        processor (`StormProcessor`): its processor (chat template, tokenizer, frame preprocessing); its
            `temporal_pool_size`, `spatial_pool_size` and `temporal_sample_rate` must equal the model's.
        fps (`float`, *optional*): for files and PyAV containers, keep one frame per `1/fps` seconds of video (the
            first frame at or after each multiple of `1/fps` from the first frame); None keeps every decoded frame.
            Decoded frames passed to `append` are all kept.
        reserve_tokens (`int`, *optional*, defaults to 256): context kept free for questions and answers; `append`
            refuses frames whose visual tokens would use it.

    Raises:
        ValueError: a bidirectional model (its backward scan needs the frames that have not arrived yet); pooling
        settings that differ between model and processor; a chat template that does not put the video first.
        TypeError: `processor` is not a STORM processor.
    """

    def __init__(self, model: StormForConditionalGeneration, processor, fps: float | None = None, reserve_tokens: int = 256):
        config = model.config
        if config.temporal_encoder_config.bidirectional and config.temporal_encoder_config.num_hidden_layers:
            raise ValueError(
                "This STORM has a bidirectional temporal encoder, which cannot stream: its backward scan runs from the "
                "end of the video to every token, so each visual token depends on frames that have not arrived yet. "
                "Stream with a uni-directional STORM (temporal_encoder_config.bidirectional=False, the paper's "
                "Table 7 variant), trained with the same recipes (`bidirectional: false`)."
            )
        if not hasattr(processor, "video_processor"):
            raise TypeError(
                f"processor must be the model's StormProcessor, got {type(processor).__name__}. Import "
                "storm_transformers before AutoProcessor.from_pretrained, so that it loads the STORM processor."
            )
        for name in ("temporal_pool_size", "spatial_pool_size", "temporal_sample_rate"):
            if getattr(processor, name) != getattr(config, name):
                raise ValueError(
                    f"processor.{name}={getattr(processor, name)} but model.config.{name}={getattr(config, name)}: "
                    "set both to the same value."
                )
        if fps is not None and fps <= 0:
            raise ValueError(f"fps={fps} must be positive (frames per second of video), or None for every frame.")
        self.model, self.processor = model.eval(), processor
        self.fps, self.reserve_tokens = fps, reserve_tokens
        self.max_positions = config.text_config.max_position_embeddings
        self.prefix_ids = self._prompt_ids("")[0]
        self.cache = DynamicCache(config=config.text_config)
        self._llm_forward(input_ids=torch.tensor([self.prefix_ids], device=model.device))
        self.frames_seen = 0  # frames appended (after fps sampling), including those waiting for a whole group
        self.frames_encoded = 0  # frames in whole groups of k, encoded and in the cache
        self.video_tokens = 0
        self._encoder_states = None  # per temporal-encoder layer: the scan state after the frames encoded
        self._pending = None  # (T_p, 3, H, W): fewer than k frames waiting for their group
        self._sources: dict = {}  # decoding position per file path / container (see `_decode`)

    # ------------------------------------------------------------------ reports

    @property
    def tokens_cached(self) -> int:
        """Tokens in the LLM's KV cache: the prompt prefix and the visual tokens so far."""
        return len(self.prefix_ids) + self.video_tokens

    @property
    def context_remaining(self) -> int:
        """Tokens of the LLM context (`text_config.max_position_embeddings`) not yet used by the stream."""
        return self.max_positions - self.tokens_cached

    def __repr__(self) -> str:
        return (
            f"StormStreamingSession(frames_seen={self.frames_seen}, frames_encoded={self.frames_encoded}, "
            f"tokens_cached={self.tokens_cached}, context_remaining={self.context_remaining})"
        )

    # ------------------------------------------------------------------ frames in

    def append(self, frames, max_frames: int | None = None) -> torch.Tensor:
        """Add frames to the stream: every whole group of k frames goes through the vision tower, the temporal encoder
        (each layer continuing from its carried scan state), pooling and sampling, and its visual tokens into the KV
        cache. Frames short of a whole group wait for the next call.

        Args:
            frames: decoded frames — `np.ndarray` `(T, H, W, 3)` or `(H, W, 3)` uint8, `torch.Tensor` `(T, 3, H, W)`,
                a PIL image or a list of them — or an encoded video: a PyAV `InputContainer` (read from where it is)
                or a file path (reopened at every call and read after the last frame decoded, so a file that is
                still being written, e.g. MPEG-TS, Matroska or fragmented MP4, can be appended again as it grows).
                Frames are resized and normalised as the processor does.
            max_frames (`int`, *optional*): for encoded videos, decode at most this many frames (kept after `fps`).

        Returns:
            `torch.Tensor` of shape `(num_new_tokens, hidden_size)`: the visual tokens added to the cache (none when
            no group was completed, or when temporal sampling skips the new pooled frames).

        Raises:
            ValueError: the new tokens would leave fewer than `reserve_tokens` of the LLM context (nothing is added,
            and a file path is read from the same frame at the next call; frames read from a PyAV container are
            lost); a file or container that cannot be read.
        """
        sources = copy.deepcopy(self._sources)  # where each file was left, restored if the frames are refused
        if isinstance(frames, (str, os.PathLike, av.container.InputContainer)):
            frames = self._decode(frames, max_frames)
            if frames is None:
                return self._no_tokens()
        pixels = self._pixels(frames)  # (T, 3, H, W)
        if self._pending is not None:
            pixels = torch.cat([self._pending, pixels])
        pool_size = self.model.config.temporal_pool_size
        ready = pixels.shape[0] - pixels.shape[0] % pool_size
        try:
            self._check_budget(ready)
        except ValueError:
            self._sources = sources  # a file is read again from the same frame next time (a container cannot be)
            raise
        self.frames_seen += len(pixels) - (0 if self._pending is None else len(self._pending))
        self._pending = pixels[ready:] if ready < len(pixels) else None
        if not ready:
            return self._no_tokens()
        tokens = self._encode(pixels[:ready])  # (n, D)
        if len(tokens):
            self._llm_forward(inputs_embeds=tokens[None])
            self.video_tokens += len(tokens)
        return tokens

    def _pixels(self, frames) -> torch.Tensor:
        """Frames → pixel values `(T, 3, H, W)` with the processor's resizing and normalisation."""
        if isinstance(frames, np.ndarray | torch.Tensor) and frames.ndim == 3:
            frames = frames[None]
        elif not isinstance(frames, np.ndarray | torch.Tensor | list | tuple):
            frames = [frames]  # one PIL image
        if len(frames) == 0:
            raise ValueError("append() got no frames: pass at least one frame.")
        processed = self.processor.video_processor(
            videos=[frames], do_sample_frames=False, return_tensors="pt", device=self.model.device
        )  # resized and normalised on the model's device
        return processed["pixel_values_videos"][0]

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Whole groups of k frames `(T, 3, H, W)` → their pooled, sampled visual tokens `(n, D)`, continuing the
        temporal encoder's scan from the frames before (in chunks of the model's scan chunk size)."""
        inner, pool_size = self.model.model, self.model.config.temporal_pool_size
        with torch.no_grad():
            features = inner._frame_tokens(pixels)  # (T, N, D)
            frames, tokens_per_frame, width = features.shape
            chunk = inner._scan_chunk_frames(frames, tokens_per_frame, pool_size)
            pooled = []
            for start in range(0, frames, chunk):
                sequence = features[start : start + chunk].reshape(1, -1, width)  # (1, T_c·N, D)
                encoded, self._encoder_states = inner.temporal_encoder.forward_chunk(sequence, self._encoder_states)
                encoded = encoded.view(1, -1, tokens_per_frame, width)  # (1, T_c, N, D)
                pooled.append(inner._pool(encoded, self.frames_encoded + start, is_video=True).flatten(0, 2))  # (n_c, D)
        self.frames_encoded += frames
        return torch.cat(pooled)

    def _llm_forward(self, **inputs) -> None:
        """Run the LLM over the next positions, appending their keys and values to the stream's cache."""
        with torch.no_grad():
            self.model.model.language_model(use_cache=True, **inputs, **{CACHE_NAME: self.cache})

    def _no_tokens(self) -> torch.Tensor:
        return torch.empty(0, self.model.config.text_config.hidden_size, device=self.model.device)

    def _check_budget(self, frames: int) -> None:
        """Refuse, before any work, frames whose visual tokens would leave less than `reserve_tokens` of context."""
        config = self.model.config
        pool_size, sample_rate = config.temporal_pool_size, config.temporal_sample_rate
        first, pooled = self.frames_encoded // pool_size, frames // pool_size
        kept = sum(1 for index in range(first, first + pooled) if index % sample_rate == 0)
        new_tokens = kept * config.num_image_tokens()
        if self.tokens_cached + new_tokens <= self.max_positions - self.reserve_tokens:
            return
        raise ValueError(
            f"The stream's LLM context is full: {self.tokens_cached} tokens are cached ({self.frames_encoded} frames), "
            f"and {frames} more frames would add {new_tokens} visual tokens, past the context of {self.max_positions} "
            f"tokens (text_config.max_position_embeddings) minus {self.reserve_tokens} reserved for questions and "
            "answers. Nothing was added. Ask your questions now, then start a new session for the rest of the video; "
            "or stream with more compression (a larger temporal_sample_rate on both model.config and the processor, or "
            "a model trained with a larger temporal_pool_size / spatial_pool_size), or fewer frames per second (fps)."
        )

    # ------------------------------------------------------------------ questions

    def ask(self, question: str, max_new_tokens: int = 64, **generate_kwargs) -> StormStreamingAnswer:
        """Answer `question` about everything streamed so far (the frames in whole groups of k).

        The question and answer tokens go into the KV cache only for the time of `generate`: the cache is cropped
        back to the stream's length afterwards (also on error), so questions leave no trace in the stream and cost only
        their own tokens.

        Args:
            question (`str`): the user's question (the text after the video in the user turn).
            max_new_tokens (`int`, *optional*, defaults to 64): as for `generate`.
            generate_kwargs: passed to `model.generate` (e.g. `do_sample=False`).

        Raises:
            ValueError: the question and `max_new_tokens` do not fit the context left.
        """
        start = time.perf_counter()
        suffix = self._prompt_ids(question)[1]
        if self.tokens_cached + len(suffix) + max_new_tokens > self.max_positions:
            raise ValueError(
                f"The question ({len(suffix)} tokens) and max_new_tokens={max_new_tokens} do not fit the "
                f"{self.context_remaining} tokens of context left after the stream ({self.tokens_cached} tokens "
                "cached). Ask with fewer max_new_tokens, or start a new session."
            )
        video = [self.model.config.video_token_id] * self.video_tokens
        input_ids = torch.tensor([self.prefix_ids + video + suffix], device=self.model.device)
        length = self.cache.get_seq_length()
        try:
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                **{CACHE_NAME: self.cache},
                **generate_kwargs,
            )
        finally:
            self.cache.crop(length - self.cache.get_seq_length())  # a negative count removes that many tokens
        new_tokens = output[0, input_ids.shape[1] :]
        text = self.processor.decode(new_tokens, skip_special_tokens=True).strip()
        return StormStreamingAnswer(text, new_tokens, self.frames_encoded, time.perf_counter() - start)

    def _prompt_ids(self, question: str) -> tuple[list[int], list[int]]:
        """Token ids of the chat prompt for a video and `question`, split at the video placeholder: (before, after)."""
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = list(self.processor.tokenizer(text)["input_ids"])  # as the processor tokenizes, before expanding the video
        video_token_id = self.model.config.video_token_id
        if ids.count(video_token_id) != 1:
            raise ValueError(
                f"The processor's chat template gives {ids.count(video_token_id)} video placeholders for one video; "
                "streaming needs exactly one."
            )
        split = ids.index(video_token_id)
        if getattr(self, "prefix_ids", None) not in (None, ids[:split]):
            raise ValueError("The chat template puts text of the question before the video; streaming needs the video first.")
        return ids[:split], ids[split + 1 :]

    # ------------------------------------------------------------------ encoded videos

    def _decode(self, source, max_frames: int | None) -> np.ndarray | None:
        """The next frames of a file path or PyAV container `(T, H, W, 3)` uint8 at the processor's size, after the
        frames already read from it, `fps`-sampled; None when nothing new is there."""
        key = os.fspath(source) if isinstance(source, (str, os.PathLike)) else id(source)
        position = self._sources.setdefault(key, _SourcePosition())
        size = self.processor.video_processor.size
        frames = []
        try:
            container = av.open(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else source
        except (av.error.FFmpegError, FileNotFoundError) as error:
            raise ValueError(
                f"Could not open {source} as a video ({error}). A file that is still being written can be read only "
                "if its format allows it (MPEG-TS, Matroska, fragmented MP4; a plain MP4 has its index at the end)."
            ) from None
        try:
            stream = container.streams.video[0]
            if isinstance(source, (str, os.PathLike)) and position.pts is not None:
                container.seek(position.pts, stream=stream, backward=True)
            reformatter = VideoReformatter()
            for frame in container.decode(stream):
                if frame.pts is None or (position.pts is not None and frame.pts <= position.pts):
                    continue
                position.pts = frame.pts
                if position.keep(float(frame.pts * stream.time_base), self.fps):
                    scaled = reformatter.reformat(frame, format="rgb24", width=size["width"], height=size["height"], interpolation="BICUBIC")
                    frames.append(scaled.to_ndarray())
                    if max_frames is not None and len(frames) == max_frames:
                        break
        except av.error.FFmpegError as error:
            if not frames:
                raise ValueError(f"Could not decode {source} ({error}).") from None
        finally:
            if container is not source:
                container.close()
        return np.stack(frames) if frames else None


class _SourcePosition:
    """Where a file or container was left: the last frame's pts, and the fps sampler's next target time (seconds)."""

    def __init__(self):
        self.pts = None
        self.start = None
        self.next_index = 0

    def keep(self, seconds: float, fps: float | None) -> bool:
        """Whether the frame at `seconds` is kept: the first frame at or after start + i/fps, for i = 0, 1, …"""
        if fps is None:
            return True
        if self.start is None:
            self.start = seconds
        if seconds + 1e-9 < self.start + self.next_index / fps:
            return False
        while self.start + self.next_index / fps <= seconds + 1e-9:
            self.next_index += 1
        return True


__all__ = ["StormStreamingSession", "StormStreamingAnswer"]


# ---------------------------------------------------------------------------------------------- `storm stream`


def read_questions(path) -> list[tuple[float, str]]:
    """Questions of `storm stream`: a JSONL file, one `{"time": seconds, "question": text}` per line, sorted by time.

    Raises:
        ValueError: a line that is not such an object (its line number is given).
    """
    import json

    questions = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                questions.append((float(row["time"]), str(row["question"])))
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(
                    f'{path}, line {number}: expected {{"time": <seconds>, "question": <text>}}, got {line.strip()!r} '
                    f"({error})."
                ) from None
    return sorted(questions, key=lambda item: item[0])


def stream_command(args) -> None:
    """Play `args.video` at its frame rate times `args.speed` (0: as fast as possible) into a streaming session, ask
    each question of `args.questions` when playback reaches its time, print each answer and the time it took."""
    from huggingface_hub import ModelCard

    from .loading import check_device, load_storm

    questions = read_questions(args.questions)
    device = check_device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    model, processor = load_storm(args.model, dtype=args.dtype, device=device)
    card = os.path.join(args.model, "README.md")
    if os.path.exists(card) and "random-weights" in (ModelCard.load(card).data.tags or []):
        print(f"NOTE: {args.model} has random (untrained) weights: the answers below are noise, not understanding.")
    session = StormStreamingSession(model, processor, fps=args.fps)
    size = processor.video_processor.size
    sampler, reformatter = _SourcePosition(), VideoReformatter()
    append_seconds, started = 0.0, time.perf_counter()

    def answer_until(seconds: float) -> None:
        while questions and questions[0][0] <= seconds:
            at, question = questions.pop(0)
            answer = session.ask(question, max_new_tokens=args.max_new_tokens, do_sample=False)
            print(
                f"[{at:7.2f} s] Q: {question}\n            A: {answer.text}  ({1000 * answer.seconds:.0f} ms; "
                f"{answer.frames} frames, {session.tokens_cached} tokens cached, {session.context_remaining} left)",
                flush=True,
            )

    try:
        container = av.open(args.video)
    except (av.error.FFmpegError, FileNotFoundError) as error:
        raise ValueError(f"Could not open {args.video} as a video ({error}).") from None
    with container:
        stream = container.streams.video[0]
        first = None
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            first = frame.pts if first is None else first
            seconds = float((frame.pts - first) * stream.time_base)
            answer_until(seconds - 1e-9)  # questions asked before this frame arrives
            if args.speed > 0:
                time.sleep(max(0.0, started + seconds / args.speed - time.perf_counter()))
            if sampler.keep(seconds, args.fps):
                scaled = reformatter.reformat(frame, format="rgb24", width=size["width"], height=size["height"], interpolation="BICUBIC")
                start = time.perf_counter()
                session.append(scaled.to_ndarray())
                append_seconds += time.perf_counter() - start
    answer_until(float("inf"))  # questions after the end of the video: answered on all of it
    print(
        f"streamed {session.frames_seen} frames ({session.frames_encoded} encoded) in {time.perf_counter() - started:.1f} s; "
        f"{1000 * append_seconds / max(session.frames_seen, 1):.1f} ms of work per frame; {session!r}"
    )
