# Run on the shared 2-core CPU machine as `python docs/miniature-results/probes.py OUT CHECKPOINT...` (141 s for two
# checkpoints); prints each checkpoint's report and writes them to OUT. count-probes.json: the shipped checkpoint and
# seed 0 of `--curriculum direction count --curriculum-steps 1200` (its export, not kept), 2026-12-03.
"""`miniature.representation` of saved checkpoints on clips regenerated here: the first 1200 training clips at
`TRAIN_MIX` (data seed 0) to fit the probes on, the 600 test clips to score them on. Its count probes came after the
runs of docs/miniature.md; this gives them for checkpoints already trained."""
import json
import sys
import tempfile
from pathlib import Path

import torch

from storm_transformers.training import miniature

if __name__ == "__main__":
    torch.set_num_threads(2)
    out, checkpoints = Path(sys.argv[1]), sys.argv[2:]
    with tempfile.TemporaryDirectory() as folder:
        data = miniature.prepare_data(Path(folder), [
            {"sizes": {"train": 1200}, "seed": 0, "question_weights": dict(miniature.TRAIN_MIX)},
            {"sizes": {"test": miniature.DATA_SIZES["test"]}, "seed": 0}])
        reports = {}
        for checkpoint in checkpoints:
            reports[checkpoint] = miniature.representation(Path(checkpoint), data, device="cpu")
            print(checkpoint, reports[checkpoint], flush=True)
    out.write_text(json.dumps(reports, indent=1) + "\n")
