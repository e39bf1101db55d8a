"""`storm convert gguf`: a GGUF causal LM (llama.cpp's format) dequantised into a plain transformers folder.

`storm convert compose` copies an LLM's weights exactly and so refuses quantized ones. A GGUF file (such as the
SmolLM2-135M-Instruct Q4_1 that `storm fetch-assets --with-llm` fetches) becomes a folder it accepts:

    storm convert gguf --input assets/llm/SmolLM2-135M-Instruct.Q4_1.gguf --output smollm2

transformers reads the GGUF (`from_pretrained(..., gguf_file=...)`, which dequantises every tensor to float32 with the
`gguf` package) and its tokenizer and chat template; the weights go into a plain model of the same architecture
(no `quantization_config`), saved as safetensors with the tokenizer and a card. The values are the dequantised ones,
exactly: before the folder is moved into place, it is reloaded and its logits on a chat prompt must equal those of the
GGUF model (max |Δ| = 0). The quantization error of the GGUF itself stays, of course.
"""

from pathlib import Path

import torch
from huggingface_hub import ModelCard, ModelCardData
from transformers import AutoModelForCausalLM, AutoTokenizer

from storm_transformers.loading import loading_report_off

from .checkpoint import prepare_output_dir, staging_folder
from .verification import VERIFY_CONVERSATION

GGUF_MAGIC = b"GGUF"


def read_gguf(path: Path):
    """The causal LM (float32, dequantised) and tokenizer in the GGUF file `path`, and its metadata fields.

    Raises:
        FileNotFoundError: no such file. ValueError: not a GGUF file, or a GGUF transformers cannot read (an
        architecture it does not support, say).
    """
    if not path.is_file():
        raise FileNotFoundError(f"No GGUF file at {path}. (`storm fetch-assets --with-llm` fetches SmolLM2's.)")
    with path.open("rb") as file:
        if file.read(4) != GGUF_MAGIC:
            raise ValueError(f"{path} is not a GGUF file (it does not start with 'GGUF').")
    print(f"reading and dequantising {path}")
    try:
        with loading_report_off():
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, RuntimeError, OSError) as error:
        raise ValueError(f"transformers cannot read the GGUF file {path}: {error}") from error
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    metadata = {
        key: fields[key].contents()
        for key in ("general.name", "general.license", "general.architecture", "general.file_type")
        if key in fields
    }
    return model.eval(), tokenizer, metadata


def convert_gguf(gguf_file: str | Path, output_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write the GGUF causal LM `gguf_file` as a plain float32 transformers folder `output_dir` (see the module
    docstring), which `storm convert compose --llm` accepts.

    Args:
        gguf_file: a `.gguf` file of a causal LM that transformers reads (Llama, Qwen2, Mistral, … architectures).
        output_dir: folder to create; it appears only once complete and verified.
        overwrite: replace an existing `output_dir`.

    Returns:
        `Path`: `output_dir`.

    Raises:
        FileExistsError: `output_dir` exists and not `overwrite`. FileNotFoundError: no such file. ValueError: not a
        GGUF transformers can read, or `output_dir` is the GGUF file's folder. RuntimeError: the reloaded folder does
        not compute what the GGUF does. Nothing is written in any of these cases.
    """
    gguf_file, output_dir = Path(gguf_file), prepare_output_dir(output_dir, overwrite)
    if gguf_file.resolve().parent == output_dir.resolve() or output_dir.resolve() in gguf_file.resolve().parents:
        raise ValueError(f"The output folder {output_dir} holds the GGUF file {gguf_file}. Choose another one.")
    gguf_model, tokenizer, metadata = read_gguf(gguf_file)
    config = gguf_model.config.to_dict()
    config.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(type(gguf_model.config).from_dict(config), dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    name = metadata.get("general.name") or gguf_file.stem
    card = ModelCard(
        f"---\n{ModelCardData(license=metadata.get('general.license'), library_name='transformers').to_yaml()}\n---\n\n"
        f"# {name}\n\nDequantised to float32 by `storm convert gguf` from the GGUF file `{gguf_file.name}` "
        f"(architecture {metadata.get('general.architecture', config.get('model_type'))}): the weights are the "
        "GGUF's dequantised values, exactly, with its tokenizer and chat template. Licence: as declared by the GGUF "
        "file.\n"
    )
    prompt = tokenizer.apply_chat_template(VERIFY_CONVERSATION, add_generation_prompt=True, return_tensors="pt")
    input_ids = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    with torch.no_grad():
        reference = gguf_model(input_ids=input_ids).logits
    with staging_folder(output_dir, overwrite) as staging:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        card.save(staging / "README.md")
        with torch.no_grad():
            reloaded = AutoModelForCausalLM.from_pretrained(staging, dtype=torch.float32).eval()
            difference = (reloaded(input_ids=input_ids).logits - reference).abs().max().item()
        print(f"verification: logits of the folder vs the GGUF model: max |Δ| = {difference:g} over {tuple(reference.shape)}")
        if difference != 0:
            raise RuntimeError(f"Verification failed: the folder's logits differ from the GGUF's by {difference:g}.")
    return output_dir
