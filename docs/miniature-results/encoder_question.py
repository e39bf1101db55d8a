# Run on the shared 2-core CPU machine as `python docs/miniature-results/encoder_question.py [TYPE]` (TYPE: direction,
# the default, or count, order, change); prints a table and writes docs/miniature-results/encoder-TYPE.json.
# encoder-direction.json: 2026-12-02, 2910 s, this script as `encoder_direction.py` (commit 3995e17), with the
# checkpoint then shipped (stage 0 at 8 px). encoder-count.json: 2026-12-03, with the checkpoint shipped since.
"""Can the temporal encoder carry `direction` (or another temporal question: TYPE) through temporal pooling when the
loss asks it to directly?

At k = 8 every miniature run answers direction at chance and its LLM input does not carry it (probe 33–45%,
docs/miniature.md). That is either capacity (2 Mamba layers of width 48 cannot write motion into the one pooled
frame) or optimisation (nothing but the LLM's loss asks them to, and the LLM sits at chance). This separates the two
without an LLM: the shipped checkpoint's stage-0 vision tower and projector (frozen) give each clip's projected
tokens `(8, 16, 48)`; a fresh temporal encoder of the miniature's size (2 layers, state 16), then temporal pooling,
then one Linear on the pooled tokens (flattened) is trained with cross-entropy on the answer. The same head without
an encoder is the control (what `linear-k8` can read). Fresh clips of TYPE from the generator (seed stream 7, never
written to disk); accuracy on 400 held-out clips."""
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import storm_transformers  # noqa: F401
from storm_transformers import StormTemporalEncoder, StormTemporalEncoderConfig
from storm_transformers.modeling_storm import temporal_pool
from storm_transformers.training.synthetic import COLORS, DIRECTIONS, SHAPES, make_clip

torch.set_num_threads(2)
CHECKPOINT = Path(__file__).resolve().parents[2] / "checkpoints" / "storm-tiny-synthetic"
TRAIN, TEST, STEPS, BATCH = 2000, 400, 800, 32
QUESTION = sys.argv[1] if len(sys.argv) > 1 else "direction"
ANSWERS = {"direction": list(DIRECTIONS), "count": ["1", "2", "3"], "order": list(SHAPES), "change": list(COLORS)}
# (name, Mamba layers, bidirectional, k, seeds): the scan runs in torch on the CPU (~1 s a step), so one seed per
# encoder row; the head alone is cheap.
ROWS = [("no encoder, k=8", 0, True, 8, 3), ("no encoder, k=4", 0, True, 4, 3), ("bi, k=8", 2, True, 8, 1),
        ("uni, k=8", 2, False, 8, 1) if QUESTION == "direction" else ("bi, k=4", 2, True, 4, 1)]
t0 = time.time()


def log(message):
    print(f"[{time.time() - t0:5.0f} s] {message}", flush=True)


def summary(runs: list[dict]) -> str:
    accuracies = [100 * run["final test accuracy"] for run in runs]
    if len(accuracies) == 1:
        return f"{accuracies[0]:.1f}% (1 seed)"
    return f"{statistics.mean(accuracies):.1f} ± {statistics.stdev(accuracies):.1f}% ({len(accuracies)} seeds)"


def projected_tokens(count: int, seed: int):
    """`count` clips of `QUESTION` → the frozen projector's tokens `(count, 8, 16, 48)` and labels `(count,)`."""
    rng = np.random.default_rng([7, seed])
    clips, labels = [], []
    for _ in range(count):
        frames, _, answer = make_clip(QUESTION, rng)  # (8, 64, 64, 3) uint8
        clips.append(frames)
        labels.append(ANSWERS[QUESTION].index(answer))
    pixels = processor.video_processor(videos=clips, return_tensors="pt")["pixel_values_videos"]  # (B, 8, 3, 64, 64)
    with torch.inference_mode():
        tokens = model.model._frame_tokens(pixels.flatten(0, 1))  # (B·8, 16, 48)
    return tokens.unflatten(0, pixels.shape[:2]).clone(), torch.tensor(labels)


def run(layers: int, bidirectional: bool, k: int, seed: int, train, test) -> dict:
    torch.manual_seed(seed)
    (x, y), (x_test, y_test) = train, test
    frames, tokens, width = x.shape[1:]
    encoder = None
    if layers:
        config = StormTemporalEncoderConfig(hidden_size=width, num_hidden_layers=layers, bidirectional=bidirectional,
                                            state_size=16)
        encoder = StormTemporalEncoder(config)
    head = torch.nn.Linear(frames // k * tokens * width, len(ANSWERS[QUESTION]))
    parameters = list(head.parameters()) + (list(encoder.parameters()) if encoder else [])
    optimizer = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=0.01)

    def logits(batch):  # (B, 8, 16, 48) → (B, answers)
        if encoder is not None:
            batch = encoder(batch.flatten(1, 2)).view(batch.shape)  # (B, 8·16, 48) scanned (t, row, col)
        return head(temporal_pool(batch, k).flatten(1))  # (B, 8/k, 16, 48) → (B, answers)

    curve = []
    generator = torch.Generator().manual_seed(seed)
    for step in range(1, STEPS + 1):
        index = torch.randint(len(x), (BATCH,), generator=generator)
        loss = torch.nn.functional.cross_entropy(logits(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            with torch.no_grad():
                accuracy = (logits(x_test).argmax(-1) == y_test).float().mean().item()
            curve.append({"step": step, "loss": round(loss.item(), 4), "test accuracy": round(accuracy, 4)})
    return {"final test accuracy": curve[-1]["test accuracy"], "curve": curve}


model = AutoModelForImageTextToText.from_pretrained(CHECKPOINT, dtype=torch.float32).eval()
processor = AutoProcessor.from_pretrained(CHECKPOINT)
train, test = projected_tokens(TRAIN, 0), projected_tokens(TEST, 1)
log(f"tokens: train {tuple(train[0].shape)}, test {tuple(test[0].shape)}")
results = {}
for name, layers, bidirectional, k, seeds in ROWS:
    results[name] = [run(layers, bidirectional, k, seed, train, test) for seed in range(seeds)]
    log(f"{name}: {summary(results[name])}; curve of seed 0: {results[name][0]['curve']}")
out = Path(__file__).with_name(f"encoder-{QUESTION}.json")
out.write_text(json.dumps({"command": " ".join(sys.argv), "question": QUESTION, "train clips": TRAIN,
                           "test clips": TEST, "steps": STEPS, "batch": BATCH, "results": results}, indent=1) + "\n")
print(f"\n| row | {QUESTION} accuracy, held out |\n|---|---|")
for name in results:
    print(f"| {name} | {summary(results[name])} |")
