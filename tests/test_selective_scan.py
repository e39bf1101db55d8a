import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from storm_transformers.selective_scan import selective_scan, selective_scan_ref


def scan_inputs(batch=2, dim=6, state=4, seqlen=300, seed=0, requires_grad=False):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).requires_grad_(requires_grad)

    return dict(
        u=randn(batch, dim, seqlen),
        delta=randn(batch, dim, seqlen),
        A=(-torch.rand(dim, state, generator=generator) * 4).requires_grad_(requires_grad),
        B=randn(batch, state, seqlen),
        C=randn(batch, state, seqlen),
        D=randn(dim),
        z=randn(batch, dim, seqlen),
        delta_bias=randn(dim, scale=0.5),
    )


@pytest.mark.parametrize("seqlen", [1, 7, 128, 300])
def test_torch_scan_equals_sequential_reference_fp32(seqlen):
    inputs = scan_inputs(seqlen=seqlen)
    out = selective_scan(**inputs, delta_softplus=True)
    ref = selective_scan_ref(**inputs, delta_softplus=True)
    assert out.shape == (2, 6, seqlen) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_torch_scan_gradients_equal_reference():
    inputs = scan_inputs(seqlen=150, requires_grad=True)
    grad_out = torch.randn(2, 6, 150, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(selective_scan(**inputs, delta_softplus=True), list(inputs.values()), grad_out)
    ref_grads = torch.autograd.grad(selective_scan_ref(**inputs, delta_softplus=True), list(inputs.values()), grad_out)
    for name, grad, ref in zip(inputs, grads, ref_grads):
        torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-4, msg=name)


def test_without_optional_arguments_and_in_bf16():
    inputs = scan_inputs(seqlen=40)
    plain = {key: inputs[key] for key in ("u", "A", "B", "C")}
    plain["delta"] = torch.nn.functional.softplus(inputs["delta"])  # without delta_softplus, Δ must be positive
    torch.testing.assert_close(selective_scan(**plain), selective_scan_ref(**plain), rtol=0, atol=1e-5)
    half = {key: value.bfloat16() if key != "A" else value for key, value in plain.items()}
    out = selective_scan(**half)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), selective_scan_ref(**half).float(), rtol=0, atol=1e-2)


class _CountWrittenElements(TorchDispatchMode):
    """Counts the elements of every tensor that every op produces: the work done, independent of timing."""

    def __init__(self):
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.elements += tensor.numel()
        return out


def _backward_work(scan, seqlen):
    inputs = scan_inputs(batch=1, dim=4, state=2, seqlen=seqlen, requires_grad=True)
    out = scan(**inputs, delta_softplus=True)
    with _CountWrittenElements() as counter:
        out.sum().backward()
    return counter.elements


def test_backward_work_is_linear_in_sequence_length():
    ratio = _backward_work(selective_scan, 1024) / _backward_work(selective_scan, 256)
    assert 3.5 < ratio < 4.5, ratio  # 4x the steps, 4x the work
    # The counter does see quadratic work: the one-step-per-iteration reference indexes full-length tensors.
    ref_ratio = _backward_work(selective_scan_ref, 512) / _backward_work(selective_scan_ref, 128)
    assert ref_ratio > 10, ref_ratio


def _chunk(inputs: dict, start: int, end: int) -> dict:
    """The time steps start..end-1 of scan inputs (A, D, delta_bias have no time axis)."""
    return {key: value[..., start:end] if key in ("u", "delta", "B", "C", "z") else value for key, value in inputs.items()}


def _scan_in_chunks(scan, inputs: dict, bounds, initial_state=None):
    outputs, state = [], initial_state
    for start, end in bounds:
        out, state = scan(**_chunk(inputs, start, end), delta_softplus=True, initial_state=state, return_last_state=True)
        outputs.append(out)
    return torch.cat(outputs, dim=-1), state


@pytest.mark.parametrize("scan", [selective_scan, selective_scan_ref])
@pytest.mark.parametrize("bounds", [[(0, 150), (150, 300)], [(0, 1), (1, 129), (129, 300)], [(0, 97), (97, 194), (194, 291), (291, 300)]])
def test_scan_in_chunks_with_the_state_carried_equals_one_scan(scan, bounds):
    inputs = scan_inputs(seqlen=300)
    whole, last = scan(**inputs, delta_softplus=True, return_last_state=True)
    chunked, chunked_last = _scan_in_chunks(scan, inputs, bounds)
    assert last.shape == (2, 6, 4) and last.dtype == torch.float32
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)
    torch.testing.assert_close(chunked_last, last, rtol=0, atol=1e-5)


def test_initial_state_is_the_state_before_the_first_step():
    inputs = scan_inputs(seqlen=40)
    h0 = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(3))
    out, last = selective_scan(**inputs, delta_softplus=True, initial_state=h0, return_last_state=True)
    ref, ref_last = selective_scan_ref(**inputs, delta_softplus=True, initial_state=h0, return_last_state=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(last, ref_last, rtol=0, atol=1e-5)
    zero_state = selective_scan(**inputs, delta_softplus=True)
    assert (out - zero_state).abs().max() > 1e-2  # the initial state does change the output


def test_gradients_flow_through_the_carried_state():
    inputs = scan_inputs(seqlen=200, requires_grad=True)
    h0 = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(3), requires_grad=True)
    grad_out = torch.randn(2, 6, 200, generator=torch.Generator().manual_seed(1))
    leaves = [*inputs.values(), h0]
    whole, last = selective_scan(**inputs, delta_softplus=True, initial_state=h0, return_last_state=True)
    grads = torch.autograd.grad((whole * grad_out).sum() + last.sum(), leaves)
    chunked, chunked_last = _scan_in_chunks(selective_scan, inputs, [(0, 70), (70, 141), (141, 200)], initial_state=h0)
    chunked_grads = torch.autograd.grad((chunked * grad_out).sum() + chunked_last.sum(), leaves)
    for name, grad, chunked_grad in zip([*inputs, "initial_state"], grads, chunked_grads):
        torch.testing.assert_close(chunked_grad, grad, rtol=1e-4, atol=1e-4, msg=name)
