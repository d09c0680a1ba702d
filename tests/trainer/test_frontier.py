"""rlhf frontier: the RL stage at fixed KL strengths per algorithm from one SFT + reward model,
each policy measured like the pipeline measures its own (tiny settings, reference kernels)."""

import json

import pytest

from rlhf.frontier import FrontierConfig, point_name, render_table, run
from tests.helpers import micro_config

pytestmark = pytest.mark.reference_kernels


def _config(tmp_path, **overrides) -> FrontierConfig:
    base = micro_config(tmp_path / "unused")
    # the base run's own RL stage at a fixed kl_coef: the frontier's ppo point at that value
    # must then reproduce the pipeline's held-out figures (same SFT / reward model and seeds)
    base.ppo.kl_coef, base.ppo.kl_target, base.ppo.num_iterations = 0.1, None, 1
    settings = dict(output_dir=str(tmp_path / "frontier"), algorithms=("ppo", "grpo"),
                    kl_coefs=(0.1, 1.0), num_iterations=1, device="cpu", eval_samples=16,
                    base=base)
    settings.update(overrides)
    return FrontierConfig(**settings)


# the tiny SFT stage's max_length is shorter than most built-in examples, on purpose (speed)
@pytest.mark.filterwarnings("ignore:.*SFT examples were longer than max_length:UserWarning")
def test_frontier_points_are_measured_as_the_pipeline_measures(tmp_path):
    cfg = _config(tmp_path)
    result = run(cfg)
    out = tmp_path / "frontier"
    assert [(p["algorithm"], p["kl_coef"]) for p in result["points"]] == [
        ("ppo", 0.1), ("ppo", 1.0), ("grpo", 0.1), ("grpo", 1.0)]
    base = json.loads((out / "base" / "summary.json").read_text())
    assert result["sft_gold_mean"] == base["gold_heldout"]["sft_mean"]
    # the ppo point at the base run's own settings is the base run's RL stage, re-done from the
    # saved reward-model backbone: the same policy, the same held-out samples and figures
    same = result["points"][0]
    assert same["gold_mean"] == pytest.approx(base["gold_heldout"]["ppo_mean"], abs=1e-12)
    assert same["kl_mean"] == pytest.approx(base["kl_to_reference"]["mean"], rel=1e-6)
    for p in result["points"]:
        assert p["iterations"] == 1 and p["settings"]["algorithm"] == p["algorithm"]
        for key in ("gold_mean", "gold_stderr", "kl_mean", "proxy_mean", "rl_seconds"):
            assert isinstance(p[key], float), (key, p)
        folder = out / "points" / point_name(p["algorithm"], p["kl_coef"])
        assert json.loads((folder / "result.json").read_text()) == p
        assert (folder / "backbone").is_dir()
    grpo_roles = json.loads(
        (out / "points" / "grpo-kl0.1" / "backbone" / "roles.json").read_text())["roles"]
    assert "critic" not in grpo_roles
    assert (out / "frontier.png").stat().st_size > 10_000
    table = (out / "frontier.md").read_text()
    assert table == render_table(result) and table.count("\n| grpo |") == 2
    assert json.loads((out / "frontier.json").read_text())["points"] == result["points"]

    # resume keeps finished points and re-runs a missing one to the same figures
    (out / "points" / "grpo-kl1" / "result.json").unlink()
    import shutil

    shutil.rmtree(out / "points" / "grpo-kl1")
    again = run(_config(tmp_path, resume=True))
    assert [{k: v for k, v in p.items() if k != "rl_seconds" and k != "peak_memory_mb"}
            for p in again["points"]] == [
        {k: v for k, v in p.items() if k != "rl_seconds" and k != "peak_memory_mb"}
        for p in result["points"]]
    assert again["points"][:3] == result["points"][:3]  # not re-run: the very same records


@pytest.mark.parametrize(("overrides", "message"), [
    ({"algorithms": ("ppo", "a2c")}, "expected a non-empty list of"),
    ({"algorithms": ("grpo", "grpo")}, "lists an algorithm twice"),
    ({"kl_coefs": (0.1, 0.0)}, "numbers > 0"),
    ({"kl_coefs": ()}, "numbers > 0"),
    ({"num_iterations": 0}, "num_iterations must be >= 1"),
    ({"eval_samples": 1}, "eval_samples must be >= 2"),
    ({"resume": True, "overwrite": True}, "contradict"),
])
def test_bad_frontier_settings_are_refused(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, **overrides)


def test_frontier_refuses_own_model_or_data(tmp_path):
    cfg = _config(tmp_path)
    cfg.base.sft.model = str(tmp_path / "some-model")
    with pytest.raises(ValueError, match="runs on the built-in task"):
        run(cfg)


def test_frontier_cli_prints_its_config(capsys):
    from rlhf.cli import main

    assert main(["frontier", "algorithms=ppo,rloo", "kl_coefs=0.05,0.5", "--print-config"]) == 0
    shown = capsys.readouterr().out
    assert "algorithms:\n- ppo\n- rloo" in shown and "kl_coefs:\n- 0.05\n- 0.5" in shown
    assert "# points:\n#   ppo:\n" in shown and "#     kl_coef:\n#     - 0.05\n" in shown


def test_frontier_printed_config_loads_back(tmp_path, capsys):
    """--print-config's output is a config: given back, it prints the same (it printed the
    base's output_dir, seed, ..., which the frontier refuses in a config, and the points)."""
    from rlhf.cli import main

    assert main(["frontier", "algorithms=grpo", "seed=3", "--print-config"]) == 0
    shown = capsys.readouterr().out
    (tmp_path / "frontier.yaml").write_text(shown)
    assert main(["frontier", str(tmp_path / "frontier.yaml"), "--print-config"]) == 0
    assert capsys.readouterr().out == shown
