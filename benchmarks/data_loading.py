"""Training-data throughput: rows per second that `StormDataCollator` prepares (decode the clip, chat template,
placeholders, labels, padding), in a PyTorch `DataLoader` as `storm train` runs it.

The clips are the miniature's (`storm_transformers.training.synthetic`: 64×64 H.264, 8 or 32 frames), generated into a
temporary folder, and the processor is the shipped miniature's (`checkpoints/storm-tiny-synthetic`: 64 px frames,
k = 4). These rows are what bounds the miniature's training runs on a 16-core GPU machine (docs/miniature.md,
"Reproduce"): there, every SFT step of every run prepares 16 of them on the CPU.

Usage (from the repository root; the script imports the repository's packages, not an installed copy):
    python benchmarks/data_loading.py [--clips 512] [--frames 8 32] [--workers 1 2] [--batch-size 16]

Prints one row per clip length and worker count: rows per second over one pass of the shuffled clips (after a first
batch, which starts the workers), and the CPU time per row that this implies (workers × seconds / rows; with one
worker that is the time one process spends per row).
"""

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import av
import torch
import transformers
from transformers import AutoProcessor

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the repository's storm_transformers

import storm_transformers  # noqa: E402, F401  (registers STORM)
from storm_transformers.training.data import StormDataCollator, load_conversations  # noqa: E402
from storm_transformers.training.synthetic import generate_dataset  # noqa: E402


def rows_per_second(rows, collator, workers: int, batch_size: int) -> float:
    """Rows per second of one shuffled pass of `rows` through a DataLoader with `workers` worker processes, timed from
    the end of its first batch."""
    loader = torch.utils.data.DataLoader(rows, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         collate_fn=collator, generator=torch.Generator().manual_seed(0))
    batches = iter(loader)
    next(batches)
    start, count = time.perf_counter(), 0
    for batch in batches:
        count += len(batch["input_ids"])
    return count / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(REPO / "checkpoints" / "storm-tiny-synthetic"),
                        help="folder whose processor prepares the rows")
    parser.add_argument("--clips", type=int, default=512, help="clips per clip length")
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 32], help="frames per clip (multiples of 8)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    processor = AutoProcessor.from_pretrained(args.model)
    print("| frames per clip | DataLoader workers | rows/s | CPU ms per row |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for frames in args.frames:
            data = Path(folder) / f"{frames}f"
            generate_dataset(data, {"train": args.clips}, seed=0, workers=os.cpu_count() or 1, num_frames=frames)
            rows = load_conversations(data / "train.jsonl")
            collator = StormDataCollator(processor, frames, data_root=data)
            for workers in args.workers:
                rate = rows_per_second(rows, collator, workers, args.batch_size)
                print(f"| {frames} | {workers} | {rate:.0f} | {1000 * max(workers, 1) / rate:.1f} |", flush=True)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, PyAV {av.__version__}; {args.clips} clips of 64×64 px, batches of {args.batch_size}")


if __name__ == "__main__":
    main()
