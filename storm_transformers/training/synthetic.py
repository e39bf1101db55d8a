"""Synthetic video QA: procedurally rendered clips whose questions need (or do not need) temporal order.

STORM's claim (paper §3) is that its Mamba temporal encoder writes what happens over time into every token, so the
tokens survive temporal pooling; averaging plain per-frame tokens loses the order of events. These clips test exactly
that: every clip is `NUM_FRAMES` = 8 frames (so with temporal pooling k = 8 the whole clip is one pooling window),
64×64 px, coloured shapes on a textured background, written as real H.264 MP4 with PyAV. One question per clip:

| type | temporal | what happens | question → answer | what the average frame shows |
|---|---|---|---|---|
| `direction` | yes | a shape crosses the frame | "Which way does the red circle move: left, right, up or down?" → `left` | a streak: the axis, not the sign |
| `order` | yes | two shapes each appear for the same 2–3 frames, one after the other | "Which appears first, the red circle or the blue square?" → `circle` | both, equally faint |
| `count` | yes | a shape is visible on 4 of the 8 frames, in 1, 2 or 3 separate runs | "How many times does the green triangle appear?" → `2` | the same half-visible shape for every count |
| `change` | yes | a shape changes colour half-way | "What colour does the square turn into?" → `yellow` | the same blend for X→Y and Y→X |
| `color` | no | a still shape | "What colour is the triangle?" → `blue` | the answer |
| `shape` | no | a still shape | "What shape is the green object?" → `square` | the answer |

Rows are in the conversational format of `data.py` (`messages` with a `{"type": "video", "path": ...}` part,
paths relative to the data folder), plus `question_type` and `temporal` columns. Everything is drawn from one seeded
`numpy.random.Generator` per clip, so a seed gives the same data on every machine.
"""

import json
from collections.abc import Collection
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import av
import numpy as np

NUM_FRAMES, SIZE, FPS = 8, 64, 8
COLORS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 235), "yellow": (235, 215, 40)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
QUESTION_TYPES = ("direction", "order", "count", "change", "color", "shape")
TEMPORAL_TYPES = ("direction", "order", "count", "change")
# Accuracy of guessing uniformly among a question's possible answers.
CHANCE = {"direction": 1 / 4, "order": 1 / 2, "count": 1 / 3, "change": 1 / 3, "color": 1 / 4, "shape": 1 / 3}
SPLITS = {"train": 0, "validation": 1, "test": 2}  # seed offsets, so that no clip repeats across splits
RADIUS = 8
# Nuisance factors of the shifted test clips (`make_clip(..., shifted=...)`): other background textures
# (`shifted_background`), other shape sizes and slower motion.
SHIFTS = ("background", "size", "speed")
SHIFTED_RADII, SHIFTED_STEP = (6, 10), (3.0, 4.0)


def background(rng: np.random.Generator) -> np.ndarray:
    """A muted textured background `(SIZE, SIZE, 3)` uint8: stripes, a checkerboard or smooth noise."""
    base = rng.integers(40, 90, size=3)
    alt = np.clip(base + rng.integers(-25, 26, size=3), 20, 110)
    y, x = np.mgrid[:SIZE, :SIZE]
    kind = rng.integers(3)
    if kind == 0:
        period = rng.integers(6, 16)
        pattern = ((x + rng.integers(SIZE)) // period) % 2 if rng.random() < 0.5 else ((y + x) // period) % 2
    elif kind == 1:
        cell = rng.integers(5, 13)
        pattern = ((x // cell) + (y // cell)) % 2
    else:
        coarse = rng.random((5, 5))
        pattern = np.kron(coarse, np.ones((SIZE // 4, SIZE // 4)))[:SIZE, :SIZE]
    return (base + (alt - base) * pattern[..., None]).astype(np.uint8)


def shifted_background(rng: np.random.Generator) -> np.ndarray:
    """A background `(SIZE, SIZE, 3)` uint8 of textures `background` never draws (for the shifted test clips of
    `make_clip(..., shifted=True)`): dots, concentric rings or a diagonal gradient, in a slightly wider brightness
    range."""
    base = rng.integers(30, 100, size=3)
    alt = np.clip(base + rng.integers(-30, 31, size=3), 15, 120)
    y, x = np.mgrid[:SIZE, :SIZE]
    kind = rng.integers(3)
    if kind == 0:
        period = rng.integers(6, 12)
        pattern = (np.hypot((x % period) - period / 2, (y % period) - period / 2) < period / 4).astype(float)
    elif kind == 1:
        cx, cy, period = *rng.integers(SIZE, size=2), rng.integers(5, 11)
        pattern = (np.hypot(x - cx, y - cy) // period) % 2
    else:
        pattern = (x + y * rng.uniform(-1, 1)) / (2 * SIZE) + 0.5
    return (base + (alt - base) * np.clip(pattern, 0, 1)[..., None]).astype(np.uint8)


def shape_mask(shape: str, cx: float, cy: float, radius: int = RADIUS) -> np.ndarray:
    """Boolean `(SIZE, SIZE)` mask of `shape` centred at (cx, cy) pixels."""
    y, x = np.mgrid[:SIZE, :SIZE]
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx**2 + dy**2 <= radius**2
    if shape == "square":
        return (np.abs(dx) <= radius * 0.85) & (np.abs(dy) <= radius * 0.85)
    return (dy <= radius * 0.8) & (dy >= -radius) & (np.abs(dx) <= (dy + radius) * 0.6)  # triangle, apex up


class Scene:
    """`NUM_FRAMES` = 8 beats over one background, each beat `frames_per_beat` frames long; `draw` paints a shape
    on chosen beats, at one position or at one position per frame."""

    def __init__(self, rng: np.random.Generator, frames_per_beat: int = 1, shifts: frozenset = frozenset()):
        self.frames_per_beat = frames_per_beat
        self.frames = np.repeat((shifted_background if "background" in shifts else background)(rng)[None],
                                NUM_FRAMES * frames_per_beat, axis=0)
        self.radius = int(rng.choice(SHIFTED_RADII)) if "size" in shifts else RADIUS

    def draw(self, shape: str, color: str, positions, beats=range(NUM_FRAMES)):
        for beat in beats:
            for t in range(beat * self.frames_per_beat, (beat + 1) * self.frames_per_beat):
                cx, cy = positions[t] if isinstance(positions, list) else positions
                self.frames[t][shape_mask(shape, cx, cy, self.radius)] = COLORS[color]


def _place(rng, taken=(), radius: int = RADIUS) -> tuple[int, int]:
    """A shape centre inside the frame, at least 2.5 radii from the centres in `taken`."""
    while True:
        point = tuple(int(v) for v in rng.integers(radius + 2, SIZE - radius - 2, size=2))
        if all(np.hypot(point[0] - a, point[1] - b) > 2.5 * radius for a, b in taken):
            return point


def _two_objects(rng) -> tuple[tuple[str, str], tuple[str, str]]:
    """Two (colour, shape) pairs that differ in both colour and shape."""
    colors = rng.choice(list(COLORS), size=2, replace=False)
    shapes = rng.choice(SHAPES, size=2, replace=False)
    return (str(colors[0]), str(shapes[0])), (str(colors[1]), str(shapes[1]))


def runs_pattern(rng, runs: int, on: int = 4) -> list[int]:
    """Frames (of 8) on which a shape is visible: `on` of them, in exactly `runs` separate runs."""
    while True:
        visible = np.zeros(NUM_FRAMES, dtype=bool)
        visible[rng.choice(NUM_FRAMES, size=on, replace=False)] = True
        if np.count_nonzero(np.diff(visible.astype(int)) == 1) + int(visible[0]) == runs:
            return np.flatnonzero(visible).tolist()


def make_clip(question_type: str, rng: np.random.Generator, num_frames: int = NUM_FRAMES,
              shifted: bool | Collection[str] = False) -> tuple[np.ndarray, str, str]:
    """Frames `(num_frames, 64, 64, 3)` uint8, question and answer of one clip of `question_type`.

    Every clip tells its story in `NUM_FRAMES` = 8 beats; `num_frames` = 8·m stretches each beat over m frames (a
    moving shape moves m times slower, in m times more steps), so that longer clips ask the same questions with
    neighbouring frames that are nearly redundant, the regime of the paper's test-time temporal sampling (§3.3).
    The random draws do not depend on `num_frames`: the same seed tells the same story at every length.
    `shifted` changes nuisance factors (not the questions): `True` all of `SHIFTS`, or some of them by name:
    `"background"` other textures (`shifted_background`), `"size"` shape radius 6 or 10 px instead of 8, `"speed"`
    slower motion (`SHIFTED_STEP` px per beat).

    Raises:
        ValueError: `num_frames` is not a positive multiple of 8; `shifted` names a factor not in `SHIFTS`.
    """
    if num_frames < NUM_FRAMES or num_frames % NUM_FRAMES:
        raise ValueError(f"num_frames={num_frames} must be a positive multiple of {NUM_FRAMES} (the story's beats).")
    shifts = frozenset(SHIFTS if shifted is True else shifted or ())
    if not shifts <= set(SHIFTS):
        raise ValueError(f"shifted={shifted!r} names unknown nuisance factors; use True, False or some of {SHIFTS}.")
    per_beat = num_frames // NUM_FRAMES
    scene = Scene(rng, per_beat, shifts)
    radius = scene.radius
    (color, shape), (other_color, other_shape) = _two_objects(rng)
    if question_type == "direction":
        direction = str(rng.choice(list(DIRECTIONS)))
        dx, dy = DIRECTIONS[direction]
        step = rng.uniform(*SHIFTED_STEP) if "speed" in shifts else rng.uniform(4.5, 5.5)
        across = rng.uniform(radius + 4, SIZE - radius - 4)
        start = radius + 2 + (SIZE - 2 * radius - 4 - 7 * step) * rng.random()
        scale = (NUM_FRAMES - 1) / (num_frames - 1)  # the same path in num_frames steps (1.0 at 8 frames)
        along = [start + t * scale * step for t in range(num_frames)]
        along = along if dx + dy > 0 else along[::-1]
        positions = [(a, across) if dx else (across, a) for a in along]
        scene.draw(shape, color, positions)
        return scene.frames, f"Which way does the {color} {shape} move: left, right, up or down?", direction
    if question_type == "order":
        first, second = ((color, shape), (other_color, other_shape))
        duration = int(rng.integers(2, 4))
        start_first = int(rng.integers(0, NUM_FRAMES - duration))
        start_second = int(rng.integers(start_first + 1, NUM_FRAMES - duration + 1))
        a = _place(rng, radius=radius)
        b = _place(rng, [a], radius)
        scene.draw(first[1], first[0], a, range(start_first, start_first + duration))
        scene.draw(second[1], second[0], b, range(start_second, start_second + duration))
        named = [first, second] if rng.random() < 0.5 else [second, first]
        question = f"Which appears first, the {named[0][0]} {named[0][1]} or the {named[1][0]} {named[1][1]}?"
        return scene.frames, question, first[1]
    if question_type == "count":
        runs = int(rng.integers(1, 4))
        scene.draw(shape, color, _place(rng, radius=radius), runs_pattern(rng, runs))
        return scene.frames, f"How many times does the {color} {shape} appear?", str(runs)
    if question_type == "change":
        where = _place(rng, radius=radius)
        scene.draw(shape, color, where, range(0, NUM_FRAMES // 2))
        scene.draw(shape, other_color, where, range(NUM_FRAMES // 2, NUM_FRAMES))
        return scene.frames, f"What colour does the {shape} turn into?", other_color
    scene.draw(shape, color, _place(rng, radius=radius))
    if question_type == "color":
        return scene.frames, f"What colour is the {shape}?", color
    return scene.frames, f"What shape is the {color} object?", shape


def write_mp4(path: Path, frames: np.ndarray) -> None:
    """Encode `(T, H, W, 3)` uint8 frames as H.264 (libx264, yuv420p, CRF 12, one keyframe) at `FPS`."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.options = {"crf": "12", "preset": "veryfast"}
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode(None))


def _row(args) -> dict:
    split_dir, seed, index, num_frames, shifted, mix = args
    rng = np.random.default_rng([seed, index])
    # uniform: `integers`, so that the uniform splits stay the clips they always were
    kind = rng.integers(len(QUESTION_TYPES)) if mix is None else rng.choice(len(mix), p=mix)
    question_type = QUESTION_TYPES[int(kind)]
    frames, question, answer = make_clip(question_type, rng, num_frames, shifted)
    relative = Path("videos") / split_dir.name / f"{index:06d}.mp4"
    write_mp4(split_dir.parent.parent / relative, frames)
    return {
        "messages": [
            {"role": "user", "content": [{"type": "video", "path": str(relative)}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
        "question_type": question_type,
        "temporal": question_type in TEMPORAL_TYPES,
    }


def generate_dataset(output_dir, sizes: dict[str, int], seed: int = 0, workers: int = 1,
                     num_frames: int = NUM_FRAMES, shifted: bool | Collection[str] = False,
                     question_weights: dict[str, float] | None = None) -> dict[str, Path]:
    """Write `sizes[split]` clips per split into `output_dir/videos/<split>/` and `output_dir/<split>.jsonl`.

    Args:
        output_dir: folder to fill (created).
        sizes: clips per split, e.g. `{"train": 6000, "validation": 300, "test": 600}`; keys from `SPLITS`.
        seed: the data seed; each split draws from its own stream (`seed * 3 + split offset`).
        workers: processes that render and encode in parallel (the result does not depend on it).
        num_frames: frames per clip, a multiple of 8 (`make_clip`); the same seed tells the same stories.
        shifted: other nuisance factors, all (`True`) or some of `SHIFTS` (`make_clip`), for measuring
            generalisation.
        question_weights: relative frequency of each question type (keys from `QUESTION_TYPES`, missing ones 0), e.g.
            more of the types a model learns slowly in a training split; uniform when `None`.

    Returns:
        `dict[str, Path]`: the JSONL file of each split.

    Raises:
        ValueError: an unknown split name; `num_frames` not a positive multiple of 8; unknown question types or
            weights that are negative or all zero.
    """
    output_dir = Path(output_dir)
    mix = None
    if question_weights is not None:
        unknown = set(question_weights) - set(QUESTION_TYPES)
        weights = np.array([question_weights.get(kind, 0.0) for kind in QUESTION_TYPES], dtype=float)
        if unknown or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(
                f"question_weights {question_weights} must map question types {QUESTION_TYPES} to non-negative "
                "weights, at least one of them positive."
            )
        mix = weights / weights.sum()
    files = {}
    for split, count in sizes.items():
        if split not in SPLITS:
            raise ValueError(f"Unknown split {split!r}; use {list(SPLITS)}.")
        split_dir = output_dir / "videos" / split
        split_dir.mkdir(parents=True, exist_ok=True)
        stream = seed * len(SPLITS) + SPLITS[split]
        jobs = [(split_dir, stream, index, num_frames, shifted, mix) for index in range(count)]
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                rows = list(pool.map(_row, jobs, chunksize=64))
        else:
            rows = [_row(job) for job in jobs]
        files[split] = output_dir / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return files
