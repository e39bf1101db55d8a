"""STORM's Mamba temporal encoder (paper §3.2, Eq. 5).

A stack of L pre-LayerNorm residual layers, X⁽ˡ⁾ = X⁽ˡ⁻¹⁾ + MambaMixer(LayerNorm(X⁽ˡ⁻¹⁾)), each scanning a whole video
as one sequence: frames in time order, each frame row-major (left to right, top to bottom). The mixer is Mamba-1
(mamba_ssm's `Mamba`, parameter names kept) made bidirectional in the bimamba-v2 way: shared `in_proj`/`out_proj`, a
second convolution + SSM (`conv1d_b`, `x_proj_b`, `dt_proj_b`, `A_b_log`, `D_b`) that scans the reversed sequence.

Shape legend: B batch (videos), L scan length (frames × tokens per frame), D model width, E = expand·D inner width,
N SSM state size, R rank of Δ.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer

from .configuration_storm import StormTemporalEncoderConfig
from .kernels import mamba_kernels
from .selective_scan import selective_scan

# Δ initialisation of mamba_ssm's `Mamba` (dt_min, dt_max, dt_init_floor): Δ = softplus(dt_proj.bias) starts
# log-uniform in [DT_MIN, DT_MAX].
DT_MIN, DT_MAX, DT_INIT_FLOOR = 1e-3, 1e-1, 1e-4


def _ssm_parameters(config: StormTemporalEncoderConfig):
    """Convolution, projections, A and D of one scan direction, shaped as in mamba_ssm's `Mamba`."""
    inner, rank, state = config.intermediate_size, config.dt_rank, config.state_size
    conv1d = nn.Conv1d(inner, inner, config.conv_kernel, groups=inner, padding=config.conv_kernel - 1, bias=True)
    x_proj = nn.Linear(inner, rank + 2 * state, bias=False)
    dt_proj = nn.Linear(rank, inner, bias=True)
    A_log = nn.Parameter(torch.empty(inner, state, dtype=torch.float32))  # kept in fp32, as in mamba_ssm
    D = nn.Parameter(torch.empty(inner, dtype=torch.float32))
    return conv1d, x_proj, dt_proj, A_log, D


class StormMambaMixer(nn.Module):
    """Bidirectional Mamba-1 mixer: `(B, L, D)` → `(B, L, D)`.

    Forward direction as mamba_ssm `Mamba.forward` (non-fused path): `in_proj` → x, z; causal depthwise conv + SiLU;
    `x_proj` → Δ, B, C; selective scan gated by SiLU(z). The backward direction runs the same on the flipped x, z with
    its own `*_b` parameters and is flipped back; the two outputs are summed (or averaged, `bidirectional_merge`)
    before `out_proj`. With `bidirectional=False` only the forward direction exists (causal, paper Table 7).
    """

    def __init__(self, config: StormTemporalEncoderConfig):
        super().__init__()
        self.config = config
        self.state_size, self.dt_rank = config.state_size, config.dt_rank
        self.bidirectional = config.bidirectional
        self.merge = config.bidirectional_merge
        self.in_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D = _ssm_parameters(config)
        if self.bidirectional:
            self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b = _ssm_parameters(config)
        self.out_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def directions(self) -> list[tuple]:
        """`(conv1d, x_proj, dt_proj, A_log, D)` of the forward scan, then of the backward scan if bidirectional."""
        forward = (self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D)
        if not self.bidirectional:
            return [forward]
        return [forward, (self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b)]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x, z = self.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)  # (B, E, L) each
        forward, *backward = self.directions()
        y = self._scan(x, z, *forward)  # (B, E, L)
        if backward:
            y_b = self._scan(x.flip(-1), z.flip(-1), *backward[0]).flip(-1)  # (B, E, L), back in forward order
            y = y + y_b if self.merge == "sum" else (y + y_b) / 2
        return self.out_proj(y.transpose(1, 2))  # (B, L, D)

    def _scan(self, x, z, conv1d, x_proj, dt_proj, A_log, D):
        # The one dispatch point: mamba_ssm / causal_conv1d kernels for CUDA tensors when they import and
        # `use_mamba_kernels` is on; otherwise the torch spec. Both compute the same thing (tests/test_kernels.py).
        kernels = mamba_kernels() if x.is_cuda and self.config.use_mamba_kernels else (None, None)
        scan_fn, conv_fn = kernels[0] or selective_scan, kernels[1]
        if conv_fn is not None:
            x = conv_fn(x, conv1d.weight.squeeze(1), conv1d.bias, activation="silu")  # (B, E, L)
        else:  # in float32 like the kernel, so both round once; causal: output t sees inputs t-K+1..t
            out = F.conv1d(x.float(), conv1d.weight.float(), conv1d.bias.float(), padding=conv1d.padding, groups=conv1d.groups)
            x = F.silu(out[..., : x.shape[-1]]).to(x.dtype)  # (B, E, L)
        dt, B, C = torch.split(x_proj(x.transpose(1, 2)), [self.dt_rank, self.state_size, self.state_size], dim=-1)
        dt = dt_proj.weight @ dt.transpose(1, 2)  # (B, E, L); the bias is added inside the scan
        A = -torch.exp(A_log.float())  # (E, N)
        return scan_fn(
            x,
            dt,
            A,
            B.transpose(1, 2).contiguous(),  # (B, N, L)
            C.transpose(1, 2).contiguous(),  # (B, N, L)
            D=D.float(),
            z=z,
            delta_bias=dt_proj.bias.float(),
            delta_softplus=True,
        )


class StormMambaLayer(GradientCheckpointingLayer):
    """One pre-LayerNorm residual layer of paper Eq. 5: `x + mixer(norm(x))`, `(B, L, D)` → `(B, L, D)`."""

    def __init__(self, config: StormTemporalEncoderConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mixer = StormMambaMixer(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.mixer(self.norm(hidden_states))


class StormTemporalEncoder(PreTrainedModel):
    """STORM's temporal encoder: `config.num_hidden_layers` `StormMambaLayer`s over a flattened video.

    Input and output: `torch.Tensor` of shape `(batch_size, num_frames * tokens_per_frame, hidden_size)`, tokens in
    (frame, row, column) order. With `num_hidden_layers=0` it is the identity (a Linear-only projector).
    """

    config: StormTemporalEncoderConfig
    config_class = StormTemporalEncoderConfig
    base_model_prefix = "temporal_encoder"
    supports_gradient_checkpointing = True
    _no_split_modules = ["StormMambaLayer"]
    # No attention inside: any attention implementation requested for the whole model is fine here.
    _supports_sdpa = _supports_flash_attn = _supports_flex_attn = _supports_attention_backend = True
    # Regexes searched in parameter names: A_log, A_b_log, D and D_b stay fp32 under a bf16/fp16 `from_pretrained`.
    _keep_in_fp32_modules_strict = ["mixer.A_log", "mixer.A_b_log", "mixer.D"]

    def __init__(self, config: StormTemporalEncoderConfig):
        super().__init__(config)
        self.layers = nn.ModuleList([StormMambaLayer(config) for _ in range(config.num_hidden_layers)])
        self.post_init()

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return hidden_states

    @torch.no_grad()
    def _init_weights(self, module):
        """mamba_ssm's initialisation (`Mamba.__init__` and `MixerModel`'s `_init_weights`), not transformers' 0.02-std
        normal: `in_proj`, `x_proj` keep `nn.Linear`'s default U(±1/√fan_in), `out_proj` the same divided by √L
        (`rescale_prenorm_residual`), plus the SSM init of `_init_ssm`. The default scales with the width; a fixed
        0.02 std would make a narrow mixer's output ~400× smaller than its residual stream (at width 48), so that
        a temporal encoder trained from scratch barely learns."""
        super()._init_weights(module)  # LayerNorm: ones/zeros
        if isinstance(module, StormMambaMixer):
            for linear in (module.in_proj, *(x_proj for _, x_proj, *_ in module.directions())):
                _init_uniform(linear, scale=1.0)
            _init_uniform(module.out_proj, scale=self.config.num_hidden_layers**-0.5)
            for conv1d, _, dt_proj, A_log, D in module.directions():
                _init_ssm(conv1d, dt_proj, A_log, D, self.config.dt_rank)


def _init_uniform(linear: nn.Linear, scale: float) -> None:
    """`nn.Linear`'s default weight init (kaiming-uniform with a = √5, i.e. U(±1/√fan_in)) times `scale`."""
    bound = scale / math.sqrt(linear.in_features)
    init.uniform_(linear.weight, -bound, bound)


def _init_ssm(conv1d, dt_proj, A_log, D, dt_rank):
    """mamba_ssm `Mamba.__init__`: S4D-real A, D = 1, Δ bias = softplus⁻¹ of log-uniform [DT_MIN, DT_MAX]."""
    inner, state = A_log.shape
    A = torch.arange(1, state + 1, dtype=torch.float32, device=A_log.device).expand(inner, -1)
    init.copy_(A_log, torch.log(A))
    init.ones_(D)
    init.kaiming_uniform_(conv1d.weight, a=math.sqrt(5))
    init.zeros_(conv1d.bias)
    dt_std = dt_rank**-0.5
    init.uniform_(dt_proj.weight, -dt_std, dt_std)
    log_dt = torch.rand(inner, device=dt_proj.bias.device) * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN)
    dt = torch.exp(log_dt).clamp(min=DT_INIT_FLOOR)
    init.copy_(dt_proj.bias, dt + torch.log(-torch.expm1(-dt)))  # inverse softplus


__all__ = ["StormTemporalEncoder", "StormMambaLayer", "StormMambaMixer"]
