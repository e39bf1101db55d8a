import math

import pytest
import torch
from storm_testing import enable_checkpointing
from torch.utils._python_dispatch import TorchDispatchMode

from storm_transformers import StormTemporalEncoder, StormTemporalEncoderConfig
from storm_transformers.temporal_encoder import StormMambaMixer, chunk_bounds


def encoder(**kwargs) -> StormTemporalEncoder:
    torch.manual_seed(0)
    return StormTemporalEncoder(StormTemporalEncoderConfig(hidden_size=16, state_size=4, **kwargs)).eval()


def test_parameters_use_mamba_ssm_names_and_shapes():
    model = encoder(num_hidden_layers=1, expand=2, conv_kernel=4)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    inner, rank = 32, math.ceil(16 / 16)
    expected = {
        "in_proj.weight": (2 * inner, 16),
        "conv1d.weight": (inner, 1, 4),
        "conv1d.bias": (inner,),
        "x_proj.weight": (rank + 8, inner),
        "dt_proj.weight": (inner, rank),
        "dt_proj.bias": (inner,),
        "A_log": (inner, 4),
        "D": (inner,),
        "out_proj.weight": (16, inner),
    }
    for name, shape in expected.items():
        assert shapes[f"layers.0.mixer.{name}"] == shape
    backward = {"conv1d_b.weight", "conv1d_b.bias", "x_proj_b.weight", "dt_proj_b.weight", "dt_proj_b.bias", "A_b_log", "D_b"}
    assert {f"layers.0.mixer.{name}" for name in backward} <= shapes.keys()
    assert shapes["layers.0.norm.weight"] == (16,)
    uni = encoder(num_hidden_layers=1, bidirectional=False)
    assert not any(name.endswith("_b") or "_b." in name or "A_b_log" in name for name, _ in uni.named_parameters())


def test_mamba_initialisation():
    mixer = encoder(num_hidden_layers=1).layers[0].mixer
    for _, _, dt_proj, A_log, D in mixer.directions():
        assert A_log.dtype == torch.float32 and D.dtype == torch.float32
        torch.testing.assert_close(A_log[0], torch.log(torch.arange(1.0, 5.0)))  # S4D-real
        torch.testing.assert_close(D, torch.ones_like(D))
        dt = torch.nn.functional.softplus(dt_proj.bias)
        assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6  # log-uniform in [dt_min, dt_max]


def test_projections_follow_mamba_ssm_initialisation_scale():
    """in_proj/x_proj ~ U(±1/√fan_in), out_proj the same / √L: the mixer's output is a sizeable fraction of its input
    at any width (transformers' fixed 0.02 std leaves it ~1500× below its input at width 16, ~400× at width 48)."""
    model = encoder(num_hidden_layers=4)
    mixer = model.layers[0].mixer
    for linear, scale in ((mixer.in_proj, 1.0), (mixer.x_proj, 1.0), (mixer.x_proj_b, 1.0), (mixer.out_proj, 0.5)):
        bound = scale / math.sqrt(linear.in_features)
        assert linear.weight.abs().max() <= bound
        assert linear.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)  # uniform: std = bound / √3
    x = torch.randn(2, 64, 16)
    with torch.no_grad():
        branch, _ = mixer(model.layers[0].norm(x))
    assert 0.01 < (branch.pow(2).mean().sqrt() / x.pow(2).mean().sqrt()).item() < 2  # 0.02 std: 0.0007


def test_bidirectional_scan_lets_the_first_frame_see_the_last():
    frames, tokens = 4, 9
    x = torch.randn(1, frames * tokens, 16)
    perturbed = x.clone()
    perturbed[:, -tokens:] += torch.randn(1, tokens, 16)  # change the last frame only (not by a constant: LayerNorm)
    for bidirectional in (True, False):
        model = encoder(bidirectional=bidirectional)
        with torch.no_grad():  # at init Δ ≤ 0.1 keeps B·C small: scale the projections up for an O(1) signal
            for layer in model.layers:
                for projection in (layer.mixer.in_proj, *(x_proj for _, x_proj, *_ in layer.mixer.directions())):
                    projection.weight.normal_(0, 0.3)
        with torch.no_grad():
            first = model(x)[:, :tokens]
            first_perturbed = model(perturbed)[:, :tokens]
        changed = (first - first_perturbed).abs().max().item()
        if bidirectional:
            assert changed > 1e-3
        else:
            assert changed == 0.0  # causal scan: nothing flows backwards in time


def test_mean_merge_is_half_the_sum_merge():
    summed = encoder(num_hidden_layers=1).layers[0].mixer  # initialised (a bare StormMambaMixer has empty A_log, D)
    averaged = StormMambaMixer(StormTemporalEncoderConfig(hidden_size=16, state_size=4, bidirectional_merge="mean"))
    averaged.load_state_dict(summed.state_dict())
    x = torch.randn(2, 10, 16)
    torch.testing.assert_close(averaged(x)[0], summed(x)[0] / 2)  # out_proj is linear without bias


def test_zero_layers_is_the_identity():
    x = torch.randn(1, 12, 16)
    assert torch.equal(encoder(num_hidden_layers=0)(x), x)


def test_scan_order_is_frame_major():
    # A causal encoder over (frame, row, col): token i depends only on tokens <= i of the flattened sequence.
    model = encoder(bidirectional=False)
    x = torch.randn(1, 8, 16, requires_grad=True)
    model(x)[0, 3].sum().backward()
    influence = x.grad[0].abs().sum(-1)
    assert influence[:4].min() > 0 and influence[4:].max() == 0


@pytest.mark.parametrize("bidirectional", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(bidirectional):
    model = encoder(bidirectional=bidirectional).train()
    x = torch.randn(2, 20, 16)
    model(x).pow(2).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    enable_checkpointing(model)
    assert all(layer.gradient_checkpointing for layer in model.layers)
    model(x).pow(2).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], msg=name)


def _scaled_encoder(bidirectional=True, conv_kernel=4, **kwargs) -> StormTemporalEncoder:
    """An encoder whose projections are scaled up so that the scan carries an O(1) signal across many tokens (at init
    Δ ≤ 0.1 keeps B·C small), which makes a lost or wrong carried state visible."""
    model = encoder(bidirectional=bidirectional, conv_kernel=conv_kernel, **kwargs)
    with torch.no_grad():
        for layer in model.layers:
            for projection in (layer.mixer.in_proj, *(x_proj for _, x_proj, *_ in layer.mixer.directions())):
                projection.weight.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("chunk_size", [2, 8, 13, 39])  # 40 tokens: 13 and 39 do not divide it; 2 < K - 1 = 3
def test_chunked_scan_equals_the_whole_sequence_scan(bidirectional, chunk_size):
    model = _scaled_encoder(bidirectional)
    x = torch.randn(2, 40, 16)
    with torch.no_grad():
        whole = model(x, chunk_size=40)
        chunked = model(x, chunk_size=chunk_size)
        in_place = x.clone()
        chunks = list(model.output_chunks(in_place, chunk_size))
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)
    assert [start for start, _ in chunks] == list(range(0, 40, chunk_size))
    torch.testing.assert_close(torch.cat([chunk for _, chunk in chunks], dim=1), whole, rtol=0, atol=1e-5)
    assert not torch.equal(in_place, x)  # without autograd the residual stream is updated in place, no copy
    assert (model(x, chunk_size=40) - whole).abs().max() == 0  # forward leaves its input as it is


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_chunked_scan_gives_the_whole_sequence_gradients(bidirectional, checkpointing):
    model = _scaled_encoder(bidirectional).train()
    if checkpointing:
        enable_checkpointing(model)
    x = torch.randn(2, 30, 16)
    grad_out = torch.randn(2, 30, 16)

    def gradients(chunk_size):
        model.zero_grad()
        inputs = x.clone().requires_grad_()
        chunks = [chunk for _, chunk in model.output_chunks(inputs, chunk_size)]  # with autograd: as forward
        (torch.cat(chunks, dim=1) * grad_out).sum().backward()
        return {"inputs": inputs.grad, **{name: p.grad.clone() for name, p in model.named_parameters()}}

    whole, chunked = gradients(None), gradients(10)
    for name, grad in whole.items():
        torch.testing.assert_close(chunked[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_chunked_scan_with_a_lora_on_in_proj_equals_the_whole_sequence_scan():
    """`in_proj` wrapped by PEFT (LoRA): every use of it, the backward scan's chunk states included, goes through the
    adapter, so that a chunked scan still equals the whole-sequence one and differs from the model without LoRA."""
    peft = pytest.importorskip("peft")
    model = _scaled_encoder(bidirectional=True)
    x = torch.randn(2, 40, 16)
    with torch.no_grad():
        base = model(x, chunk_size=40)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["in_proj"], init_lora_weights=False)
    lora = peft.get_peft_model(model, config).base_model.model
    with torch.no_grad():
        whole, chunked = lora(x, chunk_size=40), lora(x, chunk_size=8)
    assert (whole - base).abs().max() > 1e-3  # the adapter changes the output
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)


def test_chunks_hold_no_tensor_of_the_whole_sequence_wider_than_the_residual_stream():
    """Counting every tensor the ops produce: in chunks, nothing is larger than the (B, L, D) residual stream; in one
    chunk, the 2E-wide tensors (in_proj output, convolution, Δ) of the whole sequence appear."""
    model = encoder(bidirectional=True)
    x = torch.randn(1, 200, 16)
    residual = x.numel()

    def largest_tensor(chunk_size):
        with torch.no_grad(), _LargestTensor() as counter:
            for _ in model.output_chunks(x.clone(), chunk_size):
                pass
        return counter.largest

    # The torch scan's per-chunk (B, 2E, c, N) tensors (both directions at once) stay below L·D for c = 10.
    assert largest_tensor(10) <= residual
    assert largest_tensor(None) >= 4 * residual  # in_proj output: 2E = 4D wide


def test_streaming_chunk_by_chunk_equals_the_whole_sequence():
    model = _scaled_encoder(bidirectional=False)
    x = torch.randn(1, 50, 16)
    with torch.no_grad():
        whole = model(x, chunk_size=None)
        outputs, states = [], None
        for start in range(0, 50, 7):  # arrival in chunks of 7 tokens, the last one shorter
            out, states = model.forward_chunk(x[:, start : start + 7], states)
            outputs.append(out)
    assert len(states) == 2 and states[0].ssm.shape == (1, 32, 4) and states[0].conv.shape == (1, 32, 3)
    torch.testing.assert_close(torch.cat(outputs, dim=1), whole, rtol=0, atol=1e-5)


def test_bidirectional_encoder_refuses_to_stream():
    with pytest.raises(ValueError, match=r"backward scan .* not arrived yet.*bidirectional=False"):
        encoder(bidirectional=True).forward_chunk(torch.randn(1, 8, 16))


def test_chunk_bounds():
    assert chunk_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert chunk_bounds(10, None) == chunk_bounds(10, 10) == chunk_bounds(10, 99) == [(0, 10)]
    with pytest.raises(ValueError, match="chunk_size=0 must be a positive number of tokens"):
        chunk_bounds(10, 0)


class _LargestTensor(TorchDispatchMode):
    """The number of elements of the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and not func.is_view:
                self.largest = max(self.largest, tensor.numel())
        return out
