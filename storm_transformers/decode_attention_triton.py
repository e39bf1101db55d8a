"""Decode steps of grouped-query attention in Triton (flash-decoding): the GPU path of `kernels.gqa_decode_attention`.

Same result as the torch path there (SDPA's, softmax in float32, a masked score set to the float32 minimum as in
transformers' eager attention). Imported only by `kernels.py`, on first use with CUDA tensors (importing Triton needs
no GPU, so the tests run it on the CPU under Triton's interpreter, `TRITON_INTERPRET=1`).

Design (Dao et al., "Flash-Decoding for long-context inference", 2023, with the query heads that share a key/value
head read together as one block of rows, so that the cache is read once per key/value head):

- partial pass, one program per (sequence, key/value head, split of the cache): the `G·q` queries of that key/value
  head (`G` query heads per key/value head, `q` new tokens) form a block of rows; the program walks its part of the
  cache in blocks of `BLOCK_N` keys with an online softmax (running maximum and sum in float32) and writes its
  unnormalised output, maximum and sum. Queries, keys, values and the mask are read through their strides: nothing
  is copied.
- combine pass, one program per (sequence, key/value head, row): rescales the splits to the common maximum, sums
  them, divides by the total and writes the row in transformers' output layout `(batch, q, heads, head_dim)`.

Two launches per layer instead of the torch path's ~10 kernels: at decode time the attention is launch- and
latency-bound, not bandwidth-bound (docs/benchmarks.md, "where a decode step's time goes").
"""

import contextlib

import torch

try:  # Triton ships with CUDA builds of torch (not with transformers); kernels.py imports this module only on use
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError("The Triton decode attention needs Triton (installed with CUDA builds of torch).") from error

# Keys per block of the partial pass and warps; `benchmarks/latency.py --sections decode` measures the result.
CONFIG = {"BLOCK_N": 64, "num_warps": 4}
# Programs the partial pass aims for (a few per SM of an H100/H200), so that a short cache still fills the GPU.
TARGET_PROGRAMS = 512
FLOAT32_MIN = torch.finfo(torch.float32).min
MASK_NONE, MASK_BOOL, MASK_ADDITIVE = 0, 1, 2


@triton.jit
def _partial(
    Q, K, V, Mask, Acc, Max, Sum,
    kv_heads, kv_length, rows, length, keys_per_split, scaling,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mm, stride_mn,
    MASK_KIND: tl.constexpr, IEEE: tl.constexpr, FMIN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """Program (b·kv_heads + h, split): rows r = g·q + i of key/value head h (query head h·G + g, new token i)."""
    bh, split = tl.program_id(0), tl.program_id(1)
    b, h = bh // kv_heads, bh % kv_heads
    r = tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    row_ok = r < rows
    head = h * (rows // length) + r // length  # query head of each row (rows = G·q)
    position = r % length
    q = tl.load(Q + b * stride_qb + head[:, None] * stride_qh + position[:, None] * stride_qm + d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)  # (BLOCK_M, HEAD_DIM)
    running_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, kv_length)
    for block in range(start, end, BLOCK_N):
        n = block + tl.arange(0, BLOCK_N)
        n_ok = n < end
        k = tl.load(K + b * stride_kb + h * stride_kh + n[None, :] * stride_kn + d[:, None] * stride_kd,
                    mask=n_ok[None, :], other=0.0)  # (HEAD_DIM, BLOCK_N)
        # (BLOCK_M, BLOCK_N) float32 (a float argument can arrive as float64 from torch.compile: cast back)
        scores = (tl.dot(q, k, input_precision="ieee" if IEEE else "tf32") * scaling).to(tl.float32)
        if MASK_KIND != 0:
            mask_at = Mask + b * stride_mb + position[:, None] * stride_mm + n[None, :] * stride_mn
            if MASK_KIND == 1:
                allowed = tl.load(mask_at, mask=row_ok[:, None] & n_ok[None, :], other=1)
                scores = tl.where(allowed != 0, scores, FMIN)
            else:
                scores += tl.load(mask_at, mask=row_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        scores = tl.where(n_ok[None, :], scores, float("-inf"))  # past the split: no weight at all
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # a row at −inf so far (an additive −inf mask)
        correction = tl.exp(running_max - shift)
        p = tl.exp(scores - shift[:, None])
        running_sum = running_sum * correction + tl.sum(p, 1)
        v = tl.load(V + b * stride_vb + h * stride_vh + n[:, None] * stride_vn + d[None, :] * stride_vd,
                    mask=n_ok[:, None], other=0.0)  # (BLOCK_N, HEAD_DIM)
        acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee" if IEEE else "tf32")
        running_max = new_max
    at = (bh * tl.num_programs(1) + split) * BLOCK_M + r
    tl.store(Max + at, running_max)
    tl.store(Sum + at, running_sum)
    tl.store(Acc + at[:, None] * HEAD_DIM + d[None, :], acc)



@triton.jit
def _combine(
    Acc, Max, Sum, Out, kv_heads, splits, rows, length,
    stride_ob, stride_om, stride_oh, stride_od,
    BLOCK_M: tl.constexpr, SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """Program (b·kv_heads + h, row r): the splits' outputs rescaled to their common maximum, summed, normalised, and
    written at `Out[b, r % q, h·G + r // q]`."""
    bh, r = tl.program_id(0), tl.program_id(1)
    s = tl.arange(0, SPLITS)
    d = tl.arange(0, HEAD_DIM)
    s_ok = s < splits
    at = (bh * splits + s) * BLOCK_M + r  # (SPLITS,)
    maxima = tl.load(Max + at, mask=s_ok, other=float("-inf"))
    sums = tl.load(Sum + at, mask=s_ok, other=0.0)
    acc = tl.load(Acc + at[:, None] * HEAD_DIM + d[None, :], mask=s_ok[:, None], other=0.0)  # (SPLITS, HEAD_DIM)
    scale = tl.where(s_ok, tl.exp(maxima - tl.max(maxima, 0)), 0.0)  # an empty split: max −inf, scale 0
    out = tl.sum(acc * scale[:, None], 0) / tl.sum(sums * scale, 0)  # (HEAD_DIM,)
    b, h = bh // kv_heads, bh % kv_heads
    head = h * (rows // length) + r // length
    tl.store(Out + b * stride_ob + (r % length) * stride_om + head * stride_oh + d * stride_od,
             out.to(Out.dtype.element_ty))


def supports(query: torch.Tensor, key: torch.Tensor) -> bool:
    """Whether the kernels take these tensors: a power-of-two head_dim of at least 16 (`tl.dot`'s smallest tile), a
    float dtype that Triton's dot takes (bf16, fp16, fp32), queries and cache of one dtype."""
    head_dim = query.shape[-1]
    return (head_dim >= 16 and head_dim & (head_dim - 1) == 0 and query.dtype == key.dtype
            and query.dtype in (torch.bfloat16, torch.float16, torch.float32))


def decode_attention_triton(query, key, value, attention_mask, scaling: float) -> torch.Tensor:
    """Attention of a decode step's queries to a grouped-query KV cache, by the two kernels above.

    Args:
        query: `(batch, heads, q, head_dim)`, any strides (q new tokens per sequence).
        key, value: `(batch, kv_heads, kv_length, head_dim)`, any strides; `heads` a multiple of `kv_heads`.
        attention_mask: None, boolean (True = attend) or additive float, `(batch or 1, 1, q, ≥ kv_length)`; only its
            first `kv_length` columns are read.
        scaling: the scores' factor (`head_dim ** -0.5` in Qwen2).

    Returns:
        `(batch, q, heads, head_dim)` contiguous, in the query's dtype: softmax(q·kᵀ·scaling + mask)·v with the softmax
        in float32 and a masked score at the float32 minimum (a fully masked row averages the values: finite, as
        transformers' eager attention).

    Raises:
        ValueError: shapes that do not fit together, or tensors `supports` does not take.
    """
    batch, heads, length, head_dim = query.shape
    kv_heads, kv_length = key.shape[1], key.shape[2]
    if key.shape != value.shape or key.shape[0] != batch or key.shape[3] != head_dim or heads % kv_heads:
        raise ValueError(f"query {tuple(query.shape)}, key {tuple(key.shape)} and value {tuple(value.shape)} must be "
                         "(batch, heads, q, head_dim) and (batch, kv_heads, kv_length, head_dim) with kv_heads "
                         "dividing heads.")
    if not supports(query, key) or value.dtype != key.dtype:
        raise ValueError(f"The Triton decode attention takes a power-of-two head_dim >= 16 and one float dtype; got "
                         f"head_dim {head_dim}, {query.dtype}, {key.dtype}, {value.dtype}.")
    rows = heads // kv_heads * length  # G·q rows per key/value head
    block_m = max(16, triton.next_power_of_2(rows))
    block_n = CONFIG["BLOCK_N"]
    blocks = triton.cdiv(kv_length, block_n)
    splits = max(1, min(blocks, TARGET_PROGRAMS // (batch * kv_heads)))
    keys_per_split = triton.cdiv(blocks, splits) * block_n
    splits = triton.cdiv(kv_length, keys_per_split)
    if attention_mask is None:
        kind, mask, mask_strides = MASK_NONE, query, (0, 0, 0)
    else:
        if attention_mask.dim() != 4 or attention_mask.shape[2] != length or attention_mask.shape[3] < kv_length:
            raise ValueError(f"attention_mask must be (batch or 1, 1, q, >= kv_length) = (.., 1, {length}, >= "
                             f"{kv_length}); got {tuple(attention_mask.shape)}.")
        kind = MASK_BOOL if attention_mask.dtype == torch.bool else MASK_ADDITIVE
        mask = attention_mask
        mask_strides = (0 if mask.shape[0] == 1 else mask.stride(0), mask.stride(2), mask.stride(3))
    partial = torch.empty(batch * kv_heads, splits, block_m, head_dim, device=query.device, dtype=torch.float32)
    maxima = torch.empty(batch * kv_heads, splits, block_m, device=query.device, dtype=torch.float32)
    sums = torch.empty_like(maxima)
    out = torch.empty(batch, length, heads, head_dim, device=query.device, dtype=query.dtype)
    with _on_device(query):
        _partial[(batch * kv_heads, splits)](
            query, key, value, mask, partial, maxima, sums,
            kv_heads, kv_length, rows, length, keys_per_split, scaling,
            *query.stride(), *key.stride(), *value.stride(), *mask_strides,
            MASK_KIND=kind, IEEE=query.dtype == torch.float32, FMIN=FLOAT32_MIN,
            BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=head_dim, num_warps=CONFIG["num_warps"],
        )
        _combine[(batch * kv_heads, rows)](
            partial, maxima, sums, out, kv_heads, splits, rows, length, *out.stride(),
            BLOCK_M=block_m, SPLITS=triton.next_power_of_2(splits), HEAD_DIM=head_dim,
        )
    return out


def _on_device(tensor):
    """Launch on the tensors' GPU (Triton launches on the current device), or anywhere under the interpreter."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()
