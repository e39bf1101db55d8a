"""Every folder STORM writes loads where only transformers is installed (issue 14, item 2).

`import storm_transformers` registers the classes for their Auto classes (`register_for_auto_class`), so every
`save_pretrained` writes the code files and `auto_map` with transformers' own `custom_object_save`: the training
recipe's output, a merged LoRA, a conversion and a `push_to_hub`. A Python without storm-transformers and without PyAV
loads those folders with `trust_remote_code=True` and generates the same tokens as our classes; where the package is
imported, its own classes load the same folders.
"""

import ast
import filecmp
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import numpy as np
import pytest
import torch
import transformers.utils.hub
from conversion_sources import read_json, save_qwen2, save_siglip
from huggingface_hub import ModelCard
from peft import PeftModel, get_peft_model
from storm_testing import tiny_config
from transformers import AutoModel, AutoModelForImageTextToText, AutoModelForMultimodalLM, AutoProcessor
from trl import SFTConfig

import storm_transformers
from storm_transformers import StormForConditionalGeneration, StormModel, StormProcessor, read_video_pyav
from storm_transformers.conversion.compose import compose
from storm_transformers.training.args import StormDataArguments, StormModelArguments
from storm_transformers.training.modules import storm_lora_config
from storm_transformers.training.sft import main as sft

PACKAGE = Path(storm_transformers.__file__).parent
MODEL_CODE = {
    "configuration_storm.py", "modeling_storm.py", "temporal_encoder.py", "selective_scan.py", "kernels.py",
    "selective_scan_triton.py", "layer_norm_triton.py",
}
PROCESSOR_CODE = {"configuration_storm.py", "processing_storm.py", "video_processing_storm.py"}
# What remote code may import outside `try:` besides the standard library: transformers and what it brings.
ALLOWED = {"torch", "numpy", "transformers", "huggingface_hub"}
AUTO_MAP = {
    "AutoConfig": "configuration_storm.StormConfig",
    "AutoModel": "modeling_storm.StormModel",
    "AutoModelForImageTextToText": "modeling_storm.StormForConditionalGeneration",
    "AutoModelForMultimodalLM": "modeling_storm.StormForConditionalGeneration",
}
SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "storm-tiny-synthetic"
NOT_INSTALLED = ("storm_transformers", "storm_cli", "av")  # hidden from the bare Python below
NUM_FRAMES, NEW_TOKENS, QUESTION = 4, 6, "What happens in the video?"
REPO = "someone/storm-tiny"

# Runs in a Python that has this environment's packages except storm-transformers and PyAV (`bare_site_packages`):
# loads each folder with trust_remote_code, answers a question about decoded frames, tries to decode a file.
LOAD_WITHOUT_STORM = textwrap.dedent(
    """
    import importlib.util, json, sys
    job = json.loads(sys.argv[1])
    sys.path.append(job["site"])
    not_found = [name for name in job["hidden"] if importlib.util.find_spec(name) is None]
    import numpy as np, torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.set_num_threads(job["threads"])
    frames = np.load(job["frames"])
    results = {}
    for folder in job["folders"]:
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": job["question"]}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(text=prompt, videos=[frames], do_sample_frames=False, return_tensors="pt")
        with torch.no_grad():
            tokens = model.generate(**inputs, max_new_tokens=job["new_tokens"], do_sample=False)[0].tolist()
        # the LLM's decode attention that load_storm picks, registered by the folder's own modeling code
        attention = {"text_config": "sdpa_gqa_decode"}
        fast = AutoModelForImageTextToText.from_pretrained(
            folder, trust_remote_code=True, attn_implementation=attention)
        with torch.no_grad():
            fast_tokens = fast.eval().generate(**inputs, max_new_tokens=job["new_tokens"], do_sample=False)[0].tolist()
        try:
            processor.video_processor([job["video"]])
            error = None
        except ImportError as exception:
            error = str(exception)
        classes = [type(model).__module__, type(processor).__module__, type(processor.video_processor).__module__]
        results[folder] = {"tokens": tokens, "fast_tokens": fast_tokens, "classes": classes, "decode_error": error}
    imported = sorted(name for name in sys.modules if name.split(".")[0] in job["hidden"])
    print(json.dumps({"not_found": not_found, "imported": imported, "results": results}))
    """
)


class RecordingHub:
    """Stands in for the Hub (unreachable here): `huggingface_hub.HfApi` for the conversions' `upload_folder` and
    transformers' `hf_api()` for `push_to_hub` (`create_commit`). Uploaded files are copied into `root/<repo>`."""

    def __init__(self, root: Path):
        self.root, self.calls = root, []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id))
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        self.calls.append(("upload_folder", repo_id))
        shutil.copytree(folder_path, self.root / repo_id, dirs_exist_ok=True)
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0")

    def create_commit(self, *, repo_id, operations, **kwargs):
        self.calls.append(("create_commit", repo_id))
        for operation in operations:
            target = self.root / repo_id / operation.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(operation.path_or_fileobj, target)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    recording = RecordingHub(tmp_path_factory.mktemp("hub"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub, "HfApi", lambda: recording)
        patch.setattr(transformers.utils.hub, "hf_api", lambda: recording)
        patch.setattr(transformers.utils.hub, "create_and_tag_model_card", lambda *args, **kwargs: ModelCard("x"))
        yield recording


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, videos_dir):
    folder = tmp_path_factory.mktemp("data")
    (folder / "bikes.mp4").symlink_to(videos_dir / "bikes.mp4")
    user = {"role": "user", "content": [{"type": "video", "path": "bikes.mp4"}, {"type": "text", "text": "What?"}]}
    (folder / "train.jsonl").write_text(json.dumps({"messages": [user, {"role": "assistant", "content": "Bikes."}]}))
    return folder / "train.jsonl"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_checkpoint, dataset):
    """The folder the training recipe (`storm train`, full fine-tuning) writes: one step on the CPU."""
    output_dir = tmp_path_factory.mktemp("trained") / "out"
    data_args = StormDataArguments(dataset_name=str(dataset), num_frames=NUM_FRAMES)
    training_args = SFTConfig(
        output_dir=str(output_dir), max_steps=1, per_device_train_batch_size=1, learning_rate=1e-2,
        save_strategy="no", report_to="none", bf16=False, use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    sft(data_args, StormModelArguments(model_name_or_path=str(tiny_checkpoint)), training_args)
    return output_dir


@pytest.fixture(scope="module")
def merged(tmp_path_factory, tiny_checkpoint, hub):
    """A LoRA adapter of the recipe's configuration (`storm_lora_config`; random, not trained: `storm train
    --use_peft` is tested in test_training_sft.py), saved, loaded on its base, merged and saved as the README says;
    then pushed with `push_to_hub` (model and processor) to the recording Hub. Returns (saved folder, pushed folder)."""
    root = tmp_path_factory.mktemp("lora")
    config = storm_lora_config()
    config.init_lora_weights = False  # random B too, so that merging changes the weights
    torch.manual_seed(0)
    get_peft_model(AutoModelForImageTextToText.from_pretrained(tiny_checkpoint), config).save_pretrained(root / "lora")
    base = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint)
    model = PeftModel.from_pretrained(base, root / "lora").merge_and_unload()
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    model.save_pretrained(root / "merged")
    processor.save_pretrained(root / "merged")
    model.push_to_hub(f"{REPO}-merged")
    processor.push_to_hub(f"{REPO}-merged")
    return root / "merged", hub.root / f"{REPO}-merged"


@pytest.fixture(scope="module")
def composed(tmp_path_factory, qwen2_tokenizer_dir, hub):
    """`storm convert compose --push-to-hub`: the output folder and the pushed copy."""
    root = tmp_path_factory.mktemp("compose")
    siglip, qwen2 = save_siglip(root / "siglip"), save_qwen2(root / "qwen2", qwen2_tokenizer_dir)
    output = compose(siglip, qwen2, root / "storm", num_frames=NUM_FRAMES, push_to_hub_repo=REPO)
    return output, hub.root / REPO


@pytest.fixture(scope="module")
def frames(tmp_path_factory, video_path):
    """NUM_FRAMES decoded frames of the real clip, 64×64 (the tiny checkpoint's size), as a .npy file."""
    sample = lambda metadata: np.linspace(0, metadata.total_num_frames - 1, NUM_FRAMES).round().astype(int)  # noqa: E731
    decoded, _ = read_video_pyav(video_path, sample, size=(64, 64))
    np.save(path := tmp_path_factory.mktemp("frames") / "frames.npy", decoded)
    return path


@pytest.fixture(scope="module")
def bare_site_packages(tmp_path_factory):
    """A folder of links to every entry of this environment's site-packages except storm-transformers (its package,
    its editable-install finder and .pth file, the `storm_cli` module) and PyAV: with `python -I -S` (no
    site-packages, no .pth files, no working folder on sys.path) and this folder on sys.path, neither is installed."""
    site = Path(sysconfig.get_path("purelib"))
    folder = tmp_path_factory.mktemp("site-packages")
    for entry in site.iterdir():
        if entry.name.split("-")[0].split(".")[0] in NOT_INSTALLED or entry.name.startswith("__editable__"):
            continue
        if entry.suffix != ".pth":
            (folder / entry.name).symlink_to(entry)
    return folder


def generate_with_our_classes(folder: Path, frames_file: Path) -> list[int]:
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    assert type(model) is StormForConditionalGeneration and type(processor) is StormProcessor
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    # The frames as given: each folder's processor has its own default frame count.
    inputs = processor(text=prompt, videos=[np.load(frames_file)], do_sample_frames=False, return_tensors="pt")
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)[0].tolist()


def test_folders_load_and_generate_without_storm_and_without_pyav(
    trained, merged, composed, frames, video_path, bare_site_packages, tmp_path
):
    # The recipe's output, a merged LoRA, a pushed conversion (a pushed folder holds the saved files: checked below).
    folders = [trained, merged[0], composed[1], SHIPPED]  # and the miniature STORM that ships in checkpoints/
    job = {
        "site": str(bare_site_packages),
        "hidden": list(NOT_INSTALLED),
        "frames": str(frames),
        "video": str(video_path),
        "threads": torch.get_num_threads(),
        "question": QUESTION,
        "new_tokens": NEW_TOKENS,
        "folders": list(map(str, folders)),
    }
    command = [sys.executable, "-I", "-S", "-c", LOAD_WITHOUT_STORM, json.dumps(job)]
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["not_found"] == list(NOT_INSTALLED) and report["imported"] == []
    for folder in folders:
        loaded = report["results"][str(folder)]
        assert all(module.startswith("transformers_modules.") for module in loaded["classes"]), loaded["classes"]
        assert loaded["tokens"] == generate_with_our_classes(folder, frames), folder
        assert loaded["fast_tokens"] == loaded["tokens"], folder
        assert "needs PyAV, which is not installed: `pip install av`" in loaded["decode_error"]


@pytest.mark.parametrize("trust_remote_code", [False, True])
def test_where_the_package_is_imported_its_classes_load_the_folder(trained, trust_remote_code):
    kwargs = {"trust_remote_code": trust_remote_code}
    assert type(AutoModelForImageTextToText.from_pretrained(trained, **kwargs)) is StormForConditionalGeneration
    assert type(AutoModelForMultimodalLM.from_pretrained(trained, **kwargs)) is StormForConditionalGeneration
    assert type(AutoModel.from_pretrained(trained, **kwargs)) is StormModel
    if not trust_remote_code:  # AutoProcessor prefers the folder's code when trusted, as for any remote code
        processor = AutoProcessor.from_pretrained(trained)
        assert type(processor) is StormProcessor and type(processor.video_processor).__module__.startswith(PACKAGE.name)


def check_code_files(folder: Path) -> None:
    """`folder` holds exactly the remote-code files (byte-identical copies of the package's), importing nothing of
    ours and, outside `try:`, nothing but the standard library and what transformers brings; `config.json` and
    `processor_config.json` name them in `auto_map`."""
    names = {path.name for path in folder.glob("*.py")}
    assert names >= MODEL_CODE | PROCESSOR_CODE and not names & {"__init__.py", "loading.py", "streaming.py", "cli.py"}
    for name in names:
        text = (folder / name).read_text()
        assert text == (PACKAGE / name).read_text(), name
        tree = ast.parse(text)
        optional = {id(node) for block in ast.walk(tree) if isinstance(block, ast.Try) for node in ast.walk(block)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module]
            else:
                continue
            for top in {module.split(".")[0] for module in modules}:
                assert top not in NOT_INSTALLED[:2], f"{name}:{node.lineno} imports {top}"
                assert id(node) in optional or top in ALLOWED or top in sys.stdlib_module_names, (
                    f"{name}:{node.lineno} imports {top}, which transformers does not install: import it in `try:`"
                )
    assert read_json(folder / "config.json")["auto_map"] == AUTO_MAP
    processor = read_json(folder / "processor_config.json")
    assert processor["auto_map"] == {"AutoProcessor": "processing_storm.StormProcessor"}
    assert processor["video_processor"]["auto_map"]["AutoVideoProcessor"] == "video_processing_storm.StormVideoProcessor"


def test_every_folder_carries_the_code_and_auto_map(trained, merged, composed, hub):
    for folder in (trained, *merged, *composed):
        check_code_files(folder)
    for saved, pushed in (merged, composed):  # push_to_hub uploads what save_pretrained writes (and a card)
        names = sorted(os.listdir(saved))
        assert sorted(set(os.listdir(pushed)) - {"README.md"}) == sorted(set(names) - {"README.md"})
        assert filecmp.cmpfiles(saved, pushed, set(names) - {"README.md"}, shallow=False)[1:] == ([], [])
    assert ("upload_folder", REPO) in hub.calls and ("create_commit", f"{REPO}-merged") in hub.calls
    card = ModelCard.load(composed[0] / "README.md")
    assert "custom_code" in card.data.tags and "pip install storm-transformers" not in card.text
    assert f'AutoModelForImageTextToText.from_pretrained("{REPO}", trust_remote_code=True)' in card.text


def test_a_model_sharded_with_fsdp2_saves_its_own_code(tmp_path):
    """FSDP2 turns the model into `FSDPStormForConditionalGeneration`, a subclass defined in torch: the folder still
    gets STORM's files (not torch's) and `auto_map` names STORM's classes."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    model = StormForConditionalGeneration(tiny_config())
    expected = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        fully_shard(model)
        assert type(model).__name__ == "FSDPStormForConditionalGeneration"
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        model.save_pretrained(tmp_path, state_dict=state)
    finally:
        dist.destroy_process_group()
    assert type(model)._auto_class == "AutoModelForImageTextToText"  # the wrapper inherits the registration again
    assert {path.name for path in tmp_path.glob("*.py")} == MODEL_CODE
    assert read_json(tmp_path / "config.json")["auto_map"] == AUTO_MAP
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert all(torch.equal(tensor, expected[name]) for name, tensor in loaded.state_dict().items())
