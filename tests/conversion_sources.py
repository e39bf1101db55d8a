"""Source checkpoints for the conversion tests, saved as real folders: tiny random SigLIP and Qwen2 models (with the
real Qwen2 tokenizer), and a tiny checkpoint in VILA's layout (config.json + llm/ + vision_tower/ + mm_projector/)."""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (
    AutoTokenizer,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipConfig,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "patch_size": 8,
    "image_size": 32,
}  # 4×4 patches → 2×2 = 4 STORM tokens per frame
TEXT = {
    "vocab_size": 151936,
    "hidden_size": 48,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
}


def save_siglip(folder: Path, full: bool = False, seed: int = 0, **overrides) -> Path:
    """A random `SiglipVisionModel` (with its pooling head), or a whole `SiglipModel` when `full`."""
    torch.manual_seed(seed)
    vision = SiglipVisionConfig(**(VISION | overrides))
    if full:
        text = {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "vocab_size": 64,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
        }
        model = SiglipModel(SiglipConfig(vision_config=vision.to_dict(), text_config=text))
    else:
        model = SiglipVisionModel(vision)
    model.save_pretrained(folder)
    return folder


def save_qwen2(folder: Path, tokenizer_dir: Path, seed: int = 0, **overrides) -> Path:
    """A random Qwen2ForCausalLM (untied embeddings) with the real Qwen2 tokenizer and its ChatML template."""
    torch.manual_seed(seed)
    Qwen2ForCausalLM(Qwen2Config(**(TEXT | overrides))).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


VILA_TOKENS = ["[BOS]", "[PAD]", "<vila/sentinel>", "<image>", "<vila/video>"]
VILA_QWEN2_TEMPLATE = (  # VILA's chat_templates/qwen2.jinja as its builder stores it (spaces and newlines removed)
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}"
    "{% endif %}{% for message in messages if message['content'] is not none %}{{ '<|im_start|>' + message['role'] "
    "+ '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def save_vila(folder: Path, tokenizer_dir: Path, select_layer: int = -1, num_video_frames: int = 8) -> Path:
    """A tiny checkpoint as VILA's `save_pretrained` writes it, with an `mlp_downsample_2x2_fix` projector."""
    llm = save_qwen2(folder / "llm", tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(llm)
    tokenizer.add_tokens(VILA_TOKENS, special_tokens=True)
    tokenizer.chat_template = VILA_QWEN2_TEMPLATE
    tokenizer.save_pretrained(llm)
    vision = save_siglip(folder / "vision_tower")
    # VILA's transformers (4.x) keeps SiglipVisionModel's `vision_model.` level in the key names.
    state = SiglipVisionModel.from_pretrained(vision).state_dict()
    save_file(
        {f"vision_model.{key}": value.contiguous() for key, value in state.items()},
        vision / "model.safetensors",
        metadata={"format": "pt"},
    )
    projector = folder / "mm_projector"
    projector.mkdir()
    c, d = VISION["hidden_size"], TEXT["hidden_size"]
    weights = {
        "layers.1.weight": torch.ones(4 * c),
        "layers.1.bias": torch.zeros(4 * c),
        "layers.2.weight": torch.randn(d, 4 * c),
        "layers.2.bias": torch.zeros(d),
        "layers.4.weight": torch.randn(d, d),
        "layers.4.bias": torch.zeros(d),
    }
    save_file(weights, projector / "model.safetensors", metadata={"format": "pt"})
    projector_cfg = {
        "model_type": "v2l_projector",
        "mm_projector_type": "mlp_downsample_2x2_fix",
        "architectures": ["MultimodalProjector"],
    }
    write_json(projector / "config.json", projector_cfg)
    config = {
        "architectures": ["LlavaLlamaModel"],
        "model_type": "llava_llama",
        "llm_cfg": read_json(llm / "config.json"),
        "vision_tower_cfg": read_json(vision / "config.json"),
        "mm_projector_cfg": projector_cfg,
        "hidden_size": d,
        "mm_hidden_size": c,
        "mm_vision_select_layer": select_layer,
        "mm_vision_select_feature": "cls_patch",
        "num_video_frames": num_video_frames,
        "fps": 0.0,
        "image_aspect_ratio": "resize",
        "s2": False,
        "dynamic_s2": False,
        "model_dtype": "torch.float32",
        "chat_template": "qwen2",
        "mm_projector_lr": None,
    }
    write_json(folder / "config.json", config)
    return folder


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_json(path: Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2), encoding="utf-8")


def leftovers(output: Path) -> list[str]:
    """Anything a conversion into `output` left next to it: the folder itself or a temporary `.name.partial-*`."""
    return sorted(path.name for path in output.parent.iterdir() if path.name.lstrip(".").startswith(output.name))
