"""Our Triton decode attention (flash-decoding, `decode_attention_triton`) against the torch path of
`kernels.gqa_decode_attention`, on the CPU.

As tests/test_selective_scan_triton.py: Triton's interpreter (`TRITON_INTERPRET=1`, read when a kernel is defined)
runs the kernels with numpy, so this file runs itself once in a subprocess with that variable set and the tests check
the numbers it prints. 16-key blocks make every case cross block and split boundaries. The same kernels on a GPU,
inside a compiled static-cache decode: tests/test_kernels.py.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# name: (arguments of `_error`, largest relative error allowed)
CASES = {
    "bool mask with unfilled slots, one query": (dict(), 1e-5),
    "additive float mask, 3 queries (assisted decoding)": (dict(mask="float", length=3), 1e-5),
    "no mask, one query": (dict(mask="none"), 1e-5),
    "mask shared by the batch, a length that is not a whole block": (dict(mask_batch=1, kv_length=45), 1e-5),
    "one split of several blocks": (dict(target_programs=4, kv_length=100), 1e-5),
    "queries in transformers' layout (a transposed view)": (dict(transposed=True, length=2), 1e-5),
    "a fully masked query row (left padding): finite": (dict(length=2, masked_row=True), 1e-5),
    # bfloat16 on a GPU only (tests/test_kernels.py): Triton's interpreter multiplies bfloat16 tiles wrongly
    "float16, head_dim 32, 7 query heads per key/value head": (dict(dtype="float16", heads=14, head_dim=32), 1e-2),
}


def _error(batch=2, heads=6, kv_heads=2, length=1, kv_length=70, head_dim=16, mask="bool", mask_batch=2,
           transposed=False, masked_row=False, target_programs=None, dtype="float32") -> float:
    """Largest relative error (max |a − b| / max |b|) of the Triton kernels against the torch path."""
    import torch

    from storm_transformers import decode_attention_triton, kernels

    decode_attention_triton.CONFIG["BLOCK_N"] = 16
    default_target = decode_attention_triton.TARGET_PROGRAMS
    decode_attention_triton.TARGET_PROGRAMS = target_programs or default_target
    dtype = getattr(torch, dtype)
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(dtype)

    query = randn(batch, length, heads, head_dim).transpose(1, 2) if transposed else randn(batch, heads, length, head_dim)
    key, value = randn(batch, kv_heads, kv_length, head_dim), randn(batch, kv_heads, kv_length, head_dim)
    allowed = torch.rand(mask_batch, 1, length, kv_length + 8, generator=generator) > 0.3  # a static cache's slots
    allowed[..., 0] = True
    if masked_row:
        allowed[-1, :, 0] = False
    attention_mask = {"bool": allowed, "float": torch.zeros(allowed.shape).masked_fill(~allowed, -1e9),
                      "none": None}[mask]
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = heads // kv_heads, True
    expected, _ = kernels.gqa_decode_attention(module, query, key, value, attention_mask, scaling=0.3)  # torch path
    try:
        out = decode_attention_triton.decode_attention_triton(query, key, value, attention_mask, scaling=0.3)
    finally:
        decode_attention_triton.TARGET_PROGRAMS = default_target
    assert out.shape == expected.shape and out.dtype == expected.dtype and out.is_contiguous()
    assert torch.isfinite(out).all()
    return ((out.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


@pytest.fixture(scope="module")
def interpreter_errors() -> dict:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, __file__], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES)
def test_triton_decode_attention_equals_the_torch_path(interpreter_errors, case):
    assert interpreter_errors[case] <= CASES[case][1], interpreter_errors[case]


@pytest.mark.parametrize(
    "shapes, message",
    [
        (dict(key=(2, 4, 40, 16)), "kv_heads dividing heads"),  # 4 key/value heads do not divide 6 query heads
        (dict(value=(2, 2, 41, 16)), "must be"),
        (dict(head_dim=24), "power-of-two head_dim"),
        (dict(mask=(2, 1, 1, 39)), "attention_mask must be"),  # shorter than the cache
    ],
)
def test_triton_decode_attention_names_what_does_not_fit(shapes, message):
    """Checked before any kernel runs (no GPU needed)."""
    import torch

    triton_attention = pytest.importorskip("storm_transformers.decode_attention_triton")
    head_dim = shapes.get("head_dim", 16)
    query = torch.zeros(2, 6, 1, head_dim)
    key = torch.zeros(shapes.get("key", (2, 2, 40, head_dim)))
    value = torch.zeros(shapes.get("value", key.shape))
    mask = torch.ones(shapes.get("mask", (2, 1, 1, 40)), dtype=torch.bool)
    with pytest.raises(ValueError, match=message):
        triton_attention.decode_attention_triton(query, key, value, mask, scaling=0.25)


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1 (the test fixture does)"
    print(json.dumps({name: _error(**kwargs) for name, (kwargs, _) in CASES.items()}))
