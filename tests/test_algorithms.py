"""The RL stage's algorithms x their settings, as a TRL or veRL user sets them: what each run
logs and computes against float64 computations written out here from the rollout it trained
on, and the settings a run would ignore refused in one line.

Tiny runs on the CPU (the 2-layer, 32-wide Llama of tests/test_grpo.py), one iteration each.
"""

from __future__ import annotations

import pytest
import torch

from rlhf import rl
from tests._tiny_models import rl_tokenizer
from tests.test_grpo import PROMPTS, randomised_policy, rl_config
from tests.test_stages import read_jsonl

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    # the loop is under test, not the kernels (see tests/test_stages.py)
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "reference")


@pytest.fixture(scope="module")
def tokenizer():
    return rl_tokenizer()


def _one_iteration(tmp_path, tokenizer, monkeypatch, algorithm, **overrides):
    """One iteration of ``algorithm`` on a policy that differs from the reference -> (its
    metrics record, the rollout it trained on)."""
    captured = []
    make_rollout = rl.make_rollout

    def capture(*args, **kwargs):
        captured.append(make_rollout(*args, **kwargs))
        return captured[-1]

    monkeypatch.setattr(rl, "make_rollout", capture)
    cfg = rl_config(tmp_path, algorithm, num_iterations=1, **overrides)
    rl.train(cfg, backbone=randomised_policy(tokenizer), tokenizer=tokenizer, prompts=PROMPTS)
    monkeypatch.setattr(rl, "make_rollout", make_rollout)
    (record,) = read_jsonl(tmp_path / algorithm / "metrics.jsonl")
    return record, captured[0]


@pytest.mark.parametrize("algorithm", ["dapo", "dr_grpo"])
def test_loss_parts_under_a_step_normaliser_do_not_depend_on_accumulation(tmp_path, tokenizer,
                                                                          monkeypatch, algorithm):
    """With a step normaliser (DAPO's step tokens, Dr. GRPO's rows x max_new_tokens) each
    micro-batch's loss is a part of the step's; policy/loss was scaled back to the step's
    value but its parts policy/pg_loss and policy/kl were not: with grad_accum_steps=2 they
    logged half the step's values. One step of all 8 rows on the policy that sampled them
    (ratio 1): pg_loss = -sum(A x tokens) / normaliser and kl = sum(k3) / normaliser."""
    record, rollout = _one_iteration(tmp_path, tokenizer, monkeypatch, algorithm,
                                     minibatch_size=4, grad_accum_steps=2)
    m = rollout.action_mask.double()
    normaliser = float(m.sum()) if algorithm == "dapo" else 8 * 8  # rows x max_new_tokens
    d = (rollout.ref_logprobs.double() - rollout.old_logprobs.double()) * m
    kl = float(((d.exp() - d - 1) * m).sum()) / normaliser
    pg_loss = -float((rollout.advantages.double() * m.sum(-1)).sum()) / normaliser
    assert kl > 1e-3  # the policy differs from the reference
    assert record["policy/kl"] == pytest.approx(kl, rel=1e-4)
    assert record["policy/pg_loss"] == pytest.approx(pg_loss, rel=1e-3, abs=1e-6)
    assert record["policy/loss"] == pytest.approx(
        record["policy/pg_loss"] + record["kl_coef"] * record["policy/kl"], rel=1e-5, abs=1e-7)
