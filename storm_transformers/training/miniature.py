"""The paper's core claim in miniature: tiny STORMs trained on synthetic video QA (`synthetic.py`).

One command runs everything (the data are generated on the spot, seeded; the runs are bound by video decoding and
need the 16 CPU cores of a GPU machine):

```bash
python -m storm_transformers.training.miniature --output runs/miniature --seeds 0 \
    --export bi-k4 0 checkpoints/storm-tiny-synthetic
```

For every seed (all seeds at once) it first trains a vision tower on labelled single frames (stage 0,
`vision_pretraining.py`: the stand-in for the paper's pretrained SigLIP; 1–2 minutes on an H200). Then for every
configuration below it builds a random tiny STORM (a SigLIP-architecture encoder, the temporal encoder and a
Qwen2-architecture LLM, all from scratch, with the real Qwen2 tokenizer), puts that tower in, and trains it with the
project's recipe (`sft.py`: stage 1 alignment, then SFT with the tower frozen; `--vision-steps 0` skips stage 0 and
trains the tower end to end instead; stage 0 shows shapes of radius 5–10 px, `--vision-radii 8 8` only the QA clips' 8;
`--curriculum direction` puts an SFT stage on the direction questions alone before SFT on the whole split, which is how
the shipped `bi-k4` learned direction: docs/miniature.md). Each run is evaluated with greedy answers on the test split
by question type (32-frame configurations also with test-time temporal sampling s = 2), on shifted test clips (other
backgrounds, shape sizes and speeds), with linear probes of its visual tokens (`representation`), and at `CURVE_POINTS`
points along SFT on the validation split (per-type learning curves), in processes of their own beside the training
runs. Same data, steps and seeds for every row; the training split asks more of the question types learned late
(`TRAIN_MIX`, `--train-mix`), the test split is uniform. On one H200 (16 cores) the seven key configurations of one
seed took 459–489 s (`--parallel 7`, the default; 2026-12-03, commit 9522891: docs/miniature.md, "Results").
Results: `<output>/results.json` and `<output>/results.md`; checkpoints under `<output>/runs/<config>-seed<seed>/sft`;
the clips under `<output>/data*`, reused by a later run with the same data arguments.

| config | temporal encoder | temporal pooling k | clip frames | paper's counterpart |
|---|---|---|---|---|
| `linear-k4`, `linear-k8` | none (Linear projector only) | 4, 8 | 8 | VILA + T.Pool |
| `uni-k4`, `uni-k8` | 2 uni-directional Mamba layers | 4, 8 | 8 | STORM uni-directional (Table 7) |
| `bi-k4`, `bi-k8` | 2 bidirectional Mamba layers | 4, 8 | 8 | STORM + T.Pool |
| `bi-k1` | 2 bidirectional Mamba layers | 1 (no pooling) | 8 | STORM |
| `linear-k4-32f`, `bi-k4-32f` | none / 2 bidirectional | 4, then s = 1 or 2 | 32 | VILA / STORM + T.Pool + T.Sampling |

Clips have 8 beats, so at k = 8 on 8 frames every event happens inside one pooling window; 32-frame clips stretch each
beat over 4 frames. `uni-k4` and `bi-k1` are not in the default `--configs` (`KEY_CONFIGS`).
"""

import argparse
import functools
import json
import math
import multiprocessing
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

from .synthetic import CHANCE, RADIUS, TEMPORAL_TYPES
from .vision_pretraining import STAGE0_RADII, STAGE0_STEPS, check_radii, pretrain_checkpoint

CONFIGS = {
    "linear-k4": {"layers": 0, "bidirectional": True, "k": 4, "frames": 8},
    "linear-k8": {"layers": 0, "bidirectional": True, "k": 8, "frames": 8},
    "uni-k4": {"layers": 2, "bidirectional": False, "k": 4, "frames": 8},
    "uni-k8": {"layers": 2, "bidirectional": False, "k": 8, "frames": 8},
    "bi-k4": {"layers": 2, "bidirectional": True, "k": 4, "frames": 8},
    "bi-k8": {"layers": 2, "bidirectional": True, "k": 8, "frames": 8},
    "bi-k1": {"layers": 2, "bidirectional": True, "k": 1, "frames": 8},
    # (d): 32-frame clips (each of the 8 beats lasts 4 frames), k = 4 → 8 pooled frames, evaluated at s = 1 and 2.
    "linear-k4-32f": {"layers": 0, "bidirectional": True, "k": 4, "frames": 32},
    "bi-k4-32f": {"layers": 2, "bidirectional": True, "k": 4, "frames": 32},
}
KEY_CONFIGS = ("linear-k4", "linear-k8", "uni-k8", "bi-k8", "bi-k4", "linear-k4-32f", "bi-k4-32f")
DATA_SIZES = {"train": 6000, "validation": 300, "test": 600}
CURVE_POINTS = 8  # SFT checkpoints per run whose validation answers give the per-type learning curves
# Question types of the training split, relative frequencies (the validation and test splits stay uniform): more of
# the types whose answer the LLM learns late. Alone, `direction` needs ~550 SFT steps of 16 clips to leave its loss
# plateau (docs/miniature-results/direction_only.py); a uniform sixth of 2000 steps gives it ~330.
TRAIN_MIX = {"direction": 3, "order": 2, "count": 2, "change": 1, "color": 1, "shape": 2}
SHIFTED_DATA_SEED = 1000  # added to the data seed: the shifted test clips come from another seed stream
LOAD_LOCK = threading.Lock()  # transformers' model building/loading is not safe from several threads at once
HIDDEN = 48  # LLM and temporal-encoder width: the 152k-row Qwen2 embedding dominates the size (≈ 31 MB in float32)


def miniature_config(layers: int, bidirectional: bool, k: int, vocab_size: int, image_token_id: int, video_token_id: int):
    """The tiny STORM: SigLIP 64 px / patch 8 (4 layers, width 96) → 16 tokens per frame after the 2×2 downsample →
    `layers` Mamba layers of width 48 → temporal pooling k → Qwen2 (2 layers, width 48, tied embeddings)."""
    from storm_transformers import StormConfig

    return StormConfig(
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": 96,
            "intermediate_size": 384,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "patch_size": 8,
            "image_size": 64,
            "vision_use_head": False,
        },
        text_config={
            "model_type": "qwen2",
            "vocab_size": vocab_size,
            "hidden_size": HIDDEN,
            "intermediate_size": 192,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 1024,
            "tie_word_embeddings": True,
        },
        temporal_encoder_config={"num_hidden_layers": layers, "bidirectional": bidirectional, "state_size": 16},
        vision_feature_layer=-1,  # the encoder is trained from scratch: no reason to drop its last layer
        temporal_pool_size=k,
        image_token_id=image_token_id,
        video_token_id=video_token_id,
    )


def build_initial(output_dir: Path, tokenizer_dir: Path, name: str, seed: int, vision_tower: Path | None = None) -> Path:
    """A random STORM of configuration `name` with the real Qwen2 tokenizer (the stage-1 starting point); with
    `vision_tower`, a STORM folder whose vision tower (stage 0, `vision_pretraining.py`) replaces the random one."""
    from storm_transformers.conversion.tiny import random_checkpoint

    settings = CONFIGS[name]

    def config(vocab_size, image_token_id, video_token_id):
        return miniature_config(settings["layers"], settings["bidirectional"], settings["k"], vocab_size,
                                image_token_id, video_token_id)

    folder = random_checkpoint(
        output_dir,
        tokenizer_dir,
        config,
        seed=seed,
        num_frames=settings["frames"],
        summary=f"Random initialisation of the miniature STORM `{name}`"
        + (" with the vision tower of stage 0 (`vision_pretraining.py`)." if vision_tower else "."),
        origin="`storm_transformers.training.miniature`",
    )
    if vision_tower is not None:
        from safetensors.torch import load_file, save_file

        weights = load_file(folder / "model.safetensors")
        pretrained = load_file(vision_tower / "model.safetensors")
        tower = {key: value for key, value in pretrained.items() if key.startswith("model.vision_tower.")}
        if set(tower) != {key for key in weights if key.startswith("model.vision_tower.")}:
            raise ValueError(f"The vision tower in {vision_tower} does not match configuration {name!r}.")
        save_file({**weights, **tower}, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def prepare_data(folder: Path, datasets: list[dict]) -> Path:
    """`folder` filled by `synthetic.generate_dataset(folder, **arguments)` for each `arguments` of `datasets`, once:
    the arguments are recorded in `folder/datasets.json` (written last, so an interrupted generation starts again), and
    a later run with the same arguments reuses the clips.

    Raises:
        ValueError: `folder` holds clips generated with other arguments (another `--train-mix`, size or data seed
            under the same `--output`).
    """
    from .synthetic import generate_dataset

    record = folder / "datasets.json"
    if record.exists():
        made = json.loads(record.read_text())
        if made != datasets:
            raise ValueError(
                f"{folder} holds clips generated with {made}, but this run asks for {datasets}. Choose another "
                f"--output, or delete {folder} to generate them again."
            )
        return folder
    for arguments in datasets:
        generate_dataset(folder, workers=os.cpu_count(), **arguments)
    record.write_text(json.dumps(datasets))
    return folder


def _question_weight(text: str) -> tuple[str, float]:
    """`TYPE=WEIGHT` of `--train-mix`, e.g. `direction=3`."""
    kind, _, weight = text.partition("=")
    try:
        return kind, float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not TYPE=WEIGHT (e.g. direction=3)") from None


def pretrain_vision(output: Path, tokenizer_dir: Path, seed: int, steps: int, radii: tuple[int, int],
                    num_workers: int) -> tuple[Path, list[dict]]:
    """Stage 0 for `seed`: a random STORM (vision tower as in every configuration) whose tower is trained on
    labelled single frames with shape radii drawn from `radii` px, their pixels prepared by `num_workers` DataLoader
    processes (`vision_pretraining.py`); returns its folder and the training log, which it also prints."""
    folder = output / "runs" / f"vision-seed{seed}"
    init = build_initial(folder / "init", tokenizer_dir, "linear-k8", seed)
    return pretrain_checkpoint(init, folder / "stage0", overwrite=True, max_steps=steps, seed=seed, radii=radii,
                               num_workers=num_workers, log_every=max(1, steps // 5),
                               log=functools.partial(print, f"seed {seed}:", flush=True))


def pretrain_towers(output: Path, tokenizer_dir: Path, seeds: list[int], steps: int,
                    radii: tuple[int, int]) -> dict[int, tuple[Path, list[dict]]]:
    """`pretrain_vision` for every seed at once, each in a spawned process of its own with its share of the cores:
    one tiny tower leaves a GPU mostly idle (on one H200, 2026-12-03: 1500 steps took 27–34 s for one seed alone and
    37–38 s each for three seeds run as three commands at once). Returns `{seed: (folder, training log)}`; runs
    before the configurations' threads start."""
    share = max(1, (os.cpu_count() or 1) // len(seeds))
    with ProcessPoolExecutor(len(seeds), mp_context=multiprocessing.get_context("spawn"),
                             initializer=_spawned_process, initargs=(share,)) as pool:
        futures = {seed: pool.submit(pretrain_vision, output, tokenizer_dir, seed, steps, radii, min(8, share))
                   for seed in seeds}
        return {seed: future.result() for seed, future in futures.items()}


def curriculum_data(data: Path, question_types: list[str]) -> Path:
    """`data/train-<types>.jsonl`: the training rows that ask one of `question_types` (the curriculum stage's data;
    video paths stay relative to `data`).

    Raises:
        ValueError: the training split has no row of one of `question_types` (a `--train-mix` that leaves it out).
    """
    rows = _rows(data, "train")
    missing = sorted(set(question_types) - {row["question_type"] for row in rows})
    if missing:
        raise ValueError(f"--curriculum {' '.join(question_types)}: the training split asks no {', '.join(missing)} "
                         "question; give those types a weight in --train-mix, or leave them out of --curriculum.")
    path = data / f"train-{'-'.join(question_types)}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows if row["question_type"] in question_types))
    return path


def loader_workers(name: str, share: int) -> int:
    """DataLoader workers of a training run of `name`, given each run's `share` of the cores (cores // --parallel):
    twice the share for 32-frame clips, whose rows cost 1.5–1.6× an 8-frame row to decode and process. With equal
    workers the 32-frame runs took 1.5× as long, on cores the finished 8-frame runs left idle (one H200, 16 cores,
    2026-12-03: seven 300-step SFT runs at once, 2 workers each, 48.5 s against 32 s); twice the workers there is
    not yet measured."""
    return share * (2 if CONFIGS[name]["frames"] > 8 else 1)


def train(name: str, seed: int, output: Path, data: Path, steps: dict, workers: int, log,
          train_vision_tower: bool = False, curriculum: Path | None = None) -> Path:
    """Stage 1 (alignment), then SFT with `python -m storm_transformers.training.sft` from `<run>/init`, first on
    `curriculum` (a jsonl of some question types: `curriculum_data`) for `steps["curriculum"]` steps if given, then on
    the whole training split; returns the SFT output folder (the model, and `CURVE_POINTS` `checkpoint-<step>`
    folders for the learning curves). SFT keeps the vision tower frozen (`miniature_sft.yaml`: it comes from stage 0)
    unless `train_vision_tower` (the recipe without stage 0, everything trained end to end)."""
    run = output / "runs" / f"{name}-seed{seed}"
    previous = run / "init"
    stages = [("alignment", "alignment", data / "train.jsonl")]
    if curriculum is not None and steps.get("curriculum"):
        stages.append(("curriculum", "sft", curriculum))
    stages.append(("sft", "sft", data / "train.jsonl"))
    for stage, recipe, dataset in stages:
        out = run / stage
        command = [
            sys.executable, "-m", "storm_transformers.training.sft",
            "--config", str(Path(__file__).parent / "configs" / f"miniature_{recipe}.yaml"),
            "--model_name_or_path", str(previous),
            "--dataset_name", str(dataset),
            "--output_dir", str(out),
            "--max_steps", str(steps[stage]),
            "--seed", str(seed),
            "--dataloader_num_workers", str(workers),
            "--num_frames", str(CONFIGS[name]["frames"]),
        ]
        if stage == "sft":  # the model every CURVE_POINTS-th of the way, for the learning curves
            every = max(1, steps[stage] // CURVE_POINTS)
            command += ["--save_strategy", "steps", "--save_steps", str(every), "--save_only_model", "true"]
        if recipe == "sft" and train_vision_tower:
            command += ["--trainable_modules", "vision_tower", "multi_modal_projector", "temporal_encoder",
                        "language_model"]
        start = time.perf_counter()
        # Runs share the machine's cores: one intra-op thread each (the GPU does the math; the workers decode).
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with open(run / f"{stage}.log", "w") as stream:
            result = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, env=env)
        if result.returncode:
            raise RuntimeError(f"{name} seed {seed}: {stage} failed, see {run / f'{stage}.log'}")
        log(f"{name} seed {seed}: {stage} done in {time.perf_counter() - start:.0f} s")
        previous = out
    return previous


def checkpoints(sft_dir: Path) -> list[tuple[int, Path]]:
    """`(step, folder)` of the SFT run's intermediate models (`checkpoint-<step>`), in step order."""
    found = [(int(folder.name.rsplit("-", 1)[1]), folder) for folder in sft_dir.glob("checkpoint-*")]
    return sorted(found)


def _spawned_process(threads: int) -> None:
    """Initialiser of the processes that evaluate or run stage 0: `threads` intra-op threads, the tiny vision tower
    not compiled (as in `main`), and an exit as soon as the process that started it has gone (a SIGTERM or SIGKILL
    reaches only `main`, Ctrl-C the whole process group; without it stage 0 trains on for minutes with nobody to use
    it). Their DataLoader workers exit with them (PyTorch's worker watchdog)."""
    import torch

    from storm_transformers import kernels

    torch.set_num_threads(threads)
    kernels.COMPILE_REGIONS = False
    parent = os.getppid()

    def exit_with_parent():  # checks once a second: the orphan is adopted by another process
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=exit_with_parent, name="exit-with-parent", daemon=True).start()


def evaluate(model_dir: Path, data: Path, split: str = "test", temporal_sample_rate: int = 1,
             batch_size: int = 50, device: str | None = None, limit: int | None = None) -> dict:
    """Greedy answers of the checkpoint in `model_dir` on `data/<split>.jsonl`; accuracy overall, on temporal and
    non-temporal questions and per question type (exact match of the lower-cased answer), and per type the mean
    cross-entropy (nats) of the answer's first token (every answer is one token; chance is ln of the choices)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import storm_transformers  # noqa: F401

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with LOAD_LOCK:
        model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
        processor = AutoProcessor.from_pretrained(model_dir)
    model.config.temporal_sample_rate = processor.temporal_sample_rate = temporal_sample_rate
    rows = _rows(data, split, limit)
    correct: dict[str, list[bool]] = {}
    losses: dict[str, list[float]] = {}  # cross-entropy of the answer's (first) token, nats
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        inputs = _prompts(processor, batch, data).to(device)
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                                    return_dict_in_generate=True)
        answers = processor.batch_decode(output.sequences[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        first = output.logits[0].float().log_softmax(-1)  # (B, V): the first answer token's log-probabilities
        for index, (row, answer) in enumerate(zip(batch, answers)):
            expected = _answer(row)
            correct.setdefault(row["question_type"], []).append(answer.strip().lower() == expected)
            expected_id = processor.tokenizer(expected, add_special_tokens=False)["input_ids"][0]
            losses.setdefault(row["question_type"], []).append(-first[index, expected_id].item())
    temporal = [hit for kind, hits in correct.items() if kind in TEMPORAL_TYPES for hit in hits]
    static = [hit for kind, hits in correct.items() if kind not in TEMPORAL_TYPES for hit in hits]
    return {
        "accuracy": _mean([hit for hits in correct.values() for hit in hits]),
        "temporal": _mean(temporal),
        "non-temporal": _mean(static),
        "by type": {kind: _mean(hits) for kind, hits in sorted(correct.items())},
        "answer loss by type": {kind: round(_mean(values), 4) for kind, values in sorted(losses.items())},
        "visual tokens per video": model.config.num_video_tokens(processor.video_processor.num_frames),
        "questions": sum(len(hits) for hits in correct.values()),
    }


def representation(model_dir: Path, data: Path, fit_clips: int = 1200, device: str | None = None) -> dict:
    """What the visual tokens of the checkpoint in `model_dir` hold, before the temporal encoder (the collapse that
    docs/miniature.md describes shows here):

    - `vision-token norm`, `projector-output norm`: mean L2 norm of the vision hidden state STORM projects `(P, C)`
      and of the projector's tokens `(g², D)`;
    - `within-frame cosine`: mean cosine between two tokens of one frame after subtracting the mean token (1.0: every
      token of a frame says the same);
    - `probe shape`: held-out accuracy of a linear probe (logistic regression) from the first frame's projector tokens
      (flattened) to the shape, on `shape` clips;
    - `probe direction`: the same from the projector tokens averaged over each half of the clip (temporal pooling
      k = T/2, flattened) to the direction, on `direction` clips;
    - `probe direction, LLM input`: the same from the visual tokens the LLM receives (temporal encoder and the model's
      own pooling, `get_video_features`), and `probe direction, LLM answer state`: from the LLM's last hidden state
      where the answer is generated (the prompt's last position): where the direction is lost, if it is;
    - `probe count`, `probe count, LLM input`, `probe count, LLM answer state`: the same three for the count.

    Probes are fitted on the clips of their type among the first `fit_clips` training clips and scored on those of
    the test split; the norms and the cosine are measured on those `shape` clips. Where either split has no
    clip of a type (a `--train-mix` without it), the entries that need it are left out."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import storm_transformers  # noqa: F401
    from storm_transformers.modeling_storm import vision_hidden_state

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with LOAD_LOCK:
        model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
        processor = AutoProcessor.from_pretrained(model_dir)

    def clips(split, kind, limit=None):
        """The `kind` clips among the first `limit` of `split`, prepared as `evaluate` prepares them: the model
        inputs, the vision hidden states `(B·T, P, C)`, the projector's tokens `(B, T, g², D)` and the answers."""
        rows = _rows(data, split, limit, kind)
        inputs = _prompts(processor, rows, data).to(device)
        pixels = inputs["pixel_values_videos"]  # (B, T, 3, H, W)
        with torch.inference_mode():
            patches = vision_hidden_state(model.model.vision_tower, pixels.flatten(0, 1),
                                          model.config.vision_feature_layer)  # (B·T, P, C)
            projected = model.model.multi_modal_projector(patches)  # (B·T, g², D)
        return inputs, patches, projected.unflatten(0, pixels.shape[:2]), [_answer(row) for row in rows]

    def llm_side(inputs):  # (B, N·D) the visual tokens the LLM receives, (B, D) its last state at the answer
        with torch.inference_mode():
            visual = model.model.get_video_features(inputs["pixel_values_videos"]).pooler_output  # (B, N, D)
            state = model(**inputs, output_hidden_states=True, logits_to_keep=1).hidden_states[-1][:, -1]  # (B, D)
        return visual.flatten(1), state

    def halves(tokens):  # temporal pooling k = T/2: (B, T, g², D) → (B, 2·g²·D)
        return tokens.unflatten(1, (2, -1)).mean(dim=2).flatten(1)

    def available(kind):  # fit and test clips of this question type exist (a --train-mix may leave a type out)
        return bool(_rows(data, "train", fit_clips, kind)) and bool(_rows(data, "test", None, kind))

    report = {}
    if available("shape"):
        _, patches, shape_train, shape_labels = clips("train", "shape", fit_clips)
        centred = torch.nn.functional.normalize(patches - patches.mean(dim=(0, 1)), dim=-1)  # (F, P, C)
        cosine = centred @ centred.transpose(1, 2)  # (F, P, P)
        count = cosine.shape[-1]
        report["vision-token norm"] = patches.norm(dim=-1).mean().item()
        report["projector-output norm"] = shape_train.norm(dim=-1).mean().item()
        report["within-frame cosine"] = ((cosine.sum(dim=(1, 2)) - count) / (count * (count - 1))).mean().item()
        _, _, shape_test, shape_test_labels = clips("test", "shape")
        report["probe shape"] = _linear_probe(shape_train[:, 0].flatten(1), shape_labels,
                                              shape_test[:, 0].flatten(1), shape_test_labels)
    for kind in ("direction", "count"):
        if not available(kind):
            continue
        train_inputs, _, train_tokens, labels = clips("train", kind, fit_clips)
        test_inputs, _, test_tokens, test_labels = clips("test", kind)
        report[f"probe {kind}"] = _linear_probe(halves(train_tokens), labels, halves(test_tokens), test_labels)
        (visual, state), (visual_test, state_test) = llm_side(train_inputs), llm_side(test_inputs)
        report[f"probe {kind}, LLM input"] = _linear_probe(visual, labels, visual_test, test_labels)
        report[f"probe {kind}, LLM answer state"] = _linear_probe(state, labels, state_test, test_labels)
    return {key: round(value, 4) for key, value in report.items()}


def _linear_probe(train, train_labels, test, test_labels, weight_decay: float = 1e-3, steps: int = 300) -> float:
    """Held-out accuracy of a multinomial logistic regression (standardised features, L2, full-batch L-BFGS)."""
    import torch

    classes = sorted(set(train_labels))
    train, test = train.float(), test.float()
    mean, std = train.mean(dim=0), train.std(dim=0) + 1e-6
    train, test = (train - mean) / std, (test - mean) / std
    y = torch.tensor([classes.index(label) for label in train_labels], device=train.device)
    with torch.enable_grad():
        probe = torch.nn.Linear(train.shape[1], len(classes)).to(train.device)
        optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(probe(train), y) + weight_decay * probe.weight.square().sum()
            loss.backward()
            return loss

        optimizer.step(closure)
    predicted = probe(test).argmax(dim=-1).tolist()
    return _mean([classes[index] == label for index, label in zip(predicted, test_labels)])


def _mean(values) -> float:
    return sum(values) / len(values) if values else math.nan


def _rows(data: Path, split: str, limit: int | None = None, kind: str | None = None) -> list[dict]:
    """The rows of `data/<split>.jsonl` (the first `limit`), of question type `kind` if given."""
    rows = [json.loads(line) for line in (data / f"{split}.jsonl").read_text().splitlines()][:limit]
    return [row for row in rows if kind in (None, row["question_type"])]


def _answer(row: dict) -> str:
    return row["messages"][1]["content"][0]["text"]


def _prompts(processor, rows: list[dict], data: Path):
    """The rows' questions with their videos, left-padded model inputs (`BatchFeature`), as at generation time."""
    return processor.apply_chat_template(
        [_with_absolute_paths(row["messages"][:1], data) for row in rows], add_generation_prompt=True, tokenize=True,
        return_dict=True, return_tensors="pt",
        processor_kwargs={"num_frames": processor.video_processor.num_frames, "padding": True, "padding_side": "left"},
    )


def _with_absolute_paths(messages: list[dict], root: Path) -> list[dict]:
    return [
        {**message, "content": [{**part, "path": str(root / part["path"])} if "path" in part else part
                                for part in message["content"]]}
        for message in messages
    ]


def latency(name: str, tokenizer_dir: Path, video: Path, temporal_sample_rate: int = 1, repeats: int = 5) -> float:
    """Median seconds of one prefill (time to first token) of configuration `name` on this machine, batch 1, for
    `video` at 8 frames, with test-time temporal sampling s = `temporal_sample_rate` (weights do not matter for
    speed: a random model of the same architecture)."""
    import tempfile

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import storm_transformers  # noqa: F401

    with tempfile.TemporaryDirectory() as tmp:
        folder = build_initial(Path(tmp) / name, tokenizer_dir, name, seed=0)
        model = AutoModelForImageTextToText.from_pretrained(folder).eval()
        processor = AutoProcessor.from_pretrained(folder)
    model.config.temporal_sample_rate = processor.temporal_sample_rate = temporal_sample_rate
    messages = [{"role": "user", "content": [{"type": "video", "path": str(video)}, {"type": "text", "text": "?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            model(**inputs, logits_to_keep=1)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def table(results: dict) -> str:
    """Markdown: one row per configuration (and sampling), mean ± spread over seeds."""
    types = list(CHANCE)
    header = ["config", "s", "visual tokens / video", "seeds", "all", "temporal", "non-temporal", *types]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, runs in results["evaluations"].items():
        name, s = key.rsplit("@s", 1)
        def cell(values):
            values = [v for v in values if not math.isnan(v)]
            if len(values) > 1:
                return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"
            return f"{100 * values[0]:.1f}" if values else "–"
        row = [name, s, str(runs[0]["visual tokens per video"]), str(len(runs)), cell([r["accuracy"] for r in runs]),
               cell([r["temporal"] for r in runs]), cell([r["non-temporal"] for r in runs])]
        row += [cell([r["by type"].get(kind, math.nan) for r in runs]) for kind in types]
        lines.append("| " + " | ".join(row) + " |")
    chance = ["chance", "", "", "", "", "", ""] + [f"{100 * CHANCE[kind]:.1f}" for kind in types]
    lines.append("| " + " | ".join(chance) + " |")
    return "\n".join(lines)


def export(run_dir: Path, results: dict, name: str, seed: int, output_dir: Path, command: str,
           example: tuple[str, str] = ("examples/square_turns_green.mp4", "What colour does the square turn into?")):
    """Copy a trained run into a self-contained checkpoint folder with a model card that states what it knows.

    The card's usage snippet loads `output_dir` as given (a path relative to the repository root for the shipped
    model) and asks `example` = (video, question)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import storm_transformers  # noqa: F401
    from storm_transformers.conversion.checkpoint import write_checkpoint
    from storm_transformers.model_cards import storm_model_card

    model = AutoModelForImageTextToText.from_pretrained(run_dir)
    processor = AutoProcessor.from_pretrained(run_dir)
    scores = next(r for r in results["evaluations"][f"{name}@s1"] if r["seed"] == seed)
    by_type = ", ".join(f"{kind} {100 * value:.0f}%" for kind, value in scores["by type"].items())
    learned = [kind for kind, value in scores["by type"].items() if value >= 0.9]
    guessing = [kind for kind, value in scores["by type"].items() if value < CHANCE[kind] + 0.1]
    partly = [f"{kind} ({100 * value:.0f}%, chance {100 * CHANCE[kind]:.0f}%)" for kind, value in
              scores["by type"].items() if kind not in learned and kind not in guessing]
    answers = f"It answers {', '.join(learned) or 'no'} questions reliably" + (
        f"; {', '.join(partly)} questions partly" if partly else "") + (
        f"; on {', '.join(guessing)} questions it is no better than guessing" if guessing else "") + "."
    args = results["args"]
    curriculum = (f"then SFT on the training split's {', '.join(args['curriculum'])} questions alone "
                  f"({args['curriculum_steps']} steps, a curriculum), " if args.get("curriculum") else "")
    smallest, largest = args.get("vision_radii", (RADIUS, RADIUS))
    stage0_radii = f"shapes of radius {smallest if smallest == largest else f'{smallest}–{largest}'} px"
    shifted = next((r for r in results.get("shifted", {}).get(f"{name}@s1", []) if r["seed"] == seed), None)
    shifted_by_type = shifted and ", ".join(f"{kind} {100 * value:.0f}%" for kind, value in shifted["by type"].items())
    settings = CONFIGS[name]
    encoder = (f"{settings['layers']} {'bidirectional' if settings['bidirectional'] else 'uni-directional'} Mamba "
               "layers" if settings["layers"] else "no temporal encoder")
    card = storm_model_card(
        model,
        processor,
        repo_id=str(output_dir),
        summary=(
            "A miniature STORM trained from scratch on synthetic video QA (`storm_transformers.training.synthetic`): "
            f"configuration `{name}` ({encoder}, temporal pooling k = {settings['k']}), seed {seed}. On the 600 "
            f"held-out test clips it answers {100 * scores['accuracy']:.0f}% of the questions ({100 * scores['temporal']:.0f}% "
            f"of those that need temporal order): {by_type}."
        ),
        provenance=(
            f"Trained with `{command}` (storm_transformers/training/miniature.py, one H200): a random STORM with the "
            "real Qwen2 tokenizer; stage 0 trains its vision tower on labelled single frames (what covers each "
            f"patch, which objects a frame holds, where; {args['vision_steps']} steps of 128 frames, "
            f"{stage0_radii}, `vision_pretraining.py`); stage 1 (alignment: projector and temporal encoder, "
            f"{args['alignment_steps']} steps), {curriculum}then SFT of everything but the frozen vision tower "
            f"({args['sft_steps']} steps), batch 16, on {args['train_size']} synthetic 8-frame 64×64 clips (data "
            f"seed {args['data_seed']}; question types in the proportions {dict(args['train_mix'])}). "
            "See docs/miniature.md for every configuration."
        ),
        limits=(
            "It knows only its synthetic world: 8-frame clips of one or two coloured shapes (red, green, blue, "
            "yellow; circle, square, triangle) on a textured background, and six question forms (which way a shape "
            "moves, which appears first, how many times one appears, what colour one turns into, what colour or "
            f"shape it is). {answers}"
            + (f" On test clips with other backgrounds, shape sizes and speeds it answers "
               f"{100 * shifted['accuracy']:.0f}% ({shifted_by_type})." if shifted else "")
            + " It has never seen a natural video or image and cannot hold a conversation: on anything else its "
            "answers are meaningless. Use it to try STORM end to end on a CPU."
        ),
        extra_tags=("synthetic-data",),
        example=example,
    )
    return write_checkpoint(output_dir, model, processor, card, overwrite=True)


def main(argv=None):
    """The experiment of the module docstring, with command-line arguments `argv` (`sys.argv[1:]` when None). The
    evaluations run in spawned processes, which import the caller's `__main__` module again: call `main` from a script
    under `if __name__ == "__main__":`, as Python's `multiprocessing` requires."""
    parser = argparse.ArgumentParser(description="Train and evaluate the miniature STORMs (see the module docstring).")
    parser.add_argument("--output", default="runs/miniature")
    parser.add_argument("--tokenizer", default="assets/tokenizer", help="folder with ggml-vocab-qwen2.gguf or tokenizer.json")
    parser.add_argument("--configs", nargs="+", default=list(KEY_CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--train-size", type=int, default=DATA_SIZES["train"])
    parser.add_argument("--test-size", type=int, default=DATA_SIZES["test"])
    parser.add_argument("--vision-steps", type=int, default=STAGE0_STEPS,
                        help="stage 0 steps (128 frames each); 0: no stage 0, the tower is trained end to end in SFT")
    parser.add_argument("--vision-radii", type=int, nargs=2, default=list(STAGE0_RADII),
                        metavar=("SMALLEST", "LARGEST"), help="stage 0: shape radius range in px, drawn per object "
                        f"(default %(default)s; {RADIUS} {RADIUS}: the QA clips' radius only, as before 2026-12-03)")
    parser.add_argument("--alignment-steps", type=int, default=100)
    parser.add_argument("--sft-steps", type=int, default=2000)
    parser.add_argument("--train-mix", nargs="+", type=_question_weight, default=list(TRAIN_MIX.items()),
                        metavar="TYPE=WEIGHT", help="relative frequency of each question type in the training split "
                        "(types left out: none); default: TRAIN_MIX")
    parser.add_argument("--curriculum", nargs="+", default=[], choices=sorted(CHANCE), metavar="TYPE",
                        help="before SFT on the whole training split, SFT on its questions of these types alone")
    parser.add_argument("--curriculum-steps", type=int, default=800, help="steps of the --curriculum stage")
    parser.add_argument("--parallel", type=int, default=7, help="training runs at once (CPU-bound: about 2 cores each)")
    parser.add_argument("--export", nargs=3, metavar=("CONFIG", "SEED", "DIR"), help="write that run as a checkpoint")
    args = parser.parse_args(argv)
    try:  # before any clip is generated
        check_radii(args.vision_radii)
    except ValueError as error:
        parser.error(f"--vision-radii: {error}")

    from transformers import AutoTokenizer

    from storm_transformers import kernels
    from storm_transformers.conversion.assets import QWEN2_GGUF

    kernels.COMPILE_REGIONS = False  # models this small gain nothing from compiling (also set by `_spawned_process`)

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", flush=True)

    tokenizer_dir = Path(args.tokenizer)
    if (tokenizer_dir / QWEN2_GGUF).exists():  # convert the GGUF once, not in every run
        converted = output / "qwen2-tokenizer"
        if not (converted / "tokenizer.json").exists():
            AutoTokenizer.from_pretrained(tokenizer_dir, gguf_file=QWEN2_GGUF).save_pretrained(converted)
        tokenizer_dir = converted
    train_mix = dict(args.train_mix)
    datasets = {}
    for frames in sorted({CONFIGS[name]["frames"] for name in args.configs} | {8}):  # the probes read 8-frame clips
        datasets[frames] = prepare_data(output / ("data" if frames == 8 else f"data-{frames}f"), [
            {"sizes": {"train": args.train_size}, "seed": args.data_seed, "num_frames": frames,
             "question_weights": train_mix},
            {"sizes": {"validation": DATA_SIZES["validation"], "test": args.test_size}, "seed": args.data_seed,
             "num_frames": frames},
        ])
        log(f"{frames}-frame clips in {datasets[frames]}")
    # item 5 of the generalisation check: another seed stream, other nuisances
    shifted = prepare_data(output / "data-shifted", [
        {"sizes": {"test": args.test_size}, "seed": args.data_seed + SHIFTED_DATA_SEED, "shifted": True}])
    steps = {"alignment": args.alignment_steps, "curriculum": args.curriculum_steps, "sft": args.sft_steps}
    curricula = {frames: curriculum_data(data, args.curriculum) for frames, data in datasets.items()} \
        if args.curriculum else {}
    workers = max(1, (os.cpu_count() or 2) // args.parallel)
    results = {"args": vars(args), "evaluations": {}, "shifted": {}, "representation": {}, "vision pretraining": {},
               "curves": {}, "failed": []}
    lock = threading.Lock()

    def record(key, value, run=None):  # results[key] updated with value, or value appended to results[key][run]
        with lock:
            if run is None:
                results[key].update(value)
            else:
                results[key].setdefault(run, []).append(value)
            (output / "results.json").write_text(json.dumps(results, indent=1))

    # Evaluations run in processes of their own, beside the training runs (threads would share one interpreter's lock).
    evaluator = ProcessPoolExecutor(args.parallel, mp_context=multiprocessing.get_context("spawn"),
                                    initializer=_spawned_process, initargs=(workers,))
    towers, probes = {}, []
    # stage 0, once per seed (the seeds at once), shared by every configuration of the seed
    stage0 = pretrain_towers(output, tokenizer_dir, args.seeds, args.vision_steps, tuple(args.vision_radii)) \
        if args.vision_steps else {}
    for seed, (tower, history) in stage0.items():
        towers[seed] = tower
        log(f"seed {seed}: stage 0 done")
        record("vision pretraining", {f"seed{seed}": history})
        for stage in ("init", "stage0"):
            probes.append((f"{stage}-seed{seed}", evaluator.submit(representation, towers[seed].parent / stage,
                                                                  datasets[8])))

    def job(name, seed):
        data = datasets[CONFIGS[name]["frames"]]
        try:
            with LOAD_LOCK:
                build_initial(output / "runs" / f"{name}-seed{seed}" / "init", tokenizer_dir, name, seed,
                              towers.get(seed))
            folder = train(name, seed, output, data, steps, loader_workers(name, workers), log,
                           train_vision_tower=not args.vision_steps,
                           curriculum=curricula.get(CONFIGS[name]["frames"]))
        except RuntimeError as error:  # one failed run does not stop the others
            log(str(error))
            results["failed"].append(f"{name}-seed{seed}")
            return
        # (d): test-time temporal sampling s = 2 on the 32-frame clips (8 pooled frames at k = 4 → 4).
        rates = (1, 2) if CONFIGS[name]["frames"] > 8 else (1,)
        tests = {s: evaluator.submit(evaluate, folder, data, temporal_sample_rate=s) for s in rates}
        # learning curves: accuracy and answer loss by question type on the validation split along SFT
        curve = [(step, evaluator.submit(evaluate, checkpoint, data, "validation")) for step, checkpoint in
                 checkpoints(folder)]
        if CONFIGS[name]["frames"] == 8:
            probe = evaluator.submit(representation, folder, data)
            on_shifted = evaluator.submit(evaluate, folder, shifted).result()
            record("representation", {f"{name}-seed{seed}": probe.result()})
            record("shifted", {"seed": seed, **on_shifted}, run=f"{name}@s1")
            log(f"{name} seed {seed} shifted clips: accuracy {on_shifted['accuracy']:.3f}")
        points = [(step, future.result()) for step, future in curve]
        record("curves", {f"{name}-seed{seed}": [
            {"step": step, "by type": point["by type"], "answer loss by type": point["answer loss by type"]}
            for step, point in points]})
        for s, evaluation in tests.items():
            evaluation = evaluation.result()
            record("evaluations", {"seed": seed, **evaluation}, run=f"{name}@s{s}")
            log(f"{name} seed {seed} s={s}: accuracy {evaluation['accuracy']:.3f}, temporal {evaluation['temporal']:.3f}")
        if args.export and (args.export[0], int(args.export[1])) == (name, seed):
            arguments = sys.argv[1:] if argv is None else argv
            command = "python -m storm_transformers.training.miniature " + " ".join(arguments)
            with LOAD_LOCK:
                export(folder, results, name, seed, Path(args.export[2]), command)
            log(f"exported {name} seed {seed} to {args.export[2]}")

    jobs = [(name, seed) for seed in args.seeds for name in args.configs]
    with evaluator, ThreadPoolExecutor(args.parallel) as pool:
        list(pool.map(lambda pair: job(*pair), jobs))
        for key, probe in probes:
            record("representation", {key: probe.result()})
    (output / "results.json").write_text(json.dumps(results, indent=1))
    tables = f"{table(results)}\n\nShifted test clips:\n\n{table({'evaluations': results['shifted']})}\n"
    (output / "results.md").write_text(tables)
    print(tables)
    log("done")


if __name__ == "__main__":
    main()
