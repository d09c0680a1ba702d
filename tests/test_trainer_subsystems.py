"""Defects found by the trainer-subsystems hunt (resume, data, planner, ...): one test per
defect, each failing on the code before its fix. The references are the uninterrupted run, the
file's own lines, and the configuration the run really uses.
"""

from __future__ import annotations

import pytest
import torch

from rlhf import rl, task
from rlhf.checkpoint import latest_checkpoint, load_state
from tests.test_grpo import PROMPTS, rl_config
from tests.test_stages import read_jsonl, tiny_backbone

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    # the loops are under test, not the kernels (their own tests cover them)
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "reference")


@pytest.fixture(scope="module")
def tokenizer():
    corpus = task.make_corpus(96, seed=1)
    return task.train_tokenizer([ex["prompt"] + ex["completion"] for ex in corpus],
                                vocab_size=300)


# --------------------------------------------------------------------------------------------
# resume: Ctrl-C in the middle of an RL iteration's update
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_ctrl_c_during_an_rl_update_resumes_to_the_uninterrupted_numbers(
        tmp_path, tokenizer, monkeypatch, algorithm):
    """Ctrl-C lands in the update of iteration 2, after its first optimizer step (the update is
    most of an iteration's time). The checkpoint written then labelled weights already stepped
    in iteration 2 as iteration 1, and the resumed run redid iteration 2 on top of its own
    steps: different numbers from iteration 2 on. Now no half-done iteration is saved, and
    resuming from the newest whole-iteration checkpoint gives the uninterrupted run's numbers."""
    settings = dict(num_iterations=3, minibatch_size=2, save_every=1)  # 4 steps an iteration
    torch.set_num_threads(1)
    rl.train(rl_config(tmp_path / "full", algorithm, **settings),
             backbone=tiny_backbone(tokenizer), tokenizer=tokenizer, prompts=PROMPTS)
    want = read_jsonl(tmp_path / "full" / algorithm / "metrics.jsonl")

    cfg = rl_config(tmp_path / "cut", algorithm, **settings)
    backward = rl.backward_losses
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4 + 3:  # iteration 2, third micro-batch: two optimizer steps done
            raise KeyboardInterrupt
        return backward(*args, **kwargs)

    monkeypatch.setattr(rl, "backward_losses", interrupted)
    with pytest.raises(KeyboardInterrupt):
        rl.train(cfg, backbone=tiny_backbone(tokenizer), tokenizer=tokenizer, prompts=PROMPTS)
    monkeypatch.setattr(rl, "backward_losses", backward)
    newest = latest_checkpoint(tmp_path / "cut" / algorithm / "checkpoints")
    assert load_state(newest)["iteration"] == 1
    cfg.resume = True
    rl.train(cfg, backbone=tiny_backbone(tokenizer), tokenizer=tokenizer, prompts=PROMPTS)
    got = read_jsonl(tmp_path / "cut" / algorithm / "metrics.jsonl")
    assert [r["iteration"] for r in got] == [1, 2, 3]
    for a, b in zip(want, got):
        for key in ("proxy_reward", "kl", "kl_coef", "policy/loss", "response_length"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), (key, a, b)
