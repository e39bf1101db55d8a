# Run on the shared 2-core CPU machine (2026-12-03, torch 2.14.1) as `python docs/miniature-results/stage0_sizes.py
# 1500 128` (the stage-0 steps and frames per step of each tower: stage 0's defaults; 755 s and 812 s of stage 0; on a
# GPU where there is one); prints a table and writes docs/miniature-results/stage0-sizes.json. Only the shipped
# checkpoint's configuration and processor are read. stage0-sizes.json came from this script as of commit b1af67e,
# which drew the 5–10 px radii from a generator of their own and placed objects as for radius 10; since fa8a9fb it
# uses stage 0's `radii` option (each object's radius from the frame's generator, placed for its own size).
"""Does a stage-0 tower that sees shapes of several sizes keep `shape` on the shifted clips' sizes?

`shifted_shape.py` finds the shipped checkpoint's shape features lost at the shifted clips' shape sizes (radius 6 or
10 px; stage 0 and the QA clips draw radius 8 only). Here two vision towers of the miniature's size are pretrained
from the same random initialisation with the same stage-0 steps (`vision_pretraining.pretrain_vision_tower`, one
process): one on frames as stage 0 draws them (radius 8), one with every object's radius drawn from 5–10
px (the sizes a pretrained SigLIP has seen; this range includes the shifted sizes). A linear probe (as
`miniature.representation`'s) reads the shape from the first frame's vision hidden state `(64, 96)` of `shape` clips:
fitted on 1000 clips as in training, scored on 300 held-out clips as in training and with the shifted sizes; and,
to tell features that lose the shape from a reading that does not transfer, fitted on 1000 clips with the shifted
sizes and scored on the 300 held-out ones."""
import json
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel

from storm_transformers import StormConfig, StormForConditionalGeneration, StormProcessor
from storm_transformers.modeling_storm import vision_hidden_state
from storm_transformers.training import synthetic, vision_pretraining
from storm_transformers.training.miniature import _linear_probe

torch.set_num_threads(2)
CHECKPOINT = Path(__file__).resolve().parents[2] / "checkpoints" / "storm-tiny-synthetic"
STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 1500
BATCH = int(sys.argv[2]) if len(sys.argv) > 2 else 128
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
model = StormForConditionalGeneration(StormConfig.from_pretrained(CHECKPOINT)).eval()  # the tower is replaced
processor = StormProcessor.from_pretrained(CHECKPOINT)
layer = model.config.vision_feature_layer


def shape_clips(count: int, seed: int, sizes: bool):
    """First frames of `count` shape clips `(count, 3, 64, 64)` as the video processor prepares them, and the
    shapes; `sizes`: the shifted clips' radii (6 or 10 px), on the training backgrounds."""
    rng = np.random.default_rng([11, seed])
    frames, _, answers = zip(*(synthetic.make_clip("shape", rng, shifted=("size",) if sizes else ())
                               for _ in range(count)))
    pixels = processor.video_processor(videos=[np.stack([clip[0] for clip in frames])], do_sample_frames=False,
                                       return_tensors="pt")["pixel_values_videos"][0]  # (count, 3, 64, 64)
    return pixels, list(answers)


def pretrained_tower(radii):
    """A fresh tower (seed 0) after `STEPS` stage-0 steps with shape radii drawn from `radii` px."""
    torch.manual_seed(0)
    model.model.vision_tower = AutoModel.from_config(model.config.vision_config).to(DEVICE)
    return vision_pretraining.pretrain_vision_tower(model, processor, max_steps=STEPS, batch_size=BATCH, radii=radii,
                                                    num_workers=0, log_every=100)


def features(pixels):  # (F, 3, 64, 64) → (F, 64·96)
    with torch.inference_mode():
        return vision_hidden_state(model.model.vision_tower, pixels.to(DEVICE), layer).flatten(1).cpu()


fit, fit_labels = shape_clips(1000, 0, sizes=False)
shifted_fit, shifted_fit_labels = shape_clips(1000, 2, sizes=True)
tests = {"as in training": shape_clips(300, 1, sizes=False), "shifted sizes (6, 10 px)": shape_clips(300, 1, sizes=True)}
rows = {}
for name, radii in [("stage 0 as shipped (radius 8)", (8, 8)), ("stage 0, radii 5–10 px", (5, 10))]:
    history = pretrained_tower(radii)
    train = features(fit)
    rows[name] = {"history": history, **{
        test: round(_linear_probe(train, fit_labels, features(pixels), labels), 4)
        for test, (pixels, labels) in tests.items()}}
    pixels, labels = tests["shifted sizes (6, 10 px)"]
    rows[name]["shifted sizes, probe fitted on them"] = round(
        _linear_probe(features(shifted_fit), shifted_fit_labels, features(pixels), labels), 4)
    print(name, {key: value for key, value in rows[name].items() if key != "history"}, flush=True)
out = Path(__file__).with_name("stage0-sizes.json")
out.write_text(json.dumps({"command": " ".join(sys.argv), "steps": STEPS, "batch": BATCH, "rows": rows}, indent=1)
               + "\n")
columns = [*tests, "shifted sizes, probe fitted on them"]
print(f"\n| tower ({STEPS} stage-0 steps of {BATCH} frames) | shape probe: " + " | ".join(columns) + " |\n|---|---|---|---|")
for name, row in rows.items():
    print(f"| {name} | " + " | ".join(f"{100 * row[column]:.1f}%" for column in columns) + " |")
