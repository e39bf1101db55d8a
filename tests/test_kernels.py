"""The CUDA kernel path (mamba_ssm / causal_conv1d) against the torch path: GPU only, skipped elsewhere."""

import subprocess
import sys

import pytest
import torch

import storm_transformers.temporal_encoder as temporal_encoder
from storm_transformers import StormTemporalEncoder, StormTemporalEncoderConfig
from storm_transformers.kernels import MambaKernels, mamba_kernels, selective_scan_with_state
from storm_transformers.selective_scan import selective_scan


def test_kernels_are_not_imported_with_the_package():
    code = "import sys, storm_transformers; print(sorted({'mamba_ssm', 'causal_conv1d'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_cpu_tensors_never_reach_a_kernel(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a CUDA kernel was called with CPU tensors")

    monkeypatch.setattr(temporal_encoder, "mamba_kernels", lambda: MambaKernels(fail, fail))
    model = StormTemporalEncoder(StormTemporalEncoderConfig(hidden_size=16, state_size=4))
    assert model(torch.randn(1, 10, 16)).shape == (1, 10, 16)


def _scan_inputs(seqlen, requires_grad=False, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).requires_grad_(requires_grad)

    return dict(
        u=randn(2, 6, seqlen), delta=randn(2, 6, seqlen), A=(-torch.rand(6, 4, generator=generator) * 4).requires_grad_(requires_grad),
        B=randn(2, 4, seqlen), C=randn(2, 4, seqlen), D=randn(6), z=randn(2, 6, seqlen), delta_bias=randn(6),
    )


@pytest.mark.parametrize("with_initial_state", [True, False])
@pytest.mark.parametrize("gated", [True, False])
def test_kernel_wrapper_adds_the_state_exactly_on_the_torch_spec(with_initial_state, gated):
    """`selective_scan_with_state` around a scan that starts from h = 0 (here the torch spec, in place of mamba_ssm's
    kernel) equals the torch spec with `initial_state`, in outputs, last state and every gradient."""
    inputs = _scan_inputs(50, requires_grad=True)
    if not gated:
        inputs.pop("z")
    h0 = torch.randn(2, 6, 4, requires_grad=True) if with_initial_state else None
    leaves = [*inputs.values()] + ([h0] if with_initial_state else [])
    grad_out, grad_last = torch.randn(2, 6, 50), torch.randn(2, 6, 4)

    def run(scan):
        out, last = scan(**inputs, delta_softplus=True, initial_state=h0, return_last_state=True)
        return out, last, torch.autograd.grad((out * grad_out).sum() + (last * grad_last).sum(), leaves)

    out, last, grads = run(lambda **kw: selective_scan_with_state(selective_scan, **kw))
    ref_out, ref_last, ref_grads = run(selective_scan)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-5)
    torch.testing.assert_close(last, ref_last, rtol=0, atol=1e-5)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-4)
    no_state = selective_scan_with_state(selective_scan, **inputs, delta_softplus=True)
    torch.testing.assert_close(no_state, selective_scan(**inputs, delta_softplus=True), rtol=0, atol=1e-5)


def test_chunked_encoder_on_the_kernel_wrapper_equals_the_whole_torch_scan(monkeypatch):
    """The temporal encoder's carried-state path with the kernel wrapper (the torch spec standing in for mamba_ssm's
    kernel, on CPU tensors) equals one whole-sequence scan."""
    torch.manual_seed(0)
    model = StormTemporalEncoder(StormTemporalEncoderConfig(hidden_size=16, state_size=4, chunk_size=7)).eval()
    x = torch.randn(2, 30, 16)
    whole = model(x, chunk_size=30)
    calls = []

    def wrapped_torch_scan(*args, initial_state=None, return_last_state=False, **kwargs):
        calls.append(initial_state is not None)
        return selective_scan_with_state(selective_scan, *args, **kwargs, initial_state=initial_state, return_last_state=return_last_state)

    monkeypatch.setattr(temporal_encoder, "selective_scan", wrapped_torch_scan)
    torch.testing.assert_close(model(x), whole, rtol=0, atol=1e-5)
    assert any(calls)  # the carried states went through the wrapper


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


@requires_kernels
@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
def test_chunked_kernel_path_equals_whole_sequence_kernel_and_torch_paths(monkeypatch, bidirectional, dtype, tolerance):
    """The scan in chunks of 700 tokens (not dividing 2100 + 5; state carried through `selective_scan_with_state`)
    against one whole-sequence kernel call and against the torch path: outputs, input and parameter gradients."""
    torch.manual_seed(0)
    config = StormTemporalEncoderConfig(hidden_size=64, num_hidden_layers=2, bidirectional=bidirectional)
    model = StormTemporalEncoder(config).cuda().to(dtype)
    for layer in model.layers:  # mamba_ssm keeps these in fp32; so do we
        for _, _, _, A_log, D in layer.mixer.directions():
            A_log.data, D.data = A_log.data.float(), D.data.float()
    x = torch.randn(2, 3 * 700 + 5, 64, device="cuda", dtype=dtype)
    grad_out = torch.randn_like(x)
    results = {}
    for name, use_kernels, chunk_size in [("chunked kernel", True, 700), ("whole kernel", True, None), ("chunked torch", False, 700)]:
        config.use_mamba_kernels, config.chunk_size = use_kernels, chunk_size
        results[name] = _run(model, x, grad_out)
    for other in ("whole kernel", "chunked torch"):
        out, dx, grads = results[other]
        assert _relative_error(results["chunked kernel"][0], out) <= tolerance, other
        assert _relative_error(results["chunked kernel"][1], dx) <= tolerance, other
        for name, grad in grads.items():
            assert _relative_error(results["chunked kernel"][2][name], grad) <= tolerance, (other, name)
    with torch.no_grad():  # inference: the residual stream is updated in place, chunk by chunk
        config.use_mamba_kernels, config.chunk_size = True, 700
        in_place = torch.cat([chunk for _, chunk in model.output_chunks(x.clone())], dim=1)
    assert _relative_error(in_place, results["whole kernel"][0]) <= tolerance
