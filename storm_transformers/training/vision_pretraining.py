"""Stage 0 for STORMs trained from scratch: the vision tower learns single frames before it learns video QA.

The paper starts from a pretrained SigLIP (§4.1). A miniature trained from scratch has none, and trained end to end
on video QA its vision tower collapses: every token of a frame ends up carrying the same clip-wide summary (mostly
colour), so shape and position are lost before the LLM sees them (docs/miniature.md, "The collapse"). This stage
stands in for SigLIP's pretraining: the tower is trained on single frames of the synthetic generator
(`synthetic.py`), which knows what every frame shows, with two targets read linearly from the hidden state that STORM
projects (`vision_hidden_state` at `config.vision_feature_layer`):

- per token (each `patch_size`² patch): what covers it: background or one of the 12 (shape, colour) objects;
- per frame (the mean of the frame's tokens): which objects are present (12-way multi-label) and, for frames with one
  object, where its centre is (x, y in [0, 1]).

The per-token target keeps every token about its own patch; the per-frame position target makes the mean of a
frame's tokens (what temporal and spatial pooling compute) say where the object is. Shapes are drawn at radii of
5–10 px (`--radii`; the QA clips draw 8): a tower that has seen one size only loses the shape at other sizes
(docs/miniature.md, "Why the earlier checkpoint failed on the shifted clips"). The LLM-side stages then run with the
tower frozen (`trainable_modules` without `vision_tower`, `configs/miniature_*.yaml`).

```bash
python -m storm_transformers.training.vision_pretraining --model_name_or_path runs/init \
    --output_dir runs/vision --max_steps 3000 --radii 5 10
```
"""

import argparse
import math
import sys
import time

import numpy as np
import torch
from torch import nn

from .synthetic import COLORS, RADIUS, SHAPES, SIZE, background, shape_mask

NUM_OBJECTS = len(SHAPES) * len(COLORS)  # 12 (shape, colour) classes; patch class 0 is the background
OBJECTS_PER_FRAME = (0, 1, 2)
OBJECTS_PER_FRAME_P = (0.1, 0.6, 0.3)
MAX_RADIUS = 10  # px: two objects 2.5 radii apart always fit in a 64 px frame
# Stage 0's defaults: shapes of radius 5–10 px (the QA clips draw 8, the shifted ones 6 or 10) for 3000 steps of 128
# frames; with 8 px only, or 1500 steps, shape is lost at other sizes or weaker at 8 (docs/miniature.md, "Stage 0
# with shapes of many sizes").
STAGE0_RADII, STAGE0_STEPS = (5, 10), 3000


def object_class(shape: str, color: str) -> int:
    """Index in [0, 12) of a (shape, colour) pair: `shape index · 4 + colour index`."""
    return SHAPES.index(shape) * len(COLORS) + list(COLORS).index(color)


def check_radii(radii) -> None:
    """Raise `ValueError` unless `radii` = (smallest, largest) px with 1 ≤ smallest ≤ largest ≤ `MAX_RADIUS`."""
    if not 1 <= radii[0] <= radii[1] <= MAX_RADIUS:
        raise ValueError(f"radii={tuple(radii)} must be (smallest, largest) px with 1 ≤ smallest ≤ largest ≤ "
                         f"{MAX_RADIUS} (two objects 2.5 largest radii apart must fit in a {SIZE} px frame).")


def labelled_frame(rng: np.random.Generator, patch_size: int, radii: tuple[int, int] = (RADIUS, RADIUS),
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One frame as `synthetic.py` draws them (textured background, 0–2 objects of distinct shape and colour, no
    overlap) with what it shows. `radii` = (smallest, largest) px: each object's radius is drawn uniformly from that
    range (the default, 8 only, is what the QA clips draw, and gives the frames of stage 0 before 2026-12-03; a range
    shows the tower shapes of many sizes, as a pretrained SigLIP has seen them: `STAGE0_RADII`).

    Returns:
        frame `(64, 64, 3)` uint8; patch classes `(64 / patch_size)²` int64 (0 background, 1 + `object_class` where
        an object covers at least a quarter of the patch); present `(12,)` float32 multi-hot; centre `(2,)` float32,
        the object's (x, y) / 64 for a frame with exactly one object, NaN otherwise.
    """
    frame = background(rng)
    count = int(rng.choice(OBJECTS_PER_FRAME, p=OBJECTS_PER_FRAME_P))
    colors = rng.choice(list(COLORS), size=count, replace=False)
    shapes = rng.choice(SHAPES, size=count, replace=False)
    grid = SIZE // patch_size
    patches = np.zeros((grid, grid), dtype=np.int64)
    present = np.zeros(NUM_OBJECTS, dtype=np.float32)
    centre = np.full(2, np.nan, dtype=np.float32)
    centres: list[tuple[float, float]] = []
    for color, shape in zip(colors, shapes):
        radius = radii[0] if radii[0] == radii[1] else int(rng.integers(radii[0], radii[1] + 1))
        while True:  # a centre anywhere a synthetic clip puts one, 2.5 largest radii from the others (as `_place`)
            cx, cy = rng.uniform(radius + 2, SIZE - radius - 2, size=2)
            if all(math.hypot(cx - a, cy - b) > 2.5 * radii[1] for a, b in centres):
                break
        centres.append((cx, cy))
        mask = shape_mask(str(shape), cx, cy, radius)
        frame[mask] = COLORS[str(color)]
        cls = object_class(str(shape), str(color))
        coverage = mask.reshape(grid, patch_size, grid, patch_size).sum(axis=(1, 3))  # (grid, grid) pixels
        patches[coverage * 4 >= patch_size**2] = 1 + cls
        present[cls] = 1.0
    if count == 1:
        centre[:] = (centres[0][0] / SIZE, centres[0][1] / SIZE)
    return frame, patches.reshape(-1), present, centre


class FrameHeads(nn.Module):
    """Linear read-outs of the vision hidden state `(F, P, C)`: patch classes `(F, P, 13)` from each token; object
    presence `(F, 12)` and centre `(F, 2)` from the mean token of each frame. Discarded after the stage."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.patch = nn.Linear(hidden_size, 1 + NUM_OBJECTS)
        self.frame = nn.Linear(hidden_size, NUM_OBJECTS + 2)

    def forward(self, hidden_states: torch.Tensor):
        frame = self.frame(hidden_states.mean(dim=1))  # (F, 14)
        return self.patch(hidden_states), frame[:, :NUM_OBJECTS], frame[:, NUM_OBJECTS:]


def frame_losses(heads: FrameHeads, hidden_states: torch.Tensor, patches, present, centre) -> dict[str, torch.Tensor]:
    """Cross-entropy of the patch classes, binary cross-entropy of presence, squared error of the centre (frames with
    one object only). Inputs: `(F, P, C)`, `(F, P)`, `(F, 12)`, `(F, 2)` (NaN rows ignored)."""
    patch_logits, present_logits, centre_pred = heads(hidden_states)
    known = ~centre.isnan().any(dim=1)
    return {
        "patch": nn.functional.cross_entropy(patch_logits.flatten(0, 1), patches.flatten()),
        "present": nn.functional.binary_cross_entropy_with_logits(present_logits, present),
        "centre": 10 * nn.functional.mse_loss(centre_pred[known], centre[known]) if known.any() else centre.new_zeros(()),
    }


class LabelledFrames(torch.utils.data.IterableDataset):
    """Endless batches of `labelled_frame`s, prepared by `video_processor` (`StormVideoProcessor`) as one
    already-sampled video: pixel values `(F, 3, H, W)`, patch classes `(F, P)`, presence `(F, 12)`, centres
    `(F, 2)`. Each DataLoader worker draws from its own stream (`[seed, worker id]`), so the frames depend on the seed
    and on the number of workers."""

    def __init__(self, video_processor, patch_size: int, batch_size: int, seed: int, radii: tuple[int, int]):
        self.video_processor, self.patch_size, self.batch_size = video_processor, patch_size, batch_size
        self.seed, self.radii = seed, radii

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, worker.id if worker else 0])
        while True:
            frames, patches, present, centre = zip(*(labelled_frame(rng, self.patch_size, self.radii)
                                                     for _ in range(self.batch_size)))
            pixels = self.video_processor(videos=[np.stack(frames)], do_sample_frames=False,
                                          return_tensors="pt")["pixel_values_videos"][0]
            yield pixels, *(torch.from_numpy(np.stack(values)) for values in (patches, present, centre))


def pretrain_vision_tower(model, processor, max_steps: int = STAGE0_STEPS, batch_size: int = 128,
                          learning_rate: float = 1e-3, seed: int = 0, radii: tuple[int, int] = STAGE0_RADII,
                          num_workers: int = 4, log_every: int = 100, log=print) -> list[dict]:
    """Train `model.model.vision_tower` in place on generated frames (module docstring); everything else untouched.

    Args:
        model (`StormForConditionalGeneration`): on the device to train on; float32.
        processor (`StormProcessor`): its video processor prepares the frames exactly as for training clips.
        max_steps, batch_size (frames), learning_rate: AdamW with 5% warmup then cosine decay, weight decay 0.01.
        seed: the frames' and the heads' seed.
        radii: (smallest, largest) shape radius in px, drawn per object (`labelled_frame`).
        num_workers: DataLoader processes that draw and prepare frames (`LabelledFrames`).

    Returns:
        `list[dict]`: every `log_every` steps the mean losses and the patch-class accuracy since the last entry.

    Raises:
        ValueError: `max_steps` or `batch_size` below 1; `radii` not 1 ≤ smallest ≤ largest ≤ `MAX_RADIUS`.
    """
    from storm_transformers.modeling_storm import vision_hidden_state

    if max_steps < 1 or batch_size < 1:
        raise ValueError(f"max_steps={max_steps} and batch_size={batch_size} must be at least 1.")
    check_radii(radii)
    tower = model.model.vision_tower
    patch_size, layer = tower.config.patch_size, model.config.vision_feature_layer
    device = next(tower.parameters()).device
    torch.manual_seed(seed)
    heads = FrameHeads(tower.config.hidden_size).to(device)
    parameters = [*tower.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.01)
    warmup = max(1, max_steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * step / max_steps))))
    # The workers only draw frames (numpy and the video processor). Forked, they start at once; spawned (the default
    # inside a spawned process, e.g. miniature.pretrain_towers) each re-imports the caller's main module and, on exit,
    # can abort in C++ destructors.
    batches = torch.utils.data.DataLoader(
        LabelledFrames(processor.video_processor, patch_size, batch_size, seed, tuple(radii)), batch_size=None,
        num_workers=num_workers, multiprocessing_context="fork" if num_workers and sys.platform == "linux" else None)
    tower.train()
    history, totals, started = [], {}, time.perf_counter()
    for step, batch in zip(range(1, max_steps + 1), batches):
        pixels, *targets = (tensor.to(device) for tensor in batch)  # (F, 3, H, W), (F, P), (F, 12), (F, 2)
        hidden_states = vision_hidden_state(tower, pixels, layer)  # (F, P, C)
        losses = frame_losses(heads, hidden_states, *targets)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():  # the patch head after this step's update
            accuracy = (heads.patch(hidden_states.detach()).argmax(-1) == targets[0]).float().mean()
        for name, value in {**losses, "patch accuracy": accuracy}.items():
            totals[name] = totals.get(name, 0.0) + value.item()
        if step % log_every == 0 or step == max_steps:
            count = step - (history[-1]["step"] if history else 0)
            entry = {"step": step, **{name: round(value / count, 4) for name, value in totals.items()},
                     "seconds": round(time.perf_counter() - started, 1)}
            history.append(entry)
            log(f"vision pretraining {entry}")
            totals = {}
    tower.eval()
    return history


def pretrain_checkpoint(model_name_or_path, output_dir, overwrite: bool = False, **kwargs):
    """Load the STORM in `model_name_or_path` (float32, on the GPU if there is one), run `pretrain_vision_tower` with
    `kwargs` and write the whole model and its processor to `output_dir` (`write_checkpoint`: atomically).

    Returns:
        `(Path, list[dict])`: the output folder and the training log.

    Raises:
        What `write_checkpoint` and `pretrain_vision_tower` raise (an existing `output_dir` without `overwrite`).
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import storm_transformers  # noqa: F401
    from storm_transformers.conversion.checkpoint import write_checkpoint

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForImageTextToText.from_pretrained(model_name_or_path, dtype=torch.float32).to(device)
    processor = AutoProcessor.from_pretrained(model_name_or_path)
    history = pretrain_vision_tower(model, processor, **kwargs)
    return write_checkpoint(output_dir, model, processor, overwrite=overwrite), history


def main(argv=None):
    parser = argparse.ArgumentParser(description="Stage 0: train a STORM's vision tower on labelled synthetic frames "
                                     "(see the module docstring) and save the whole model.")
    parser.add_argument("--model_name_or_path", required=True, help="a STORM folder (e.g. a random initialisation)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_steps", type=int, default=STAGE0_STEPS)
    parser.add_argument("--per_device_train_batch_size", type=int, default=128, help="frames per step")
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--radii", type=int, nargs=2, default=list(STAGE0_RADII), metavar=("SMALLEST", "LARGEST"),
                        help="shape radius range in px, drawn per object (default %(default)s; the QA clips draw "
                        f"{RADIUS} only)")
    parser.add_argument("--dataloader_num_workers", type=int, default=4)
    args = parser.parse_args(argv)
    return pretrain_checkpoint(
        args.model_name_or_path, args.output_dir, max_steps=args.max_steps,
        batch_size=args.per_device_train_batch_size, learning_rate=args.learning_rate, seed=args.seed,
        radii=tuple(args.radii), num_workers=args.dataloader_num_workers)[0]


if __name__ == "__main__":
    main()
