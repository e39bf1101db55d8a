# Run on the shared 2-core CPU machine as `python docs/miniature-results/shifted_shape.py [CHECKPOINT [OUT]]` (~2 min
# alone; defaults: the shipped checkpoint, docs/miniature-results/shifted-shape.json); prints a table and writes OUT.
# shifted-shape.json: the checkpoint shipped until 2026-12-03 (stage 0 at 8 px), 2026-12-02, with this script as of
# commit 3995e17 (its "other backgrounds only" clips drew one more number per clip); shifted-shape-stage0-5-10.json:
# the checkpoint shipped since (stage 0 at 5–10 px), 2026-12-03.
"""Where does the shipped checkpoint lose `shape` on the shifted clips (48%, against 93% on the test split)?

A linear probe (the one `miniature.representation` uses) is fitted on clean `shape` clips and scored on held-out
clips rendered four ways: as in training; with the shifted clips' other shape sizes only (radius 6 or 10 px instead
of 8); with their other background textures only; with both (the shifted clips). Two readouts: the projector's tokens
of the first frame `(16, 48)` (what the stage-0 vision tower and the projector give) and the visual tokens the LLM
receives `(2, 16, 48)` (after the temporal encoder and k = 4 pooling); beside them, the shipped model's own greedy
answers. If the probe holds where the answers fail, the LLM's reading is what does not transfer; if the probe fails
too, the tower's features do not."""
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import storm_transformers  # noqa: F401
from storm_transformers.training import synthetic
from storm_transformers.training.miniature import _linear_probe

torch.set_num_threads(2)
SHIPPED = Path(__file__).resolve().parents[2] / "checkpoints" / "storm-tiny-synthetic"
CHECKPOINT = Path(sys.argv[1]) if len(sys.argv) > 1 else SHIPPED
OUT = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).with_name("shifted-shape.json")
FIT, TEST = 1000, 300
model = AutoModelForImageTextToText.from_pretrained(CHECKPOINT, dtype=torch.float32).eval()
processor = AutoProcessor.from_pretrained(CHECKPOINT)


def clips(count: int, seed: int, shifted=()):
    """`count` shape clips, `(count, 8, 64, 64, 3)` uint8, their questions and answers, with the nuisance factors
    `shifted` (`make_clip`: "size", "background") as in the shifted clips and the others as in training."""
    rng = np.random.default_rng([11, seed])
    frames, questions, answers = zip(*(synthetic.make_clip("shape", rng, shifted=shifted) for _ in range(count)))
    return list(frames), list(questions), list(answers)


def readouts(frames, questions):
    """Projector tokens of frame 0 `(B, 16·48)`, the LLM's visual tokens `(B, 2·16·48)` and the greedy answers, with
    the clips written as H.264 MP4 and read back, and the prompts built as `miniature.evaluate` builds them."""
    with tempfile.TemporaryDirectory() as folder:
        conversations = []
        for index, (clip, question) in enumerate(zip(frames, questions)):
            path = Path(folder) / f"{index}.mp4"
            synthetic.write_mp4(path, clip)
            conversations.append([{"role": "user", "content": [{"type": "video", "path": str(path)},
                                                                {"type": "text", "text": question}]}])
        inputs = processor.apply_chat_template(
            conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
            processor_kwargs={"num_frames": processor.video_processor.num_frames, "padding": True,
                              "padding_side": "left"},
        )
    pixels = inputs["pixel_values_videos"]  # (B, 8, 3, 64, 64)
    with torch.inference_mode():
        projected = model.model._frame_tokens(pixels[:, 0])  # (B, 16, 48)
        visual = model.model.get_video_features(pixels).pooler_output  # (B, 32, 48)
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    answers = processor.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return projected.flatten(1), visual.flatten(1), [answer.strip().lower() for answer in answers]


fit_frames, fit_questions, fit_labels = clips(FIT, 0)
fit_projected, fit_visual, _ = readouts(fit_frames, fit_questions)
rows = {}
for name, shifted in [("as in training", ()), ("other sizes only", ("size",)),
                      ("other backgrounds only", ("background",)), ("shifted (both)", ("size", "background"))]:
    frames, questions, labels = clips(TEST, 1, shifted)
    projected, visual, answers = readouts(frames, questions)
    rows[name] = {
        "probe, projector tokens": round(_linear_probe(fit_projected, fit_labels, projected, labels), 4),
        "probe, LLM input": round(_linear_probe(fit_visual, fit_labels, visual, labels), 4),
        "model's answers": round(float(np.mean([a == b for a, b in zip(answers, labels)])), 4),
        "answers given": {answer: answers.count(answer) for answer in sorted(set(answers))},
    }
    print(name, rows[name], flush=True)
OUT.write_text(json.dumps({"command": " ".join(sys.argv), "fit clips": FIT, "test clips": TEST, "rows": rows},
                          indent=1) + "\n")
columns = ["probe, projector tokens", "probe, LLM input", "model's answers"]
print("\n| shape clips | " + " | ".join(columns) + " |\n|---|---|---|---|")
for name, row in rows.items():
    print(f"| {name} | " + " | ".join(f"{100 * row[column]:.1f}%" for column in columns) + " |")
