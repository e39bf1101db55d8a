import shutil

import pytest
import torch
from conversion_sources import TEXT, VISION, leftovers, read_json, save_vila, write_json
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

from storm_transformers.cli import main
from storm_transformers.conversion.vila import convert_vila


@pytest.fixture(scope="module")
def vila(tmp_path_factory, qwen2_tokenizer_dir):
    return save_vila(tmp_path_factory.mktemp("vila") / "NVILA-tiny", qwen2_tokenizer_dir)


def test_vila_checkpoint_converts_its_vision_tower_and_llm(vila, tmp_path, capsys):
    output = tmp_path / "storm"
    assert main(["convert", "vila", "--input", str(vila), "--discard-mm-projector", "--output", str(output)]) == 0
    out = capsys.readouterr().out
    assert "vision tower hidden_states[-1] vs the source vision model: max |Δ| = 0" in out  # mm_vision_select_layer
    assert "text-only logits vs the source LLM: max |Δ| = 0" in out
    assert (
        "VILA projector (`mm_projector/`): not converted: `mlp_downsample_2x2_fix`, 6 tensors (`layers.1.bias`, "
        "`layers.1.weight`, `layers.2.bias`, `layers.2.weight`, `layers.4.bias`, `layers.4.weight`)"
    ) in out
    assert "`head.*` (11 tensors)" in out

    storm = AutoModelForImageTextToText.from_pretrained(output)
    vision = load_file(vila / "vision_tower" / "model.safetensors")
    for key, tensor in storm.model.vision_tower.state_dict().items():
        assert torch.equal(tensor, vision[f"vision_model.{key}"]), key
    llm = AutoModelForCausalLM.from_pretrained(vila / "llm")
    for key, tensor in llm.model.state_dict().items():
        assert torch.equal(storm.model.language_model.state_dict()[key][: len(tensor)], tensor), key
    config = storm.config
    assert config.vision_feature_layer == -1
    assert (config.vision_config.hidden_size, config.text_config.hidden_size) == (
        VISION["hidden_size"],
        TEXT["hidden_size"],
    )
    processor = AutoProcessor.from_pretrained(output)
    assert processor.video_processor.num_frames == 8  # VILA's num_video_frames
    tokenizer = processor.tokenizer
    assert {"<vila/video>", "<image>"} <= set(tokenizer.get_vocab())  # VILA's own tokens stay, unused
    assert tokenizer.convert_tokens_to_ids("<|video_pad|>") == config.video_token_id
    card = ModelCard.load(output / "README.md")
    assert "VILA checkpoint `NVILA-tiny`" in card.text and "mlp_downsample_2x2_fix" in card.text
    # The folder carries its code, as every saved STORM folder (tests/test_remote_code.py loads such folders).
    assert read_json(output / "config.json")["auto_map"]["AutoModelForImageTextToText"] == (
        "modeling_storm.StormForConditionalGeneration"
    )
    assert read_json(output / "processor_config.json")["auto_map"] == {"AutoProcessor": "processing_storm.StormProcessor"}
    code = {path.name for path in output.glob("*.py")}
    assert {"modeling_storm.py", "processing_storm.py", "video_processing_storm.py"} <= code


def test_the_projector_must_be_discarded_explicitly(vila, tmp_path, capsys):
    output = tmp_path / "storm"
    assert main(["convert", "vila", "--input", str(vila), "--output", str(output)]) == 1
    err = capsys.readouterr().err
    assert "VILA's 'mlp_downsample_2x2_fix' projector (6 tensors: layers.1.bias, layers.1.weight" in err
    assert "Pass --discard-mm-projector" in err
    assert leftovers(output) == []


def _edit_config(**fields):
    def edit(folder):
        write_json(folder / "config.json", read_json(folder / "config.json") | fields)

    return edit


def _drop_config_field(field):
    def edit(folder):
        config = read_json(folder / "config.json")
        del config[field]
        write_json(folder / "config.json", config)

    return edit


def _extra_key(part, key):
    def edit(folder):
        path = folder / part / "model.safetensors"
        weights = load_file(path)
        save_file(weights | {key: torch.zeros(2)}, path, metadata={"format": "pt"})

    return edit


def _remove(part):
    def edit(folder):
        shutil.rmtree(folder / part)

    return edit


@pytest.mark.parametrize(
    "edit, error, message",
    [
        (_remove("mm_projector"), FileNotFoundError, "is not a complete VILA checkpoint: it has no mm_projector"),
        (_drop_config_field("llm_cfg"), ValueError, "is not a VILA config: it lacks llm_cfg"),
        (_edit_config(mm_vision_select_feature="patch"), ValueError, "mm_vision_select_feature='patch'"),
        (_edit_config(dynamic_s2=True), ValueError, r"turns on multi-scale vision \(dynamic_s2\)"),
        (_edit_config(hidden_size=64), ValueError, "says hidden_size=64 but llm/ has width 48"),
        (_edit_config(mm_hidden_size=16), ValueError, "says mm_hidden_size=16 but vision_tower/ has width 32"),
        (_extra_key("mm_projector", "pos_embed"), ValueError, "not VILA projector weights .*: pos_embed"),
        (_extra_key("vision_tower", "vision_model.extra.weight"), ValueError, "unexpected: extra.weight"),
        (_edit_config(num_video_frames=6), ValueError, "num_frames=6 is not a multiple of temporal_pool_size=4"),
    ],
)
def test_vila_checkpoints_storm_cannot_convert_fail_clearly(vila, tmp_path, edit, error, message):
    source = shutil.copytree(vila, tmp_path / "vila")
    edit(source)
    output = tmp_path / "storm"
    with pytest.raises(error, match=message):
        convert_vila(source, output, discard_mm_projector=True)
    assert leftovers(output) == []
