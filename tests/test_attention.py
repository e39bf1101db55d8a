"""The LLM's decode attention (`kernels.gqa_decode_attention`, `load_storm`'s default): SDPA's result, computed per
key/value head for decode steps, and transformers' SDPA itself for everything else."""

import pytest
import torch
from transformers.integrations import sdpa_attention

from storm_transformers import kernels
from storm_transformers.kernels import GQA_DECODE_ATTENTION, gqa_decode_attention
from storm_transformers.loading import load_storm


class Attention(torch.nn.Module):
    """What transformers' attention functions read from their module (Qwen2Attention's attributes)."""

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, True


def qkv(batch=2, heads=6, kv_heads=2, length=1, kv_length=40, head_dim=16, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, length, head_dim, generator=generator).to(dtype)
    key = torch.randn(batch, kv_heads, kv_length, head_dim, generator=generator).to(dtype)
    value = torch.randn(batch, kv_heads, kv_length, head_dim, generator=generator).to(dtype)
    return query, key, value


@pytest.mark.parametrize("kv_length", [40, 2 * kernels.DECODE_SPLITS])  # split into unequal / equal parts
@pytest.mark.parametrize("length", [1, 3, kernels.DECODE_QUERY_LENGTH])
@pytest.mark.parametrize("mask_kind", ["bool", "float", "none"])
def test_decode_steps_equal_sdpa(length, mask_kind, kv_length):
    query, key, value = qkv(length=length, kv_length=kv_length)
    generator = torch.Generator().manual_seed(1)
    # a static cache's mask: longer than the keys read so far, with unfilled (False) slots and padding
    allowed = torch.rand(2, 1, length, kv_length + 8, generator=generator) > 0.3
    allowed[..., 0] = True
    mask = {"bool": allowed, "float": torch.zeros(allowed.shape).masked_fill(~allowed, -1e9), "none": None}[mask_kind]
    if mask is None and length > 1:
        pytest.skip("no mask and several queries is a causal prompt: SDPA's is_causal (test_everything_else_is_sdpa)")
    module = Attention(groups=3)
    out, weights = gqa_decode_attention(module, query, key, value, mask, scaling=0.3)
    sliced = None if mask is None else mask[..., :kv_length]
    expected, _ = sdpa_attention.sdpa_attention_forward(module, query, key, value, sliced, scaling=0.3)
    assert weights is None and out.shape == (2, length, 6, 16)  # (batch, q, heads, head_dim)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_bf16_decode_step_is_within_rounding_of_sdpa():
    query, key, value = qkv(dtype=torch.bfloat16, kv_length=300)
    mask = torch.ones(2, 1, 1, 300, dtype=torch.bool)
    module = Attention(groups=3)
    out, _ = gqa_decode_attention(module, query, key, value, mask)
    expected, _ = sdpa_attention.sdpa_attention_forward(module, query.float(), key.float(), value.float(), mask)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=0.02, atol=0.02)


def test_a_fully_masked_query_gives_no_nan():
    """A padded query row (left padding in a short batched prompt) attends to nothing: eager attention's float32
    minimum, not -inf, so the row is finite instead of NaN."""
    query, key, value = qkv(length=2)
    mask = torch.ones(2, 1, 2, 40, dtype=torch.bool)
    mask[1, :, 0] = False
    out, _ = gqa_decode_attention(Attention(groups=3), query, key, value, mask)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "case",
    ["prefill (more queries than a decode step)", "no grouping (heads = kv heads)", "causal prompt without a mask",
     "dropout", "attention sinks"],
)
def test_everything_else_is_sdpa(case, monkeypatch):
    calls = []

    def sdpa(module, query, key, value, attention_mask, **kwargs):
        calls.append(kwargs)
        return "sdpa", None

    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", sdpa)
    length = kernels.DECODE_QUERY_LENGTH + 1 if case.startswith("prefill") else 2
    heads = 2 if case.startswith("no grouping") else 6
    query, key, value = qkv(length=length, heads=heads)
    mask = None if case.startswith("causal") else torch.ones(2, 1, length, 40, dtype=torch.bool)
    kwargs = {"dropout": {"dropout": 0.1}, "attention sinks": {"s_aux": torch.zeros(heads)}}.get(case, {})
    assert gqa_decode_attention(Attention(groups=heads // 2), query, key, value, mask, **kwargs)[0] == "sdpa"
    assert len(calls) == 1


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_load_storm_decodes_with_it_and_generates_what_sdpa_generates(tiny_checkpoint, cache_implementation):
    model, _ = load_storm(tiny_checkpoint, dtype="float32")
    reference, _ = load_storm(tiny_checkpoint, dtype="float32", attn_implementation="sdpa")
    assert model.config.text_config._attn_implementation == GQA_DECODE_ATTENTION
    assert model.config.vision_config._attn_implementation == "sdpa"
    assert reference.config.text_config._attn_implementation == "sdpa"
    text = model.config.text_config
    assert text.num_attention_heads > text.num_key_value_heads  # the checkpoint's LLM has grouped-query attention
    ids = torch.randint(1000, 5000, (2, 24), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :5] = 0  # left padding
    calls = []
    original = kernels.gqa_decode_attention

    def counted(module, query, *args, **kwargs):
        calls.append(query.shape[2])
        return original(module, query, *args, **kwargs)

    from transformers import AttentionInterface

    AttentionInterface.register(GQA_DECODE_ATTENTION, counted)
    try:
        options = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                       output_logits=True)
        if cache_implementation:
            options["cache_implementation"] = cache_implementation
        out = model.generate(input_ids=ids, attention_mask=attention_mask, **options)
    finally:
        kernels.register_attention()
    expected = reference.generate(input_ids=ids, attention_mask=attention_mask, **options)
    layers = text.num_hidden_layers  # the prompt's 24 queries, then one query per decode step, in every layer
    assert calls == [24] * layers + [1] * layers * 5
    assert torch.equal(out.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(expected.logits), rtol=1e-4, atol=1e-4)


def test_it_compiles_in_one_graph():
    """transformers compiles the static-cache decode step (`generate`, CUDA graphs): the attention must not break
    the graph (dynamo with its eager backend: what it traces, not the kernels inductor would make)."""
    query, key, value = qkv(kv_length=70)
    mask = torch.rand(2, 1, 1, 80, generator=torch.Generator().manual_seed(2)) > 0.2
    compiled = torch.compile(gqa_decode_attention, fullgraph=True, backend="eager")
    out, _ = compiled(Attention(groups=3), query, key, value, mask, scaling=0.3)
    torch.testing.assert_close(out, gqa_decode_attention(Attention(groups=3), query, key, value, mask, scaling=0.3)[0])
