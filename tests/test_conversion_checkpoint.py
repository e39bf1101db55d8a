"""Writing checkpoint folders: safetensors shards, nothing half-written on failure or interruption (Ctrl-C, SIGTERM,
and SIGKILL, whose staging folder the next run removes), and uploads that fail in one line."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conversion_sources import leftovers, save_qwen2, save_siglip
from storm_testing import tiny_config
from transformers import AutoModelForImageTextToText, AutoTokenizer

from storm_transformers import StormForConditionalGeneration
from storm_transformers.conversion import checkpoint
from storm_transformers.conversion.checkpoint import (
    add_placeholder_tokens,
    build_processor,
    remove_stale_staging,
    write_checkpoint,
)
from storm_transformers.conversion.compose import compose
from storm_cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_and_processor(qwen2_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(qwen2_tokenizer_dir)
    add_placeholder_tokens(tokenizer)
    torch.manual_seed(0)
    model = StormForConditionalGeneration(tiny_config())
    return model, build_processor(model.config, tokenizer, num_frames=4)


def test_weights_are_safetensors_shards_of_the_set_size_and_reload(model_and_processor, tmp_path, monkeypatch):
    model, processor = model_and_processor
    monkeypatch.setattr(checkpoint, "MAX_SHARD_SIZE", "100KB")  # 5GB in use; the tiny model needs a tiny limit
    output = write_checkpoint(tmp_path / "storm", model, processor)
    assert (
        len(list(output.glob("model-*-of-*.safetensors"))) > 1 and (output / "model.safetensors.index.json").is_file()
    )
    assert not list(output.glob("*.bin")) and leftovers(output) == ["storm"]
    reloaded = AutoModelForImageTextToText.from_pretrained(output)
    for key, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], tensor), key


def test_a_failed_verification_keeps_the_previous_folder(model_and_processor, tmp_path):
    model, processor = model_and_processor
    output = tmp_path / "storm"
    output.mkdir()
    (output / "old.txt").write_text("previous")
    seen = []

    def verify(folder):
        seen.extend(path.name for path in folder.iterdir())
        raise RuntimeError("verification failed")

    with pytest.raises(RuntimeError, match="verification failed"):
        write_checkpoint(output, model, processor, overwrite=True, verify=verify)
    assert {"config.json", "model.safetensors", "processor_config.json"} <= set(seen)  # it saw the complete folder
    assert [path.name for path in output.iterdir()] == ["old.txt"] and leftovers(output) == ["storm"]


def test_an_interrupted_write_leaves_nothing(model_and_processor, tmp_path, monkeypatch):
    model, processor = model_and_processor

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(processor), "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path / "storm", model, processor)
    assert leftovers(tmp_path / "storm") == []


@pytest.fixture(scope="module")
def sources(tmp_path_factory, qwen2_tokenizer_dir):
    root = tmp_path_factory.mktemp("sources")
    return save_siglip(root / "siglip"), save_qwen2(root / "qwen2", qwen2_tokenizer_dir)


# A conversion through the `storm` command that stops inside its complete staging folder (at the verification) and
# writes that folder's path to argv[1], so the test knows when to send its signal.
CONVERSION_THAT_WAITS = """
import sys, time
from pathlib import Path
sys.path[:0] = [{repo!r}, {tests!r}]
import storm_transformers.conversion.compose
from storm_cli import main

def wait(folder, reference):
    Path(sys.argv[1]).write_text(str(folder))
    time.sleep(600)

storm_transformers.conversion.compose.verify_checkpoint = wait
sys.exit(main(["convert", "compose", "--vision", {vision!r}, "--llm", {llm!r}, "--output", {output!r}, "--num-frames", "4"]))
"""


def _start_waiting_conversion(sources, output, marker):
    script = CONVERSION_THAT_WAITS.format(
        repo=str(REPO), tests=str(REPO / "tests"), vision=str(sources[0]), llm=str(sources[1]), output=str(output)
    )
    return subprocess.Popen(
        [sys.executable, "-c", script, str(marker)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for(marker, process, seconds=300):
    deadline = time.monotonic() + seconds
    while not marker.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the conversion never reached its verification"
        time.sleep(0.2)
    return Path(marker.read_text())


def test_sigkill_leaves_a_staging_folder_that_the_next_run_removes_and_sigterm_cleans_up(sources, tmp_path, capsys):
    killed, terminated = tmp_path / "killed" / "storm", tmp_path / "terminated" / "storm"
    runs = {
        output: _start_waiting_conversion(sources, output, tmp_path / f"{output.parent.name}.marker")
        for output in (killed, terminated)
    }  # both at once: the imports dominate
    staging = {output: _wait_for(tmp_path / f"{output.parent.name}.marker", run) for output, run in runs.items()}
    assert staging[killed].name.startswith(f".storm.partial-{socket.gethostname()}-{runs[killed].pid}-")
    assert (staging[killed] / "model.safetensors").is_file()

    runs[terminated].send_signal(signal.SIGTERM)
    _, err = runs[terminated].communicate(timeout=60)
    assert runs[terminated].returncode == 143 and err.strip().splitlines()[-1] == "storm convert compose: terminated"
    assert "Traceback" not in err and leftovers(terminated) == []  # cleaned up like Ctrl-C

    runs[killed].kill()  # SIGKILL: nothing in the process can clean up
    runs[killed].communicate(timeout=60)
    assert leftovers(killed) == [staging[killed].name]
    compose(*sources, killed, num_frames=4)
    out = capsys.readouterr().out
    pid = runs[killed].pid
    assert f"removed {staging[killed]}: the staging folder of an interrupted run (process {pid} is no longer" in out
    assert leftovers(killed) == ["storm"]


def test_sigterm_to_a_python_conversion_removes_its_staging_folder(model_and_processor, tmp_path):
    model, processor = model_and_processor

    def terminate(folder):
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # else the signal below would end pytest
        os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(KeyboardInterrupt, match="terminated by signal 15"):
        write_checkpoint(tmp_path / "storm", model, processor, verify=terminate)
    assert leftovers(tmp_path / "storm") == [] and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_only_staging_folders_of_ended_processes_on_this_host_are_removed(tmp_path, capsys):
    output = tmp_path / "storm"
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    stale = tmp_path / f".storm.partial-{host}-{ended.stdout.strip()}-abc"
    running = tmp_path / f".storm.partial-{host}-{os.getpid()}-def"
    elsewhere = tmp_path / f".storm.partial-otherhost-{ended.stdout.strip()}-ghi"
    other_output = tmp_path / f".storm2.partial-{host}-{ended.stdout.strip()}-jkl"
    for folder in (stale, running, elsewhere, other_output):
        folder.mkdir()
    assert remove_stale_staging(output) == [stale]
    assert "the staging folder of an interrupted run" in capsys.readouterr().out
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        path.name for path in (running, elsewhere, other_output)
    )


def test_an_unreachable_hub_ends_in_one_line_and_keeps_the_checkpoint(sources, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # as HF_ENDPOINT=http://127.0.0.1:9
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    output = tmp_path / "storm"
    argv = ["convert", "compose", "--vision", sources[0], "--llm", sources[1], "--output", output, "--num-frames", "4"]
    assert main([*map(str, argv), "--push-to-hub", "me/storm-test"]) == 1
    err = capsys.readouterr().err  # transformers' progress bars, then the error
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and err.count("error:") == 1, err
    assert last.startswith("storm convert compose: error: Could not upload") and "Connection refused" in last
    assert last.endswith(f"upload it later with `hf upload me/storm-test {output}`.")
    assert (output / "model.safetensors").is_file()  # the conversion itself is complete
