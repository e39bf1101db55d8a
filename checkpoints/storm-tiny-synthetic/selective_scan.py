"""Mamba-1 selective scan in plain torch: the specification that the CUDA kernels (mamba_ssm) must match.

Both functions take the arguments of `mamba_ssm.ops.selective_scan_interface.selective_scan_fn` (mamba_ssm 2.3, "Mamba:
Linear-Time Sequence Modeling with Selective State Spaces", Gu & Dao 2023, Algorithm 2), for a real A and input-dependent
B and C:

    Δ_t = softplus(delta_t + delta_bias)            (if delta_softplus)
    h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t u_t         h: (batch, dim, state)
    y_t = C_t · h_t + D ⊙ u_t,   out_t = y_t ⊙ silu(z_t)

Shapes (mamba_ssm's notation): u, delta, z `(batch, dim, seqlen)`; A `(dim, state)`; B, C `(batch, state, seqlen)`,
or `(batch, groups, state, seqlen)` where each group of `dim / groups` consecutive channels has its own B and C (as in
mamba_ssm: the temporal encoder scans its two directions in one call, as two groups); D, delta_bias `(dim,)`. The scan
runs in float32 and returns `(batch, dim, seqlen)` in the dtype of `u`.

Both also take `initial_state` (h before the first step, `(batch, dim, state)`, zeros when None) and
`return_last_state` (also return h after the last step, float32, with its gradient): a long sequence can then be
scanned chunk by chunk, carrying h across the chunk boundaries, with the result of one whole-sequence scan.
mamba_ssm's kernel has `return_last_state` (without a gradient) but no `initial_state`; `kernels.py` adds both to it.
"""

import torch
import torch.nn.functional as F

# Time steps per chunk of `selective_scan`. The (batch, dim, chunk, state) tensors of one chunk stay small enough for
# the CPU caches; 128 was the fastest of 32-256 for forward+backward at seqlen 4096, width 512, on 2 cores.
SCAN_CHUNK_SIZE = 128


def _discretize_inputs(u, delta, delta_bias, delta_softplus):
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return u, delta


def _finish(y, u, D, z, dtype):
    if D is not None:
        y = y + u * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype)


def _grouped(x):
    """B or C as `(batch, groups, state, seqlen)` float32 (one group when given as `(batch, state, seqlen)`)."""
    return (x.unsqueeze(1) if x.dim() == 3 else x).float()


def _initial_state(u, A, initial_state):
    if initial_state is None:
        return u.new_zeros(u.shape[0], u.shape[1], A.shape[1])  # (b, d, n)
    return initial_state.float()


def selective_scan(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None, return_last_state=False
):
    """Selective scan in torch, linear in `seqlen` in time and memory, forward and backward.

    The recurrence runs as a Python loop over time steps, a chunk of `SCAN_CHUNK_SIZE` steps at a time: exp(ΔA) and
    ΔBu are materialised per chunk, and each step is two element-wise ops, so autograd records O(seqlen) nodes, each
    O(batch·dim·state). (A loop that indexes a full-length tensor per step, as transformers' `MambaMixer` slow path
    does, makes the backward quadratic: every slice's backward allocates a full-length gradient.)

    Args: see the module docstring (mamba_ssm `selective_scan_fn`, plus `initial_state`).

    Returns:
        `torch.Tensor` of shape `(batch, dim, seqlen)`, dtype of `u`; with `return_last_state`, also the state after
        the last step, `(batch, dim, state)` float32.
    """
    dtype = u.dtype
    u, delta = _discretize_inputs(u, delta, delta_bias, delta_softplus)
    A, B, C = A.float(), _grouped(B), _grouped(C)  # B, C (b, g, n, l)
    h = _initial_state(u, A, initial_state)  # (b, d, n)
    batch, dim, groups = u.shape[0], u.shape[1], B.shape[1]
    ys = []
    # `split` (one autograd node for all chunks), not per-chunk slicing: each slice's backward would allocate a
    # full-length gradient, which is quadratic again at chunk granularity.
    chunks = zip(*(x.split(SCAN_CHUNK_SIZE, dim=-1) for x in (delta, u, B, C)))
    for delta_c, u_c, B_c, C_c in chunks:  # (b, d, c), (b, d, c), (b, g, n, c), (b, g, n, c)
        length = u_c.shape[-1]
        decay = torch.exp(delta_c.unsqueeze(-1) * A[:, None, :])  # (b, d, c, n)
        impulse = (delta_c * u_c).view(batch, groups, dim // groups, length, 1) * B_c.transpose(2, 3).unsqueeze(2)
        impulse = impulse.view(batch, dim, length, -1)  # (b, d, c, n): each channel with its group's B
        states = []
        for decay_t, impulse_t in zip(decay.unbind(2), impulse.unbind(2)):
            h = decay_t * h + impulse_t  # (b, d, n)
            states.append(h)
        states = torch.stack(states, dim=2).view(batch, groups, dim // groups, length, -1)  # (b, g, d/g, c, n)
        ys.append(torch.einsum("bgecn,bgnc->bgec", states, C_c).reshape(batch, dim, length))  # (b, d, c)
    out = _finish(torch.cat(ys, dim=-1), u, D, z, dtype)
    return (out, h) if return_last_state else out


def selective_scan_ref(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None, return_last_state=False
):
    """Plain sequential reference of `selective_scan`: one time step per iteration, exactly the recurrence above.

    The test oracle for `selective_scan` and for the CUDA kernels (as mamba_ssm's own `selective_scan_ref`); not used
    by the model. Backward through it is quadratic in `seqlen`: keep it to short sequences.
    """
    dtype = u.dtype
    u, delta = _discretize_inputs(u, delta, delta_bias, delta_softplus)
    channels_per_group = u.shape[1] // _grouped(B).shape[1]
    A = A.float()
    B, C = (_grouped(x).repeat_interleave(channels_per_group, dim=1) for x in (B, C))  # (b, d, n, l): per channel
    h = _initial_state(u, A, initial_state)
    ys = []
    for t in range(u.shape[2]):
        h = torch.exp(delta[:, :, t, None] * A) * h + delta[:, :, t, None] * B[:, :, :, t] * u[:, :, t, None]
        ys.append(torch.einsum("bdn,bdn->bd", h, C[:, :, :, t]))
    out = _finish(torch.stack(ys, dim=2), u, D, z, dtype)
    return (out, h) if return_last_state else out
