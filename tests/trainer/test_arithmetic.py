"""task=arithmetic (rlhf/arithmetic.py): the parser and reward in closed form, the held-out
split, the RL loop's reward-function path, and a short CPU smoke of the whole pipeline on a tiny
chat model the test builds. The real SmolLM2-135M run is marked: RLHF_REAL_MODEL=1 runs it."""

from __future__ import annotations

import json
import os

import pytest
import torch

from rlhf import arithmetic
from rlhf import rl as rl_stage
from rlhf.arithmetic import parse_answer, problem_of, rewards


@pytest.mark.parametrize("text, expected", [
    ("59 + 63 = 122.", 122),
    ("59 + 63 = 122", 122),
    ("122", 122),
    (" 122\n", 122),
    ("The answer is 122", 122),
    ("The answer is 122.", 122),
    ("= 122. So the answer is 122.", 122),
    ("59 + 63 = 122. Check: 59 + 63 = 123", 123),  # the last '=' decides
    ("59 + 63 = 2 + 120", 2),  # the first number after the last '='
    ("59+63=122<|im_end|>", 122),
    ("1,234", 1234),
    ("122.0", 122),
    ("122.5", None),
    ("-4", -4),
    ("I do not know", None),
    ("", None),
    ("59 + 63 =", 63),  # nothing after '=': the last number
])
def test_parse_answer(text, expected):
    assert parse_answer(text) == expected


def test_parse_answer_refuses_non_text():
    with pytest.raises(ValueError, match="expects a response string"):
        parse_answer(122)


def test_rewards_exact_match():
    chats = [arithmetic.prompt(59, 63), arithmetic.prompt(10, 10), "What is 12 + 30? Reply"]
    assert rewards(chats, ["59 + 63 = 122.", "20", "42 is it"]) == [1.0, 1.0, 1.0]
    assert rewards(chats, ["59 + 63 = 121.", "2", "12 + 30"]) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="2 prompts for 1 responses"):
        rewards(chats[:2], ["1"])
    with pytest.raises(ValueError, match="not an arithmetic prompt"):
        rewards(["hello"], ["1"])


def test_problem_of_reads_the_chat_and_text():
    assert problem_of(arithmetic.prompt(59, 63)) == (59, 63)
    system = [{"role": "system", "content": "What is 1 + 1?"}, *arithmetic.prompt(20, 31)]
    assert problem_of(system) == (20, 31)  # the user's question, not the system's
    assert arithmetic.question(59, 63) == "What is 59 + 63? Reply with just the number."


def test_split_is_disjoint_and_fixed():
    train, heldout = arithmetic.problems("train"), arithmetic.problems("heldout")
    assert len(heldout) == arithmetic.HELDOUT_SIZE >= 500
    assert len(train) + len(heldout) == 90 * 90
    assert not set(train) & set(heldout)
    assert all(10 <= a <= 99 and 10 <= b <= 99 for a, b in train + heldout)
    assert arithmetic.problems("heldout", 5) == heldout[:5]
    with pytest.raises(ValueError, match="split must be"):
        arithmetic.problems("test")


def test_mean_stderr_closed_form():
    mean, se = arithmetic.mean_stderr([1.0, 0.0, 1.0, 0.0])
    assert mean == 0.5 and se == pytest.approx((1 / 3) ** 0.5 / 2)


# ---------------------------------------------------------------------------------------------
# the RL loop with a reward function, and the pipeline, on a tiny chat model
# ---------------------------------------------------------------------------------------------


def test_reward_fn_gets_each_rows_prompt(tiny_chat_model, tmp_path):
    from rlhf.models import LoraSpec, SharedBackbone, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_chat_model))
    backbone = SharedBackbone.from_pretrained(str(tiny_chat_model), lora=LoraSpec(rank=4),
                                              roles=("policy",))
    chats = arithmetic.prompts("train", 20)
    seen = []

    def reward_fn(row_prompts, texts):
        seen.append((row_prompts, texts))
        return [float(len(t) % 3) for t in texts]  # any deterministic score of the text

    cfg = rl_stage.GRPOConfig(output_dir=str(tmp_path / "grpo"), num_iterations=2,
                              rollout_batch_size=8, group_size=4, minibatch_size=8,
                              ppo_epochs=1, max_prompt_length=40, max_new_tokens=6,
                              save_every=0, warmup_steps=0)
    summary = rl_stage.train(cfg, backbone=backbone, tokenizer=tokenizer, prompts=chats,
                             reward_fn=reward_fn)
    assert len(seen) == 2
    records = [json.loads(line) for line in (tmp_path / "grpo/metrics.jsonl").read_text()
               .splitlines()]
    for (row_prompts, texts), record in zip(seen, records):
        assert len(row_prompts) == len(texts) == 8
        for group in range(2):  # rows g*4 .. g*4+3 are one prompt's samples
            block = row_prompts[group * 4:(group + 1) * 4]
            assert all(p == block[0] for p in block) and block[0] in chats
        scores = [float(len(t) % 3) for t in texts]
        assert record["proxy_reward"] == pytest.approx(sum(scores) / len(scores))
        assert record["rollout_s"] + record["scoring_s"] + record["update_s"] == pytest.approx(
            record["iteration_s"], rel=1e-6)
    assert summary["iterations"] == 2

    def bad_length(row_prompts, texts):
        return [0.0]

    cfg_bad = rl_stage.GRPOConfig(**{**cfg.__dict__, "output_dir": str(tmp_path / "bad")})
    with pytest.raises(ValueError, match="returned 1 scores for 8 responses"):
        rl_stage.train(cfg_bad, backbone=backbone, tokenizer=tokenizer, prompts=chats,
                       reward_fn=bad_length)


def test_shared_prefill_matches_repeated_prompts(tiny_chat_model):
    """A group's prompt is prefilled once (RolloutEngine._prefill): the same tokens and
    log-probs as prefilling every repeated row, the original path."""
    from rlhf.engine import RolloutEngine
    from rlhf.models import LoraSpec, SharedBackbone, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_chat_model))
    backbone = SharedBackbone.from_pretrained(str(tiny_chat_model), lora=LoraSpec(rank=4),
                                              roles=("policy",))
    ids, mask = rl_stage.encode_prompts(arithmetic.prompts("train", 3), tokenizer, 40)
    ids, mask = ids[:, 4:], mask[:, 4:]  # rows of different lengths stay left-padded
    engine = RolloutEngine(backbone)
    forward, rows = engine._forward, []

    def counting_forward(input_ids, *args):
        rows.append(tuple(input_ids.shape))
        return forward(input_ids, *args)

    engine._forward = counting_forward
    kwargs = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    for _ in range(2):  # the second call reuses the engine's cache buffers in place
        rows.clear()
        shared = engine.generate(ids, mask, 7, seed=5, samples_per_prompt=4, **kwargs)
        assert rows[0] == (3, ids.shape[1]) and rows[1] == (12, 1)  # prefill: 3 rows, not 12
        repeated = engine.generate(ids.repeat_interleave(4, 0), mask.repeat_interleave(4, 0), 7,
                                   seed=5, **kwargs)
        assert torch.equal(shared.sequences, repeated.sequences)
        assert torch.equal(shared.response_mask, repeated.response_mask)
        torch.testing.assert_close(shared.logprobs, repeated.logprobs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_pipeline_smoke(tiny_chat_model, tmp_path, algorithm):
    """rlhf pipeline task=arithmetic on the tiny model: no SFT, no reward stage; the files and
    figures of the built-in task."""
    from rlhf.cli import main

    out = tmp_path / "run"
    iterations = 2 if algorithm == "grpo" else 1  # the curve on GRPO; PPO: its critic runs
    code = main(["pipeline", "task=arithmetic", f"model={tiny_chat_model}",
                 f"algorithm={algorithm}", f"output_dir={out}",
                 f"ppo.num_iterations={iterations}", "ppo.rollout_batch_size=8",
                 "ppo.minibatch_size=8", "ppo.grad_accum_steps=1", "ppo.max_new_tokens=6",
                 *(["ppo.group_size=4"] if algorithm == "grpo" else ["ppo.ppo_epochs=1"]),
                 "eval_problems=6", "curve_every=1", "curve_problems=3",
                 "sample_batch_size=6", "n_show_samples=3"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    acc = summary["heldout_accuracy"]
    assert acc["n_problems"] == 6 and 0 <= acc["base_mean"] <= 1 and 0 <= acc["policy_mean"] <= 1
    assert [p["iteration"] for p in summary["heldout_curve"]] == list(range(iterations + 1))
    assert summary["config"]["ppo"]["algorithm"] == algorithm
    assert summary["world_size"] == 1  # one process (no torchrun)
    assert "sft" not in summary["config"] and "reward" not in summary["config"]
    for name in ("curves.png", "samples.md", "metrics.jsonl", "base_eval.json"):
        assert (out / name).exists(), name
    assert not (out / "sft").exists() and not (out / "rm").exists()
    last = summary["ppo_last_iteration"]
    assert ("value/loss" in last) == (algorithm == "ppo")
    assert "What is" in (out / "samples.md").read_text()


def test_pipeline_refuses_what_it_cannot_use(tiny_chat_model, tmp_path, capsys):
    from rlhf.cli import main

    base = ["pipeline", "task=arithmetic", f"output_dir={tmp_path / 'x'}"]
    assert main(base) == 2
    assert "task=arithmetic needs model=" in capsys.readouterr().err
    assert main([*base, f"model={tiny_chat_model}", "sft.max_steps=5"]) == 2
    assert "sft.max_steps has no effect with task=arithmetic" in capsys.readouterr().err
    assert main([*base, f"model={tiny_chat_model}", "pair_prompts=5"]) == 2
    assert "pair_prompts=5 has no effect with task=arithmetic" in capsys.readouterr().err
    assert main(["pipeline", "task=maths"]) == 2
    assert "task='maths' is not a task" in capsys.readouterr().err


@pytest.mark.skipif(os.environ.get("RLHF_REAL_MODEL") != "1",
                    reason="the real SmolLM2-135M-Instruct (a 93 MB package, minutes of CPU): "
                           "set RLHF_REAL_MODEL=1 to run it")
def test_real_model_few_steps(tmp_path):
    from rlhf.cli import main

    out = tmp_path / "real"
    assert main(["pipeline", "task=arithmetic", "model=smollm2-135m-instruct", "algorithm=grpo",
                 f"output_dir={out}", "ppo.num_iterations=2", "eval_problems=16",
                 "curve_every=0", "cpu_threads=2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    # the base model answers some two-digit additions (about a quarter on the held-out set)
    assert summary["heldout_accuracy"]["base_mean"] > 0
    assert summary["ppo_last_iteration"]["kl"] > 0  # the policy moved
