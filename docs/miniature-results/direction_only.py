# Run on one H200 (2026-12-02) as `python docs/miniature-results/direction_only.py 1000` with PyAV, datasets and TRL
# installed and the Qwen2 tokenizer converted to /tmp/qwen2-tokenizer (what `miniature.main` writes to <output>/qwen2-tokenizer).
"""Can the miniature learn `direction` at all when it is all it is taught? bi-k4 from scratch with the stage-0 tower
(frozen), alignment 50 steps, SFT on direction clips only; greedy accuracy on the test split's direction clips."""
import json
import sys
import time
from pathlib import Path

from storm_transformers import kernels

kernels.COMPILE_REGIONS = False
from storm_transformers.training import miniature as m
from storm_transformers.training.synthetic import generate_dataset

out, t0 = Path("/tmp/dexp"), time.time()
def log(message):
    print(f"[{time.time() - t0:5.0f} s] {message}", flush=True)
data = out / "data"
generate_dataset(data, {"train": 6000, "test": 600}, seed=0, workers=16)
for split in ("train", "test"):
    rows = [json.loads(line) for line in (data / f"{split}.jsonl").read_text().splitlines()]
    keep = [row for row in rows if row["question_type"] == "direction"]
    (data / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in keep))
    log(f"{split}: {len(keep)} direction clips")
tokenizer = Path("/tmp/qwen2-tokenizer")
tower, _ = m.pretrain_vision(out, tokenizer, 0, 1500, log)
m.build_initial(out / "runs" / "bi-k4-seed0" / "init", tokenizer, "bi-k4", 0, tower)
folder = m.train("bi-k4", 0, out, data, {"alignment": 50, "sft": int(sys.argv[1])}, 12, log)
for split in ("test", "train"):
    scores = m.evaluate(folder, data, split=split, limit=300)
    log(f"{split}: {scores['by type']} answer loss {scores['answer loss by type']}")
