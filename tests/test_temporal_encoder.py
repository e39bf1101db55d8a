import math

import pytest
import torch
from storm_testing import enable_checkpointing, tiny_config

from modeling_storm import StormTemporalEncoder, StormTemporalEncoderConfig
from modeling_storm.temporal_encoder import StormMambaMixer


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
        branch = mixer(model.layers[0].norm(x))
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
    torch.manual_seed(1)
    config = StormTemporalEncoderConfig(hidden_size=16, state_size=4)
    summed = StormMambaMixer(config)
    averaged = StormMambaMixer(StormTemporalEncoderConfig(hidden_size=16, state_size=4, bidirectional_merge="mean"))
    averaged.load_state_dict(summed.state_dict())
    x = torch.randn(2, 10, 16)
    torch.testing.assert_close(averaged(x), summed(x) / 2)  # out_proj is linear without bias


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
