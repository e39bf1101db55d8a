"""Mamba-1 selective scan in Triton, forward and backward: the GPU path when mamba_ssm is not installed.

Same arguments and result as the torch spec `selective_scan.selective_scan` (mamba_ssm's `selective_scan_fn` plus
`initial_state` and a differentiable last state), and, as mamba_ssm, B and C may come in groups of channels
`(batch, groups, state, seqlen)`. Any strides: nothing is copied to make a tensor contiguous. Imported only by
`kernels.py`, on first use with CUDA tensors (importing Triton needs no GPU, so the tests run it on the CPU under
Triton's interpreter, `TRITON_INTERPRET=1`).

Design (one program per (batch, group, block of `BLOCK_E` channels), sequential over time):

- forward: the sequence is read in tiles of `BLOCK_T` time steps. Within a tile, exp(ΔA) and ΔBu are formed for
  `(BLOCK_T, BLOCK_E, N)` at once and the recurrence h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t is solved by an
  associative scan over time (`tl.associative_scan` with the composition of affine maps); the tile's states are then
  offset by the state carried in from the previous tile, contracted with C into y, and the last one is carried on.
  The next tile's inputs are loaded before the current one is computed. Work and memory are linear in the length.
- backward: tiles from the last to the first. The states of a tile are recomputed from the state saved at its start
  by the forward (one `(BLOCK_E, N)` float32 state per tile: `4·E·N·L/BLOCK_T` bytes per sequence); the adjoint
  g_t = ∂loss/∂h_t = C_t dy_t + exp(Δ_{t+1} A) g_{t+1} runs as a second associative scan over the tile read in reverse
  time order (loads at reversed addresses; the recomputed states are flipped in registers with `tl.flip`), carrying
  q = exp(Δ_t A) g_t from tile to tile. As mamba_ssm's backward, exp(Δ_t A) h_{t-1} is recovered as h_t − Δ_t B_t u_t.
  Gradients of B and C (summed over the channels of a group) are added atomically across programs, those of A, D and
  the Δ bias summed over time per program and over the batch afterwards.

Everything is computed in float32; outputs and gradients are returned in the dtypes of their inputs.
"""

import contextlib

import torch

try:  # Triton ships with CUDA builds of torch (not with transformers); kernels.py imports this module only on use
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError("The Triton selective scan needs Triton (installed with CUDA builds of torch).") from error
# The backward flips tiles along time (`tl.flip` on a leading dimension), which Triton supports from 3.4 (torch 2.8's);
# with an older Triton this module does not import and the torch scan runs instead (kernels.triton_selective_scan).
MIN_TRITON = (3, 4)
if tuple(int(part) for part in triton.__version__.split(".")[:2]) < MIN_TRITON:
    raise ImportError(f"The Triton selective scan needs Triton >= 3.4 (tl.flip along any dimension); this is "
                      f"{triton.__version__}. Upgrade torch (>= 2.8 ships it) or install mamba_ssm.")

# Launch configuration: time steps per tile (also the spacing of the states saved for the backward), channels per
# program and warps, of the forward and of the backward. `benchmarks/latency.py --sections scan` times others on a
# GPU and prints the fastest (docs/benchmarks.md).
CONFIG = {"BLOCK_T": 16, "BLOCK_E": 8, "num_warps": 4, "BACKWARD_BLOCK_E": 4, "backward_num_warps": 4}


@triton.jit
def _affine_combine(a_left, b_left, a_right, b_right):
    """Composition of h ↦ a·h + b maps, the left (earlier) one applied first: h ↦ a_r·(a_l·h + b_l) + b_r."""
    return a_left * a_right, b_left * a_right + b_right


@triton.jit
def _adjoint_combine(a_left, b_left, c_left, d_left, a_right, b_right, c_right, d_right):
    """Scan of the adjoint in reverse time order. Each element holds two maps, F(x) = a·x + b (q_t from q_{t+1}) and
    G(x) = c·x + d (g_t from q_{t+1}); combined, F = F_r ∘ F_l and G = G_r ∘ F_l, so that the scan gives, at each
    step, g_t and q_t as maps of the q carried in from the later tile."""
    return a_left * a_right, b_left * a_right + b_right, a_left * c_right, b_left * c_right + d_right


@triton.jit
def _softplus(x):
    """torch's softplus (threshold 20)."""
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def _load_tile(
    u_rows, delta_rows, z_rows, B_base, C_base, bias, t, e_mask, n, n_mask, length,
    stride_u_t, stride_delta_t, stride_z_t, stride_B_n, stride_B_t, stride_C_n, stride_C_t,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_Z: tl.constexpr,
):
    """One tile of inputs at the time steps `t` `(BLOCK_T,)`, in float32: u, Δ before and after bias and softplus
    (0 outside the sequence), z `(BLOCK_T, BLOCK_E)` and B, C `(BLOCK_T, BLOCK_N)`. `*_rows` point at this program's
    channels `(1, BLOCK_E)`, `B_base`/`C_base` at its batch element and group."""
    t_mask = t < length
    mask = t_mask[:, None] & e_mask[None, :]
    u = tl.load(u_rows + t[:, None] * stride_u_t, mask=mask, other=0.0).to(tl.float32)
    raw = tl.load(delta_rows + t[:, None] * stride_delta_t, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw = raw + bias[None, :]
    delta = raw
    if SOFTPLUS:
        delta = _softplus(raw)
    delta = tl.where(mask, delta, 0.0)  # outside the sequence: exp(0·A) = 1 and no input, the state passes unchanged
    bc_mask = t_mask[:, None] & n_mask[None, :]
    Bt = tl.load(B_base + t[:, None] * stride_B_t + n[None, :] * stride_B_n, mask=bc_mask, other=0.0).to(tl.float32)
    Ct = tl.load(C_base + t[:, None] * stride_C_t + n[None, :] * stride_C_n, mask=bc_mask, other=0.0).to(tl.float32)
    z = u
    if HAS_Z:
        z = tl.load(z_rows + t[:, None] * stride_z_t, mask=mask, other=0.0).to(tl.float32)
    return u, raw, delta, Bt, Ct, z


@triton.jit
def _program_channels(channels_per_group, state_size, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's batch element, group, channels `e` (int64, indices into dim) and states `n`, with masks."""
    block, group, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    e_local = block * BLOCK_E + tl.arange(0, BLOCK_E)
    e_mask = e_local < channels_per_group
    e = (group * channels_per_group + e_local).to(tl.int64)
    n = tl.arange(0, BLOCK_N)
    n_mask = n < state_size
    return batch, group, e, e_mask, n, n_mask


@triton.jit
def _load_parameters(A_ptr, D_ptr, bias_ptr, e, e_mask, n, n_mask, stride_A_e, stride_A_n,
                     HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_E: tl.constexpr):
    """A `(BLOCK_E, BLOCK_N)` (0 for padded states: they stay 0), D and the Δ bias `(BLOCK_E,)`, float32."""
    en_mask = e_mask[:, None] & n_mask[None, :]
    A = tl.load(A_ptr + e[:, None] * stride_A_e + n[None, :] * stride_A_n, mask=en_mask, other=0.0).to(tl.float32)
    D = tl.zeros([BLOCK_E], dtype=tl.float32)
    if HAS_D:
        D = tl.load(D_ptr + e, mask=e_mask, other=0.0).to(tl.float32)
    bias = tl.zeros([BLOCK_E], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + e, mask=e_mask, other=0.0).to(tl.float32)
    return A, D, bias


@triton.jit
def _scan_forward_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr,
    out_ptr, last_ptr, saved_ptr,
    length, dim, channels_per_group, state_size,
    stride_u_b, stride_u_e, stride_u_t,
    stride_delta_b, stride_delta_e, stride_delta_t,
    stride_A_e, stride_A_n,
    stride_B_b, stride_B_g, stride_B_n, stride_B_t,
    stride_C_b, stride_C_g, stride_C_n, stride_C_t,
    stride_z_b, stride_z_e, stride_z_t,
    stride_h0_b, stride_h0_e, stride_h0_n,
    stride_out_b, stride_out_e, stride_out_t,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, SAVE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr,
):
    batch, group, e, e_mask, n, n_mask = _program_channels(channels_per_group, state_size, BLOCK_E, BLOCK_N)
    en_mask = e_mask[:, None] & n_mask[None, :]
    A, D, bias = _load_parameters(A_ptr, D_ptr, bias_ptr, e, e_mask, n, n_mask, stride_A_e, stride_A_n,
                                  HAS_D, HAS_BIAS, BLOCK_E)
    h = tl.zeros([BLOCK_E, BLOCK_N], dtype=tl.float32)
    if HAS_H0:
        h0 = h0_ptr + batch * stride_h0_b + e[:, None] * stride_h0_e + n[None, :] * stride_h0_n
        h = tl.load(h0, mask=en_mask, other=0.0).to(tl.float32)

    u_rows = u_ptr + batch * stride_u_b + e[None, :] * stride_u_e
    delta_rows = delta_ptr + batch * stride_delta_b + e[None, :] * stride_delta_e
    z_rows = z_ptr + batch * stride_z_b + e[None, :] * stride_z_e
    out_rows = out_ptr + batch * stride_out_b + e[None, :] * stride_out_e
    B_base = B_ptr + batch * stride_B_b + group * stride_B_g
    C_base = C_ptr + batch * stride_C_b + group * stride_C_g
    state_offsets = e[:, None] * BLOCK_N + n[None, :]  # into (dim, BLOCK_N) float32 states
    steps = tl.arange(0, BLOCK_T).to(tl.int64)  # int64: t·stride_t may pass 2³¹

    num_tiles = tl.cdiv(length, BLOCK_T)
    tile = _load_tile(
        u_rows, delta_rows, z_rows, B_base, C_base, bias, steps, e_mask, n, n_mask, length,
        stride_u_t, stride_delta_t, stride_z_t, stride_B_n, stride_B_t, stride_C_n, stride_C_t,
        HAS_BIAS, SOFTPLUS, HAS_Z,
    )
    for index in range(num_tiles):
        u, raw, delta, Bt, Ct, z = tile
        t = index * BLOCK_T + steps
        tile = _load_tile(  # prefetch: the next tile's loads are in flight while this one is computed
            u_rows, delta_rows, z_rows, B_base, C_base, bias, t + BLOCK_T, e_mask, n, n_mask, length,
            stride_u_t, stride_delta_t, stride_z_t, stride_B_n, stride_B_t, stride_C_n, stride_C_t,
            HAS_BIAS, SOFTPLUS, HAS_Z,
        )
        if SAVE:  # the state entering this tile, for the backward
            tl.store(saved_ptr + (batch * num_tiles + index) * dim * BLOCK_N + state_offsets, h, mask=en_mask)
        decay = tl.exp(delta[:, :, None] * A[None, :, :])  # (T, E, N)
        impulse = (delta * u)[:, :, None] * Bt[:, None, :]  # (T, E, N)
        a, b = tl.associative_scan((decay, impulse), 0, _affine_combine)
        states = a * h[None, :, :] + b  # (T, E, N): h_t of every step of the tile
        y = tl.sum(states * Ct[:, None, :], axis=2)  # (T, E)
        if HAS_D:
            y += u * D[None, :]
        if HAS_Z:
            y *= z * tl.sigmoid(z)
        tl.store(out_rows + t[:, None] * stride_out_t, y, mask=(t < length)[:, None] & e_mask[None, :])
        h = tl.sum(tl.where(steps[:, None, None] == BLOCK_T - 1, states, 0.0), axis=0)  # steps past the end keep h
    tl.store(last_ptr + batch * dim * BLOCK_N + state_offsets, h, mask=en_mask)


@triton.jit
def _scan_backward_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, saved_ptr, dout_ptr, dlast_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, dh0_ptr,
    length, dim, channels_per_group, state_size,
    stride_u_b, stride_u_e, stride_u_t,
    stride_delta_b, stride_delta_e, stride_delta_t,
    stride_A_e, stride_A_n,
    stride_B_b, stride_B_g, stride_B_n, stride_B_t,
    stride_C_b, stride_C_g, stride_C_n, stride_C_t,
    stride_z_b, stride_z_e, stride_z_t,
    stride_dout_b, stride_dout_e, stride_dout_t,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_DLAST: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr,
):
    batch, group, e, e_mask, n, n_mask = _program_channels(channels_per_group, state_size, BLOCK_E, BLOCK_N)
    en_mask = e_mask[:, None] & n_mask[None, :]
    A, D, bias = _load_parameters(A_ptr, D_ptr, bias_ptr, e, e_mask, n, n_mask, stride_A_e, stride_A_n,
                                  HAS_D, HAS_BIAS, BLOCK_E)
    state_offsets = e[:, None] * BLOCK_N + n[None, :]  # into (dim, BLOCK_N) float32 states
    # q = exp(Δ_t A)·g_t at the first step of the tile after the current one: ∂loss/∂h_{t-1} through h_t. At the end
    # of the sequence, the gradient of the last state.
    q = tl.zeros([BLOCK_E, BLOCK_N], dtype=tl.float32)
    if HAS_DLAST:
        q = tl.load(dlast_ptr + batch * dim * BLOCK_N + state_offsets, mask=en_mask, other=0.0)

    u_rows = u_ptr + batch * stride_u_b + e[None, :] * stride_u_e
    delta_rows = delta_ptr + batch * stride_delta_b + e[None, :] * stride_delta_e
    z_rows = z_ptr + batch * stride_z_b + e[None, :] * stride_z_e
    dout_rows = dout_ptr + batch * stride_dout_b + e[None, :] * stride_dout_e
    B_base = B_ptr + batch * stride_B_b + group * stride_B_g
    C_base = C_ptr + batch * stride_C_b + group * stride_C_g
    grad_rows = (batch * dim + e[None, :]) * length  # du, dΔ, dz: contiguous (batch, dim, seqlen)
    dBC_rows = ((batch * (dim // channels_per_group) + group) * state_size + n[None, :]) * length  # (b, G, N, L)
    steps = tl.arange(0, BLOCK_T).to(tl.int64)  # int64: t·stride_t may pass 2³¹

    dA = tl.zeros([BLOCK_E, BLOCK_N], dtype=tl.float32)
    dD = tl.zeros([BLOCK_E], dtype=tl.float32)
    dbias = tl.zeros([BLOCK_E], dtype=tl.float32)
    num_tiles = tl.cdiv(length, BLOCK_T)
    for reverse_index in range(num_tiles):
        index = num_tiles - 1 - reverse_index
        # The tile's states h_t, recomputed in time order from the state saved at its start.
        t = index * BLOCK_T + steps
        u, raw, delta, Bt, Ct, z = _load_tile(
            u_rows, delta_rows, z_rows, B_base, C_base, bias, t, e_mask, n, n_mask, length,
            stride_u_t, stride_delta_t, stride_z_t, stride_B_n, stride_B_t, stride_C_n, stride_C_t,
            HAS_BIAS, SOFTPLUS, HAS_Z,
        )
        h = tl.load(saved_ptr + (batch * num_tiles + index) * dim * BLOCK_N + state_offsets, mask=en_mask, other=0.0)
        decay = tl.exp(delta[:, :, None] * A[None, :, :])
        impulse = (delta * u)[:, :, None] * Bt[:, None, :]
        a, b = tl.associative_scan((decay, impulse), 0, _affine_combine)
        states = tl.flip(a * h[None, :, :] + b, 0)  # (T, E, N), in reverse time order from here on

        # The same tile read in reverse time order: step i is time t = start + BLOCK_T - 1 - i.
        t = index * BLOCK_T + (BLOCK_T - 1 - steps)
        t_mask = t < length
        mask = t_mask[:, None] & e_mask[None, :]
        u, raw, delta, Bt, Ct, z = _load_tile(
            u_rows, delta_rows, z_rows, B_base, C_base, bias, t, e_mask, n, n_mask, length,
            stride_u_t, stride_delta_t, stride_z_t, stride_B_n, stride_B_t, stride_C_n, stride_C_t,
            HAS_BIAS, SOFTPLUS, HAS_Z,
        )
        dout = tl.load(dout_rows + t[:, None] * stride_dout_t, mask=mask, other=0.0).to(tl.float32)
        dy = dout  # ∂loss/∂y_t, y before the gate
        if HAS_Z:
            gate = tl.sigmoid(z)
            y = tl.sum(states * Ct[:, None, :], axis=2)  # (T, E)
            if HAS_D:
                y += u * D[None, :]
            dz = dout * y * gate * (1.0 + z * (1.0 - gate))  # silu'(z) = σ(z)·(1 + z·(1 − σ(z)))
            tl.store(dz_ptr + grad_rows + t[:, None], dz, mask=mask)
            dy = dout * z * gate
        decay = tl.exp(delta[:, :, None] * A[None, :, :])  # (T, E, N), reverse time order
        impulse = (delta * u)[:, :, None] * Bt[:, None, :]
        dyC = dy[:, :, None] * Ct[:, None, :]
        ones = tl.full(decay.shape, 1.0, tl.float32)
        fa, fb, ga, gb = tl.associative_scan((decay, decay * dyC, ones, dyC), 0, _adjoint_combine)
        g = ga * q[None, :, :] + gb  # (T, E, N): g_t = ∂loss/∂h_t
        q = tl.sum(tl.where(steps[:, None, None] == BLOCK_T - 1, fa * q[None, :, :] + fb, 0.0), axis=0)

        gh = g * (states - impulse)  # g_t · exp(Δ_t A)·h_{t-1}
        gB = tl.sum(g * Bt[:, None, :], axis=2)  # (T, E)
        ddelta = gB * u + tl.sum(gh * A[None, :, :], axis=2)
        du = gB * delta
        if HAS_D:
            du += dy * D[None, :]
            dD += tl.sum(dy * u, axis=0)
        dA += tl.sum(gh * delta[:, :, None], axis=0)
        if SOFTPLUS:
            ddelta = tl.where(raw > 20.0, ddelta, ddelta * tl.sigmoid(raw))
        ddelta = tl.where(mask, ddelta, 0.0)
        dbias += tl.sum(ddelta, axis=0)
        tl.store(du_ptr + grad_rows + t[:, None], du, mask=mask)
        tl.store(ddelta_ptr + grad_rows + t[:, None], ddelta, mask=mask)
        bc_mask = t_mask[:, None] & n_mask[None, :]
        dB = tl.sum(g * (delta * u)[:, :, None], axis=1)  # (T, N), summed over this program's channels
        dC = tl.sum(states * dy[:, :, None], axis=1)
        tl.atomic_add(dB_ptr + dBC_rows + t[:, None], dB, mask=bc_mask)
        tl.atomic_add(dC_ptr + dBC_rows + t[:, None], dC, mask=bc_mask)

    tl.store(dh0_ptr + batch * dim * BLOCK_N + state_offsets, q, mask=en_mask)
    tl.store(dA_ptr + batch * dim * BLOCK_N + state_offsets, dA, mask=en_mask)
    tl.store(dD_ptr + batch * dim + e, dD, mask=e_mask)
    tl.store(dbias_ptr + batch * dim + e, dbias, mask=e_mask)


def _grid(dim, groups, batch, block_e):
    return (triton.cdiv(dim // groups, block_e), groups, batch)


def _forward(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, save, config):
    batch, dim, length = u.shape
    groups, state_size = B.shape[1], A.shape[1]
    block_n = triton.next_power_of_2(state_size)
    num_tiles = triton.cdiv(length, config["BLOCK_T"])
    out = torch.empty(batch, dim, length, device=u.device, dtype=u.dtype)
    last = torch.empty(batch, dim, block_n, device=u.device, dtype=torch.float32)
    saved = torch.empty(batch, num_tiles if save else 0, dim, block_n, device=u.device, dtype=torch.float32)
    with _on_device(u):
        _scan_forward_kernel[_grid(dim, groups, batch, config["BLOCK_E"])](
            u, delta, A, B, C, _or(D, u), _or(z, u), _or(delta_bias, u), _or(initial_state, u),
            out, last, saved,
            length, dim, dim // groups, state_size,
            *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(), *_or(z, u).stride(),
            *(initial_state.stride() if initial_state is not None else (0, 0, 0)), *out.stride(),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
            HAS_H0=initial_state is not None, SAVE=save,
            BLOCK_T=config["BLOCK_T"], BLOCK_E=config["BLOCK_E"], BLOCK_N=block_n, num_warps=config["num_warps"],
        )
    return out, last[..., :state_size], saved


def _backward(inputs, saved, dout, dlast, delta_softplus, config):
    u, delta, A, B, C, D, z, delta_bias, initial_state = inputs
    batch, dim, length = u.shape
    groups, state_size = B.shape[1], A.shape[1]
    block_n = saved.shape[-1]
    f32 = dict(device=u.device, dtype=torch.float32)
    du, ddelta = torch.empty(batch, dim, length, **f32), torch.empty(batch, dim, length, **f32)
    dz = torch.empty(batch, dim, length, **f32) if z is not None else None
    dB, dC = torch.zeros(batch, groups, state_size, length, **f32), torch.zeros(batch, groups, state_size, length, **f32)
    dA, dh0 = torch.empty(batch, dim, block_n, **f32), torch.empty(batch, dim, block_n, **f32)
    dD, dbias = torch.empty(batch, dim, **f32), torch.empty(batch, dim, **f32)
    if dlast is not None:  # (b, d, BLOCK_N) float32, as the kernel reads it
        dlast = torch.nn.functional.pad(dlast.float(), (0, block_n - state_size)).contiguous()
    with _on_device(u):
        _scan_backward_kernel[_grid(dim, groups, batch, config["BACKWARD_BLOCK_E"])](
            u, delta, A, B, C, _or(D, u), _or(z, u), _or(delta_bias, u), saved, dout, _or(dlast, u),
            du, ddelta, _or(dz, u), dB, dC, dA, dD, dbias, dh0,
            length, dim, dim // groups, state_size,
            *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(), *_or(z, u).stride(), *dout.stride(),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
            HAS_DLAST=dlast is not None,
            BLOCK_T=config["BLOCK_T"], BLOCK_E=config["BACKWARD_BLOCK_E"], BLOCK_N=block_n,
            num_warps=config["backward_num_warps"],
        )
    return (du, ddelta, dA.sum(0)[:, :state_size], dB, dC, dD.sum(0), dz, dbias.sum(0), dh0[..., :state_size])


def _on_device(tensor):
    """Launch on the tensors' GPU (Triton launches on the current device), or anywhere under the interpreter."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _or(tensor, placeholder):
    """`tensor`, or `placeholder` for an absent optional one (the kernel never reads it: its HAS_* flag is off)."""
    return placeholder if tensor is None else tensor


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, config):
        inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state)
        save = any(ctx.needs_input_grad[:9])
        out, last, saved = _forward(*inputs, delta_softplus, save, config)
        if save:
            ctx.save_for_backward(*inputs, saved)
        ctx.delta_softplus, ctx.config = delta_softplus, config
        ctx.set_materialize_grads(False)
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        *inputs, saved = ctx.saved_tensors
        dout = torch.zeros_like(inputs[0]) if dout is None else dout
        grads = _backward(inputs, saved, dout, dlast, ctx.delta_softplus, ctx.config)
        return *(
            grad.to(tensor.dtype) if needed and tensor is not None else None
            for grad, tensor, needed in zip(grads, inputs, ctx.needs_input_grad)
        ), None, None


def selective_scan_triton(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None, return_last_state=False
):
    """Selective scan (Mamba-1, paper Eq. 1-2 of Gu & Dao 2023) by the Triton kernels above; differentiable.

    Args: as `selective_scan.selective_scan` (mamba_ssm's `selective_scan_fn`): u, delta, z `(batch, dim, seqlen)`;
        A `(dim, state)`; B, C `(batch, state, seqlen)` or, in groups of `dim / groups` consecutive channels,
        `(batch, groups, state, seqlen)`; D, delta_bias `(dim,)`; `initial_state` `(batch, dim, state)` (h before the
        first step; zeros when None); `return_last_state`. All tensors on one CUDA device (or on the CPU under
        `TRITON_INTERPRET=1`), any strides and float dtypes.

    Returns:
        `(batch, dim, seqlen)` in the dtype of `u`; with `return_last_state`, also the state after the last step,
        `(batch, dim, state)` float32, with its gradient.

    Raises:
        ValueError: shapes that do not fit together (the message names the argument).
    """
    if u.dim() != 3:
        raise ValueError(f"u must have shape (batch, dim, seqlen), got {tuple(u.shape)}.")
    batch, dim, length = u.shape
    state_size = A.shape[-1]
    if delta.shape != u.shape or (z is not None and z.shape != u.shape):
        raise ValueError(f"delta and z must have the shape of u {tuple(u.shape)}; got delta {tuple(delta.shape)}"
                         f"{'' if z is None else f', z {tuple(z.shape)}'}.")
    if A.shape != (dim, state_size):
        raise ValueError(f"A must have shape (dim, state) = ({dim}, state), got {tuple(A.shape)}.")
    B, C = (x.unsqueeze(1) if x.dim() == 3 else x for x in (B, C))  # (batch, groups, state, seqlen)
    for name, x in (("B", B), ("C", C)):
        if x.shape[0] != batch or x.shape[2:] != (state_size, length) or dim % x.shape[1]:
            raise ValueError(
                f"{name} must have shape (batch, state, seqlen) = ({batch}, {state_size}, {length}) or (batch, "
                f"groups, state, seqlen) with groups dividing dim = {dim}; got {tuple(x.shape)}."
            )
    if B.shape[1] != C.shape[1]:
        raise ValueError(f"B and C must have the same number of groups, got {B.shape[1]} and {C.shape[1]}.")
    if initial_state is not None and initial_state.shape != (batch, dim, state_size):
        raise ValueError(f"initial_state must have shape (batch, dim, state) = ({batch}, {dim}, {state_size}), "
                         f"got {tuple(initial_state.shape)}.")
    out, last = _SelectiveScan.apply(
        u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, dict(CONFIG)
    )
    return (out, last) if return_last_state else out
