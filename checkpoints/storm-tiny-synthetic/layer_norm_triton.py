"""LayerNorm's forward in Triton, for inference: the vision tower's LayerNorms at CUDA inference
(`kernels.use_triton_layer_norm`).

Why: SigLIP normalises every token of every frame twice per layer (52 LayerNorms over 32 frames × 1024 tokens × 1152
channels per call of STORM-7B's tower). On an H200, PyTorch's LayerNorm kernel reads and writes that bf16 activation
at 1.8 TB/s (85 µs), torch.compile's default code at 1.1 TB/s, Liger-Kernel's at 2.2 TB/s; this kernel, two rows
per program, at 3.2 TB/s (47 µs), as fast as torch.compile's "max-autotune" code (50 µs) without its seconds of
autotuning per shape. For 128 frames the tower took 0.246 s instead of 0.253 s (docs/benchmarks.md, "Prefill
speed-ups, second round").

The result is `torch.nn.functional.layer_norm`'s (mean and biased variance in float32, eps inside the square root,
then the affine map, rounded once to the input's dtype), to float32 rounding. No autograd: kernels.py calls it only
without autograd recording. Imported only by kernels.py, on first use with CUDA tensors; the tests run it on the CPU
under Triton's interpreter (`TRITON_INTERPRET=1`).
"""

import torch
import torch.nn.functional as F

try:  # Triton ships with CUDA builds of torch (not with transformers); kernels.py imports this module only on use
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError("The Triton LayerNorm needs Triton (installed with CUDA builds of torch).") from error

# Widest normalised dimension the kernel takes (a row lives in registers, padded to a power of two, float32); wider
# rows go to torch.nn.functional.layer_norm.
MAX_COLUMNS = 8192
# Elements of one program's tile (rows × padded columns): SigLIP's 1152 channels → 2 rows per program, 4 warps.
TILE = 4096


@triton.jit
def _layer_norm_forward(X, W, B, Y, rows, columns, row_stride, eps,
                        BLOCK_ROWS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr):
    row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # (R,)
    column = tl.arange(0, BLOCK_COLUMNS)  # (C,)
    inside = (row < rows)[:, None] & (column < columns)[None, :]  # (R, C)
    x = tl.load(X + row[:, None].to(tl.int64) * row_stride + column[None, :], mask=inside, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / columns  # (R,)
    centred = tl.where(inside, x - mean[:, None], 0.0)
    variance = tl.sum(centred * centred, axis=1) / columns  # biased, as LayerNorm
    weight = tl.load(W + column, mask=column < columns, other=0.0).to(tl.float32)
    bias = tl.load(B + column, mask=column < columns, other=0.0).to(tl.float32)
    y = centred * (1.0 / tl.sqrt(variance + eps))[:, None] * weight[None, :] + bias[None, :]
    tl.store(Y + row[:, None].to(tl.int64) * columns + column[None, :], y.to(Y.dtype.element_ty), mask=inside)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """`torch.nn.functional.layer_norm(x, (C,), weight, bias, eps)` by one Triton kernel (forward only).

    Args:
        x (`torch.Tensor` of shape `(..., C)`): a CUDA tensor (or any tensor under Triton's interpreter); rows may be
            strided, channels are read contiguous (copied first if they are not). C > `MAX_COLUMNS`: computed by
            `torch.nn.functional.layer_norm` instead.
        weight, bias (`torch.Tensor` of shape `(C,)`): LayerNorm's affine parameters.
        eps (`float`): added to the variance.

    Returns:
        `torch.Tensor` of the shape and dtype of `x`, contiguous.

    Raises:
        ValueError: `weight` or `bias` is not `(C,)`.
    """
    columns = x.shape[-1]
    if weight.shape != (columns,) or bias.shape != (columns,):
        raise ValueError(f"weight and bias must have shape ({columns},) (the last dimension of x), got "
                         f"{tuple(weight.shape)} and {tuple(bias.shape)}.")
    if columns > MAX_COLUMNS:
        return F.layer_norm(x, (columns,), weight, bias, eps)
    rows = x.reshape(-1, columns)  # (R, C): a view where x's rows allow one
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if rows.shape[0] == 0:
        return out
    block_columns = triton.next_power_of_2(columns)
    block_rows = max(1, TILE // block_columns)
    grid = (triton.cdiv(rows.shape[0], block_rows),)
    _layer_norm_forward[grid](rows, weight, bias, out, rows.shape[0], columns, rows.stride(0), eps,
                              BLOCK_ROWS=block_rows, BLOCK_COLUMNS=block_columns, num_warps=4)
    return out
