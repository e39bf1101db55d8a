"""STORM's Mamba temporal encoder (paper §3.2, Eq. 5).

A stack of L pre-LayerNorm residual layers, X⁽ˡ⁾ = X⁽ˡ⁻¹⁾ + MambaMixer(LayerNorm(X⁽ˡ⁻¹⁾)), each scanning a whole video
as one sequence: frames in time order, each frame row-major (left to right, top to bottom). The mixer is Mamba-1
(mamba_ssm's `Mamba`, parameter names kept) made bidirectional in the bimamba-v2 way: shared `in_proj`/`out_proj`, a
second convolution + SSM (`conv1d_b`, `x_proj_b`, `dt_proj_b`, `A_b_log`, `D_b`) that scans the reversed sequence.

Long videos are scanned in chunks of `config.chunk_size` tokens with each direction's state (SSM state h and the last
`conv_kernel - 1` convolution inputs, `StormScanState`) carried across the chunk boundaries: the forward scan runs
left to right, the backward scan right to left, and the result is that of one whole-sequence scan. Only the D-wide
residual stream of the whole video is kept between layers; the 2E-wide tensors exist for one chunk at a time.

Shape legend: B batch (videos), L scan length (frames × tokens per frame), D model width, E = expand·D inner width,
N SSM state size, R rank of Δ, K conv kernel, c tokens in a chunk.
"""

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer

from .configuration_storm import StormTemporalEncoderConfig
from .kernels import mamba_kernels, mamba_scan, triton_selective_scan
from .selective_scan import selective_scan

# Δ initialisation of mamba_ssm's `Mamba` (dt_min, dt_max, dt_init_floor): Δ = softplus(dt_proj.bias) starts
# log-uniform in [DT_MIN, DT_MAX].
DT_MIN, DT_MAX, DT_INIT_FLOOR = 1e-3, 1e-1, 1e-4


@dataclass
class StormScanState:
    """What one scan direction of one layer carries across a chunk boundary (in that direction's scan order).

    Attributes:
        conv (`torch.Tensor` of shape `(B, E, K - 1)`): the last `conv_kernel - 1` inputs of the causal convolution.
        ssm (`torch.Tensor` of shape `(B, E, N)`, float32): the SSM state h (paper Eq. 1).
    """

    conv: torch.Tensor
    ssm: torch.Tensor


def chunk_bounds(length: int, chunk_size: int | None) -> list[tuple[int, int]]:
    """`[(start, end), ...]` of consecutive chunks of `chunk_size` tokens covering `range(length)` (the last one may
    be shorter); one chunk when `chunk_size` is None."""
    if chunk_size is None or chunk_size >= length:
        return [(0, length)]
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be a positive number of tokens, or None for one chunk.")
    return [(start, min(start + chunk_size, length)) for start in range(0, length, chunk_size)]


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
    """Bidirectional Mamba-1 mixer: `(B, L, D)` → `(B, L, D)`, for a whole sequence or one chunk of it.

    Forward direction as mamba_ssm `Mamba.forward`: `in_proj` → x, z; causal depthwise conv + SiLU; `x_proj` → Δ, B, C;
    selective scan; gate SiLU(z); `out_proj`. The backward direction runs the same on the reversed x with its own `*_b`
    parameters; its output is reversed back and summed with the forward one (or averaged, `bidirectional_merge`)
    before the gate, which both directions share (y_f·SiLU(z) + y_b·SiLU(z) = (y_f + y_b)·SiLU(z)). With
    `bidirectional=False` only the forward direction exists (causal, paper Table 7).

    Both directions run as one: one convolution over the two directions' channels stacked (the backward one's in
    reversed time order) and one selective scan with B and C in two groups of channels, as mamba_ssm's kernel takes
    them, so that the only copies are the stacked x (half of it reversed) and the reversed output.
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

    def forward(
        self,
        hidden_states: torch.Tensor,
        state: StormScanState | None = None,
        backward_state: StormScanState | None = None,
        return_state: bool = False,
    ) -> tuple[torch.Tensor, StormScanState | None]:
        """Mix one chunk of the (normalised) sequence.

        Args:
            hidden_states (`torch.Tensor` of shape `(B, c, D)`): the chunk (the whole sequence when unchunked).
            state (`StormScanState`, *optional*): the forward scan's state entering the chunk from the left; None
                when the chunk starts the sequence.
            backward_state (`StormScanState`, *optional*): the backward scan's state entering the chunk from the
                right (`backward_state` of the next chunk); None when the chunk ends the sequence.
            return_state (`bool`): also return the forward scan's state after the chunk.

        Returns:
            The mixer output `(B, c, D)`, and the forward scan's state after the chunk (None when no state is carried
            in or asked for: a whole sequence at once).
        """
        x, z = _channels_first_linear(self.in_proj, hidden_states).chunk(2, dim=1)  # (B, E, c) each, contiguous
        directions = self.directions()
        scan_inputs = [x, x.flip(-1)] if self.bidirectional else [x]  # each in its scan order
        y, states = self._scan(scan_inputs, directions, [state, backward_state][: len(directions)], return_state)
        if self.bidirectional:  # y (B, 2E, c): the backward direction's half in reversed time order
            y_forward, y_backward = y.chunk(2, dim=1)
            y = y_forward + y_backward.flip(-1)
            y = y if self.merge == "sum" else y / 2
        y = y * F.silu(z)  # (B, E, c)
        return self.out_proj(y.transpose(1, 2)), None if states is None else states[0]  # (B, c, D)

    def backward_scan_state(self, hidden_states: torch.Tensor, state: StormScanState | None) -> StormScanState:
        """The backward scan's state after reading the chunk `(B, c, D)` right to left, starting from `state`."""
        x = _channels_first_linear(self.in_proj, hidden_states, self.config.intermediate_size)  # (B, E, c): no z
        return self._scan([x.flip(-1)], self.directions()[1:], [state], return_state=True)[1][0]

    def _scan(self, xs, directions, states, return_state):
        """Causal conv + selective scan of G = len(directions) directions at once.

        Args:
            xs (list of `torch.Tensor` of shape `(B, E, c)`): each direction's x, in its scan order.
            directions (list of tuples): each direction's `(conv1d, x_proj, dt_proj, A_log, D)`.
            states (list of `StormScanState` or None): each direction's state entering the chunk.
            return_state (`bool`): return the states after the chunk even when none was carried in.

        Returns:
            y `(B, G·E, c)` before the gate, each direction's part in its scan order, and the directions' states after
            the chunk (None unless a state is carried in or `return_state`).
        """
        # The one dispatch point: for CUDA tensors with `use_mamba_kernels` on, mamba_ssm's scan (and causal_conv1d's
        # convolution) when they import, else our Triton scan; otherwise the torch spec. All compute the same thing
        # (tests/test_kernels.py). mamba_ssm's scan has no initial state and no differentiable last state:
        # `kernels.mamba_scan` adds them through extra time steps of the same kernel (`selective_scan_with_state`).
        scan, conv_fn = selective_scan, None
        if xs[0].is_cuda and self.config.use_mamba_kernels:
            available = mamba_kernels()
            if available.selective_scan_fn is not None:
                scan = mamba_scan(available.selective_scan_fn)
            else:
                scan = triton_selective_scan() or selective_scan
            conv_fn = available.causal_conv1d_fn

        groups, (batch, inner, length) = len(directions), xs[0].shape
        conv1d, x_proj, dt_proj, A_log, D = zip(*directions)
        carried = return_state or any(s is not None for s in states)
        context = conv1d[0].kernel_size[0] - 1 if carried else 0  # the K-1 inputs before the chunk (zeros at the start)
        if carried:
            xs = [
                torch.cat([x.new_zeros(batch, inner, context) if s is None else s.conv.to(x.dtype), x], dim=-1)
                for x, s in zip(xs, states)
            ]
        conv_inputs = _cat(xs, dim=1)  # (B, G·E, [K-1 +] c)
        conv_weight, conv_bias = _cat([conv.weight for conv in conv1d]), _cat([conv.bias for conv in conv1d])
        x = _causal_conv(conv_inputs, conv_weight, conv_bias, conv_fn, context)  # (B, G·E, c)
        x_dbl = torch.stack([proj(part.transpose(1, 2)) for proj, part in zip(x_proj, x.chunk(groups, dim=1))], dim=1)
        dt, B, C = torch.split(x_dbl.transpose(2, 3), [self.dt_rank, self.state_size, self.state_size], dim=2)
        delta = torch.matmul(torch.stack([proj.weight for proj in dt_proj]), dt)  # (B, G, E, c); bias: in the scan
        delta = delta.view(batch, groups * inner, length)
        A = -torch.exp(_cat(A_log).float())  # (G·E, N)
        scan_args = dict(D=_cat(D).float(), delta_bias=_cat([proj.bias for proj in dt_proj]).float(), delta_softplus=True)
        if not carried:  # B, C (B, G, N, c): the directions as groups of channels
            return scan(x, delta, A, B, C, **scan_args), None
        initial = None
        if any(s is not None for s in states):
            zeros = x.new_zeros(batch, inner, self.state_size, dtype=torch.float32)
            initial = _cat([zeros if s is None else s.ssm for s in states], dim=1)  # (B, G·E, N)
        y, last = scan(x, delta, A, B, C, **scan_args, initial_state=initial, return_last_state=True)
        new_states = [  # clones: a carried state does not keep the chunk's tensors alive
            StormScanState(conv=part[..., -context:].clone(), ssm=h)
            for part, h in zip(conv_inputs.chunk(groups, dim=1), last.chunk(groups, dim=1))
        ]
        return y, new_states


def _channels_first_linear(
    linear: nn.Module, hidden_states: torch.Tensor, features: int | None = None
) -> torch.Tensor:
    """`linear(hidden_states)` laid out channels first, `(B, c, D)` → `(B, features, c)` contiguous (the first
    `features` outputs, all when None), as the convolution and the scan read it. For a plain `nn.Linear` the product
    is computed in that layout (W·hᵀ), so that no transposed copy of the 2E-wide output is made; any other module (a
    PEFT LoRA layer, a hook) is called as it is and its output transposed.

    W·hᵀ is a batched product with W broadcast (`bmm`), not `torch.matmul(W, h.mT)`: matmul computes a 2-D by 3-D
    product as h·Wᵀ and returns its transpose made contiguous, i.e. the copy this avoids (on an H200, 128 frames:
    7.3 ms for `in_proj` against 4.9 ms, docs/benchmarks.md)."""
    if type(linear) is nn.Linear and linear.bias is None:
        weight = linear.weight if features is None else linear.weight[:features]
        return torch.bmm(weight.expand(hidden_states.shape[0], -1, -1), hidden_states.mT)  # (B, features, c)
    out = linear(hidden_states)  # (B, c, out_features)
    return (out if features is None else out[..., :features]).transpose(1, 2).contiguous()


def _cat(tensors, dim: int = 0) -> torch.Tensor:
    """`torch.cat`, without a copy when there is one tensor (a uni-directional mixer)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)


def _causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, conv_fn, context: int) -> torch.Tensor:
    """Causal depthwise convolution + SiLU, `(B, C, context + c)` → `(B, C, c)`: the outputs at the last c positions,
    output t seeing inputs t-K+1..t (zeros before the first). `weight` `(C, 1, K)`, `bias` `(C,)`. causal_conv1d's
    kernel when given, else torch in float32 like the kernel, so that both round once."""
    if conv_fn is not None:
        return conv_fn(x, weight.squeeze(1), bias, activation="silu")[..., context:]
    out = F.conv1d(x.float(), weight.float(), bias.float(), padding=weight.shape[-1] - 1, groups=x.shape[1])
    return F.silu(out[..., context : x.shape[-1]]).to(x.dtype)


class StormMambaLayer(GradientCheckpointingLayer):
    """One pre-LayerNorm residual layer of paper Eq. 5: `x + mixer(norm(x))`, `(B, L, D)` → `(B, L, D)`."""

    def __init__(self, config: StormTemporalEncoderConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mixer = StormMambaMixer(config)

    def forward(self, hidden_states: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        """The layer over the whole sequence, scanned in chunks of `chunk_size` tokens (None: one chunk)."""
        outputs = [out for _, out in self.chunks(hidden_states, chunk_size)]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)  # (B, L, D)

    def chunks(self, hidden_states: torch.Tensor, chunk_size: int | None) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield `(start, output chunk (B, c, D))` left to right, each equal to `forward(hidden_states)[:, start:
        start + c]`. Tokens of `hidden_states` before `start + c` are not read after that chunk is yielded, so a
        caller may overwrite them with it (the residual stream updated in place)."""
        bounds = chunk_bounds(hidden_states.shape[1], chunk_size)
        backward_states = self._backward_states(hidden_states, bounds)
        state = None
        for index, ((start, end), backward_state) in enumerate(zip(bounds, backward_states)):
            chunk = hidden_states[:, start:end]  # (B, c, D)
            out, state = self.mixer(self.norm(chunk), state, backward_state, return_state=index + 1 < len(bounds))
            yield start, chunk + out

    def forward_chunk(self, hidden_states: torch.Tensor, state: StormScanState | None) -> tuple[torch.Tensor, StormScanState]:
        """The next chunk `(B, c, D)` of a causal (uni-directional) layer, after the chunks that left `state`."""
        out, state = self.mixer(self.norm(hidden_states), state, return_state=True)
        return hidden_states + out, state

    def _backward_states(self, hidden_states, bounds) -> list[StormScanState | None]:
        """The backward scan's state entering each chunk from the right (None for the last chunk): one right-to-left
        sweep that keeps only these states, so that each chunk can then be mixed in both directions at once."""
        states = [None] * len(bounds)
        if not self.mixer.bidirectional:
            return states
        for index in range(len(bounds) - 1, 0, -1):
            start, end = bounds[index]
            states[index - 1] = self.mixer.backward_scan_state(self.norm(hidden_states[:, start:end]), states[index])
        return states


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
    # Whole dotted names: A_log, A_b_log, D and D_b stay fp32 under a bf16/fp16 `from_pretrained`.
    _keep_in_fp32_modules_strict = ["mixer.A_log", "mixer.A_b_log", "mixer.D", "mixer.D_b"]

    def __init__(self, config: StormTemporalEncoderConfig):
        super().__init__(config)
        self.layers = nn.ModuleList([StormMambaLayer(config) for _ in range(config.num_hidden_layers)])
        self.post_init()

    def forward(self, inputs_embeds: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        """`(B, L, D)` → `(B, L, D)`, scanned in chunks of `chunk_size` tokens (default `config.chunk_size`)."""
        chunk_size = chunk_size or self.config.chunk_size
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, chunk_size)
        return hidden_states

    def output_chunks(self, hidden_states: torch.Tensor, chunk_size: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield the encoder output chunk by chunk, left to right: `(start, (B, c, D))`, `c = chunk_size` tokens
        (default `config.chunk_size`; the last chunk may be shorter).

        When autograd is not recording, `hidden_states` is the residual stream: the layers before the last overwrite
        it in place, chunk by chunk, and the last layer's output is only yielded, so that no second copy of the
        video's tokens is made (pool each chunk as it comes). When autograd is recording, it runs as `forward`
        (gradient checkpointing included) and leaves `hidden_states` as it is.
        """
        chunk_size = chunk_size or self.config.chunk_size
        if torch.is_grad_enabled() or not self.layers:
            output = self(hidden_states, chunk_size)
            for start, end in chunk_bounds(output.shape[1], chunk_size):
                yield start, output[:, start:end]
            return
        for layer in self.layers[:-1]:
            for start, out in layer.chunks(hidden_states, chunk_size):
                hidden_states[:, start : start + out.shape[1]] = out
        yield from self.layers[-1].chunks(hidden_states, chunk_size)

    def forward_chunk(
        self, hidden_states: torch.Tensor, states: list[StormScanState] | None = None
    ) -> tuple[torch.Tensor, list[StormScanState]]:
        """Encode the next chunk `(B, c, D)` of a sequence, streaming: every layer continues from its forward scan's
        state after the previous chunks (`states`, one per layer; None for the first chunk) and returns the new states.
        Chunk by chunk, the outputs equal `forward` on the whole sequence.

        Raises:
            ValueError: the encoder is bidirectional, whose backward scan needs the chunks that have not come yet.
        """
        if self.config.bidirectional and self.layers:
            raise ValueError(
                "A bidirectional temporal encoder cannot encode a sequence chunk by chunk as it arrives: its backward "
                "scan reads every token from the end of the video, which has not arrived yet. Use a uni-directional "
                "model (temporal_encoder_config.bidirectional=False, paper Table 7)."
            )
        states = states or [None] * len(self.layers)
        new_states = []
        for layer, state in zip(self.layers, states):
            hidden_states, state = layer.forward_chunk(hidden_states, state)
            new_states.append(state)
        return hidden_states, new_states

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


__all__ = ["StormTemporalEncoder", "StormMambaLayer", "StormMambaMixer", "StormScanState"]
