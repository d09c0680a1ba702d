"""The README's snippets do what it says: the kernel quickstart runs on the CPU and gives finite
numbers; the trained policy merges into a plain transformers model with the policy's log-probs."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _kernel_quickstart() -> str:
    text = README.read_text()
    section = text[text.index("## Quickstart: the kernels"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_kernel_quickstart_gives_a_finite_loss_on_the_cpu(monkeypatch):
    """"Replace every device="cuda" by device="cpu"; the snippet then runs unchanged": at the
    README's V and H (what decides whether an unscaled lm_head overflows the k3 KL), with fewer
    rows so that it takes a second. Every loss and statistic must be finite."""
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "reference")  # what CPU tensors run by default
    code = _kernel_quickstart().replace('device="cuda"', 'device="cpu"')
    shapes = "B, T, V, H = 4, 256, 32000, 1024"
    assert shapes in code, "the README's shapes changed: update this test"
    code = code.replace(shapes, "B, T, V, H = 2, 8, 32000, 1024")
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - our own README
    loss, stats = namespace["loss"], namespace["stats"]
    assert math.isfinite(loss.item()), f"loss={loss.item()}"
    for name, value in stats.items():
        assert math.isfinite(float(value)), f"{name}={float(value)}"
    loss.backward()  # the fused op's gradients for the lm_head and the hidden states
    for name in ("hidden", "weight"):
        assert math.isfinite(float(namespace[name].grad.abs().max())), f"{name}.grad"


def _python_block_after(heading: str) -> str:
    text = README.read_text()
    return re.search(r"```python\n(.*?)```", text[text.index(heading):], re.S).group(1)


# PEFT's PeftModel.from_pretrained asks transformers 5.2x a deprecated question (not ours)
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")
def test_the_trained_policy_merges_into_a_plain_transformers_model(tmp_path, monkeypatch):
    """"Using the trained policy": the README's snippet, run as written on a pipeline's layout
    (sft/model, ppo/backbone with a trained policy adapter), gives a plain transformers model
    whose log-probs equal the policy's in SharedBackbone.load (the README says to 2e-6)."""
    import torch

    from rlhf import task
    from rlhf.models import LoraSpec, SharedBackbone
    from tests._tiny_models import review_tokenizer, tiny_llama

    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "reference")
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "pipeline"
    tokenizer = review_tokenizer(task.make_corpus(48, seed=3), vocab_size=260)
    tiny_llama(tokenizer).save_pretrained(run / "sft" / "model")
    tokenizer.save_pretrained(run / "sft" / "model")
    backbone = SharedBackbone.from_pretrained(str(run / "sft" / "model"),
                                              lora=LoraSpec(rank=4, alpha=8))
    with torch.no_grad():  # a trained adapter: LoRA's B starts at zero, which would prove nothing
        generator = torch.Generator().manual_seed(1)
        for name, param in backbone.named_trainable_parameters("policy"):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    backbone.save(run / "ppo" / "backbone")
    tokenizer.save_pretrained(run / "ppo" / "backbone")

    namespace: dict = {}
    code = _python_block_after("**Using the trained policy.**")
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - our own README
    assert (tmp_path / "runs" / "policy" / "config.json").exists()
    merged = namespace["policy"]
    assert not any("lora" in name for name, _ in merged.named_parameters())  # plain again

    trained = SharedBackbone.load(run / "ppo" / "backbone")
    ids = torch.randint(3, len(tokenizer), (3, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = trained.token_logprobs(ids, mask, role="policy")
        reference = trained.token_logprobs(ids, mask, role=None)
        logits = merged(input_ids=ids, attention_mask=mask).logits.float()
    got = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert (want - reference).abs().max() > 1e-2  # the adapter changes the model
    assert (got - want).abs().max() < 2e-5, (got - want).abs().max()
