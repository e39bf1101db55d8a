"""The synthetic video QA generator (storm_transformers.training.synthetic): answers follow from the frames, clips are
real H.264."""

import json

import numpy as np
import pytest

from storm_transformers import read_video_pyav
from storm_transformers.training.data import check_conversation
from storm_transformers.training.synthetic import (
    COLORS,
    NUM_FRAMES,
    QUESTION_TYPES,
    SHAPES,
    SIZE,
    TEMPORAL_TYPES,
    generate_dataset,
    make_clip,
    runs_pattern,
    shape_mask,
)


def clips(question_type: str, count: int = 40):
    for index in range(count):
        yield make_clip(question_type, np.random.default_rng([7, index]))


def colour_mask(frame: np.ndarray, colour: str) -> np.ndarray:
    return np.all(frame == np.array(COLORS[colour], dtype=np.uint8), axis=-1)


def named_colour(question: str) -> str:
    return next(colour for colour in COLORS if f" {colour} " in question)


def test_direction_answer_is_the_way_the_shape_moves():
    for frames, question, answer in clips("direction"):
        mask = colour_mask(frames, named_colour(question))  # (T, H, W)
        ys, xs = zip(*(np.argwhere(m).mean(0) for m in mask))
        dx, dy = xs[-1] - xs[0], ys[-1] - ys[0]
        moved = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
        assert moved == answer
        assert max(abs(dx), abs(dy)) > 25  # pixels over the 8 frames: a clear motion


def test_count_answer_is_the_number_of_separate_appearances():
    for frames, question, answer in clips("count"):
        visible = colour_mask(frames, named_colour(question)).any(axis=(1, 2)).astype(int)
        assert visible.sum() == NUM_FRAMES // 2  # the same number of visible frames for every count
        assert int(visible[0]) + int((np.diff(visible) == 1).sum()) == int(answer)


def test_runs_pattern_has_the_requested_runs():
    rng = np.random.default_rng(0)
    for runs in (1, 2, 3):
        frames = runs_pattern(rng, runs)
        assert len(frames) == 4 and sum(1 for i, f in enumerate(frames) if i == 0 or f != frames[i - 1] + 1) == runs


def test_order_answer_is_the_shape_seen_first():
    for frames, question, answer in clips("order"):
        first_seen = {}
        for colour in COLORS:
            if f" {colour} " in question:
                shape = question.split(f" {colour} ")[1].split()[0].strip("?")
                first_seen[shape] = int(np.argmax(colour_mask(frames, colour).any(axis=(1, 2))))
        assert len(first_seen) == 2 and min(first_seen, key=first_seen.get) == answer
        assert len(set(first_seen.values())) == 2  # never at the same time


def test_change_answer_is_the_colour_of_the_second_half():
    for frames, question, answer in clips("change"):
        half = NUM_FRAMES // 2
        assert colour_mask(frames[half:], answer).any(axis=(1, 2)).all()
        assert not colour_mask(frames[:half], answer).any()


def test_temporal_events_average_away_inside_one_window():
    """At k = 8 the whole clip is one pooling window: X→Y and Y→X colour changes have the same average frame."""
    frames, _, _ = make_clip("change", np.random.default_rng([3, 0]))
    assert frames.shape == (NUM_FRAMES, SIZE, SIZE, 3)
    swapped = np.concatenate([frames[NUM_FRAMES // 2 :], frames[: NUM_FRAMES // 2]])
    np.testing.assert_array_equal(frames.mean(0), swapped.mean(0))


def test_dataset_is_seeded_real_h264_and_in_the_training_format(tmp_path):
    sizes = {"train": 12, "test": 12}
    files = generate_dataset(tmp_path / "a", sizes, seed=5)
    again = generate_dataset(tmp_path / "b", {"test": 12}, seed=5, workers=2)  # the result does not depend on workers
    assert files["test"].read_text() == again["test"].read_text()
    rows = {split: [json.loads(line) for line in files[split].read_text().splitlines()] for split in sizes}
    assert {len(r) for r in rows.values()} == {12}
    for row in rows["test"]:
        check_conversation(row["messages"])
        assert row["question_type"] in QUESTION_TYPES and row["temporal"] == (row["question_type"] in TEMPORAL_TYPES)
    relative = rows["test"][0]["messages"][0]["content"][0]["path"]
    frames, metadata = read_video_pyav(str(tmp_path / "a" / relative))  # every frame
    assert tuple(frames.shape) == (NUM_FRAMES, SIZE, SIZE, 3) and metadata.total_num_frames == NUM_FRAMES
    np.testing.assert_array_equal(frames, read_video_pyav(str(tmp_path / "b" / relative))[0])
    train_frames, _ = read_video_pyav(str(tmp_path / "a" / rows["train"][0]["messages"][0]["content"][0]["path"]))
    assert not np.array_equal(frames, train_frames)  # clip 0 of each split comes from a different seed


def test_unknown_split_is_refused(tmp_path):
    with pytest.raises(ValueError, match="Unknown split 'dev'"):
        generate_dataset(tmp_path, {"dev": 1})


@pytest.mark.parametrize("question_type", QUESTION_TYPES)
def test_longer_clips_tell_the_same_story_beat_by_beat(question_type):
    """32 frames = the 8 beats, each 4 frames long: same question and answer from the same seed; every frame of a beat
    equals the 8-frame clip's frame, except a moving shape, which moves in 4× smaller steps along the same path."""
    for index in range(10):
        short, question, answer = make_clip(question_type, np.random.default_rng([11, index]))
        long, long_question, long_answer = make_clip(question_type, np.random.default_rng([11, index]), 32)
        assert long.shape == (32, SIZE, SIZE, 3) and (long_question, long_answer) == (question, answer)
        if question_type != "direction":
            np.testing.assert_array_equal(long, np.repeat(short, 4, axis=0))
            continue
        mask = colour_mask(long, named_colour(question))  # (32, H, W)
        centres = np.array([np.argwhere(m).mean(0) for m in mask])  # (32, 2) as (y, x)
        steps = np.abs(np.diff(centres, axis=0)).max(axis=1)  # pixels per frame along the motion
        short_steps = np.abs(np.diff([np.argwhere(m).mean(0) for m in colour_mask(short, named_colour(question))],
                                     axis=0)).max(axis=1)
        assert steps.mean() == pytest.approx(short_steps.mean() * 7 / 31, rel=0.15)
        np.testing.assert_array_equal(long[0], short[0])
        np.testing.assert_array_equal(long[-1], short[-1])


@pytest.mark.parametrize("num_frames", [0, 4, 12])
def test_clip_length_must_be_whole_beats(num_frames):
    with pytest.raises(ValueError, match=f"num_frames={num_frames} must be a positive multiple of 8"):
        make_clip("count", np.random.default_rng(0), num_frames)


def test_shifted_clips_change_the_nuisances_not_the_questions():
    """Shifted clips (the generalisation check of docs/miniature.md): other backgrounds, radii 6 or 10 instead of 8,
    slower motion; questions and answers drawn as before and still true of the frames."""
    areas = {radius: {int(shape_mask(shape, 32, 32, radius).sum()) for shape in SHAPES} for radius in (6, 8, 10)}
    radii, speeds = set(), []
    for index in range(30):
        frames, question, answer = make_clip("shape", np.random.default_rng([5, index]), shifted=True)
        area = int(colour_mask(frames[0], named_colour(question)).sum())
        radii |= {radius for radius, sizes in areas.items() if area in sizes}
        frames, question, answer = make_clip("direction", np.random.default_rng([5, index]), shifted=True)
        centres = np.array([np.argwhere(m).mean(0) for m in colour_mask(frames, named_colour(question))])
        move = centres[-1] - centres[0]
        axis = int(np.argmax(np.abs(move)))
        assert answer == {(0, 1): "down", (0, -1): "up", (1, 1): "right", (1, -1): "left"}[axis, int(np.sign(move[axis]))]
        speeds.append(np.abs(move).max() / 7)
    assert radii == {6, 10}
    assert 2.8 < min(speeds) and max(speeds) < 4.2  # px per frame; the training clips move 4.5-5.5


def test_one_nuisance_factor_can_be_shifted_alone():
    """`shifted=("size",)` draws the shifted radii on a training background, `("background",)` the other textures
    at radius 8 (each background is the one the unshifted / fully shifted clip of that seed draws: it comes first)."""
    areas = {radius: {int(shape_mask(shape, 32, 32, radius).sum()) for shape in SHAPES} for radius in (6, 8, 10)}
    radii = set()
    for index in range(12):
        clips = {shifts: make_clip("shape", np.random.default_rng([7, index]), shifted=shifts)
                 for shifts in ((), ("size",), ("background",), True)}
        first = {key: frames[0] for key, (frames, _, _) in clips.items()}
        shape = {key: colour_mask(first[key], named_colour(question)) for key, (_, question, _) in clips.items()}
        outside = ~np.logical_or.reduce(list(shape.values()))
        assert (first[("size",)][outside] == first[()][outside]).all()
        assert (first[("background",)][outside] == first[True][outside]).all()
        assert (first[("background",)][outside] != first[()][outside]).any()
        assert int(shape[("background",)].sum()) in areas[8]
        radii |= {radius for radius in (6, 10) if int(shape[("size",)].sum()) in areas[radius]}
    assert radii == {6, 10}


def test_unknown_nuisance_factor_is_refused():
    with pytest.raises(ValueError, match="unknown nuisance factors; use True, False or some of"):
        make_clip("shape", np.random.default_rng(0), shifted=("colour",))


def test_question_weights_set_the_mix_of_a_split(tmp_path):
    uniform = generate_dataset(tmp_path / "uniform", {"train": 30}, seed=5)["train"].read_text().splitlines()
    weighted = generate_dataset(tmp_path / "weighted", {"train": 30}, seed=5,
                                question_weights={"direction": 3, "count": 1})["train"].read_text().splitlines()
    kinds = [json.loads(line)["question_type"] for line in weighted]
    assert set(kinds) == {"direction", "count"} and kinds.count("direction") > kinds.count("count")
    assert len({json.loads(line)["question_type"] for line in uniform}) > 2
    for bad in ({"speed": 1}, {"direction": -1, "count": 2}, {"direction": 0}):
        with pytest.raises(ValueError, match="question_weights"):
            generate_dataset(tmp_path / "bad", {"train": 1}, question_weights=bad)
