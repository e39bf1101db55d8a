"""`storm generate`: answer a question about a video (the command line is parsed by `storm_cli`, which imports this
module only when the command runs).

    storm generate --video FILE --prompt TEXT [--model DIR] [--num-frames N | --fps F] [--max-new-tokens M]
                   [--temporal-sample-rate S] [--device D] [--dtype auto|float32|bfloat16|float16]
"""

import time
from pathlib import Path

from storm_cli import DEFAULT_MODEL, main  # noqa: F401  (`python -m storm_transformers.cli` and old entry points)


def generate(args) -> str:
    """Answer `args.prompt` about `args.video` with the checkpoint in `args.model`, printing what went in.

    Raises:
        FileNotFoundError, ValueError, TypeError: a checkpoint `storm_transformers.loading.load_storm` refuses, a
        device that is not available, or a video the processor cannot read.
    """
    import torch
    from huggingface_hub import ModelCard

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

    start = time.perf_counter()
    model, processor = load_storm(model_dir, dtype=args.dtype, device=device)
    if args.temporal_sample_rate is not None:
        model.config.temporal_sample_rate = processor.temporal_sample_rate = args.temporal_sample_rate
    loaded = time.perf_counter()

    messages = [{"role": "user", "content": [{"type": "video", "path": args.video}, {"type": "text", "text": args.prompt}]}]
    num_frames = args.num_frames if args.num_frames is not None else processor.video_processor.num_frames
    sampling = {"fps": args.fps} if args.fps is not None else {"num_frames": num_frames}
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
    print(f"video: {args.video} ({metadata.width}×{metadata.height}, {metadata.total_num_frames} frames, {metadata.fps:.2f} fps)")
    print(f"frames decoded: {frames}, at {times[0]:.2f} … {times[-1]:.2f} s")
    print(
        f"visual tokens sent to the LLM: {visual} (k={config.temporal_pool_size} temporal pooling, "
        f"p={config.spatial_pool_size} spatial pooling, s={config.temporal_sample_rate} temporal sampling); "
        f"prompt {inputs['input_ids'].shape[1]} tokens"
    )
    print(
        f"time: load {loaded - start:.2f} s, decode + preprocess {prepared - loaded:.2f} s, "
        f"generate {done - prepared:.2f} s ({len(new_tokens)} new tokens), total {done - start:.2f} s"
    )
    print(f"answer: {answer}")
    return answer


if __name__ == "__main__":
    import sys

    sys.exit(main())
