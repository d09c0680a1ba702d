"""rlhf/attention.py: decode attention over a grouped-query KV cache without copying it.

References: the same attention in float64 with the cache expanded per query head (what
transformers' repeat_kv does), and transformers' own sdpa for the calls handed to it."""

import pytest
import torch

from rlhf import attention
from rlhf.engine import RolloutEngine
from rlhf.models import LoraSpec, SharedBackbone
from rlhf.tiny_models import tiny_causal_lm


class _Module(torch.nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def _float64(query, key, value, mask, scale):
    groups = query.shape[1] // key.shape[1]
    k = key.double().repeat_interleave(groups, dim=1)
    v = value.double().repeat_interleave(groups, dim=1)
    scores = query.double() @ k.transpose(-1, -2) * scale + mask.double()
    return (scores.softmax(-1) @ v).transpose(1, 2)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (14, 2), (8, 1)])
def test_one_query_token_packs_the_heads_exactly(heads, kv_heads):
    torch.manual_seed(0)
    batch, length, dim = 3, 11, 16
    query = torch.randn(batch, heads, 1, dim)
    key = torch.randn(batch, kv_heads, length, dim)
    value = torch.randn(batch, kv_heads, length, dim)
    mask = torch.zeros(batch, 1, 1, length)
    mask[0, ..., :4] = float("-inf")  # left padding of row 0
    mask[2, ..., -2:] = float("-inf")  # cache slots not written yet
    module = _Module(heads // kv_heads)
    out, weights = attention.decode_sdpa(module, query, key, value, mask, scaling=dim ** -0.5)
    assert weights is None and out.shape == (batch, 1, heads, dim) and out.is_contiguous()
    want = _float64(query, key, value, mask, dim ** -0.5)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=2e-6)
    stock, _ = attention._stock_sdpa()(module, query, key, value, mask, scaling=dim ** -0.5)
    torch.testing.assert_close(out, stock, rtol=0, atol=2e-6)


def test_other_calls_go_to_transformers_sdpa(monkeypatch):
    """Several query tokens, a per-head mask, dropout, or no grouping: transformers' sdpa, with
    the same arguments."""
    calls = []
    monkeypatch.setattr(attention, "_stock_sdpa",
                        lambda: lambda *a, **k: calls.append((a, k)) or ("stock", None))
    q1, q3 = torch.randn(2, 4, 1, 8), torch.randn(2, 4, 3, 8)
    kv = torch.randn(2, 2, 5, 8)
    for module, query, mask, extra in [
        (_Module(2), q3, torch.zeros(2, 1, 3, 5), {}),
        (_Module(2), q1, torch.zeros(2, 4, 1, 5), {}),
        (_Module(2), q1, torch.zeros(2, 1, 1, 5), {"dropout": 0.1}),
        (_Module(1), q1, torch.zeros(2, 1, 1, 5), {}),
        (_Module(2), q1, torch.zeros(2, 1, 1, 5), {"softcap": 30.0}),
    ]:
        assert attention.decode_sdpa(module, query, kv, kv, mask, **extra)[0] == "stock"
    assert len(calls) == 5 and calls[2][1]["dropout"] == 0.1 and calls[4][1]["softcap"] == 30.0


def test_engine_decodes_through_it_and_restores_the_setting(monkeypatch):
    """generate() selects the packed decode attention on a grouped-query model and puts sdpa
    back afterwards; the decode steps' queries reach SDPA packed (B, kv heads, groups, d), and
    the recorded log-probs still equal a teacher-forced forward (which runs sdpa)."""
    backbone = SharedBackbone.from_model(tiny_causal_lm("qwen2", 96, seed=0),
                                         lora=LoraSpec(rank=4))
    config = backbone.causal_lm.config
    config._attn_implementation = "sdpa"
    shapes = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(query, *args, **kwargs):
        shapes.append((tuple(query.shape), config._attn_implementation))
        return real(query, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    ids = torch.randint(3, 96, (3, 5))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    engine = RolloutEngine(backbone, decode_graph="none")
    gen = engine.generate(ids, mask, 4, eos_token_id=None, pad_token_id=0, seed=1)
    assert config._attn_implementation == "sdpa"
    # 4 query heads on 2 kv heads, head dim 8: packed, by this module's attention
    assert ((3, 2, 2, 8), attention.NAME) in shapes, shapes
    with torch.no_grad():
        teacher = backbone.token_logprobs(gen.sequences, gen.attention_mask, "policy",
                                          start=gen.prompt_length - 1)
    torch.testing.assert_close(gen.logprobs, teacher * gen.response_mask, rtol=0, atol=1e-5)
