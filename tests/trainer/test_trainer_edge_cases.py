"""Edge cases a new user of the trainer runs into: settings that would be silently ignored,
values out of range, errors that name the wrong setting or come only after training, and model
directories that do not hold a causal LM. Each test failed on the code before its fix.

Everything here is config-level or stops before training, except the own-data pipeline checks,
which train nothing either (the error comes before SFT). A few seconds in all.
"""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch

from rlhf import cli, ppo, sft
from rlhf.config import load_config
from rlhf.pipeline import PipelineConfig
from tests.helpers import OWN_MODEL_SHAPE, review_tokenizer, tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _cli_error(capsys, argv: list[str]) -> str:
    """The one error line of ``rlhf <argv>`` (exit status 2, no traceback; a progress bar of
    the datasets library may come before it)."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    return err.splitlines()[-1]


# ---------------------------------------------------------------------------------------------
# the error names the setting the user gave
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["ppo", "minibatch_size=0"], "rlhf ppo: error: minibatch_size must be >= 1, got 0"),
    (["ppo", "num_iterations=0"], "rlhf ppo: error: num_iterations must be >= 1, got 0"),
    (["grpo", "num_iterations=-2"], "rlhf grpo: error: num_iterations must be >= 1, got -2"),
    (["sft", "max_steps=0"], "rlhf sft: error: max_steps must be >= 1, got 0"),
])
def test_count_errors_name_the_stage_setting(capsys, argv, message):
    # before: "batch_size must be >= 1" for minibatch_size, "steps" for num_iterations/max_steps
    assert _cli_error(capsys, [*argv, "--print-config"]) == message


# ---------------------------------------------------------------------------------------------
# RL settings that a run would ignore are refused
# ---------------------------------------------------------------------------------------------
def test_advantage_norm_is_refused_with_a_critic_and_used_without(capsys):
    # PPO's advantages are GAE (whitened by whiten_advantages): advantage_norm never reached them
    with pytest.raises(ValueError, match=r"advantage_norm='batch' has no effect with "
                                         r"algorithm='ppo'"):
        ppo.PPOConfig(advantage_norm="batch").check_critic_settings()
    err = _cli_error(capsys, ["ppo", "advantage_norm=group", "--print-config"])
    assert "advantage_norm='group' has no effect" in err
    # a critic-free run uses it, and a PPO run does not record it as used
    ppo.PPOConfig(algorithm="grpo", advantage_norm="batch").check_critic_settings()
    assert "advantage_norm" not in ppo.printable_config(ppo.PPOConfig())
    assert ppo.printable_config(ppo.GRPOConfig(advantage_norm="batch"))["advantage_norm"] == \
        "batch"


def test_kl_horizon_without_an_adaptive_kl_is_said_and_not_recorded():
    with pytest.warns(UserWarning, match=r"kl_horizon=100 has no effect with kl_target=null"):
        ppo.PPOConfig(kl_target=None, kl_horizon=100).check_critic_settings()
    fixed = ppo.PPOConfig(kl_target=None)  # the default horizon is fine, and not recorded
    assert "kl_horizon" not in ppo.printable_config(fixed)
    assert ppo.printable_config(ppo.PPOConfig(kl_horizon=100))["kl_horizon"] == 100


def test_kl_target_with_kl_coef_zero_is_said():
    """The controller multiplies kl_coef: from 0 it never moves, so a kl_target given with
    kl_coef=0 would be silently ignored. The default kl_target with kl_coef=0 ("no KL") and a
    kl_target with kl_coef > 0 say nothing."""
    with pytest.warns(UserWarning, match=r"kl_target=4.0 has no effect with kl_coef=0"):
        ppo.PPOConfig(kl_coef=0.0, kl_target=4.0).check_critic_settings()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ppo.PPOConfig(kl_coef=0.0).check_critic_settings()
        ppo.PPOConfig(kl_coef=0.05, kl_target=4.0).check_critic_settings()


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_kl_settings_are_not_shown_without_a_kl_term(algorithm):
    """kl_coef=0 drops the KL term (in the reward for PPO, in the loss for GRPO), but
    --print-config and summary.json still showed where it went, its estimator and the
    controller's target, as if they applied. They are left out; with kl_coef > 0 they stay."""
    names = ("kl_in_loss", "kl_estimator", "kl_target", "kl_horizon")
    shown = ppo.printable_config(ppo.PPOConfig(algorithm=algorithm, kl_coef=0.0))
    assert shown["kl_coef"] == 0.0 and not set(names) & set(shown)
    shown = ppo.printable_config(ppo.PPOConfig(algorithm=algorithm, kl_coef=0.05))
    assert (shown["kl_in_loss"], shown["kl_estimator"]) == (
        (False, "k1") if algorithm == "ppo" else (True, "k3"))
    assert (shown["kl_target"], shown["kl_horizon"]) == (6.0, 500)


def test_kl_term_settings_given_with_kl_coef_zero_are_said():
    """kl_estimator or kl_in_loss given with kl_coef=0 would be silently ignored; the presets'
    values (None in the config) say nothing."""
    with pytest.warns(UserWarning, match=r"kl_in_loss=True, kl_estimator='k2' has no effect "
                                         r"with kl_coef=0 \(no KL term"):
        ppo.PPOConfig(kl_coef=0.0, kl_in_loss=True, kl_estimator="k2").check_critic_settings()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ppo.PPOConfig(algorithm="grpo", kl_coef=0.0).check_critic_settings()
        ppo.PPOConfig(kl_coef=0.1, kl_estimator="k2").check_critic_settings()


def test_print_config_refuses_what_the_run_refuses(capsys):
    # before, --print-config showed dynamic_sampling: true for PPO, which the run then refused
    err = _cli_error(capsys, ["ppo", "dynamic_sampling=true", "--print-config"])
    assert "dynamic_sampling drops the groups" in err


# ---------------------------------------------------------------------------------------------
# SFT: settings of one mode given in another
# ---------------------------------------------------------------------------------------------
def test_sft_epochs_replace_the_built_in_tasks_preset_steps():
    # the built-in task presets max_steps=400, which silently replaced the epochs asked for
    cfg = load_config(sft.SFTConfig, overrides=["epochs=2"])
    assert cfg.epochs == 2.0 and cfg.max_steps is None
    assert cfg.resolved(n_examples=320).max_steps == 2 * 320 // cfg.batch_size
    assert load_config(sft.SFTConfig).max_steps == 400  # the preset stays without epochs
    for overrides in (["sft.epochs=2"], ["sft.epochs=2", "model=some/model"]):
        pipeline = load_config(PipelineConfig, overrides=overrides)
        assert (pipeline.sft.epochs, pipeline.sft.max_steps) == (2.0, None), overrides
    assert load_config(PipelineConfig, overrides=["model=some/model"]).sft.max_steps == 60


@pytest.mark.parametrize("argv, message", [
    (["sft", "epochs=2", "max_steps=3"], "epochs=2 has no effect with max_steps=3"),
    (["sft", "lora_alpha=8"], "lora_alpha=8 has no effect with lora_rank=0"),
    (["sft", "model=some/model", "corpus_size=10"], "corpus_size=10 has no effect with model="),
    (["sft", "model=some/model", "vocab_size=512"], "vocab_size=512 has no effect with model="),
    (["sft", "tokenizer=some/tokenizer"], "tokenizer='some/tokenizer' needs model="),
    (["pipeline", "sft.lora_alpha=8"], "sft.lora_alpha=8 has no effect with lora_rank=0"),
    (["pipeline", "sft.epochs=2", "sft.max_steps=3"], "sft.epochs=2 has no effect"),
])
def test_sft_settings_that_would_be_ignored_are_refused(capsys, argv, message):
    assert message in _cli_error(capsys, [*argv, "--print-config"])


def test_sft_train_refuses_an_ignored_setting_before_touching_output_dir(tmp_path):
    cfg = sft.SFTConfig(output_dir=str(tmp_path / "sft"), lora_alpha=8, max_steps=1)
    with pytest.raises(ValueError, match="lora_alpha=8 has no effect"):
        sft.train(cfg)
    assert not (tmp_path / "sft").exists()


# ---------------------------------------------------------------------------------------------
# the pipeline's own settings are checked before anything runs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("setting, message", [
    ("hidden_size=0", "hidden_size=0 is out of range"),  # was a ZeroDivisionError traceback
    ("hidden_size=36", "hidden_size must be a multiple of 8"),  # was a traceback after SFT data
    ("num_layers=0", "num_layers=0 is out of range"),
    ("pair_prompts=0", "pair_prompts=0 is out of range"),
    ("eval_samples=1", "eval_samples=1 is out of range"),  # a standard error of 0 was reported
    ("sample_batch_size=0", "sample_batch_size=0 is out of range"),  # was "range() arg 3 ..."
    ("heldout_pair_fraction=1.0", "heldout_pair_fraction=1.0 is out of range"),
    ("heldout_pair_fraction=0", "heldout_pair_fraction=0.0 is out of range"),
    ("label_beta=-1", "label_beta=-1.0 is out of range"),
    ("kl_bound=-1", "kl_bound=-1.0 is out of range"),  # was accepted: within_bound false
    ("n_show_samples=-1", "n_show_samples=-1 is out of range"),  # was accepted: no samples
    ("lora_rank=0", "lora_rank=0 is out of range"),
    ("curve_every=-1", "curve_every=-1 is out of range"),
    ("device=gpu", "device='gpu' is not a device"),
])
def test_pipeline_settings_out_of_range_are_refused_at_once(capsys, setting, message):
    assert message in _cli_error(capsys, ["pipeline", setting, "--print-config"])


def _own_data_pipeline(tmp_path, pair_rows, prompt_rows, **overrides) -> PipelineConfig:
    """A pipeline on your model and data (a tiny Llama saved with its tokenizer)."""
    from rlhf import reward, task

    tokenizer = review_tokenizer(task.make_corpus(40, seed=5), vocab_size=300)
    model = tiny_llama(tokenizer, **OWN_MODEL_SHAPE)
    model_dir = tmp_path / "my-model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    def write(name, rows):
        path = tmp_path / name
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return str(path)

    sft_rows = [{"prompt": "Note:", "completion": " the battery is good."}] * 8
    cfg = PipelineConfig(
        output_dir=str(tmp_path / "run"), device="cpu", lora_rank=4, lora_alpha=8,
        sample_batch_size=8, n_show_samples=2,
        sft=sft.SFTConfig(model=str(model_dir), dataset=write("s.jsonl", sft_rows),
                          max_steps=1, batch_size=4, grad_accum_steps=1, max_length=32),
        reward=reward.RewardConfig(dataset=write("p.jsonl", pair_rows), batch_size=2,
                                   grad_accum_steps=1, max_length=48, save_every=0),
        **overrides)
    cfg.ppo.dataset = write("q.jsonl", prompt_rows)
    cfg.ppo.num_iterations, cfg.ppo.rollout_batch_size, cfg.ppo.minibatch_size = 1, 4, 2
    cfg.ppo.max_new_tokens, cfg.ppo.max_prompt_length, cfg.ppo.save_every = 4, 16, 0
    return cfg


PAIRS = [{"prompt": "Note:", "chosen": " good", "rejected": " bad"}] * 6
PROMPTS = [{"prompt": "My prompt:"}] * 4


@pytest.mark.parametrize("pairs, prompts, message", [
    ([{"prompt": "Note:", "chosen": " good"}] * 6, PROMPTS, r"its columns are \['chosen', "),
    (PAIRS, [{"prompt": "a long prompt " * 20}] * 4, r"longer than max_prompt_length=16"),
])
def test_pipeline_on_your_data_checks_the_later_stages_data_before_sft(tmp_path, pairs,
                                                                        prompts, message):
    # before: the pairs file was read, and the prompts measured, only after SFT had trained
    from rlhf.pipeline import run

    cfg = _own_data_pipeline(tmp_path, pairs, prompts)
    with pytest.raises(ValueError, match=message):
        run(cfg)
    assert not (tmp_path / "run" / "sft" / "metrics.jsonl").exists()


def test_pipeline_refuses_a_split_that_holds_out_no_pair(tmp_path):
    # 6 pairs x 0.05 rounds to no held-out pair: was "no preference pairs given: the dataset
    # is empty" about a dataset of 6 pairs
    from rlhf.pipeline import run

    cfg = _own_data_pipeline(tmp_path, PAIRS, PROMPTS, heldout_pair_fraction=0.05)
    with pytest.raises(ValueError, match=r"heldout_pair_fraction=0.05 of 6 preference pairs "
                                         r"holds out 0 and leaves 6"):
        run(cfg)


# ---------------------------------------------------------------------------------------------
# model directories that do not hold a causal LM
# ---------------------------------------------------------------------------------------------
def test_an_encoder_without_an_lm_head_is_not_trained_as_a_causal_lm(tmp_path):
    # before: transformers built BertLMHeadModel with a random head and SFT trained it
    from transformers import BertConfig, BertModel

    from rlhf.models import load_causal_lm

    BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=32)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"does not hold a complete causal language model: .* "
                                         r"BertLMHeadModel .*\['BertModel'\]"):
        load_causal_lm(str(tmp_path))


def test_a_cut_off_weights_file_is_one_error(tmp_path):
    # before: safetensors' SafetensorError went up as a traceback
    from rlhf.models import load_causal_lm
    from rlhf.tiny_models import tiny_causal_lm

    tiny_causal_lm("llama").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"safetensors weights cannot be read .* damaged or was "
                                         r"cut off"):
        load_causal_lm(str(tmp_path))
    assert isinstance(load_causal_lm(str(_saved(tmp_path.parent / "ok"))), torch.nn.Module)


def _saved(directory):
    from rlhf.tiny_models import tiny_causal_lm

    tiny_causal_lm("qwen2").save_pretrained(directory)  # tied lm_head: nothing is missing
    return directory


# ---------------------------------------------------------------------------------------------
# seeds and output directories
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", ["sft", "rm", "ppo", "grpo", "pipeline", "frontier"])
def test_a_seed_out_of_range_is_refused_before_the_run(capsys, stage):
    # before: seed=10**20 stopped the run after its setup with "Overflow when unpacking long
    # long" (seed * 1_000_003 overflows torch's 64-bit seed); seeds are 32-bit, as numpy's
    err = _cli_error(capsys, [stage, f"seed={2**40}", "--print-config"])
    assert f"seed={2**40} is out of range" in err
    # beyond 2**53 the integer limit of every int setting says it, naming the key (fb61c24)
    err = _cli_error(capsys, [stage, f"seed={10**20}", "--print-config"])
    assert "'seed' must be an integer of at most 2**53 (9007199254740992) in size, got " \
        "100000000000000000000" in err
    assert cli.main([stage, f"seed={2**32 - 1}", "--print-config"]) == 0


@pytest.mark.parametrize("value", ["", " "])
def test_an_empty_output_dir_is_refused_not_the_current_directory(capsys, tmp_path, monkeypatch,
                                                                   value):
    # before: output_dir= (e.g. an unset $OUT) made the current directory the run's, with
    # run.json, checkpoints/ and model/ written into it
    monkeypatch.chdir(tmp_path)
    err = _cli_error(capsys, ["sft", f"output_dir={value}", "max_steps=1", "corpus_size=8"])
    assert "output_dir is empty" in err
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# the reward and RL stages read their data before the model
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage, rows, message", [
    ("rm", [{"prompt": "a", "chosen": " b"}], r"its columns are \['chosen', 'prompt'\]"),
    ("rm", None, "rlhf rm: error: dataset is required: "),
    ("ppo", [{"text": "a"}], r"its columns are \['text'\]"),
])
def test_a_broken_dataset_is_said_before_the_model_loads(capsys, tmp_path, stage, rows,
                                                         message):
    # before: the model loaded first (minutes for a large one), so a model path that does not
    # exist (here) or a slow load came before the dataset's error
    argv = [stage, f"model={tmp_path / 'no-model-here'}", f"output_dir={tmp_path / 'out'}"]
    if rows is not None:
        (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        argv.append(f"dataset={tmp_path / 'data.jsonl'}")
    err = _cli_error(capsys, argv)
    assert re.search(message, err), err


def test_reward_eval_every_without_held_out_pairs_is_refused(capsys, tmp_path):
    # before: eval_every was silently never used (eval_fraction=0 holds out no pair)
    rows = [{"prompt": "a", "chosen": " b", "rejected": " c"}] * 4
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    err = _cli_error(capsys, ["rm", f"model={tmp_path / 'no-model-here'}", "eval_fraction=0",
                              "eval_every=2", f"dataset={tmp_path / 'pairs.jsonl'}",
                              f"output_dir={tmp_path / 'out'}"])
    assert "eval_every=2 has no effect with eval_fraction=0" in err


@pytest.mark.parametrize("setting, message", [
    # before: _rl_config reset the critic's settings of a critic-free run, silently
    ("ppo.critic_lr=1", "ppo.critic_lr=1.0 has no effect with algorithm=grpo (no critic)"),
    ("ppo.gamma=0.5", "ppo.gamma=0.5 has no effect with algorithm=grpo (no critic)"),
])
def test_arithmetic_pipeline_refuses_a_critic_setting_without_a_critic(capsys, setting, message):
    err = _cli_error(capsys, ["pipeline", "task=arithmetic", "model=some/model",
                              "algorithm=grpo", setting, "--print-config"])
    assert message in err


def test_arithmetic_pipeline_print_config_refuses_what_its_run_refuses(capsys):
    # before: only the run (after loading the model) checked the RL stage's settings
    err = _cli_error(capsys, ["pipeline", "task=arithmetic", "model=some/model",
                              "ppo.advantage_norm=batch", "--print-config"])
    assert "advantage_norm='batch' has no effect with algorithm='ppo'" in err


# ---------------------------------------------------------------------------------------------
# a tokenizer of another model
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def big_tokenizer():
    """A 300-token BPE: more tokens than the 128-row embedding of tiny_models' models."""
    from rlhf import task
    from tests.helpers import review_tokenizer

    return review_tokenizer(task.make_corpus(40, seed=5), vocab_size=300)


def test_sft_with_a_tokenizer_of_another_model_is_one_error(tmp_path, big_tokenizer):
    # before: IndexError "index out of range in self" from the embedding, as a traceback
    from rlhf.tiny_models import tiny_causal_lm

    cfg = sft.SFTConfig(output_dir=str(tmp_path / "sft"), model="given", dataset="given",
                        max_steps=1, batch_size=2, device="cpu")
    examples = [{"prompt": "Review of the blender:", "completion": " It is great."}] * 2
    with pytest.raises(ValueError, match=r"holds token id \d+, but the model's embedding has "
                                         r"128 rows .* tokenizer does not belong to this model"):
        sft.train(cfg, model=tiny_causal_lm("llama"), tokenizer=big_tokenizer,
                  examples=examples)


def test_reward_and_rl_with_a_tokenizer_of_another_model_are_one_error(tmp_path,
                                                                       big_tokenizer):
    from rlhf import reward
    from rlhf.models import LoraSpec, SharedBackbone
    from rlhf.tiny_models import tiny_causal_lm

    backbone = SharedBackbone.from_model(tiny_causal_lm("llama"), lora=LoraSpec(rank=2, alpha=4))
    pairs = [{"prompt": "Review of the blender:", "chosen": " Great.", "rejected": " Bad."}] * 4
    with pytest.raises(ValueError, match=r"preference pairs, tokenised, holds token id"):
        reward.train(reward.RewardConfig(output_dir=str(tmp_path / "rm"), device="cpu"),
                     backbone=backbone, tokenizer=big_tokenizer, train_pairs=pairs)
    cfg = ppo.PPOConfig(output_dir=str(tmp_path / "ppo"), device="cpu", num_iterations=1,
                        rollout_batch_size=2, minibatch_size=2, max_prompt_length=32)
    with pytest.raises(ValueError, match=r"the prompts, tokenised, holds token id"):
        ppo.train(cfg, backbone=backbone, tokenizer=big_tokenizer,
                  prompts=["Review of the blender:"] * 2)


@pytest.mark.parametrize("dropped, algorithm, reward_fn, message", [
    ("critic", "ppo", None, r"has no critic adapter \(its roles: policy, reward;.* "
     r"algorithm=ppo needs PPO's critic.*runs/rm/backbone.*or continue this policy with a "
     r"critic-free algorithm"),
    ("reward", "grpo", None, r"has no reward adapter \(its roles: policy, critic;.* "
     r"algorithm=grpo needs the reward model that scores the samples"),
    ("reward", "ppo", len, None),  # a reward function scores: no reward adapter needed
])
def test_rl_on_a_backbone_without_a_role_it_needs_is_one_error(tmp_path, capsys, dropped,
                                                               algorithm, reward_fn, message):
    """`rlhf ppo model=runs/grpo/backbone` (a critic-free run saves no critic): the run loaded
    everything, then stopped in the critic's initialisation with "role 'critic' has no adapter
    in this backbone ...; build it with roles including 'critic'", nothing a CLI user can do.
    Now one error, from the saved backbone's roles.json before the model loads, and for a
    backbone given in memory."""
    from rlhf.models import LoraSpec, SharedBackbone
    from rlhf.tiny_models import tiny_causal_lm

    backbone = SharedBackbone.from_model(tiny_causal_lm("llama"), lora=LoraSpec(rank=2, alpha=4))
    backbone.drop_role(dropped)
    cfg = ppo.PPOConfig(output_dir=str(tmp_path / "run"), device="cpu", num_iterations=1,
                        rollout_batch_size=4, minibatch_size=4, max_prompt_length=8,
                        max_new_tokens=2, algorithm=algorithm,
                        group_size=None if algorithm == "ppo" else 2)
    if message is None:  # the check lets it through
        from rlhf.rl import _check_backbone_roles

        _check_backbone_roles(backbone.roles, cfg, reward_fn, "the backbone")
        return
    with pytest.raises(ValueError, match=message):
        ppo.train(cfg, backbone=backbone, tokenizer=None, prompts=["a"])
    saved = tmp_path / "backbone"
    backbone.save(saved)
    err = _cli_error(capsys, [algorithm if algorithm == "ppo" else "grpo", f"model={saved}",
                              f"output_dir={tmp_path / 'cli'}", "device=cpu",
                              "rollout_batch_size=4", "minibatch_size=4", "num_iterations=1",
                              *([] if algorithm == "ppo" else ["group_size=2"])])
    assert re.search(f"model='{saved}' " + message, err), err


def test_rl_on_a_backbone_whose_base_model_is_gone_names_the_backbone(tmp_path, capsys):
    """A saved backbone names its base (the SFT model) by an absolute path; with that folder
    moved or deleted, `rlhf ppo model=runs/rm/backbone` said "model='<the base's path>' does
    not exist", a path the user never gave. Now the error names the backbone, the base path
    and where it is recorded."""
    from rlhf.models import LoraSpec, SharedBackbone
    from rlhf.tiny_models import tiny_causal_lm

    saved = tmp_path / "rm" / "backbone"
    SharedBackbone.from_model(tiny_causal_lm("llama"), lora=LoraSpec(rank=2, alpha=4)).save(saved)
    info = json.loads((saved / "roles.json").read_text())
    gone = tmp_path / "moved" / "sft-model"
    info.update(base_model=str(gone), base_saved=False)
    (saved / "roles.json").write_text(json.dumps(info))
    err = _cli_error(capsys, ["ppo", f"model={saved}", f"output_dir={tmp_path / 'ppo'}",
                              "device=cpu"])
    assert err.startswith(f"rlhf ppo: error: model='{saved}' is a backbone (adapters and "
                          f"heads) on the base model '{gone}' (base_model in "
                          f"'{saved / 'roles.json'}'), and that folder does not exist"), err


@pytest.mark.parametrize("setting", ["base.seed=3", "base.output_dir=elsewhere",
                                     "base.device=cpu", "base.eval_samples=10"])
def test_frontier_refuses_a_base_setting_it_replaces(capsys, setting):
    # before: _base_config replaced these by the frontier's own fields, silently
    name = setting.split("=")[0].split(".")[1]
    err = _cli_error(capsys, ["frontier", setting, "--print-config"])
    assert f"{setting.split('=')[0]} cannot be set" in err and f"set {name}= instead" in err


# ---------------------------------------------------------------------------------------------
# sequences longer than a model's learned positions
# ---------------------------------------------------------------------------------------------
def test_sequences_past_learned_positions_are_one_error(tmp_path, big_tokenizer):
    # before: GPT-2's position embedding raised IndexError "index out of range in self", as a
    # traceback, in SFT and in the RL rollout
    from rlhf.models import LoraSpec, SharedBackbone
    from rlhf.stage import learned_positions
    from rlhf.tiny_models import tiny_causal_lm

    def gpt2():
        return tiny_causal_lm("gpt2", vocab_size=len(big_tokenizer), max_position_embeddings=16)

    assert learned_positions(gpt2()) == 16
    assert learned_positions(tiny_causal_lm("llama")) is None  # rotary: no such limit
    examples = [{"prompt": "Review of the blender:",
                 "completion": " It is great and the price is good, I like it a lot."}] * 2
    cfg = sft.SFTConfig(output_dir=str(tmp_path / "sft"), model="given", dataset="given",
                        max_steps=1, batch_size=2, max_length=64, device="cpu")
    with pytest.raises(ValueError, match=r"longest SFT example, tokenised, has \d+ tokens, more "
                                         r"than the model's 16 positions .* max_length=16 or "
                                         r"less \(it is 64\)"):
        sft.train(cfg, model=gpt2(), tokenizer=big_tokenizer, examples=examples)
    backbone = SharedBackbone.from_model(gpt2(), lora=LoraSpec(rank=2, alpha=4))
    rl_cfg = ppo.PPOConfig(output_dir=str(tmp_path / "ppo"), device="cpu", num_iterations=1,
                           rollout_batch_size=2, minibatch_size=2, max_prompt_length=12,
                           max_new_tokens=16)
    with pytest.raises(ValueError, match=r"a rollout \(max_prompt_length \+ max_new_tokens\) "
                                         r"has 28 tokens, more than the model's 16 positions"):
        ppo.train(rl_cfg, backbone=backbone, tokenizer=big_tokenizer,
                  prompts=["Review of the blender:"] * 2)


def test_ctrl_c_before_any_checkpoint_does_not_claim_one(capsys, monkeypatch, tmp_path):
    # before: "interrupted; a checkpoint was saved under ..." also for a Ctrl-C while the model
    # loaded, when nothing had been saved
    def interrupted(cfg, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sft, "train", interrupted)
    out = str(tmp_path / "sft")
    assert cli.main(["sft", f"output_dir={out}"]) == cli.EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "checkpoint was saved" not in err
    assert f"`rlhf sft output_dir={out} --resume` (it continues from the last checkpoint" in err
