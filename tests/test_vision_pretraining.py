"""Stage 0 for STORMs trained from scratch (storm_transformers.training.vision_pretraining): the labelled frames say
what they show, and the stage trains the vision tower and nothing else."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoProcessor

from storm_transformers import StormForConditionalGeneration
from storm_transformers.training.synthetic import COLORS, SHAPES, shape_mask
from storm_transformers.training.vision_pretraining import NUM_OBJECTS, labelled_frame, pretrain_vision_tower
from tests.storm_testing import tiny_config

SHIPPED = Path(__file__).parent.parent / "checkpoints" / "storm-tiny-synthetic"
PATCH = 8


@pytest.mark.parametrize("radii", [(8, 8), (5, 10)])
def test_labels_are_what_the_frame_shows(radii):
    rng = np.random.default_rng(0)
    counts, areas = set(), set()
    for _ in range(60):
        frame, patches, present, centre = labelled_frame(rng, PATCH, radii)
        assert frame.shape == (64, 64, 3) and patches.shape == (64,) and present.shape == (NUM_OBJECTS,)
        counts.add(int(present.sum()))
        for cls in np.flatnonzero(present):
            shape, colour = SHAPES[cls // len(COLORS)], list(COLORS)[cls % len(COLORS)]
            painted = np.all(frame == COLORS[colour], axis=-1)  # (64, 64) pixels of that object
            areas.add((shape, int(painted.sum())))
            coverage = painted.reshape(8, PATCH, 8, PATCH).sum(axis=(1, 3)).reshape(-1)  # (64,) per patch
            np.testing.assert_array_equal(patches == 1 + cls, coverage * 4 >= PATCH**2)
            if present.sum() == 1:
                ys, xs = np.nonzero(painted)
                # the centre of a circle or square is its centroid; a triangle's lies 1-2 px above it
                assert math.dist(centre * 64, (xs.mean(), ys.mean())) < (3 if shape == "triangle" else 1)
        if present.sum() != 1:
            assert np.isnan(centre).all()
        assert set(np.unique(patches)) <= {0, *(1 + np.flatnonzero(present))}
    assert counts == {0, 1, 2}
    drawn = {radius for radius in range(1, 12) for shape in SHAPES
             if (shape, int(shape_mask(shape, 32, 32, radius).sum())) in areas}
    assert drawn == set(range(radii[0], radii[1] + 1))  # every radius of the range, and no other


def test_stage_zero_trains_the_vision_tower_only():
    torch.manual_seed(0)
    model = StormForConditionalGeneration(tiny_config(image_size=64)).float()
    processor = AutoProcessor.from_pretrained(SHIPPED)  # its video processor: 64 px frames
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    history = pretrain_vision_tower(model, processor, max_steps=30, batch_size=16, num_workers=0, log_every=10,
                                    log=lambda message: None)
    assert [entry["step"] for entry in history] == [10, 20, 30]
    assert history[-1]["patch"] < 0.7 * history[0]["patch"]  # it learns what covers each patch
    changed = {name for name, tensor in model.state_dict().items() if not torch.equal(tensor, before[name])}
    assert changed and all(name.startswith("model.vision_tower.") for name in changed)
    assert not model.model.vision_tower.training


def test_stage_zero_refuses_no_steps():
    model = StormForConditionalGeneration(tiny_config(image_size=64))
    with pytest.raises(ValueError, match="max_steps=0 and batch_size=16 must be at least 1"):
        pretrain_vision_tower(model, AutoProcessor.from_pretrained(SHIPPED), max_steps=0, batch_size=16)


@pytest.mark.parametrize("radii", [(0, 8), (9, 8), (5, 11)])
def test_stage_zero_refuses_radii_that_do_not_fit(radii):
    model = StormForConditionalGeneration(tiny_config(image_size=64))
    with pytest.raises(ValueError, match=r"must be \(smallest, largest\) px with 1 ≤ smallest ≤ largest ≤ 10"):
        pretrain_vision_tower(model, AutoProcessor.from_pretrained(SHIPPED), radii=radii)
