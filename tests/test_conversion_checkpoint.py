"""Writing checkpoint folders: safetensors shards, and nothing half-written on failure or interruption."""

import pytest
import torch
from conversion_sources import leftovers
from storm_testing import tiny_config
from transformers import AutoModelForImageTextToText, AutoTokenizer

from conversion import checkpoint
from conversion.checkpoint import add_placeholder_tokens, build_processor, write_checkpoint
from modeling_storm import StormForConditionalGeneration


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
