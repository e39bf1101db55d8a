import io
import math
import os
import re
import shlex
import shutil
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
from conversion_sources import TEXT, VISION, leftovers, read_json, save_qwen2, save_siglip, write_json
from huggingface_hub import ModelCard
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    SiglipVisionModel,
)

from storm_transformers import default_chat_template
from storm_transformers.cli import main
from storm_transformers.conversion import compose as compose_module
from storm_transformers.conversion.compose import compose
from storm_transformers.conversion.sources import check_chat_template, resolve_source, source_license
from storm_transformers.conversion.verification import VERIFY_CONVERSATION

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sources(tmp_path_factory, qwen2_tokenizer_dir):
    root = tmp_path_factory.mktemp("sources")
    return {
        "siglip": save_siglip(root / "siglip"),
        "siglip_full": save_siglip(root / "siglip_full", full=True),
        "qwen2": save_qwen2(root / "qwen2", qwen2_tokenizer_dir),
    }


def assert_equal_weights(loaded: dict, source: dict):
    assert loaded.keys() == source.keys()
    for key, tensor in source.items():
        assert torch.equal(loaded[key], tensor), key


def test_compose_copies_both_sources_exactly_and_initialises_the_new_modules(sources, tmp_path, capsys):
    output = tmp_path / "storm"
    assert (
        main(
            [
                "convert",
                "compose",
                "--vision",
                str(sources["siglip"]),
                "--llm",
                str(sources["qwen2"]),
                "--output",
                str(output),
                "--num-frames",
                "8",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "vision tower hidden_states[-2] vs the source vision model: max |Δ| = 0 over (4, 16, 32)" in out
    assert "text-only logits vs the source LLM: max |Δ| = 0 over (1, 43, 151936)" in out
    assert "not used: `head.*` (11 tensors)" in out  # SigLIP's pooling head
    assert leftovers(output) == ["storm"]
    names = {path.name for path in output.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "processor_config.json",
        "tokenizer.json",
        "chat_template.jinja",
        "generation_config.json",
        "README.md",
    } <= names
    assert not any(name.endswith(".bin") for name in names)
    assert {"configuration_storm.py", "modeling_storm.py", "processing_storm.py"} <= names  # its code (remote code)
    with safe_open(output / "model.safetensors", "pt") as weights:  # current names, not the legacy ones
        assert not any(".vision_model." in key for key in weights.keys())

    storm = AutoModelForImageTextToText.from_pretrained(output)
    source_vision = SiglipVisionModel.from_pretrained(sources["siglip"]).state_dict()
    assert_equal_weights(
        storm.model.vision_tower.state_dict(),
        {key: value for key, value in source_vision.items() if not key.startswith("head.")},
    )
    llm = AutoModelForCausalLM.from_pretrained(sources["qwen2"])
    tokenizer = AutoTokenizer.from_pretrained(output)
    image_id, video_id = tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>"])
    assert (image_id, video_id) == (TEXT["vocab_size"], TEXT["vocab_size"] + 1)  # added: Qwen2's GGUF vocab lacks them
    rows = math.ceil(len(tokenizer) / 64) * 64
    assert storm.config.text_config.vocab_size == rows == storm.lm_head.weight.shape[0]
    source_llm = llm.state_dict()
    embed, head = source_llm.pop("model.embed_tokens.weight"), source_llm.pop("lm_head.weight")
    assert_equal_weights(
        {k: v for k, v in storm.model.language_model.state_dict().items() if k != "embed_tokens.weight"},
        {key.removeprefix("model."): value for key, value in source_llm.items()},
    )
    assert torch.equal(storm.model.language_model.embed_tokens.weight[: len(embed)], embed)
    assert torch.equal(storm.lm_head.weight[: len(head)], head)
    assert (storm.config.image_token_id, storm.config.video_token_id) == (image_id, video_id)

    mixer = storm.model.temporal_encoder.layers[0].mixer  # mamba_ssm's init: S4D-real A, D = 1, Δ in [1e-3, 0.1]
    torch.testing.assert_close(mixer.A_log, torch.log(torch.arange(1, 17.0)).expand(96, 16))
    assert torch.equal(mixer.D, torch.ones(96))
    assert (
        1e-3
        <= torch.nn.functional.softplus(mixer.dt_proj.bias).min()
        < torch.nn.functional.softplus(mixer.dt_proj.bias).max()
        <= 0.1
    )
    projector = storm.model.multi_modal_projector.linear
    assert projector.weight.shape == (TEXT["hidden_size"], 4 * VISION["hidden_size"])
    assert 0.015 < projector.weight.std() < 0.025 and not projector.bias.any()

    config = storm.config
    assert config.vision_config.vision_use_head is False and config.temporal_pool_size == 4
    processor = AutoProcessor.from_pretrained(output)
    assert processor.video_processor.size == {"height": 32, "width": 32} and processor.video_processor.num_frames == 8
    assert processor.chat_template == default_chat_template()
    card = ModelCard.load(output / "README.md")
    assert card.data.pipeline_tag == "video-text-to-text" and card.data.library_name == "transformers"
    assert "random-weights" in card.data.tags and "custom_code" in card.data.tags
    assert "Not trained yet" in card.text and "| visual tokens per video at 8 frames | 8 |" in card.text
    assert 'from_pretrained("storm", trust_remote_code=True)' in card.text  # the folder carries its code


def readme_block(after: str, language: str = "bash") -> str:
    """The first fenced block of `language` after the text `after` in README.md."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return re.search(rf"```{language}\n(.*?)```", text[text.index(after) :], re.DOTALL).group(1)


def run_readme_commands(block: str) -> None:
    """Run the README's shell lines in-process: `storm ...` through the `storm` command, `python -c` as code."""
    for line in block.strip().splitlines():
        words = shlex.split(line)
        if words[0] == "storm":
            assert main(words[1:]) == 0, line
        else:
            assert words[:2] == ["python", "-c"], line
            exec(words[2], {})  # noqa: S102


@pytest.fixture(scope="module")
def readme_smollm2(tmp_path_factory, smollm2_gguf):
    """The README's compose example from the assets: `storm convert gguf` on the SmolLM2 GGUF, a random SigLIP,
    `storm convert compose`. Returns the folder it ran in and what it printed."""
    folder = tmp_path_factory.mktemp("readme_compose")
    (folder / "assets").symlink_to(smollm2_gguf.parents[1])
    old = Path.cwd()
    os.chdir(folder)
    try:
        output = io.StringIO()
        with redirect_stdout(output):
            run_readme_commands(readme_block("The same from the assets, runnable as is"))
    finally:
        os.chdir(old)
    return folder, output.getvalue()


def test_readme_compose_example_runs_from_the_assets_and_prints_its_verification(readme_smollm2):
    folder, printed = readme_smollm2
    assert readme_block("Verification, printed at the end", language="").strip() in printed
    assert "verification: logits of the folder vs the GGUF model: max |Δ| = 0 over (1, 45, 49152)" in printed
    assert ModelCard.load(folder / "smollm2" / "README.md").data.license == "apache-2.0"  # the GGUF's metadata
    config = read_json(folder / "smollm2" / "config.json")
    assert config["model_type"] == "llama" and "quantization_config" not in config


def test_smollm2_composed_into_storm_generates_exactly_like_smollm2(readme_smollm2, video_path):
    folder, _ = readme_smollm2
    output = folder / "storm-smollm2"
    # The dequantised folder computes exactly what the GGUF does (storm convert gguf's verification, tested above).
    smol = AutoModelForCausalLM.from_pretrained(folder / "smollm2", dtype=torch.float32).eval()
    smol_tokenizer = AutoTokenizer.from_pretrained(folder / "smollm2")
    storm = AutoModelForImageTextToText.from_pretrained(output).eval()
    processor = AutoProcessor.from_pretrained(output)
    assert storm.config.text_config.model_type == "llama" and storm.config.tie_word_embeddings
    assert storm.lm_head.weight.data_ptr() == storm.model.language_model.embed_tokens.weight.data_ptr()

    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]},
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    plain_messages = [messages[0], {"role": "user", "content": "What is the capital of France?"}]
    alone = smol_tokenizer.apply_chat_template(
        plain_messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    assert torch.equal(inputs["input_ids"], alone["input_ids"])  # STORM's template = SmolLM2's own
    with torch.no_grad():
        ours = storm.generate(**inputs, max_new_tokens=20, do_sample=False)
        theirs = smol.generate(**alone, max_new_tokens=20, do_sample=False)
    assert torch.equal(ours, theirs)
    answer = processor.decode(ours[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
    # The video path runs on the real clip (random projector: only shapes and finiteness are meaningful).
    video = [{"role": "user", "content": [{"type": "video", "path": str(video_path)}, {"type": "text", "text": "?"}]}]
    video_inputs = processor.apply_chat_template(
        video,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"num_frames": 8},
    )
    with torch.no_grad():
        assert torch.isfinite(storm(**video_inputs).logits).all()


def test_chat_templates_that_are_not_storms_chatml_are_refused(qwen2_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(qwen2_tokenizer_dir)
    check_chat_template(tokenizer, "qwen2")  # Qwen2's own template renders exactly as STORM's
    tokenizer.chat_template = (
        "{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
        "{{ message['content'] }}<|eot_id|>{% endfor %}"
    )
    with pytest.raises(
        ValueError, match=r"(?s)formats conversations differently.*LLM:   '<\|start_header_id\|>system"
    ):
        check_chat_template(tokenizer, "llama3")
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        check_chat_template(tokenizer, "base")
    assert VERIFY_CONVERSATION[0]["role"] == "system"  # the check does not depend on default system prompts


def no_vision_folder(folders):
    return folders["missing"], folders["qwen2"]


def no_weights(folders):
    (folders["siglip"] / "model.safetensors").unlink()
    return folders["siglip"], folders["qwen2"]


def no_tokenizer(folders):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folders["qwen2"] / name).unlink()
    return folders["siglip"], folders["qwen2"]


def swapped(folders):
    return folders["qwen2"], folders["siglip"]


def llm_as_vision(folders):
    return folders["qwen2"], folders["qwen2"]


def clip(folders):
    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=8, image_size=32
    )
    CLIPVisionModel(config).save_pretrained(folders["missing"])
    return folders["missing"], folders["qwen2"]


def no_chat_template(folders):
    config = read_json(folders["qwen2"] / "tokenizer_config.json")
    config.pop("chat_template", None)
    write_json(folders["qwen2"] / "tokenizer_config.json", config)
    (folders["qwen2"] / "chat_template.jinja").unlink(missing_ok=True)
    return folders["siglip"], folders["qwen2"]


def clip_normalisation(folders):
    write_json(
        folders["siglip"] / "preprocessor_config.json",
        {"image_mean": [0.481, 0.458, 0.408], "image_std": [0.269, 0.261, 0.276]},
    )
    return folders["siglip"], folders["qwen2"]


def quantized_llm(folders):
    config = read_json(folders["qwen2"] / "config.json")
    write_json(folders["qwen2"] / "config.json", config | {"quantization_config": {"quant_method": "gptq", "bits": 4}})
    return folders["siglip"], folders["qwen2"]


def width_not_matching_the_weights(folders):
    write_json(folders["siglip"] / "config.json", read_json(folders["siglip"] / "config.json") | {"hidden_size": 40})
    return folders["siglip"], folders["qwen2"]


@pytest.mark.parametrize(
    "make, error, message",
    [
        (no_vision_folder, FileNotFoundError, "vision model folder .*missing does not exist"),
        (no_weights, FileNotFoundError, r"has no weights \(\*.safetensors or \*.bin\)"),
        (no_tokenizer, FileNotFoundError, r"has no tokenizer \(tokenizer.json / tokenizer_config.json\)"),
        (swapped, ValueError, "is a 'siglip_vision_model', which AutoModelForCausalLM cannot load.*did you swap"),
        (llm_as_vision, ValueError, "is a 'qwen2', not SigLIP.*did you swap --vision and --llm"),
        (clip, ValueError, "is a 'clip_vision_model', not SigLIP"),
        (no_chat_template, ValueError, "has no chat template"),
        (clip_normalisation, ValueError, r"normalises images with image_mean=\[0.481.*STORM's processors use \[0.5"),
        (quantized_llm, ValueError, r"is quantized \(gptq\).*needs the unquantized checkpoint"),
        (width_not_matching_the_weights, ValueError, "do not match its config.json .*mis-shaped"),
    ],
)
def test_bad_sources_fail_clearly_and_leave_nothing(sources, tmp_path, make, error, message):
    folders = {name: shutil.copytree(sources[name], tmp_path / name) for name in ("siglip", "qwen2")}
    folders["missing"] = tmp_path / "missing"
    vision, llm = make(folders)
    output = tmp_path / "out"
    with pytest.raises(error, match=message):
        compose(vision, llm, output, num_frames=4)
    assert leftovers(output) == []


def test_output_settings_are_checked_before_any_work(sources, tmp_path):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists. Choose another output folder or pass overwrite=True"):
        compose(sources["siglip"], sources["qwen2"], existing)
    assert (existing / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="is \\(or contains\\) the source"):
        compose(sources["siglip"], sources["qwen2"], sources["qwen2"].parent, overwrite=True)
    with pytest.raises(ValueError, match="num_frames=6 is not a multiple of temporal_pool_size=4.*Sample 4 or 8"):
        compose(sources["siglip"], sources["qwen2"], tmp_path / "out", num_frames=6)
    assert leftovers(tmp_path / "out") == []


def _shift_logits(reference):
    reference.logits[0, -1, 0] += 1e-3


def _shift_vision(reference):
    reference.vision_hidden_states[0, 0, 0] += 1e-3


def _other_prompt(reference):
    reference.input_ids[0, -1] += 1


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (_shift_logits, r"the text outputs differ from the sources by more than 0.0001"),
        (_shift_vision, r"the vision outputs differ from the sources by more than 0.0001"),
        (_other_prompt, r"the checkpoint's processor does not make the inputs the sources were checked with"),
    ],
)
def test_failed_verification_writes_nothing_and_keeps_the_old_output(sources, tmp_path, monkeypatch, corrupt, message):
    output = tmp_path / "storm"
    output.mkdir()
    (output / "keep.txt").write_text("previous checkpoint")
    reference_outputs = compose_module.reference_outputs

    def corrupted(*args, **kwargs):  # as if a weight or the processor had been converted wrongly
        reference = reference_outputs(*args, **kwargs)
        corrupt(reference)
        return reference

    monkeypatch.setattr(compose_module, "reference_outputs", corrupted)
    with pytest.raises(RuntimeError, match="Verification failed: " + message):
        compose(sources["siglip"], sources["qwen2"], output, num_frames=4, overwrite=True)
    assert leftovers(output) == ["storm"] and [path.name for path in output.iterdir()] == ["keep.txt"]


def test_a_whole_siglip_from_the_hub_in_bfloat16(sources, tmp_path, monkeypatch, capsys):
    """Hub ids are fetched and named as base models; a SiglipModel gives its vision half; A_log/D stay fp32."""
    import huggingface_hub

    downloads = {"org/tiny-siglip": sources["siglip_full"], "org/tiny-qwen2": sources["qwen2"]}
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id: str(downloads[repo_id]))
    assert resolve_source(sources["siglip"], "vision model") == (sources["siglip"], None)
    output = compose("org/tiny-siglip", "org/tiny-qwen2", tmp_path / "storm", num_frames=4, dtype="bfloat16")
    out = capsys.readouterr().out
    assert "verification (bfloat16, tolerance 0.01):" in out and "max |Δ| = 0 over (4, 16, 32)" in out
    assert "not used: `logit_bias`, `logit_scale`, `text_model.*` (22 tensors), `head.*` (11 tensors)" in out
    card = ModelCard.load(output / "README.md")
    assert card.data.base_model == ["org/tiny-siglip", "org/tiny-qwen2"]
    assert card.data.base_model_relation == "finetune"
    storm = AutoModelForImageTextToText.from_pretrained(output)
    mixer = storm.model.temporal_encoder.layers[0].mixer
    assert storm.lm_head.weight.dtype == torch.bfloat16 and mixer.A_log.dtype == mixer.D.dtype == torch.float32
    vision = SiglipVisionModel.from_pretrained(sources["siglip_full"], dtype=torch.bfloat16).state_dict()
    assert_equal_weights(
        storm.model.vision_tower.state_dict(),
        {key: value for key, value in vision.items() if not key.startswith("head.")},
    )

    def offline(repo_id):
        raise huggingface_hub.errors.LocalEntryNotFoundError("no connection")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="neither a local folder nor a model that could be downloaded"):
        resolve_source("org/elsewhere", "LLM")


def test_the_card_licence_is_the_sources_common_one(tmp_path):
    folders = [tmp_path / "vision", tmp_path / "llm"]
    for folder, license in zip(folders, ["apache-2.0", "apache-2.0"]):
        folder.mkdir()
        (folder / "README.md").write_text(f"---\nlicense: {license}\n---\n# model\n")
    assert source_license(folders) == "apache-2.0"
    (folders[1] / "README.md").write_text("---\nlicense: llama3\n---\n# model\n")
    assert source_license(folders) == "other"
    (folders[1] / "README.md").unlink()
    assert source_license(folders) == "other"


def test_help_lists_both_conversions(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["convert", "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    assert "compose" in out and "vila" in out
    with pytest.raises(SystemExit):
        main(["convert", "vila", "--help"])
    assert "--discard-mm-projector" in capsys.readouterr().out
