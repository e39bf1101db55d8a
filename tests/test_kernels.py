"""The kernel paths of the temporal encoder (mamba_ssm / causal_conv1d, our Triton scan) against the torch spec.

The CPU tests check the dispatch and the state wrapper; the GPU tests (skipped elsewhere) compare every kernel path
with the torch path, in float32 and bfloat16, outputs and gradients, whole and in chunks with carried states. The
Triton kernels also run on the CPU under Triton's interpreter: tests/test_selective_scan_triton.py.
"""

import functools
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import storm_transformers.temporal_encoder as temporal_encoder
from storm_transformers import StormForConditionalGeneration, StormTemporalEncoder, StormTemporalEncoderConfig, kernels
from storm_transformers.kernels import MambaKernels, mamba_kernels, selective_scan_with_state, triton_selective_scan
from storm_transformers.selective_scan import selective_scan
from storm_testing import VIDEO_TOKEN_ID, tiny_config


def test_kernels_are_not_imported_with_the_package():
    code = (
        "import sys, storm_transformers; "
        "print(sorted({'mamba_ssm', 'causal_conv1d', 'storm_transformers.selective_scan_triton',"
        "'storm_transformers.layer_norm_triton'} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_cpu_tensors_never_reach_a_kernel(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a GPU kernel was called with CPU tensors")

    monkeypatch.setattr(temporal_encoder, "mamba_kernels", lambda: MambaKernels(fail, fail))
    monkeypatch.setattr(temporal_encoder, "triton_selective_scan", lambda: fail)
    model = StormTemporalEncoder(StormTemporalEncoderConfig(hidden_size=16, state_size=4, chunk_size=4))
    assert model(torch.randn(1, 10, 16)).shape == (1, 10, 16)


def _scan_inputs(seqlen, requires_grad=False, seed=0, groups=0, dim=6, device="cpu", dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(device, dtype).requires_grad_(requires_grad)

    bc = (2, groups, 4, seqlen) if groups else (2, 4, seqlen)
    A = (-torch.rand(dim, 4, generator=generator) * 4).to(device).requires_grad_(requires_grad)
    return dict(
        u=randn(2, dim, seqlen), delta=randn(2, dim, seqlen), A=A, B=randn(*bc), C=randn(*bc),
        D=randn(dim).float(), z=randn(2, dim, seqlen), delta_bias=randn(dim, scale=0.5).float(),
    )


@pytest.mark.parametrize("groups", [0, 2])
@pytest.mark.parametrize("with_initial_state", [True, False])
@pytest.mark.parametrize("gated", [True, False])
def test_kernel_wrapper_adds_the_state_exactly_on_the_torch_spec(with_initial_state, gated, groups):
    """`selective_scan_with_state` around a scan that starts from h = 0 (here the torch spec, in place of mamba_ssm's
    kernel) equals the torch spec with `initial_state`, in outputs, last state and every gradient, with B and C in
    groups of channels or not."""
    inputs = _scan_inputs(50, requires_grad=True, groups=groups)
    if not gated:
        inputs.pop("z")
    h0 = torch.randn(2, 6, 4, requires_grad=True) if with_initial_state else None
    leaves = [*inputs.values()] + ([h0] if with_initial_state else [])
    grad_out, grad_last = torch.randn(2, 6, 50), torch.randn(2, 6, 4)

    def run(scan):
        out, last = scan(**inputs, delta_softplus=True, initial_state=h0, return_last_state=True)
        return out, last, torch.autograd.grad((out * grad_out).sum() + (last * grad_last).sum(), leaves)

    out, last, grads = run(lambda **kw: selective_scan_with_state(selective_scan, **kw))
    ref_out, ref_last, ref_grads = run(selective_scan)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-5)
    torch.testing.assert_close(last, ref_last, rtol=0, atol=1e-5)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-4)
    no_state = selective_scan_with_state(selective_scan, **inputs, delta_softplus=True)
    torch.testing.assert_close(no_state, selective_scan(**inputs, delta_softplus=True), rtol=0, atol=1e-5)


def test_chunked_encoder_on_the_kernel_wrapper_equals_the_whole_torch_scan(monkeypatch):
    """The temporal encoder's carried-state path with the kernel wrapper (the torch spec standing in for mamba_ssm's
    kernel, on CPU tensors) equals one whole-sequence scan."""
    torch.manual_seed(0)
    model = StormTemporalEncoder(StormTemporalEncoderConfig(hidden_size=16, state_size=4, chunk_size=7)).eval()
    x = torch.randn(2, 30, 16)
    whole = model(x, chunk_size=30)
    calls = []

    def wrapped_torch_scan(*args, initial_state=None, return_last_state=False, **kwargs):
        calls.append(initial_state is not None)
        return selective_scan_with_state(selective_scan, *args, **kwargs, initial_state=initial_state, return_last_state=return_last_state)

    monkeypatch.setattr(temporal_encoder, "selective_scan", wrapped_torch_scan)
    torch.testing.assert_close(model(x), whole, rtol=0, atol=1e-5)
    assert any(calls)  # the carried states went through the wrapper


# ---------------------------------------------------------------- GPU

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
requires_mamba = pytest.mark.skipif(
    not torch.cuda.is_available() or mamba_kernels().selective_scan_fn is None,
    reason="needs a CUDA GPU with mamba_ssm installed (pip install -e '.[cuda]')",
)


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1e-12)).item()


def _scan_outputs_and_grads(scan, inputs, initial_state, seed=1):
    result = scan(**inputs, delta_softplus=True, initial_state=initial_state, return_last_state=True)
    out, last = result
    generator = torch.Generator(device=out.device).manual_seed(seed)
    loss = (out.float() * torch.randn(out.shape, generator=generator, device=out.device)).sum() + last.square().sum()
    leaves = [*inputs.values()] + ([initial_state] if initial_state is not None else [])
    return [out, last, *torch.autograd.grad(loss, leaves)]


@requires_cuda
@pytest.mark.parametrize("groups", [0, 2])
@pytest.mark.parametrize("with_initial_state", [True, False])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
def test_triton_scan_equals_the_torch_spec(groups, with_initial_state, dtype, tolerance):
    """Outputs, last state and every gradient; 2100 steps (66 tiles, a partial last one), 40 channels (several blocks,
    a partial last one), B and C in groups or not, inputs strided as the temporal encoder gives them."""
    scan = triton_selective_scan()
    assert scan is not None, "Triton ships with CUDA builds of torch"
    inputs = _scan_inputs(2100, requires_grad=True, groups=groups, dim=40, device="cuda", dtype=dtype)
    initial = torch.randn(2, 40, 4, device="cuda", requires_grad=True) if with_initial_state else None
    results = _scan_outputs_and_grads(scan, inputs, initial)
    expected = _scan_outputs_and_grads(selective_scan, inputs, initial)
    names = ["output", "last state", *inputs, "initial_state"]
    for name, result, reference in zip(names, results, expected):
        assert result.dtype == reference.dtype, name
        assert _relative_error(result, reference) <= tolerance, name


@requires_mamba
@pytest.mark.parametrize("groups", [0, 2])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
def test_triton_scan_equals_mamba_ssm(groups, dtype, tolerance):
    inputs = _scan_inputs(2100, requires_grad=True, groups=groups, dim=40, device="cuda", dtype=dtype)
    grad_out = torch.randn(2, 40, 2100, device="cuda", dtype=dtype)

    def run(scan):
        out = scan(**inputs, delta_softplus=True)
        return [out, *torch.autograd.grad((out * grad_out).sum(), list(inputs.values()))]

    for name, result, reference in zip(["output", *inputs], run(triton_selective_scan()), run(mamba_kernels().selective_scan_fn)):
        assert _relative_error(result, reference) <= tolerance, name


def _run(model, x, grad_out):
    x = x.clone().requires_grad_()
    model.zero_grad()
    out = model(x)
    out.backward(grad_out)
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return out.detach(), x.grad.clone(), grads


def _cuda_encoder(bidirectional, dtype):
    torch.manual_seed(0)
    config = StormTemporalEncoderConfig(hidden_size=64, num_hidden_layers=2, bidirectional=bidirectional)
    model = StormTemporalEncoder(config).cuda().to(dtype)
    for layer in model.layers:  # mamba_ssm keeps these in fp32; so do we
        for _, _, _, A_log, D in layer.mixer.directions():
            A_log.data, D.data = A_log.data.float(), D.data.float()
    return config, model


# (scan, convolution) of each kernel path: what `mamba_kernels` is made to return (None: not installed). With no
# mamba_ssm scan, `StormMambaMixer._scan` runs the Triton scan.
KERNEL_SETS = {
    "mamba_ssm scan": ("mamba", None),
    "causal_conv1d": (None, "conv"),  # with the Triton scan
    "mamba_ssm scan + causal_conv1d": ("mamba", "conv"),
    "triton scan": (None, None),
}


def _kernel_set(monkeypatch, name):
    scan, conv = KERNEL_SETS[name]
    available = mamba_kernels()
    if (scan and available.selective_scan_fn is None) or (conv and available.causal_conv1d_fn is None):
        pytest.skip(f"{name}: mamba_ssm / causal_conv1d is not installed")
    chosen = MambaKernels(available.selective_scan_fn if scan else None, available.causal_conv1d_fn if conv else None)
    monkeypatch.setattr(temporal_encoder, "mamba_kernels", lambda: chosen)


@requires_cuda
@pytest.mark.parametrize("kernel_set", KERNEL_SETS)
@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
def test_kernel_path_equals_torch_path(monkeypatch, kernel_set, bidirectional, dtype, tolerance):
    _kernel_set(monkeypatch, kernel_set)
    config, model = _cuda_encoder(bidirectional, dtype)
    x = torch.randn(2, 3 * 700, 64, device="cuda", dtype=dtype)  # longer than one 2048-step mamba_ssm chunk
    grad_out = torch.randn_like(x)
    config.use_mamba_kernels = True
    kernel_out, kernel_dx, kernel_grads = _run(model, x, grad_out)
    config.use_mamba_kernels = False
    torch_out, torch_dx, torch_grads = _run(model, x, grad_out)
    assert _relative_error(kernel_out, torch_out) <= tolerance
    assert _relative_error(kernel_dx, torch_dx) <= tolerance
    for name, grad in torch_grads.items():
        assert _relative_error(kernel_grads[name], grad) <= tolerance, name


@requires_cuda
@pytest.mark.parametrize("kernel_set", ["mamba_ssm scan + causal_conv1d", "triton scan"])
@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
def test_chunked_kernel_path_equals_whole_sequence_kernel_and_torch_paths(monkeypatch, kernel_set, bidirectional, dtype, tolerance):
    """The scan in chunks of 700 tokens (not dividing 2100 + 5; states carried: mamba_ssm through
    `selective_scan_with_state`, Triton natively) against one whole-sequence kernel call and against the torch path:
    outputs, input and parameter gradients."""
    _kernel_set(monkeypatch, kernel_set)
    config, model = _cuda_encoder(bidirectional, dtype)
    x = torch.randn(2, 3 * 700 + 5, 64, device="cuda", dtype=dtype)
    grad_out = torch.randn_like(x)
    results = {}
    for name, use_kernels, chunk_size in [("chunked kernel", True, 700), ("whole kernel", True, None), ("chunked torch", False, 700)]:
        config.use_mamba_kernels, config.chunk_size = use_kernels, chunk_size
        results[name] = _run(model, x, grad_out)
    for other in ("whole kernel", "chunked torch"):
        out, dx, grads = results[other]
        assert _relative_error(results["chunked kernel"][0], out) <= tolerance, other
        assert _relative_error(results["chunked kernel"][1], dx) <= tolerance, other
        for name, grad in grads.items():
            assert _relative_error(results["chunked kernel"][2][name], grad) <= tolerance, (other, name)
    with torch.no_grad():  # inference: the residual stream is updated in place, chunk by chunk
        config.use_mamba_kernels, config.chunk_size = True, 700
        in_place = torch.cat([chunk for _, chunk in model.output_chunks(x.clone())], dim=1)
    assert _relative_error(in_place, results["whole kernel"][0]) <= tolerance


# ---------------------------------------------------------------- vision tower compilation, FP8 linears


@pytest.fixture
def eager_backend_compilation(monkeypatch):
    """Compile regions with dynamo's "eager" backend (tracing and guards as on a GPU, no code generation)."""
    from storm_transformers import kernels

    monkeypatch.setattr(kernels, "COMPILE_OPTIONS", {"backend": "eager"})
    kernels._compiled.cache_clear()
    torch._dynamo.reset()
    yield kernels
    kernels._compiled.cache_clear()
    torch._dynamo.reset()


def _tiny_siglip():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                                image_size=32, patch_size=8)
    return SiglipVisionModel(config).eval()


def test_failed_compilation_falls_back_to_eager(eager_backend_compilation, monkeypatch):
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    kernels = eager_backend_compilation

    def failing_backend(graph_module, example_inputs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(kernels, "COMPILE_OPTIONS", {"backend": failing_backend})
    monkeypatch.setattr(kernels, "COMPILE_REGIONS", True)
    norm, hidden = Qwen2RMSNorm(8), torch.randn(2, 5, 8)
    with torch.no_grad():
        with pytest.warns(UserWarning, match="(?s)Qwen2RMSNorm.forward failed.*eagerly"):
            out = kernels._compiled_or_eager(Qwen2RMSNorm.forward, norm, hidden)
        torch.testing.assert_close(out, norm(hidden))
    assert kernels.COMPILE_REGIONS is False


def test_gelu_epilogue_is_installed_and_leaves_the_cpu_and_training_to_the_mlp(monkeypatch):
    """STORM's SigLIP MLPs take the GELU epilogue path only for CUDA inference: on the CPU (where `_addmm_activation`
    computes the exact GELU, not SigLIP's tanh one) and with autograd they run their own forward."""
    torch.manual_seed(0)
    model = StormForConditionalGeneration(tiny_config()).eval()
    mlp = model.model.vision_tower.encoder.layers[0].mlp
    assert isinstance(mlp.forward, functools.partial)
    hidden = torch.randn(3, 16, 32)
    expected = type(mlp).forward(mlp, hidden)
    monkeypatch.setattr(torch, "_addmm_activation", lambda *args, **kwargs: pytest.fail("fused on the CPU"))
    with torch.no_grad():
        torch.testing.assert_close(mlp(hidden), expected, rtol=0, atol=0)
    torch.testing.assert_close(mlp(hidden), expected, rtol=0, atol=0)


def test_triton_layer_norm_is_installed_and_leaves_the_cpu_and_training_to_layer_norm(monkeypatch):
    """Every LayerNorm of STORM's vision tower takes the Triton path only for CUDA inference; on the CPU and with
    autograd it is `nn.LayerNorm.forward` itself."""
    torch.manual_seed(0)
    model = StormForConditionalGeneration(tiny_config()).eval()
    norms = [module for module in model.model.vision_tower.modules() if type(module) is torch.nn.LayerNorm]
    assert norms and all(isinstance(norm.forward, functools.partial) for norm in norms)
    norm, hidden = norms[0], torch.randn(3, 16, 32)
    expected = torch.nn.LayerNorm.forward(norm, hidden)
    monkeypatch.setattr(kernels, "triton_layer_norm", lambda: pytest.fail("Triton LayerNorm on the CPU"))
    with torch.no_grad():
        torch.testing.assert_close(norm(hidden), expected, rtol=0, atol=0)
    torch.testing.assert_close(norm(hidden), expected, rtol=0, atol=0)


def test_rope_function_is_put_back_when_the_attention_fails():
    from transformers.models.qwen2 import modeling_qwen2

    model = StormForConditionalGeneration(tiny_config()).eval()
    attention = model.model.language_model.layers[0].self_attn
    rotary = modeling_qwen2.apply_rotary_pos_emb

    def failing_forward(module, hidden_states, **kwargs):
        assert modeling_qwen2.apply_rotary_pos_emb is not rotary  # the region runner's, for this call
        raise RuntimeError("attention failed")

    with pytest.raises(RuntimeError, match="attention failed"):
        hidden = torch.randn(1, 5, 32)
        kernels._prefill_attention(failing_forward, modeling_qwen2, rotary, attention, hidden_states=hidden)
    assert modeling_qwen2.apply_rotary_pos_emb is rotary


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_layer_norm_equals_layer_norm_in_a_vision_tower_on_cuda(dtype):
    tower = _tiny_siglip().to("cuda", dtype)
    pixels = torch.randn(3, 3, 32, 32, device="cuda", dtype=dtype)
    with torch.no_grad():
        expected = tower(pixel_values=pixels).last_hidden_state
        kernels.use_triton_layer_norm(tower)
        out = tower(pixel_values=pixels).last_hidden_state
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_static_cache_generation_with_compiled_prefill_regions_on_cuda():
    """transformers compiles the decode step of a static-cache `generate` whole: the compiled prefill regions and the
    GELU epilogue cause no graph break there, and the greedy tokens equal those with every region eager."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = StormForConditionalGeneration(tiny_config()).to("cuda", torch.bfloat16).eval()
    frames = 8
    ids = torch.tensor([[5, 6, 7] + [VIDEO_TOKEN_ID] * model.config.num_video_tokens(frames) + [8, 9]], device="cuda")
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "pixel_values_videos": torch.randn(1, frames, 3, 32, 32, device="cuda", dtype=torch.bfloat16)}

    def greedy(**kwargs):
        with torch.inference_mode():
            return model.generate(**inputs, max_new_tokens=12, min_new_tokens=12, do_sample=False, **kwargs)

    counters.clear()
    static = greedy(cache_implementation="static")
    assert not counters["graph_break"]
    kernels.COMPILE_REGIONS = False
    try:
        torch.testing.assert_close(greedy(), static, rtol=0, atol=0)
    finally:
        kernels.COMPILE_REGIONS = True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_epilogue_equals_siglips_tanh_gelu_mlp_on_cuda(dtype):
    tower = _tiny_siglip().to("cuda", dtype)
    kernels.use_gelu_epilogue(tower)
    mlp = tower.encoder.layers[0].mlp
    hidden = torch.randn(3, 16, 32, device="cuda", dtype=dtype)
    with torch.no_grad():
        fused, expected = mlp(hidden), type(mlp).forward(mlp, hidden)
        exact_gelu = mlp.fc2(F.gelu(mlp.fc1(hidden)))
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(fused, expected, rtol=tolerance, atol=tolerance)
    if dtype == torch.float32:  # the tanh approximation, not the exact GELU
        assert (fused - exact_gelu).abs().max() > 10 * (fused - expected).abs().max()


def test_llm_norms_mlps_and_rope_run_compiled_at_prefill_only(eager_backend_compilation, monkeypatch):
    """As on a GPU (regions usable whatever the device): a prompt runs the LLM's 2·L RMSNorms, L MLPs and L RoPEs
    through three compiled graphs (one per module class, one for RoPE) and gives the eager result; transformers' RoPE
    function is back in its module afterwards; decode steps (one token) run eagerly."""
    from torch._dynamo.utils import counters
    from transformers.models.qwen2 import modeling_qwen2

    kernels = eager_backend_compilation
    rotary = modeling_qwen2.apply_rotary_pos_emb
    torch.manual_seed(0)
    model = StormForConditionalGeneration(tiny_config()).eval()
    text = model.model.language_model
    layer = text.layers[0]
    assert isinstance(layer.mlp.forward, functools.partial)  # installed by StormModel.__init__
    inputs = {"input_ids": torch.randint(0, 50, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    with torch.no_grad():
        expected = model(**inputs).logits
        seen = []
        compiled = functools.partial(functools.partial, kernels._compiled_or_eager)  # compiled(region): as on a GPU
        runner = lambda region, hidden: seen.append(hidden.shape) or compiled(region)  # noqa: E731
        monkeypatch.setattr(kernels, "region_runner", runner)
        counters.clear()
        out = model(**inputs, use_cache=True)
        heads = model.config.text_config.num_attention_heads
        assert sorted(seen) == sorted([(2, 7, 32)] * 3 * len(text.layers) + [(2, heads, 7, 8)] * len(text.layers))
        assert counters["stats"]["unique_graphs"] == 3  # RMSNorm, MLP and RoPE, each shared by every layer
        assert modeling_qwen2.apply_rotary_pos_emb is rotary
        seen.clear()
        step = model(input_ids=torch.randint(0, 50, (2, 1)), past_key_values=out.past_key_values,
                     attention_mask=torch.ones(2, 8, dtype=torch.long))
        assert seen == []  # a decode step: eager
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)
    assert step.logits.shape == (2, 1, model.config.text_config.vocab_size)


@pytest.mark.skipif(
    not kernels.has_fp8_matmul(torch.device("cpu")),
    reason="this torch has no row-scaled torch._scaled_mm on the CPU (2.6, 2.11)",
)
def test_fp8_linears_are_close_to_the_bf16_ones():
    from storm_transformers.kernels import Fp8Linear, quantize_linears_fp8

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.GELU(), torch.nn.Linear(32, 16, bias=False))
    module = module.to(torch.bfloat16)
    x = torch.randn(5, 7, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = module(x)
        assert quantize_linears_fp8(module) == 2
        out = module(x)
    first = module[0]
    assert isinstance(first, Fp8Linear) and first.weight.dtype == torch.float8_e4m3fn
    assert out.shape == expected.shape and out.dtype == torch.bfloat16
    assert 0 < _relative_error(out, expected) < 0.1  # e4m3 keeps 3 mantissa bits (≤ 6% per element)
    # Exactly the product of the dequantized operands: weights per output channel, activations per row.
    rows = x.reshape(-1, 64).float()
    scale = rows.abs().amax(dim=1, keepdim=True) / 448
    dequantized = (rows / scale).to(torch.float8_e4m3fn).float() * scale
    weight = first.weight.float() * first.weight_scale.t()
    with torch.no_grad():
        reference = dequantized @ weight.t() + first.bias.float()
        torch.testing.assert_close(first(x).reshape(-1, 32).float(), reference, rtol=1e-2, atol=1e-2)


def test_fp8_refuses_a_device_without_an_fp8_matmul(monkeypatch):
    monkeypatch.setattr(kernels, "has_fp8_matmul", lambda device: False)
    module = torch.nn.Sequential(torch.nn.Linear(64, 32))
    with pytest.raises(ValueError, match=r"no FP8 matrix product \(torch._scaled_mm\) on cpu"):
        kernels.quantize_linears_fp8(module)
    assert isinstance(module[0], torch.nn.Linear)


def test_fp8_refuses_sizes_that_are_not_multiples_of_16():
    from storm_transformers.kernels import quantize_linears_fp8

    with pytest.raises(ValueError, match="multiples of 16"):
        quantize_linears_fp8(torch.nn.Sequential(torch.nn.Linear(24, 16)))
