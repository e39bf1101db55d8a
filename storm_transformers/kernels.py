"""The optional CUDA kernels of the temporal encoder, found on first use (never at import time).

mamba_ssm's `selective_scan_fn` and causal_conv1d's `causal_conv1d_fn` have the signatures of our torch spec
(`selective_scan.selective_scan`, `torch.nn.Conv1d` + SiLU). Importing either package raises on machines without
their compiled CUDA extensions (`ModuleNotFoundError: selective_scan_cuda`), so they are imported here lazily and
cached; `mamba_kernels.cache_clear()` forgets the result (tests). `selective_scan_with_state` (plain torch around
the kernel) gives the kernel the initial state and differentiable last state that a chunked scan needs.
"""

import functools
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F


class MambaKernels(NamedTuple):
    selective_scan_fn: Callable | None
    causal_conv1d_fn: Callable | None


@functools.cache
def mamba_kernels() -> MambaKernels:
    """`(selective_scan_fn, causal_conv1d_fn)` from mamba_ssm / causal_conv1d; each is None where it cannot be imported."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except (ImportError, OSError):
        selective_scan_fn = None
    try:
        from causal_conv1d import causal_conv1d_fn
    except (ImportError, OSError):
        causal_conv1d_fn = None
    return MambaKernels(selective_scan_fn, causal_conv1d_fn)


# Δ of the steps that load an initial state into mamba_ssm's scan (`selective_scan_with_state`). With Δ = 2^-48,
# exp(Δ·A) rounds to exactly 1 in float32 for every |A| < 2^23, and Δ·(h0·2^48) = h0 exactly (scaling by powers of
# two does not round).
_ENTRY_DELTA = 2.0**-48


def selective_scan_with_state(
    scan_fn, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None, return_last_state=False
):
    """`scan_fn` (mamba_ssm's `selective_scan_fn`) with an initial state and a differentiable last state.

    mamba_ssm's kernel always starts from h = 0, and the last state it can return has no gradient. This runs the same
    kernel on the chunk with N extra time steps before it and N after it (N = state size), all in float32, so that
    the kernel itself carries the state in and out, exactly, forwards and backwards:

    - entry step j (j = 0..N-1): Δ = 2^-48, u = h0[:, :, j]·2^48, B = e_j (one-hot), C = 0. It adds Δ·u·e_j = h0[:, :, j]
      to state j and leaves the others as they are (exp(Δ·A) = 1 in float32); after the N entry steps h = h0.
    - the chunk's own steps, with Δ = softplus(delta + delta_bias) computed here (the kernel runs with
      `delta_softplus=False`, so that the extra steps get exactly the Δ above).
    - exit step j: Δ = 0, u = 0 (h unchanged: exp(0) = 1, no input), C = e_j, so its output is y = h[:, :, j] (+ D·0):
      the last state, read through the kernel's output and therefore with the kernel's exact gradient.

    The gate silu(z) is applied after the kernel (the exit steps must not be gated). Extra cost: 2N steps and float32
    inputs for the chunk. On a CPU, `scan_fn=selective_scan` (the torch spec, started from h = 0) gives the same as
    `selective_scan(..., initial_state=h0, return_last_state=True)`, which is how this is tested without a GPU.

    Args: as `selective_scan.selective_scan` (mamba_ssm's `selective_scan_fn` plus `initial_state`
        `(batch, dim, state)`, or None for h0 = 0).

    Returns:
        `torch.Tensor` `(batch, dim, seqlen)` in the dtype of `u`; with `return_last_state`, also the last state
        `(batch, dim, state)` float32.
    """
    batch, dim, length = u.shape
    num_states = A.shape[1]
    dtype = u.dtype
    delta = delta.float() if delta_bias is None else delta.float() + delta_bias.float()[:, None]
    delta = F.softplus(delta) if delta_softplus else delta  # (b, d, l)
    one_hot = torch.eye(num_states, device=delta.device).expand(batch, num_states, num_states)  # (b, n, n)
    nothing = delta.new_zeros(batch, num_states, num_states)  # (b, n, n)
    zeros = delta.new_zeros(batch, dim, num_states)  # (b, d, n)
    entry = initial_state is not None
    # (u, Δ, B, C) of the entry steps (an initial state, (b, d, n), read as n time steps) and of the exit steps
    before = [(initial_state.float() / _ENTRY_DELTA, torch.full_like(zeros, _ENTRY_DELTA), one_hot, nothing)] if entry else []
    after = [(zeros, zeros, nothing, one_hot)] if return_last_state else []
    inputs = [
        torch.cat([*(steps[i] for steps in before), chunk, *(steps[i] for steps in after)], dim=-1).contiguous()
        for i, chunk in enumerate((u.float(), delta, B.float(), C.float()))
    ]  # u, Δ (b, d, [n +] l [+ n]); B, C (b, n, [n +] l [+ n]); float32
    del delta
    out = scan_fn(*inputs[:2], A, *inputs[2:], D=D, delta_softplus=False)  # (b, d, [n +] l [+ n]) float32
    del inputs
    start = num_states if entry else 0
    y = out[..., start : start + length]
    if z is not None:
        y = y * F.silu(z.float())
    if not return_last_state:
        return y.to(dtype)
    return y.to(dtype), out[..., start + length :].contiguous()  # a copy: the chunk's output is not kept alive
