"""The README's snippets do what it says: the kernel quickstart runs on the CPU and gives finite
numbers; the trained policy merges into a plain transformers model with the policy's log-probs."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


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
    from tests.helpers import review_tokenizer, tiny_llama

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


def _algorithm_rows() -> dict[str, list[str]]:
    """The README's `algorithm=` table: name -> its cells."""
    text = README.read_text()
    table = text[text.index("| `algorithm=` |"):].split("\n\n")[0].splitlines()[2:]
    rows = {}
    for line in table:
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        rows[re.match(r"`(\w+)`", cells[0]).group(1)] = cells
    return rows


def test_the_algorithm_table_says_what_the_presets_set():
    """Each row of "RL algorithms" against rlhf.rl.PRESETS: the advantage estimator, the ratio
    level, the loss, the reduction, both clip bounds and where the KL goes (clip_ratio_high None
    is the low bound again); and every preset has its row."""
    from rlhf.rl import PRESETS

    rows = _algorithm_rows()
    assert set(rows) == set(PRESETS), (sorted(rows), sorted(PRESETS))
    losses = {"ppo": "clipped PPO", "cispo": "CISPO", "sapo": "SAPO"}
    reductions = {("token-mean", "batch"): "token-mean",
                  ("seq-mean-token-mean", "batch"): "seq-mean-token-mean",
                  ("seq-mean-token-sum-norm", "max_length"): "sum / (rows × `max_new_tokens`)",
                  ("token-mean", "step_tokens"): "tokens of the optimizer step"}
    wrong = []
    for name, preset in PRESETS.items():
        _, advantage, ratio, loss, reduction, clip, kl = rows[name]
        estimator = re.match(r"`(\w+)`", advantage).group(1)
        high = preset["clip_ratio_high"] or preset["clip_ratio"]
        checks = {
            "advantage_estimator": estimator == preset["advantage_estimator"],
            "ratio_level": ratio.startswith(preset["ratio_level"]),
            "loss_type": loss.startswith(losses[preset["loss_type"]]),
            "loss_reduction": reduction == reductions[preset["loss_reduction"],
                                                      preset["loss_normalizer"]],
            "clip": preset["loss_type"] == "sapo" or clip == f"{preset['clip_ratio']}, {high}",
            "kl": kl == ("none (`kl_coef=0`)" if preset["kl_coef"] == 0 else
                         f"{preset['kl_estimator']} in the "
                         f"{'loss' if preset['kl_in_loss'] else 'reward'}"),
        }
        wrong += [f"{name}: {what}" for what, ok in checks.items() if not ok]
    assert not wrong, f"the README's algorithm table differs from rlhf.rl.PRESETS: {wrong}"


def _defaults() -> dict[str, object]:
    """The stages' defaults the README states, as the code has them."""
    import dataclasses

    from rlhf import pipeline, sft, task
    from rlhf.reward import RewardConfig
    from rlhf.rl import PRESETS, RLConfig

    s, r, rl, p = sft.SFTConfig(), RewardConfig(), RLConfig(), pipeline.PipelineConfig()
    return {
        "`epochs=1`": s.epochs, "`max_length=1024`": (s.max_length, r.max_length),
        "8 examples x 4 accumulation": (s.batch_size, s.grad_accum_steps, r.batch_size,
                                        r.grad_accum_steps),
        "full weights at lr 2e-5, or LoRA (`lora_rank=16`) at lr 2e-4": (
            s.lora_rank, s.resolved(1).lr, dataclasses.replace(s, lora_rank=16).resolved(1).lr),
        "one epoch at lr 1e-4": (r.epochs, r.lr),
        "`max_prompt_length=512`": rl.max_prompt_length, "128 new tokens": rl.max_new_tokens,
        "LoRA policy at lr 2e-5": rl.lr,
        "SFT at lr 3e-3, 64 tokens, 400 steps": (task.SFT_SETTINGS["lr"],
                                                 task.SFT_SETTINGS["max_length"],
                                                 task.SFT_SETTINGS["max_steps"]),
        "`keep_last=2`": {s.keep_last, r.keep_last, rl.keep_last},
        "`cpu_threads=1`": {s.cpu_threads, r.cpu_threads, rl.cpu_threads, p.cpu_threads},
        "`heldout_pair_fraction=0.2`": p.heldout_pair_fraction,
        "`dynamic_sampling_rounds=4`": rl.dynamic_sampling_rounds,
        "`overlong_penalty` (1.0)": rl.overlong_penalty,
        "`sapo_tau_pos` (1.0)": rl.sapo_tau_pos, "`sapo_tau_neg` (1.05)": rl.sapo_tau_neg,
        "The critic-free presets use `group_size=8`": {
            preset["group_size"] for name, preset in PRESETS.items() if name != "ppo"},
        "`kl_coef=0.3` instead of PPO's 0.1": (pipeline.CRITIC_FREE_TASK_SETTINGS["kl_coef"],
                                               rl.settings.kl_coef),
        "`advantage_norm=auto|group|batch|none`": rl.advantage_norm,
        "`packing=auto`": {s.packing, r.packing, rl.packing},
    }


# what the README says each default is (the phrase quoted from it, then the value(s) it states)
_STATED = {
    "`epochs=1`": 1, "`max_length=1024`": (1024, 1024), "8 examples x 4 accumulation": (8, 4, 8, 4),
    "full weights at lr 2e-5, or LoRA (`lora_rank=16`) at lr 2e-4": (0, 2e-5, 2e-4),
    "one epoch at lr 1e-4": (1, 1e-4), "`max_prompt_length=512`": 512, "128 new tokens": 128,
    "LoRA policy at lr 2e-5": 2e-5, "SFT at lr 3e-3, 64 tokens, 400 steps": (3e-3, 64, 400),
    "`keep_last=2`": {2}, "`cpu_threads=1`": {1}, "`heldout_pair_fraction=0.2`": 0.2,
    "`dynamic_sampling_rounds=4`": 4, "`overlong_penalty` (1.0)": 1.0,
    "`sapo_tau_pos` (1.0)": 1.0, "`sapo_tau_neg` (1.05)": 1.05,
    "The critic-free presets use `group_size=8`": {8},
    "`kl_coef=0.3` instead of PPO's 0.1": (0.3, 0.1),
    "`advantage_norm=auto|group|batch|none`": "auto",  # "`auto` (the default ...)"
    "`packing=auto`": {"auto"},
}


def test_the_defaults_the_readme_states_are_the_codes():
    """"Defaults.", "RL algorithms" and "Packed sequences": each default the README states (its
    words are quoted in _STATED) is the stages' dataclass default or the task's preset."""
    text = " ".join(README.read_text().split())
    actual = _defaults()
    assert set(actual) == set(_STATED)
    gone = [phrase for phrase in _STATED if phrase not in text]
    assert not gone, f"the README no longer says (update this test): {gone}"
    wrong = {phrase: (stated, actual[phrase]) for phrase, stated in _STATED.items()
             if actual[phrase] != stated}
    assert not wrong, f"README default -> (stated, code): {wrong}"


def test_the_frontier_table_is_docs_figures_frontier_json():
    """"The over-optimisation frontier": every row of the README's table is a point of
    docs/figures/frontier.json to the digits shown, and every point has its row."""
    import json

    data = json.loads((README.parent / "docs" / "figures" / "frontier.json").read_text())
    text = README.read_text()
    table = text[text.index("| algorithm | kl_coef |"):].split("\n\n")[0].splitlines()[2:]
    shown = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in table]
    want = [[p["algorithm"], f"{p['kl_coef']:g}", f"{p['kl_mean']:.2f} ± {p['kl_stderr']:.2f}",
             f"{p['gold_mean']:+.3f} ± {p['gold_stderr']:.3f}", f"{p['gold_gain_in_stderr']:+.1f}",
             f"{p['proxy_mean']:+.2f}", f"{p['rl_seconds']:.0f}", f"{p['peak_memory_mb']:.0f}"]
            for p in data["points"]]
    assert shown == want
    sft = f"SFT model: gold {data['sft_gold_mean']:+.3f} ± {data['sft_gold_stderr']:.3f}"
    assert sft in text


def test_the_ops_table_names_every_public_op_and_real_arguments():
    """"The ops": a row per public op of rlhf_kernels (its signature as the first cell), every
    argument a row names is a parameter of that op, and "Reductions" lists every reduction the
    ops take."""
    import inspect

    import rlhf_kernels
    from rlhf_kernels._checks import REDUCTIONS

    text = README.read_text()
    section = text[text.index("## The ops"):text.index("**Drop-in for TRL")]
    named, wrong = set(), []
    for line in section.splitlines():
        for op, args in re.findall(r"`(\w+)\(([^`]*)\)`", line.split(" | ")[0]):
            named.add(op)
            parameters = inspect.signature(getattr(rlhf_kernels, op)).parameters
            for arg in re.findall(r"\w+", args):
                if arg not in parameters:
                    wrong.append(f"{op}({arg})")
    ops = {name for name in rlhf_kernels.__all__ if name != "resolve_backend"}
    assert named == ops, (sorted(ops - named), sorted(named - ops))
    assert not wrong, f"arguments the ops do not take: {wrong}"
    listed = re.search(r"Reductions \(veRL names\): (.*?)\.", " ".join(section.split())).group(1)
    assert set(re.findall(r"`([\w-]+)`", listed)) == set(REDUCTIONS)


def test_the_config_files_hold_the_defaults():
    """"configs/ has one per stage ... at their defaults": every setting of configs/<stage>.yaml
    exists in that stage's config and has its default value (a changed default leaves no stale
    file behind), and each file loads through the CLI's own reader."""
    import dataclasses

    import yaml

    from rlhf.config import load_config
    from rlhf.pipeline import PipelineConfig
    from rlhf.reward import RewardConfig
    from rlhf.rl import GRPOConfig, PPOConfig
    from rlhf.sft import SFTConfig

    def flat(tree, prefix=""):
        out = {}
        for key, value in tree.items():
            if isinstance(value, dict) or dataclasses.is_dataclass(value):
                items = value if isinstance(value, dict) else {
                    f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
                out.update(flat(items, f"{prefix}{key}."))
            else:
                out[prefix + key] = value
        return out

    configs = README.parent / "configs"
    stages = {"sft": SFTConfig, "rm": RewardConfig, "ppo": PPOConfig, "grpo": GRPOConfig,
              "pipeline": PipelineConfig}
    assert {path.stem for path in configs.glob("*.yaml")} == set(stages)
    wrong = []
    for stage, cls in stages.items():
        path = configs / f"{stage}.yaml"
        defaults = flat({f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls)})
        for key, value in flat(yaml.safe_load(path.read_text())).items():
            if defaults.get(key, "no such setting") != value:
                wrong.append(f"{path.name}: {key}: {value!r} (default "
                             f"{defaults.get(key, 'no such setting')!r})")
        load_config(cls, path)
    assert not wrong, wrong


def _h200(name: str) -> list[dict]:
    import json

    path = README.parent / "benchmarks" / "results" / f"{name}-NVIDIA_H200-2026-11-30.json"
    return json.loads(path.read_text())["rows"]


def _one(rows: list[dict], case: str, impl: str, op: str | None = None) -> dict:
    found = [row for row in rows if row["case"] == case and row["impl"] == impl
             and op in (None, row["op"])]
    assert len(found) == 1, (case, impl, len(found))
    return found[0]


def test_the_gpu_figures_in_the_benchmarks_prose_are_the_result_files():
    """README "Benchmarks", "What they show": each GPU figure of the prose, formatted as the prose
    shows it, from the H200 result files (the block below it is rendered from the same files and
    checked elsewhere; this holds the hand-written sentences to them)."""
    text = " ".join(README.read_text().split())
    tests = _h200("cuda_tests")
    logprobs, linear = _h200("logprobs"), _h200("linear_logprobs_large")
    big = "8x1024x151936 bfloat16"
    fwd2 = _one(logprobs, f"{big} fwd", "ours pipelined stages=2")
    bwd2 = _one(logprobs, f"{big} fwd+bwd", "ours pipelined stages=2")
    fwd1, bwd1 = _one(logprobs, f"{big} fwd", "ours"), _one(logprobs, f"{big} fwd+bwd", "ours")
    compiled = [_one(logprobs, f"{big} {p}", "torch.compile")["ms"] for p in ("fwd", "fwd+bwd")]
    lin = "V=151936 H=4096 N=16384 bfloat16"
    ppo_fused = _one(linear, f"{lin} fwd+bwd", "linear_ppo_loss")
    ppo_unfused = _one(linear, f"{lin} fwd+bwd", "ppo-unfused")
    lin_fwd = _one(linear, f"{lin} fwd", "linear_logprobs")
    trl_fwd = _one(linear, f"{lin} fwd", "trl-chunked")
    lin_bwd = _one(linear, f"{lin} fwd+bwd", "linear_logprobs")
    grpo = _h200("grpo_loss")
    grpo_case = "B=16 T=512 H=896 V=151936 bfloat16 fwd+bwd"
    grpo_ours, grpo_eager = _one(grpo, grpo_case, "ours"), _one(grpo, grpo_case, "eager")
    loss = _one(_h200("ppo_loss"), "64x1024 fp32 fwd+bwd", "ours", op="ppo_policy_loss")
    gae = _one(_h200("gae"), "512x2048 fp32", "ours", op="gae")
    ours15, peer15 = _h200("e2e_ppo_qwen2.5-1.5b")
    (ours8,) = _h200("e2e_ppo_llama-3-8b")
    (ours05,) = _h200("e2e_ppo_qwen2.5-0.5b")
    busy = ours05["device_busy"]
    decode_floor_ms = 1e3 * ours05["floor"]["generation_s"] / ours05["config"]["response_length"]
    gib = 2 ** 30 / 2 ** 20  # MiB per GiB
    phrases = [
        f"All {sum(row['passed'] for row in tests)} CUDA tests pass",
        f"{fwd2['ms']:.2f} ms forward ({fwd2['pct_of_floor']:.0f}% of the bandwidth floor)",
        f"{bwd2['ms']:.2f} ms forward+backward ({bwd2['pct_of_floor']:.0f}%)",
        f"({fwd1['ms']:.3f} and {bwd1['ms']:.2f} ms without)",
        f"{compiled[0] / fwd2['ms']:.1f}× and {compiled[1] / bwd2['ms']:.1f}× faster than",
        f"forward+backward is {ppo_fused['vs_unfused']:.2f}× the unfused eager loss with "
        f"{ppo_fused['peak_extra_mib'] / gib:.1f} instead of "
        f"{ppo_unfused['peak_extra_mib'] / gib:.1f} GiB of extra memory",
        f"forward is {lin_fwd['vs_unfused']:.2f}× unfused and {trl_fwd['ms'] / lin_fwd['ms']:.2f}× "
        "faster than TRL's own fused lm head",
        f"forward+backward is {lin_bwd['vs_unfused']:.2f}× unfused",
        f"is {grpo_ours['ms']:.0f} ms, {grpo_eager['ms'] / grpo_ours['ms']:.1f}× faster than eager",
        f"takes {loss['ms']:.2f} ms forward+backward",
        f"GAE at 512×2048 takes {gae['ms']:.3f} ms",
        f"{ours15['s_per_batch']:.2f} s ({ours15['response_tok_per_s']:.0f} response tokens/s) and "
        f"{ours15['peak_gib']:.2f} GiB peak",
        f"in the same call: {peer15['s_per_batch']:.1f} s and {peer15['peak_gib']:.1f} GiB, so "
        f"ours is {peer15['speed_ratio']:.1f}× faster with {peer15['memory_ratio']:.0f}× less "
        "memory",
        f"fits a 24 GiB cap at {ours8['peak_gib']:.1f} GiB",
        f"GPU {100 * busy['decode_busy_fraction']:.0f}% busy: a step takes "
        f"{busy['decode_step_gpu_ms']:.1f} ms of GPU time against a {decode_floor_ms:.2f} ms",
        f"keep it only {100 * busy['busy_fraction']['scoring']:.0f}% and "
        f"{100 * busy['busy_fraction']['update']:.0f}% busy",
    ]
    assert all(row["failed"] == 0 and row["errors"] == 0 for row in tests)
    assert peer15["peer"]["gc_active"] == {"policy": False, "value": False}  # the caveat stated
    missing = [phrase for phrase in phrases if phrase not in text]
    assert not missing, f"the README's GPU prose differs from the result files: {missing}"


def test_memory_md_measured_table_is_the_h200_file_against_todays_plan():
    """docs/memory.md "Measured": the measured column is the H200 Qwen2.5-1.5B row's stage peaks,
    the planned column what rlhf.plan computes today for that run (so a planner change that
    leaves the page's plan stale fails here), and their ratio."""
    from rlhf.plan import plan

    page = README.parent / "docs" / "memory.md"
    text = page.read_text()
    table = text[text.index("| stage | measured GiB |"):].split("\n\n")[0].splitlines()[2:]
    (ours, _) = _h200("e2e_ppo_qwen2.5-1.5b")
    config = ours["config"]
    planned = plan(config["shape"], batch=config["batch"], prompt_length=config["prompt_length"],
                   response_length=config["response_length"], lora_rank=config["lora_rank"])
    for line in table:
        stage, measured, planned_gib, ratio = (c.strip() for c in line.strip("| ").split("|"))
        want_plan = planned["stages"][stage]["total"] / 2 ** 30
        got = ours["stage_peak_gib"][stage]
        assert (measured, planned_gib, ratio) == (
            f"{got:.2f}", f"{want_plan:.2f}", f"{got / want_plan:.2f}"), stage


def test_quantization_md_opening_plans_are_todays():
    """docs/quantization.md opens with the Llama-3-8B run planned nf4 against bf16 (batch 16,
    minibatch and scoring chunk 4): both figures are what rlhf.plan computes today."""
    from rlhf.plan import plan

    text = " ".join((README.parent / "docs" / "quantization.md").read_text().split())
    peaks = [plan("llama-3-8b", batch=16, minibatch=4, forward_chunk=4,
                  quantization=q)["peak_bytes"] / 2 ** 30 for q in ("nf4", "none")]
    assert f"plans at {peaks[0]:.1f} GiB instead of {peaks[1]:.1f} GiB" in text, peaks


def test_the_planner_figures_in_the_prose_are_todays():
    """The Qwen2.5-1.5B plans the README and docs/memory.md quote (batch 16: PPO, critic-free,
    without autocast) are what rlhf.plan computes today."""
    from rlhf.plan import plan

    def gib(**kwargs):
        return f"{plan('qwen2.5-1.5b', batch=16, **kwargs)['peak_bytes'] / 2 ** 30:.2f}"

    ppo, grpo, fp32 = gib(), gib(critic=False), gib(autocast=False)
    readme = " ".join(README.read_text().split())
    memory = " ".join((README.parent / "docs" / "memory.md").read_text().split())
    for phrase in (f"{grpo} instead of {ppo} GiB", f"plans {ppo} GiB for PPO and "
                   f"`--critic-free` {grpo} GiB", f"{grpo} vs {ppo} GiB"):
        assert phrase in readme, phrase
    assert f"plans {fp32} GiB" in memory


def test_the_trl_names_table_is_the_configs_hint_table():
    """README's "Coming from TRL" table: each of TRL's (veRL's) names is a key the config
    refuses with a pointer to the setting the table gives (rlhf.config._FRAMEWORK_NAMES), so
    the table and the errors agree."""
    from rlhf.config import _FRAMEWORK_NAMES

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text[text.index("**Coming from TRL.**"):text.index("**Defaults.**")]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert len(rows) >= 8
    for row in rows:
        theirs, ours = row.strip("|").split("|")[:2]
        names = [n for n in re.findall(r"`([a-z_]+)`", theirs) if n != "num_iterations"]
        targets = re.findall(r"`([a-z_]+)`", ours)
        for name in names:
            assert name in _FRAMEWORK_NAMES, name
            assert _FRAMEWORK_NAMES[name][0][0] in targets, (name, targets)
