"""Our Triton selective scan (forward and backward) against the sequential reference, on the CPU.

Triton's interpreter (`TRITON_INTERPRET=1`, read when a kernel is defined) runs the kernels with numpy, so this file
runs itself once in a subprocess with that variable set (`python tests/test_selective_scan_triton.py` prints every
case's largest relative errors as JSON) and the tests check the numbers. Small tiles (8 time steps × 4 channels)
make every case cross tile boundaries and channel blocks. The same kernels on a GPU: tests/test_kernels.py.
"""

import json
import os

import pytest
from storm_testing import run_under_triton_interpreter

# name: (arguments of `_errors`, largest relative error allowed)
CASES = {
    "all arguments, 2 channel blocks, a partial last tile": (dict(batch=2, dim=6, seqlen=11), 1e-5),
    "B and C in 2 groups, channel-last u and delta, no z": (dict(groups=2, z=False, seqlen=16, channel_last=True), 1e-5),
    "no optional argument, shorter than a tile": (dict(D=False, z=False, bias=False, softplus=False, initial_state=False,
                                                       last_state=False, seqlen=5, state=4), 1e-5),
    "bfloat16 inputs": (dict(dtype="bfloat16", initial_state=False), 1e-2),
    "bidirectional temporal encoder in 3 chunks with carried states": (dict(encoder=True), 1e-5),
}


def _errors(batch=1, dim=4, state=3, seqlen=13, groups=0, D=True, z=True, bias=True, softplus=True,
            initial_state=True, last_state=True, channel_last=False, dtype="float32", encoder=False) -> dict:
    """Largest relative errors (max |a − b| / max |b|) of the Triton scan against `selective_scan_ref`: outputs, last
    state and the gradient of every input (or, with `encoder`, of a temporal encoder running on it against the
    torch path: output, input and parameter gradients)."""
    import torch

    from storm_transformers import selective_scan_triton as triton_scan
    from storm_transformers.selective_scan import selective_scan_ref

    triton_scan.CONFIG.update(BLOCK_T=8, BLOCK_E=4, BACKWARD_BLOCK_E=4)
    generator = torch.Generator().manual_seed(0)

    def error(actual, expected):
        return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1e-6)).item()

    if encoder:
        return _encoder_errors(triton_scan.selective_scan_triton, error)
    dtype = getattr(torch, dtype)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    def sequence():
        x = randn(batch, seqlen, dim).transpose(1, 2) if channel_last else randn(batch, dim, seqlen)
        return x.to(dtype)

    shape_bc = (batch, groups, state, seqlen) if groups else (batch, state, seqlen)
    inputs = dict(u=sequence(), delta=sequence() if softplus else torch.rand(batch, dim, seqlen, generator=generator).to(dtype),
                  A=-torch.rand(dim, state, generator=generator) * 4, B=randn(*shape_bc).to(dtype), C=randn(*shape_bc).to(dtype))
    optional = dict(D=lambda: randn(dim), z=sequence, delta_bias=lambda: randn(dim) / 2,
                    initial_state=lambda: randn(batch, dim, state))
    inputs.update({name: make() for name, make in optional.items() if {"D": D, "z": z, "delta_bias": bias,
                                                                       "initial_state": initial_state}[name]})
    for tensor in inputs.values():
        tensor.requires_grad_()

    def run(scan):
        result = scan(**inputs, delta_softplus=softplus, return_last_state=last_state)
        outputs = list(result) if last_state else [result]
        weights = torch.Generator().manual_seed(1)
        loss = sum((out.float() * torch.randn(out.shape, generator=weights)).sum() for out in outputs)
        return outputs, torch.autograd.grad(loss, list(inputs.values()))

    (outputs, grads), (ref_outputs, ref_grads) = run(triton_scan.selective_scan_triton), run(selective_scan_ref)
    for grad, ref_grad in zip(grads, ref_grads):
        assert grad.dtype == ref_grad.dtype and grad.shape == ref_grad.shape, (grad.dtype, ref_grad.dtype)
    errors = {name: error(out, ref) for name, out, ref in zip(["output", "last state"], outputs, ref_outputs)}
    return errors | {f"grad {name}": error(grad, ref) for name, grad, ref in zip(inputs, grads, ref_grads)}


def _encoder_errors(scan, error) -> dict:
    """The temporal encoder (bidirectional: both directions in one scan, B and C in 2 groups, strided as the mixer
    makes them) in chunks of 7 of 17 tokens, on the Triton scan against the torch path."""
    import torch

    import storm_transformers.temporal_encoder as temporal_encoder
    from storm_transformers import StormTemporalEncoder, StormTemporalEncoderConfig

    torch.manual_seed(0)
    config = StormTemporalEncoderConfig(hidden_size=4, state_size=2, num_hidden_layers=1, chunk_size=7)
    model = StormTemporalEncoder(config)
    x, grad_out = torch.randn(1, 17, 4), torch.randn(1, 17, 4)

    def run():
        model.zero_grad()
        inputs = x.clone().requires_grad_()
        out = model(inputs)
        out.backward(grad_out)
        return {"output": out, "grad input": inputs.grad, **{f"grad {n}": p.grad.clone() for n, p in model.named_parameters()}}

    reference = run()
    temporal_encoder.selective_scan = scan
    return {name: error(value, reference[name]) for name, value in run().items()}


@pytest.fixture(scope="module")
def interpreter_errors() -> dict:
    pytest.importorskip("storm_transformers.selective_scan_triton")  # skips where Triton is missing or older than 3.4
    return run_under_triton_interpreter(__file__, timeout=900)


@pytest.mark.parametrize("case", CASES)
def test_triton_scan_equals_the_reference_outputs_and_gradients(interpreter_errors, case):
    tolerance = CASES[case][1]
    errors = interpreter_errors[case]
    assert errors and all(value <= tolerance for value in errors.values()), errors


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(B=(2, 3, 4, 10)), "B must have shape"),  # 3 groups do not divide 8 channels
        (dict(C=(2, 5, 10)), "C must have shape"),
        (dict(delta=(2, 8, 9)), "delta and z must have the shape of u"),
        (dict(A=(7, 4)), "A must have shape"),
        (dict(initial_state=(2, 8, 3)), "initial_state must have shape"),
    ],
)
def test_triton_scan_names_the_argument_whose_shape_is_wrong(change, message):
    """Checked before any kernel runs (no GPU needed)."""
    import torch

    triton_scan = pytest.importorskip("storm_transformers.selective_scan_triton")
    shapes = dict(u=(2, 8, 10), delta=(2, 8, 10), A=(8, 4), B=(2, 4, 10), C=(2, 4, 10), initial_state=None) | change
    inputs = {name: None if shape is None else torch.zeros(shape) for name, shape in shapes.items()}
    with pytest.raises(ValueError, match=message):
        triton_scan.selective_scan_triton(**inputs)


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1 (the test fixture does)"
    print(json.dumps({name: _errors(**kwargs) for name, (kwargs, _) in CASES.items()}))
