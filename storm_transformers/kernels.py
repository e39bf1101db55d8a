"""The optional fast paths of STORM, found on first use (never at import time).

- mamba_ssm's `selective_scan_fn` and causal_conv1d's `causal_conv1d_fn` have the signatures of our torch spec
  (`selective_scan.selective_scan`, `torch.nn.Conv1d` + SiLU). Importing either package raises on machines without
  their compiled CUDA extensions (`ModuleNotFoundError: selective_scan_cuda`), so they are imported here lazily and
  cached; `mamba_kernels.cache_clear()` forgets the result (tests). `mamba_scan` gives mamba_ssm's kernel the initial
  state and differentiable last state of the spec (through `selective_scan_with_state`, plain torch around it).
- `triton_selective_scan` is our Triton scan (`selective_scan_triton.py`, forward and backward, with the spec's
  signature): the GPU path where mamba_ssm is not installed. Triton ships with CUDA builds of torch.

Which one runs is decided in one place, `StormMambaMixer._scan`: mamba_ssm when it imports, else Triton, for CUDA
tensors when `temporal_encoder_config.use_mamba_kernels` is on; the torch spec otherwise.

Also here: regional compilation for CUDA inference (`region_runner`, on by default: the LLM's norms, MLPs and RoPE at
prefill), the vision tower's MLP with its GELU in the GEMM's epilogue (`use_gelu_epilogue`) and its LayerNorms by a
Triton kernel (`use_triton_layer_norm`, `layer_norm_triton.py`), the LLM's attention for decode steps
(`gqa_decode_attention`, registered with transformers' `AttentionInterface` as `GQA_DECODE_ATTENTION`; `load_storm`'s
default) and an opt-in FP8 conversion of linears for inference on Hopper GPUs (`quantize_linears_fp8`).
"""

import functools
import sys
import warnings
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


@functools.cache
def triton_selective_scan() -> Callable | None:
    """`selective_scan_triton.selective_scan_triton`, or None where Triton cannot be imported (CPU-only torch)."""
    try:
        from .selective_scan_triton import selective_scan_triton
    except ImportError:
        return None
    return selective_scan_triton


@functools.cache
def triton_layer_norm() -> Callable | None:
    """`layer_norm_triton.layer_norm`, or None where Triton cannot be imported (CPU-only torch)."""
    try:
        from .layer_norm_triton import layer_norm
    except ImportError:
        return None
    return layer_norm


def mamba_scan(scan_fn: Callable) -> Callable:
    """mamba_ssm's `scan_fn` with the torch spec's signature: called as it is when no state is carried, through
    `selective_scan_with_state` when an initial state is given or the last state is asked for."""

    def scan(*args, initial_state=None, return_last_state=False, **kwargs):
        if initial_state is None and not return_last_state:
            return scan_fn(*args, **kwargs)
        return selective_scan_with_state(
            scan_fn, *args, **kwargs, initial_state=initial_state, return_last_state=return_last_state
        )

    return scan


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

    Args: as `selective_scan.selective_scan` (mamba_ssm's `selective_scan_fn`, B and C in groups or not, plus
        `initial_state` `(batch, dim, state)`, or None for h0 = 0).

    Returns:
        `torch.Tensor` `(batch, dim, seqlen)` in the dtype of `u`; with `return_last_state`, also the last state
        `(batch, dim, state)` float32.
    """
    batch, dim, length = u.shape
    num_states = A.shape[1]
    dtype = u.dtype
    delta = delta.float() if delta_bias is None else delta.float() + delta_bias.float()[:, None]
    delta = F.softplus(delta) if delta_softplus else delta  # (b, d, l)
    groups = (batch, B.shape[1]) if B.dim() == 4 else (batch,)  # B, C (b, [g,] n, l)
    one_hot = torch.eye(num_states, device=delta.device).expand(*groups, num_states, num_states)  # (b, [g,] n, n)
    nothing = delta.new_zeros(*groups, num_states, num_states)  # (b, [g,] n, n)
    zeros = delta.new_zeros(batch, dim, num_states)  # (b, d, n)
    entry = initial_state is not None
    # (u, Δ, B, C) of the entry steps (an initial state, (b, d, n), read as n time steps) and of the exit steps
    before = [(initial_state.float() / _ENTRY_DELTA, torch.full_like(zeros, _ENTRY_DELTA), one_hot, nothing)] if entry else []
    after = [(zeros, zeros, nothing, one_hot)] if return_last_state else []
    inputs = [
        torch.cat([*(steps[i] for steps in before), chunk, *(steps[i] for steps in after)], dim=-1).contiguous()
        for i, chunk in enumerate((u.float(), delta, B.float(), C.float()))
    ]  # u, Δ (b, d, [n +] l [+ n]); B, C (b, [g,] n, [n +] l [+ n]); float32
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


# ---------------------------------------------------------------- regional compilation (CUDA inference)

# The regions below (`region_runner`) run compiled for CUDA inference while this is True; False runs them eagerly.
COMPILE_REGIONS = True
# Options of their `torch.compile` (its default mode: inductor, no autotuning).
COMPILE_OPTIONS: dict = {}
# The LLM's modules that run compiled at prefill (`use_compiled_prefill_regions`): in each decoder layer of a
# transformers Llama-family model (Qwen2 included), the two RMSNorms and the MLP, where eager PyTorch launches one
# kernel per element-wise op (RMSNorm: 7; SiLU·up: 2) over activations of every prompt token.
PREFILL_REGIONS = ("input_layernorm", "post_attention_layernorm", "mlp")


def region_runner(region: Callable, hidden_states: torch.Tensor) -> Callable:
    """How to run `region(module, hidden_states, ...)` (a function of a module, e.g. a class's `forward`): compiled for
    CUDA tensors at inference (no autograd recording, not already inside `torch.compile`) while `COMPILE_REGIONS` is
    on, else `region` itself.

    Regional compilation (as accelerate's `compile_regions`): one `torch.compile` per region function, and since
    torch.compile lifts a module's parameters to graph inputs, every module it runs (the 57 RMSNorms of Qwen2-7B)
    shares one compiled graph; a second input shape (another prompt length) compiles once more with dynamic shapes,
    then nothing else does. The first call compiles (docs/benchmarks.md gives the time); if compiling fails, a
    warning says why and every region runs eagerly from then on."""
    usable = COMPILE_REGIONS and _cuda_inference(hidden_states)
    return functools.partial(_compiled_or_eager, region) if usable else region


def _cuda_inference(hidden_states: torch.Tensor) -> bool:
    """A CUDA tensor, no autograd recording, not inside `torch.compile`: where the fast paths below apply."""
    return hidden_states.is_cuda and not torch.is_grad_enabled() and not torch.compiler.is_compiling()


@functools.cache
def _compiled(region: Callable) -> Callable:
    return torch.compile(region, **COMPILE_OPTIONS)


def _compiled_or_eager(region, *args, **kwargs):
    global COMPILE_REGIONS
    try:
        return _compiled(region)(*args, **kwargs)
    except torch._dynamo.exc.TorchDynamoException as error:  # compilation failed: same result, eagerly
        COMPILE_REGIONS = False
        warnings.warn(f"Compiling {region.__qualname__} failed ({type(error).__name__}: {error}); running it and the "
                      "other compiled regions eagerly (storm_transformers.kernels.COMPILE_REGIONS = False).",
                      stacklevel=2)
        return region(*args, **kwargs)


def use_compiled_prefill_regions(language_model: torch.nn.Module) -> None:
    """Make the `PREFILL_REGIONS` modules of `language_model`'s decoder layers run compiled at prefill: each module's
    `forward` becomes its class's `forward` through `region_runner` when its input holds more than one token per
    sequence, and the class's `forward` itself otherwise (decode steps, which transformers compiles whole with a static
    cache). Likewise RoPE, where the layers' attention applies it by `ROTARY_FUNCTION` (`_prefill_attention`). Other
    models (no `layers`, other names) are left as they are. Parameters, state dicts and adapters (PEFT wraps the
    MLP's linears, which the class's `forward` calls) are untouched."""
    for layer in getattr(language_model, "layers", ()):
        for name in PREFILL_REGIONS:
            module = getattr(layer, name, None)
            if isinstance(module, torch.nn.Module):
                module.forward = functools.partial(_prefill_region, type(module).forward, module)
        attention = getattr(layer, "self_attn", None)
        source = sys.modules.get(type(attention).__module__)  # the Python module that defines the attention class
        rotary = getattr(source, ROTARY_FUNCTION, None)
        if isinstance(rotary, functools.partial) and rotary.func is _rotary_region:  # ours, while a prefill runs
            rotary = rotary.args[0]
        if isinstance(attention, torch.nn.Module) and callable(rotary):
            forward = type(attention).forward
            attention.forward = functools.partial(_prefill_attention, forward, source, rotary, attention)


def _is_prompt(hidden_states: torch.Tensor) -> bool:
    """`(B, L, D)` with L > 1: a prompt (prefill), not a decode step."""
    return hidden_states.dim() == 3 and hidden_states.shape[1] > 1


def _prefill_region(forward: Callable, module: torch.nn.Module, hidden_states: torch.Tensor, *args, **kwargs):
    if _is_prompt(hidden_states) and not args and not kwargs:
        return region_runner(forward, hidden_states)(module, hidden_states)
    return forward(module, hidden_states, *args, **kwargs)


# The function that transformers' Llama-family attention (Qwen2's included) calls on its queries and keys to apply
# RoPE, a global of the module that defines the attention class: eager PyTorch runs it as ~10 kernels (a slice, a
# negation and a concatenation per tensor for `rotate_half`, products and sums) over every prompt token's queries.
ROTARY_FUNCTION = "apply_rotary_pos_emb"


def _prefill_attention(forward: Callable, source, rotary: Callable, attention: torch.nn.Module, *args, **kwargs):
    """`forward(attention, ...)`, with RoPE (`rotary`, `source`'s `ROTARY_FUNCTION`) through `region_runner`
    (compiled at CUDA inference) when the attention reads a prompt (more than one token per sequence); unchanged for
    decode steps.

    transformers' attention `forward` calls RoPE as a global of its module (`source`), so for the duration of this
    call that global is `rotary` through `region_runner`, and `rotary` again afterwards (also after an error). Code
    that calls it meanwhile (another model, another thread) gets the same values: compiled only for CUDA tensors
    without autograd, eager otherwise."""
    hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    if not _is_prompt(hidden_states):
        return forward(attention, *args, **kwargs)
    setattr(source, ROTARY_FUNCTION, functools.partial(_rotary_region, rotary))
    try:
        return forward(attention, *args, **kwargs)
    finally:
        setattr(source, ROTARY_FUNCTION, rotary)


def _rotary_region(rotary: Callable, query: torch.Tensor, *args, **kwargs):
    return region_runner(rotary, query)(query, *args, **kwargs)


# ---------------------------------------------------------------- vision tower: the MLP's GELU in the GEMM's epilogue


def use_gelu_epilogue(vision_tower: torch.nn.Module) -> None:
    """Make the MLPs of a SigLIP vision tower compute `gelu_tanh(fc1(x))` in one cuBLASLt GEMM with a bias+GELU
    epilogue (`torch._addmm_activation`) at CUDA inference, instead of a GEMM and a separate pass over its
    `(tokens, 4304)` output. Only for `hidden_act="gelu_pytorch_tanh"` (SigLIP's), the tanh approximation that the
    epilogue computes on CUDA (on the CPU `_addmm_activation` computes the exact GELU, so the CPU keeps the eager
    MLP); `fc1` a plain `nn.Linear` with a bias (not an FP8 or LoRA layer); no autograd recording. Anything else
    runs the MLP's own `forward`. A tower without these MLPs is left as it is."""
    for layer in getattr(getattr(vision_tower, "encoder", None), "layers", ()):
        mlp = getattr(layer, "mlp", None)
        if getattr(getattr(mlp, "config", None), "hidden_act", None) == "gelu_pytorch_tanh":
            mlp.forward = functools.partial(_gelu_epilogue_mlp, type(mlp).forward, mlp)


def _gelu_epilogue_mlp(forward: Callable, mlp: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    fc1 = mlp.fc1
    if not (type(fc1) is torch.nn.Linear and fc1.bias is not None and _cuda_inference(hidden_states)):
        return forward(mlp, hidden_states)
    rows = hidden_states.reshape(-1, hidden_states.shape[-1])  # (tokens, C)
    activations = torch._addmm_activation(fc1.bias, rows, fc1.weight.t(), use_gelu=True)  # (tokens, inner)
    return mlp.fc2(activations).view(*hidden_states.shape[:-1], -1)  # (..., C)


def use_triton_layer_norm(module: torch.nn.Module) -> None:
    """Make every `nn.LayerNorm` inside `module` (the vision tower's) run `layer_norm_triton.layer_norm` at CUDA
    inference, where PyTorch's own LayerNorm kernel reaches about half the memory bandwidth on SigLIP's 1152 channels
    (layer_norm_triton.py says how much). Only for a LayerNorm over the last dimension with weight and bias, no
    autograd recording, Triton importable; anything else (the CPU, training) runs the LayerNorm's own `forward`."""
    for norm in module.modules():
        if type(norm) is torch.nn.LayerNorm:
            norm.forward = functools.partial(_triton_layer_norm_forward, norm)


def _triton_layer_norm_forward(norm: torch.nn.LayerNorm, hidden_states: torch.Tensor) -> torch.Tensor:
    affine = len(norm.normalized_shape) == 1 and norm.weight is not None and norm.bias is not None
    layer_norm = triton_layer_norm() if affine and _cuda_inference(hidden_states) else None
    if layer_norm is None:
        return torch.nn.LayerNorm.forward(norm, hidden_states)
    return layer_norm(hidden_states, norm.weight, norm.bias, norm.eps)


# ---------------------------------------------------------------- LLM attention: decode steps of grouped-query attention

# The name under which `gqa_decode_attention` is registered with transformers' `AttentionInterface`.
GQA_DECODE_ATTENTION = "sdpa_gqa_decode"
# Queries per sequence up to which a step counts as decoding (one new token; a few with assisted decoding).
DECODE_QUERY_LENGTH = 16
# Parts the KV length is split into for the product of the attention weights and the values (split-K).
DECODE_SPLITS = 32


def gqa_decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' `sdpa_attention_forward`, except for decode steps of grouped-query attention, computed per
    key/value head: the `G` query heads that share a key/value head are read as `G × q` queries of that head.

    Why: with a mask (a static KV cache always passes one), transformers' SDPA path copies each layer's cached keys
    and values `G` times (`repeat_kv`; Qwen2-7B: G = 7) and SDPA's kernels parallelise over query blocks, of which a
    decode step has one per head. Here the cache is read once: the scores by one batched product per key/value head,
    the weighted sum of the values by `DECODE_SPLITS` products per head over parts of the cache, then summed (split-K,
    as flash-decoding splits the cache), so that both products fill the GPU. The result is SDPA's (softmax in
    float32, as transformers' eager attention), to bf16 rounding.

    Args (transformers' attention-function interface, `AttentionInterface`):
        query (`torch.Tensor` of shape `(batch, heads, q, head_dim)`), key / value (`(batch, kv_heads, kv_length,
        head_dim)`), attention_mask (boolean, True = attend, or additive float, `(batch or 1, 1, q, ≥ kv_length)`;
        or None), dropout, scaling (default `head_dim ** -0.5`).

    Returns:
        `(attn_output (batch, q, heads, head_dim), None)`.

    Decoding is `q ≤ DECODE_QUERY_LENGTH` with `heads > kv_heads`, a mask (or a single query), no dropout and no
    extra scores (attention sinks, position bias); anything else, prefill and training included, is
    `sdpa_attention_forward` itself.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, length, head_dim = query.shape
    kv_heads, kv_length = key.shape[1], key.shape[2]
    extra_scores = any(kwargs.get(name) is not None for name in ("s_aux", "position_bias"))
    causal_without_mask = attention_mask is None and length > 1  # sdpa's is_causal: a prompt, not a decode step
    if length > DECODE_QUERY_LENGTH or heads == kv_heads or dropout or extra_scores or causal_without_mask:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    rows = heads // kv_heads * length  # G·q queries per key/value head; head h reads kv head h // G, as repeat_kv
    scaling = head_dim**-0.5 if scaling is None else scaling
    grouped = query.reshape(batch, kv_heads, rows, head_dim)
    scores = torch.matmul(grouped, key.transpose(2, 3)).float() * scaling  # (batch, kv_heads, G·q, kv_length)
    if attention_mask is not None:
        mask = attention_mask[..., :kv_length]  # (batch or 1, 1, q, kv_length)
        mask = mask[:, :, None].expand(-1, -1, rows // length, -1, -1).reshape(mask.shape[0], 1, rows, kv_length)
        # the float32 minimum, not -inf, as transformers' eager attention: a fully masked row (a padded query) is not NaN
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    weights = torch.softmax(scores, dim=-1).to(value.dtype)
    pad = -kv_length % DECODE_SPLITS  # zero weights on zero values: nothing added
    if pad:
        weights, value = F.pad(weights, (0, pad)), F.pad(value, (0, 0, 0, pad))
    part = (kv_length + pad) // DECODE_SPLITS
    weights = weights.view(batch, kv_heads, rows, DECODE_SPLITS, part).transpose(2, 3)  # (.., splits, G·q, part)
    parts = torch.matmul(weights, value.view(batch, kv_heads, DECODE_SPLITS, part, head_dim))  # (.., splits, G·q, d)
    output = parts.sum(dim=2, dtype=torch.float32).to(value.dtype)  # (batch, kv_heads, G·q, head_dim)
    return output.reshape(batch, heads, length, head_dim).transpose(1, 2).contiguous(), None


def register_attention() -> None:
    """Register `gqa_decode_attention` with transformers' `AttentionInterface` as `GQA_DECODE_ATTENTION`, with SDPA's
    masks (`AttentionMaskInterface`; a name without a mask function gets no mask at all), so that any transformers
    model can use it: `attn_implementation="sdpa_gqa_decode"`. Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(GQA_DECODE_ATTENTION, gqa_decode_attention)
    AttentionMaskInterface.register(GQA_DECODE_ATTENTION, sdpa_mask)


# ---------------------------------------------------------------- FP8 linears (opt-in, inference)

FP8_MAX = 448.0  # largest float8_e4m3fn


class Fp8Linear(torch.nn.Module):
    """Inference stand-in for an `nn.Linear`: float8 (e4m3) weights with one scale per output channel, activations
    quantized per row (token) on the fly, and the product by `torch._scaled_mm` (cuBLASLt's FP8 GEMM on Hopper and
    Ada GPUs, compute capability ≥ 8.9), accumulated in float32, returned in the activations' dtype.

    `(..., in_features)` → `(..., out_features)`. The weights are buffers: nothing trains, and a model holding these
    is not meant to be saved (reload the bf16 checkpoint and convert again)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()  # (out, in)
        scale = weight.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / FP8_MAX  # (out, 1)
        self.register_buffer("weight", (weight / scale).to(torch.float8_e4m3fn))
        self.register_buffer("weight_scale", scale.t().contiguous())  # (1, out) float32
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # (M, in)
        quantize = _compiled_quantize_rows() if rows.is_cuda and not torch.compiler.is_compiling() else quantize_rows
        quantized, scale = quantize(rows)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        out = torch._scaled_mm(quantized, self.weight.t(), scale_a=scale, scale_b=self.weight_scale, bias=bias,
                               out_dtype=x.dtype)  # (M, out)
        return out.reshape(*x.shape[:-1], self.out_features)


def quantize_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(M, K)` → its float8 (e4m3) rows `(M, K)` and their float32 scales `(M, 1)`: each row divided by its largest
    magnitude / `FP8_MAX`."""
    scale = rows.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12) / FP8_MAX  # (M, 1)
    return (rows.float() / scale).to(torch.float8_e4m3fn), scale


@functools.cache
def _compiled_quantize_rows():
    """`quantize_rows` compiled (one fused kernel instead of four passes over float32 copies of the activations)."""
    return torch.compile(quantize_rows, dynamic=True)


@functools.cache
def has_fp8_matmul(device: torch.device) -> bool:
    """Whether `torch._scaled_mm` runs on `device` with one scale per row and per column, as `Fp8Linear` calls it (a
    16×16 product): every CUDA build on compute capability ≥ 8.9; on the CPU only in newer torch releases (2.6 has
    none; 2.11's CPU backend takes only one scale per tensor)."""
    one = torch.ones(16, 16, device=device).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(one, one.t(), scale_a=torch.ones(16, 1, device=device),
                         scale_b=torch.ones(1, 16, device=device), out_dtype=torch.float32)
    except (NotImplementedError, RuntimeError):
        return False
    return True


def quantize_linears_fp8(module: torch.nn.Module) -> int:
    """Replace every `nn.Linear` inside `module` by an `Fp8Linear` (in place), for inference; returns how many.

    Typical use, the vision tower and the LLM of a bf16 STORM on a Hopper GPU (the temporal encoder, the projector and
    the LM head stay bf16): `quantize_linears_fp8(model.model.vision_tower)`,
    `quantize_linears_fp8(model.model.language_model)`. Speed and output difference: docs/benchmarks.md.

    Raises:
        ValueError: a CUDA module on a GPU without FP8 tensor cores (compute capability below 8.9), a device on which
            this torch has no `torch._scaled_mm` (the CPU in torch 2.6), or a Linear whose sizes are not multiples of
            16 (cuBLASLt's FP8 GEMM needs them).
    """
    linears = [(name, child) for name, child in module.named_modules() if isinstance(child, torch.nn.Linear)]
    for name, linear in linears:
        device = linear.weight.device
        if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
            raise ValueError(f"FP8 linears need a GPU of compute capability ≥ 8.9 (Hopper, Ada); {device} is "
                             f"{torch.cuda.get_device_name(device)}. Keep this model in bf16.")
        if linear.in_features % 16 or linear.out_features % 16:
            raise ValueError(f"{name} is {linear.in_features} → {linear.out_features}: FP8 GEMMs need multiples of 16.")
        if not has_fp8_matmul(device):
            raise ValueError(f"torch {torch.__version__} has no FP8 matrix product (torch._scaled_mm) on {device.type}. "
                             "FP8 linears are for Hopper/Ada GPUs; keep this model in bf16.")
        parent_name, _, child_name = name.rpartition(".")
        setattr(module.get_submodule(parent_name), child_name, Fp8Linear(linear))
    return len(linears)
