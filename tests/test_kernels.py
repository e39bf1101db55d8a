"""The CUDA kernel path (mamba_ssm / causal_conv1d) against the torch path: GPU only, skipped elsewhere."""

import subprocess
import sys

import pytest
import torch

import modeling_storm.temporal_encoder as temporal_encoder
from modeling_storm import StormTemporalEncoder, StormTemporalEncoderConfig
from modeling_storm.kernels import MambaKernels, mamba_kernels


def test_kernels_are_not_imported_with_the_package():
    code = "import sys, modeling_storm, processing_storm; print(sorted({'mamba_ssm', 'causal_conv1d'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_cpu_tensors_never_reach_a_kernel(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a CUDA kernel was called with CPU tensors")

    monkeypatch.setattr(temporal_encoder, "mamba_kernels", lambda: MambaKernels(fail, fail))
    model = StormTemporalEncoder(StormTemporalEncoderConfig(hidden_size=16, state_size=4))
    assert model(torch.randn(1, 10, 16)).shape == (1, 10, 16)


requires_kernels = pytest.mark.skipif(
    not torch.cuda.is_available() or mamba_kernels().selective_scan_fn is None,
    reason="needs a CUDA GPU with mamba_ssm installed (pip install storm-transformers[cuda])",
)


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1e-12)).item()


def _run(model, x, grad_out):
    x = x.clone().requires_grad_()
    model.zero_grad()
    out = model(x)
    out.backward(grad_out)
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return out.detach(), x.grad.clone(), grads


@requires_kernels
@pytest.mark.parametrize("kernel_set", ["scan", "conv", "both"])
@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
def test_kernel_path_equals_torch_path(monkeypatch, kernel_set, bidirectional, dtype, tolerance):
    available = mamba_kernels()
    if kernel_set != "scan" and available.causal_conv1d_fn is None:
        pytest.skip("causal_conv1d is not installed")
    chosen = MambaKernels(
        available.selective_scan_fn if kernel_set != "conv" else None,
        available.causal_conv1d_fn if kernel_set != "scan" else None,
    )
    monkeypatch.setattr(temporal_encoder, "mamba_kernels", lambda: chosen)
    torch.manual_seed(0)
    config = StormTemporalEncoderConfig(hidden_size=64, num_hidden_layers=2, bidirectional=bidirectional)
    model = StormTemporalEncoder(config).cuda().to(dtype)
    for layer in model.layers:  # mamba_ssm keeps these in fp32; so do we
        for _, _, _, A_log, D in layer.mixer.directions():
            A_log.data, D.data = A_log.data.float(), D.data.float()
    x = torch.randn(2, 3 * 700, 64, device="cuda", dtype=dtype)  # longer than one 2048-step kernel chunk
    grad_out = torch.randn_like(x)
    config.use_mamba_kernels = True
    kernel_out, kernel_dx, kernel_grads = _run(model, x, grad_out)
    config.use_mamba_kernels = False
    torch_out, torch_dx, torch_grads = _run(model, x, grad_out)
    assert _relative_error(kernel_out, torch_out) <= tolerance
    assert _relative_error(kernel_dx, torch_dx) <= tolerance
    for name, grad in torch_grads.items():
        assert _relative_error(kernel_grads[name], grad) <= tolerance, name
