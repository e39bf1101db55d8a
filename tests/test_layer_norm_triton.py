"""Our Triton LayerNorm (`layer_norm_triton.layer_norm`) against `torch.nn.functional.layer_norm`, on the CPU.

As tests/test_selective_scan_triton.py: Triton's interpreter (`TRITON_INTERPRET=1`, read when a kernel is defined)
runs the kernel with numpy, so this file runs itself once in a subprocess with that variable set (`python
tests/test_layer_norm_triton.py` prints every case's largest relative error as JSON) and the tests check the numbers.
On a GPU, through the vision tower: tests/test_kernels.py.
"""

import json
import os

import pytest
from storm_testing import run_under_triton_interpreter

# name: (arguments of `_error`, largest relative error allowed)
CASES = {
    "SigLIP's 1152 channels, rows not a multiple of a program's": (dict(shape=(3, 5, 1152)), 1e-5),
    "channels not a power of two, large mean": (dict(shape=(7, 40), offset=50.0), 1e-5),
    "one row per program (4096 channels)": (dict(shape=(3, 4096)), 1e-5),
    "strided rows (every other row of a tensor)": (dict(shape=(9, 48), strided=True), 1e-5),
    "bfloat16": (dict(shape=(6, 1152), dtype="bfloat16"), 1e-2),
}


def _error(shape, dtype="float32", offset=0.0, strided=False) -> float:
    """Largest relative error (max |a − b| / max |b|) of the Triton LayerNorm against torch's (random weight, bias)."""
    import torch
    import torch.nn.functional as F

    from storm_transformers.layer_norm_triton import layer_norm

    generator = torch.Generator().manual_seed(0)
    dtype = getattr(torch, dtype)
    columns = shape[-1]
    x = torch.randn(shape[0] * (2 if strided else 1), *shape[1:], generator=generator) * 3 + offset
    x = (x[::2] if strided else x).to(dtype)
    weight, bias = (torch.randn(columns, generator=generator).to(dtype) for _ in range(2))
    out = layer_norm(x, weight, bias, 1e-6)
    expected = F.layer_norm(x.float(), (columns,), weight.float(), bias.float(), 1e-6).to(dtype)
    assert out.shape == x.shape and out.dtype == x.dtype
    return ((out.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


@pytest.fixture(scope="module")
def interpreter_errors() -> dict:
    pytest.importorskip("storm_transformers.layer_norm_triton")  # skips where Triton is missing
    return run_under_triton_interpreter(__file__, timeout=600)


@pytest.mark.parametrize("case", CASES)
def test_triton_layer_norm_equals_torchs(interpreter_errors, case):
    assert interpreter_errors[case] <= CASES[case][1], interpreter_errors[case]


def test_triton_layer_norm_names_a_wrong_weight_and_leaves_wide_rows_to_torch(monkeypatch):
    """Both before any kernel runs (no GPU needed)."""
    import torch
    import torch.nn.functional as F

    triton_norm = pytest.importorskip("storm_transformers.layer_norm_triton")
    with pytest.raises(ValueError, match=r"weight and bias must have shape \(8,\)"):
        triton_norm.layer_norm(torch.zeros(2, 8), torch.ones(4), torch.zeros(8), 1e-6)
    columns = triton_norm.MAX_COLUMNS + 1
    x, weight, bias = torch.randn(2, columns), torch.randn(columns), torch.randn(columns)
    monkeypatch.setattr(triton_norm, "_layer_norm_forward", None)  # launching the kernel would fail
    expected = F.layer_norm(x, (columns,), weight, bias, 1e-6)
    torch.testing.assert_close(triton_norm.layer_norm(x, weight, bias, 1e-6), expected)


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1 (the test fixture does)"
    print(json.dumps({name: _error(**kwargs) for name, (kwargs, _) in CASES.items()}))
