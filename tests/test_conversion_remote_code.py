"""A checkpoint written with remote code must load, and compute the same, where only transformers is installed."""

import ast
import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from conversion_sources import read_json, save_qwen2, save_siglip
from huggingface_hub import ModelCard
from transformers import AutoModelForImageTextToText, AutoProcessor

from storm_transformers.conversion.compose import compose
from storm_transformers.conversion.remote_code import flatten_sources

OUR_TOP_LEVEL = ("storm_transformers", "storm_cli")
REPO = "someone/storm-tiny"

# Runs in a fresh interpreter: our packages cannot be imported (a meta-path finder refuses them, so this holds even
# where they are pip-installed); loads the folder with trust_remote_code and saves the logits on a real video.
LOAD_WITHOUT_OUR_PACKAGES = textwrap.dedent(
    """
    import importlib.abc, json, sys
    BLOCKED = set(sys.argv[4].split(","))

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is not installed here")

    sys.meta_path.insert(0, Refuse())
    for name in BLOCKED:
        try:
            __import__(name)
        except ImportError:
            continue
        raise SystemExit(f"{name} is importable")
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder, video, out = sys.argv[1:4]
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "video", "path": video}, {"type": "text", "text": "What?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt", processor_kwargs={"num_frames": 8})
    with torch.no_grad():
        torch.save(model(**inputs).logits, out)
    ours = [name for name in sys.modules if name.split(".")[0] in BLOCKED]
    classes = [type(model).__module__, type(processor).__module__, type(processor.video_processor).__module__]
    print(json.dumps({"classes": classes, "imported": ours}))
    """
)


class RecordingHub:
    """Stands in for `huggingface_hub.HfApi` (the Hub is unreachable here): records each call, and the folder's
    files at the moment of the upload."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}, None))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs, sorted(os.listdir(kwargs["folder_path"]))))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/0")


@pytest.fixture(scope="module")
def remote_checkpoint(tmp_path_factory, qwen2_tokenizer_dir):
    """A composed checkpoint with remote code, pushed to a recording stand-in of the Hub."""
    root = tmp_path_factory.mktemp("remote")
    hub = RecordingHub()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub, "HfApi", lambda: hub)
        output = compose(
            save_siglip(root / "siglip"),
            save_qwen2(root / "qwen2", qwen2_tokenizer_dir),
            root / "storm",
            num_frames=8,
            remote_code=True,
            push_to_hub_repo=REPO,
        )
    return output, hub.calls


def test_push_to_hub_uploads_the_finished_folder_in_one_commit(remote_checkpoint):
    output, calls = remote_checkpoint
    assert [name for name, _, _ in calls] == ["create_repo", "upload_folder"]
    _, create, _ = calls[0]
    assert create == {"repo_id": REPO, "repo_type": "model", "exist_ok": True}
    _, upload, files_at_upload = calls[1]
    assert upload["repo_id"] == REPO and upload["repo_type"] == "model" and upload["folder_path"] == str(output)
    assert files_at_upload == sorted(os.listdir(output))  # the folder was complete when it was uploaded
    assert {
        "config.json",
        "model.safetensors",
        "processor_config.json",
        "tokenizer.json",
        "chat_template.jinja",
        "generation_config.json",
        "README.md",
        "configuration_storm.py",
        "modeling_storm.py",
        "temporal_encoder.py",
        "selective_scan.py",
        "processing_storm.py",
        "video_processing_storm.py",
    } <= set(files_at_upload)
    config, processor = read_json(output / "config.json"), read_json(output / "processor_config.json")
    assert config["auto_map"] == {
        "AutoConfig": "configuration_storm.StormConfig",
        "AutoModel": "modeling_storm.StormModel",
        "AutoModelForImageTextToText": "modeling_storm.StormForConditionalGeneration",
    }
    assert processor["auto_map"] == {"AutoProcessor": "processing_storm.StormProcessor"}
    assert processor["video_processor"]["auto_map"] == {
        "AutoVideoProcessor": "video_processing_storm.StormVideoProcessor"
    }
    card = ModelCard.load(output / "README.md")
    assert "custom_code" in card.data.tags and card.data.license == "other"
    assert f'AutoModelForImageTextToText.from_pretrained("{REPO}", trust_remote_code=True)' in card.text
    assert "import storm_transformers" not in card.text


def test_copied_code_imports_nothing_of_ours(remote_checkpoint):
    output, _ = remote_checkpoint
    for path in output.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                assert not {alias.name.split(".")[0] for alias in node.names} & set(OUR_TOP_LEVEL), path.name
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                assert node.module.split(".")[0] not in OUR_TOP_LEVEL, path.name


def test_remote_code_loads_without_our_packages_and_gives_the_same_logits(remote_checkpoint, video_path, tmp_path):
    output, _ = remote_checkpoint
    logits_file = tmp_path / "logits.pt"
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            LOAD_WITHOUT_OUR_PACKAGES,
            str(output),
            str(video_path),
            str(logits_file),
            ",".join(OUR_TOP_LEVEL),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["imported"] == []
    assert all(module.startswith("transformers_modules.") for module in report["classes"]), report
    model = AutoModelForImageTextToText.from_pretrained(output).eval()  # our registered classes, in this process
    processor = AutoProcessor.from_pretrained(output)
    assert type(model).__module__ == "storm_transformers.modeling_storm"
    messages = [
        {"role": "user", "content": [{"type": "video", "path": str(video_path)}, {"type": "text", "text": "What?"}]}
    ]
    inputs = processor.apply_chat_template(
        messages,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"num_frames": 8},
    )
    with torch.no_grad():
        expected = model(**inputs).logits
    torch.testing.assert_close(torch.load(logits_file), expected, rtol=0, atol=0)


def _package(root, package, files):
    (root / package).mkdir(parents=True, exist_ok=True)
    (root / package / "__init__.py").write_text("")
    for name, text in files.items():
        (root / package / name).write_text(textwrap.dedent(text))
    return root / package


def test_flatten_sources_makes_our_imports_relative(tmp_path):
    _package(tmp_path, "storm_transformers", {"configuration_storm.py": "import math\nX = 1\n"})
    processing = _package(
        tmp_path,
        "processing_storm",
        {
            "processing_storm.py": """
            import numpy as np
            from storm_transformers.configuration_storm import X
            from .video import Y
            try:
                import mamba_ssm  # optional: allowed
            except ImportError:
                mamba_ssm = None
            """,
            "video.py": "Y = 2\n",
        },
    )
    sources = flatten_sources([processing / "processing_storm.py"])
    assert sorted(sources) == ["configuration_storm.py", "processing_storm.py", "video.py"]
    assert "from .configuration_storm import X" in sources["processing_storm.py"]
    assert "from storm_transformers" not in sources["processing_storm.py"]


@pytest.mark.parametrize(
    "code, message",
    [
        ("from storm_transformers import X\n", r"`from storm_transformers import \.\.\.` cannot be flattened"),
        ("import storm_transformers.configuration_storm\n", "cannot work in remote code"),
        ("import einops\n", "remote code imports `einops`, which transformers does not install"),
        ("from . import video\n", r"`from \. import \.\.\.`"),
    ],
)
def test_flatten_sources_refuses_imports_that_cannot_work_as_remote_code(tmp_path, code, message):
    _package(tmp_path, "storm_transformers", {"configuration_storm.py": "X = 1\n"})
    processing = _package(tmp_path, "processing_storm", {"processing_storm.py": code, "video.py": ""})
    with pytest.raises(ValueError, match=message):
        flatten_sources([processing / "processing_storm.py"])


def test_flatten_sources_refuses_two_files_with_one_name(tmp_path):
    _package(tmp_path, "storm_transformers", {"common.py": "A = 1\n"})
    processing = _package(
        tmp_path,
        "processing_storm",
        {
            "processing_storm.py": "from storm_transformers.common import A\nfrom .common import B\n",
            "common.py": "B = 1\n",
        },
    )
    with pytest.raises(ValueError, match="Two source files are both named common.py"):
        flatten_sources([processing / "processing_storm.py"])
