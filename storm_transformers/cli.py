"""`storm generate`: answer a question about a video (the command line is parsed by `storm_cli`, which imports this
module only when the command runs).

    storm generate --video FILE --prompt TEXT [--model DIR] [--num-frames N | --fps F [--max-frames N]] [--fit]
                   [--max-new-tokens M] [--temporal-sample-rate S] [--device D] [--dtype auto|float32|bfloat16|float16]
"""

import time
from pathlib import Path

from storm_cli import DEFAULT_MODEL, main  # noqa: F401  (`python -m storm_transformers.cli` and old entry points)


def generate(args) -> str:
    """Answer `args.prompt` about `args.video` with the checkpoint in `args.model`, printing what went in.

    Before any frame is decoded, and before the weights load, it prints the budget (`storm_transformers.video_token_budget`, from the video's
    container index only): the frames it will sample and their times, the visual tokens they make and whether they fit
    the LLM context with the prompt and `--max-new-tokens`; `--fit` changes the sampling until they do (fewer frames
    with `--fps`, a higher temporal sampling rate s with a frame count) and says what it changed.

    Raises:
        FileNotFoundError, ValueError, TypeError: a checkpoint `storm_transformers.loading.load_storm` refuses, a
        device that is not available, a video the processor cannot read, `--max-frames` without `--fps`, or a video
        whose tokens do not fit the LLM context (without `--fit`; nothing is decoded).
    """
    if args.max_frames is not None and args.fps is None:
        raise ValueError(
            f"--max-frames {args.max_frames} caps --fps sampling; with a frame count (--num-frames, or the "
            "checkpoint's default) the count is the frames taken. Pass --fps too, or drop --max-frames."
        )
    import torch
    from huggingface_hub import ModelCard
    from transformers import AutoConfig, AutoProcessor

    from .processing_storm import video_token_budget
    from .video_processing_storm import read_video_metadata

    from .loading import check_checkpoint, check_device, load_storm

    device = check_device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    try:
        model_dir = check_checkpoint(args.model)
    except FileNotFoundError as error:
        if args.model != DEFAULT_MODEL:
            raise
        raise FileNotFoundError(
            f"{error} The default checkpoint ships in the repository's checkpoints/ folder: install from a clone "
            "(`pip install -e .`) or pass --model."
        ) from None
    card = Path(model_dir) / "README.md"
    if card.exists() and "random-weights" in (ModelCard.load(card).data.tags or []):
        print(f"NOTE: {model_dir} has random (untrained) weights: the answer below is noise, not understanding.")

    # The budget needs the config and the processor only: a video that does not fit is refused before the weights load
    # (minutes for STORM-7B) and before any frame is decoded.
    start = time.perf_counter()
    config = AutoConfig.from_pretrained(model_dir)
    if args.temporal_sample_rate is not None:
        config.temporal_sample_rate = args.temporal_sample_rate
    messages = [{"role": "user", "content": [{"type": "video", "path": args.video}, {"type": "text", "text": args.prompt}]}]
    video = read_video_metadata(args.video)  # the container's index: no frame decoded
    print(f"video: {args.video} ({video.duration:.1f} s, {video.total_num_frames} frames, {video.fps:.2f} fps)")
    arguments = _budget_arguments(args, messages, AutoProcessor.from_pretrained(model_dir))
    budget = video_token_budget(video, config, **arguments, fit=args.fit)
    print(f"budget: {budget}")
    if not budget.fits:  # without --fit (with it, a budget that cannot fit is an error of video_token_budget)
        raise _does_not_fit(args, budget, video, config, arguments)
    if budget.fitted:
        print(f"--fit: {budget.fitted}")
    indexed = time.perf_counter()

    model, processor = load_storm(model_dir, dtype=args.dtype, device=device)
    model.config.temporal_sample_rate = processor.temporal_sample_rate = budget.temporal_sample_rate
    loaded = time.perf_counter()

    # the frames of the budget: the same sampling arguments, with the cap --fit may have lowered
    sampling = {"fps": args.fps, "max_frames": budget.max_frames} if args.fps else {"num_frames": arguments["num_frames"]}
    inputs = processor.apply_chat_template(
        messages,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={**sampling, "return_metadata": True},
    )
    metadata = inputs.pop("video_metadata")[0]
    inputs = inputs.to(model.device)
    prepared = time.perf_counter()

    # On a GPU, a static KV cache, with which transformers compiles the decode step (CUDA graphs): ~5x the tokens/s,
    # after a compilation on the first call (docs/benchmarks.md). Not in the generation config: transformers then
    # refuses a cache passed in by the caller (StormStreamingSession passes one).
    fast_decoding = {"cache_implementation": "static"} if model.device.type == "cuda" else {}
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, **fast_decoding)
    done = time.perf_counter()

    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    answer = processor.decode(new_tokens, skip_special_tokens=True).strip()
    frames = len(metadata.frames_indices)
    times = metadata.timestamps
    visual = int((inputs["input_ids"] == model.config.video_token_id).sum())
    config = model.config
    print(f"frames decoded: {frames} of {metadata.width}×{metadata.height}, at {times[0]:.2f} … {times[-1]:.2f} s")
    print(
        f"visual tokens sent to the LLM: {visual} (k={config.temporal_pool_size} temporal pooling, "
        f"p={config.spatial_pool_size} spatial pooling, s={config.temporal_sample_rate} temporal sampling); "
        f"prompt {inputs['input_ids'].shape[1]} tokens"
    )
    print(
        f"time: index {indexed - start:.2f} s, load {loaded - indexed:.2f} s, decode + preprocess "
        f"{prepared - loaded:.2f} s, generate {done - prepared:.2f} s ({len(new_tokens)} new tokens), total "
        f"{done - start:.2f} s"
    )
    print(f"answer: {answer}")
    return answer


def _budget_arguments(args, messages, processor) -> dict:
    """The arguments of `video_token_budget` for `args`; the prompt's tokens are counted on the chat template with one
    placeholder for the video (the template is only rendered: no video is read)."""
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    arguments = {"prompt_tokens": len(ids) - ids.count(processor.video_token_id), "max_new_tokens": args.max_new_tokens}
    if args.fps is not None:
        return {**arguments, "fps": args.fps, "max_frames": args.max_frames or processor.video_processor.max_frames}
    return {**arguments, "num_frames": args.num_frames or processor.video_processor.num_frames}


def _does_not_fit(args, budget, video, config, arguments: dict) -> ValueError:
    """The error for a `budget` that does not fit: its numbers, and the flags that make it fit."""
    from .processing_storm import video_token_budget

    if args.fps is not None:
        fixes = (
            f"--fit (it takes the {budget.frames_that_fit} frames that fit, spread over the whole video), or "
            f"--max-frames {budget.frames_that_fit} (or fewer), or a lower --fps"
        )
    else:
        fitted_rate = video_token_budget(video, config, **arguments, fit=True).temporal_sample_rate
        fixes = (
            f"--fit (it keeps the frames and raises the temporal sampling rate to s={fitted_rate}), or "
            f"--temporal-sample-rate {fitted_rate}, or --num-frames {budget.frames_that_fit} (or fewer), or --fps"
        )
    return ValueError(
        f"{budget.frames} frames make {budget.visual_tokens} visual tokens; with the prompt's {budget.prompt_tokens} "
        f"tokens and --max-new-tokens {budget.max_new_tokens} that is {budget.total_tokens} tokens, past the LLM's "
        f"context of {budget.context_length} tokens (text_config.max_position_embeddings). Nothing was decoded. "
        f"Pass {fixes}."
    )


if __name__ == "__main__":
    import sys

    sys.exit(main())
