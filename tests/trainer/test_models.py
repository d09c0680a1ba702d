"""SharedBackbone (rlhf/models.py): one Hugging Face backbone, four roles through LoRA adapters.

Tiny random-initialised Llama, Qwen2 and GPT-2 models (rlhf/tiny_models.py), CPU, fp32 unless a
test says otherwise. Adapters are perturbed away from PEFT's B = 0 initialisation before any
comparison, so that "the role changes nothing" cannot pass by accident.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlhf.models import (
    LLAMA_3_8B,
    QWEN2_5_1_5B,
    ROLES,
    LoraSpec,
    ModelShape,
    SharedBackbone,
    check_tokenizer,
    estimate_memory,
    memory_table_markdown,
)
from rlhf.tiny_models import ARCHITECTURES, tiny_causal_lm, tiny_config, tiny_reward_model
from rlhf_kernels import reference

VOCAB = 160
PAD = 0
SPEC = LoraSpec(rank=4, alpha=8)
REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def make_backbone(arch: str, seed: int = 0, **kwargs) -> SharedBackbone:
    backbone = SharedBackbone.from_model(tiny_causal_lm(arch, vocab_size=VOCAB, seed=seed),
                                         lora=SPEC, **kwargs)
    perturb(backbone, seed)
    return backbone


@torch.no_grad()
def perturb(backbone: SharedBackbone, seed: int) -> None:
    """Give every adapter (A and B) and head random, distinct weights."""
    gen = torch.Generator().manual_seed(1000 + seed)
    for role in backbone.roles:
        for param in backbone.trainable_parameters(role):
            param.copy_(0.2 * torch.randn(param.shape, generator=gen))


def random_rows(lengths, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # ids >= 3 so that real tokens never equal pad/bos/eos
    return [torch.randint(3, VOCAB, (n,), generator=gen) for n in lengths]


def pad_batch(rows: list[torch.Tensor], side: str, extra: int = 0):
    """Rows -> (input_ids, attention_mask) padded with PAD on ``side`` to max length + extra."""
    width = max(len(r) for r in rows) + extra
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        span = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[b, span], mask[b, span] = row, 1
    return ids, mask


def real_positions(mask: torch.Tensor, b: int) -> torch.Tensor:
    return mask[b].nonzero().flatten()


def policy_loss(backbone, ids, mask):
    return -(backbone.token_logprobs(ids, mask, "policy") * mask[:, 1:]).sum()


def critic_loss(backbone, ids, mask):
    return (backbone.values(ids, mask) - 1.0).pow(2).mul(mask).sum()


def reward_loss(backbone, ids, mask):
    return -torch.nn.functional.logsigmoid(backbone.rewards(ids, mask)).sum()


LOSSES = {"policy": policy_loss, "critic": critic_loss, "reward": reward_loss}


def outputs(backbone, ids, mask) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {"policy": backbone.token_logprobs(ids, mask, "policy"),
                "reference": backbone.token_logprobs(ids, mask, None),
                "critic": backbone.values(ids, mask),
                "reward": backbone.rewards(ids, mask)}


@pytest.fixture(scope="module")
def batch():
    return pad_batch(random_rows([7, 4, 9], seed=3), "right")


# --------------------------------------------------------------------------------------------
# the reference = the plain base model, bit for bit
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_adapters_off_equals_plain_base_model_bitwise(arch, side):
    plain = tiny_causal_lm(arch, vocab_size=VOCAB, seed=5)
    backbone = make_backbone(arch, seed=5)
    ids, mask = pad_batch(random_rows([6, 3, 8], seed=1), side)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = plain(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        ref_logits = backbone.logits(ids, mask, role=None)
        policy_logits = backbone.policy_logits(ids, mask)
        ref_logits_again = backbone.logits(ids, mask, role=None)  # after a switch back
    assert torch.equal(ref_logits, expected)
    assert torch.equal(ref_logits_again, expected)
    assert not torch.allclose(policy_logits, expected, atol=1e-3)  # the adapter does something
    # reference_logprobs = logprobs of those logits, masked
    labels = torch.where(mask[:, 1:] != 0, ids[:, 1:], -100)
    want = reference.logprobs(expected[:, :-1].double(), labels)
    got = backbone.reference_logprobs(ids, mask)
    assert got.dtype == torch.float32 and not got.requires_grad
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=0)


# --------------------------------------------------------------------------------------------
# token_logprobs (through linear_logprobs) against the float64 reference
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_token_logprobs_match_float64_reference(arch):
    backbone = make_backbone(arch, seed=2)
    ids, mask = pad_batch(random_rows([5, 1, 7], seed=4), "left")
    temperature = 0.7
    logp, entropy = backbone.token_logprobs(ids, mask, "policy", temperature=temperature,
                                            return_entropy=True)
    assert logp.shape == entropy.shape == (3, 6) and logp.dtype == torch.float32
    with torch.no_grad():
        logits = backbone.policy_logits(ids, mask).double()
    labels = torch.where(mask[:, 1:] != 0, ids[:, 1:], -100)
    want_logp, want_entropy = reference.logprobs(logits[:, :-1], labels, temperature,
                                                 return_entropy=True)
    torch.testing.assert_close(logp.double(), want_logp, atol=2e-5, rtol=0)
    torch.testing.assert_close(entropy.double(), want_entropy, atol=2e-5, rtol=0)
    assert (logp[mask[:, 1:] == 0] == 0).all() and (entropy[mask[:, 1:] == 0] == 0).all()
    # Gradients into the policy adapter equal float64 autograd through the full logits.
    params = backbone.trainable_parameters("policy")
    g_logp, g_entropy = torch.randn_like(logp), torch.randn_like(entropy)
    got = torch.autograd.grad((logp * g_logp).sum() + (entropy * g_entropy).sum(), params,
                              allow_unused=True)
    logits = backbone.policy_logits(ids, mask).double()
    ref_logp, ref_entropy = reference.logprobs(logits[:, :-1], labels, temperature,
                                               return_entropy=True)
    want = torch.autograd.grad((ref_logp * g_logp.double()).sum()
                               + (ref_entropy * g_entropy.double()).sum(), params,
                               allow_unused=True)
    assert any(w is not None and w.abs().max() > 0 for w in want)
    for param, g, w in zip(params, got, want):
        if w is None:
            assert g is None or not g.any()
            continue
        assert g is not None, f"no gradient for a policy parameter of shape {tuple(param.shape)}"
        torch.testing.assert_close(g.double(), w.double(), atol=1e-5, rtol=1e-3)

def test_token_logprobs_from_a_start_position():
    """``start`` scores only tokens start+1.. (PPO's response frame): the same values as the
    full call's columns from ``start`` on, and their gradient; bad ``start`` is refused."""
    backbone = make_backbone("llama", seed=3)
    ids, mask = pad_batch(random_rows([7, 3, 8], seed=5), "left")
    full, full_entropy = backbone.token_logprobs(ids, mask, "policy", temperature=0.9,
                                                 return_entropy=True)
    for start in (1, 4, ids.shape[1] - 2):
        part, entropy = backbone.token_logprobs(ids, mask, "policy", temperature=0.9,
                                                return_entropy=True, start=start)
        assert part.shape == (3, ids.shape[1] - 1 - start)
        torch.testing.assert_close(part, full[:, start:], atol=1e-6, rtol=0)
        torch.testing.assert_close(entropy, full_entropy[:, start:], atol=1e-6, rtol=0)
    ref = backbone.reference_logprobs(ids, mask, start=4)
    torch.testing.assert_close(ref, backbone.reference_logprobs(ids, mask)[:, 4:], atol=1e-6,
                               rtol=0)
    params = backbone.trainable_parameters("policy")
    weights = torch.randn_like(full[:, 4:])
    got = torch.autograd.grad((backbone.token_logprobs(ids, mask, start=4) * weights).sum(),
                              params, allow_unused=True)
    want = torch.autograd.grad((backbone.token_logprobs(ids, mask)[:, 4:] * weights).sum(),
                               params, allow_unused=True)
    for g, w in zip(got, want):
        if w is not None:
            torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-4)
    for bad in (-1, ids.shape[1] - 1):
        with pytest.raises(ValueError, match="start must be in"):
            backbone.token_logprobs(ids, mask, start=bad)



# --------------------------------------------------------------------------------------------
# rewards / values under left and right padding
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_rewards_and_values_are_independent_of_padding_side(arch):
    backbone = make_backbone(arch, seed=7)
    rows = random_rows([6, 2, 9, 1], seed=8)
    with torch.no_grad():
        alone_rewards = torch.cat([backbone.rewards(r[None], torch.ones(1, len(r))) for r in rows])
        alone_values = [backbone.values(r[None], torch.ones(1, len(r)))[0] for r in rows]
        for side in ("left", "right"):
            ids, mask = pad_batch(rows, side, extra=2)
            rewards = backbone.rewards(ids, mask)
            values = backbone.values(ids, mask)
            assert rewards.shape == (4,) and rewards.dtype == torch.float32
            torch.testing.assert_close(rewards, alone_rewards, atol=1e-5, rtol=1e-5)
            for b in range(len(rows)):
                torch.testing.assert_close(values[b, real_positions(mask, b)], alone_values[b],
                                           atol=1e-5, rtol=1e-5)
            assert (values[mask == 0] == 0).all()


@pytest.mark.parametrize("arch", ["llama"])
def test_rewards_read_the_last_real_token(arch):
    backbone = make_backbone(arch, seed=9)
    ids, mask = pad_batch(random_rows([5, 3], seed=2), "left", extra=1)
    with torch.no_grad():
        hidden = backbone.hidden_states(ids, mask, "reward")
        want = backbone.reward_head(hidden[:, -1].float()).squeeze(-1)  # left pad: last column
        wrong = backbone.reward_head(hidden[:, -2].float()).squeeze(-1)
        got = backbone.rewards(ids, mask)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert not torch.allclose(got, wrong, atol=1e-4)


# --------------------------------------------------------------------------------------------
# gradients go where they should; training one role leaves the others alone
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("role", ROLES)
def test_gradients_flow_only_into_the_role_adapter_and_head(role, batch):
    backbone = make_backbone("llama", seed=11)
    ids, mask = batch
    LOSSES[role](backbone, ids, mask).backward()
    own = {id(p) for p in backbone.trainable_parameters(role)}
    for name, param in backbone.named_parameters():
        if id(param) in own:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, f"{name} got a gradient from the {role} loss"
    # the base is frozen, the roles are trainable (explicitly, not by PEFT's last set_adapter)
    assert not any(p.requires_grad for p in backbone.causal_lm.parameters() if id(p) not in
                   {id(q) for r in ROLES for q in backbone.trainable_parameters(r)})
    assert all(p.requires_grad for r in ROLES for p in backbone.trainable_parameters(r))


@pytest.mark.parametrize("arch, trained", [("llama", "policy"), ("llama", "critic"),
                                           ("llama", "reward"), ("qwen2", "critic"),
                                           ("qwen2", "policy"), ("gpt2", "reward")])
def test_a_training_step_on_one_role_leaves_the_others_unchanged(arch, trained, batch):
    backbone = make_backbone(arch, seed=13)
    ids, mask = batch
    before = outputs(backbone, ids, mask)
    optimizer = torch.optim.Adam(backbone.trainable_parameters(trained), lr=1e-2)
    LOSSES[trained](backbone, ids, mask).backward()
    optimizer.step()
    after = outputs(backbone, ids, mask)
    for name in before:
        if name == trained:
            assert not torch.allclose(after[name], before[name], atol=1e-4), name
        else:
            assert torch.equal(after[name], before[name]), f"{name} moved after a {trained} step"


def test_switching_roles_between_forward_and_backward_keeps_gradients(batch):
    """PEFT's set_adapter/disable_adapter turn requires_grad off for inactive adapters, which
    makes autograd drop their gradients; the backbone must not."""
    backbone = make_backbone("qwen2", seed=17)
    ids, mask = batch
    loss = policy_loss(backbone, ids, mask)
    backbone.reference_logprobs(ids, mask)
    backbone.rewards(ids, mask)
    loss = loss + critic_loss(backbone, ids, mask)
    loss.backward()
    for role in ("policy", "critic"):
        assert all(p.grad is not None for p in backbone.trainable_parameters(role)), role
    assert all(p.grad is None for p in backbone.trainable_parameters("reward"))


def _switch_state(backbone) -> list:
    """Per LoRA layer: the active adapters, the disabled flag and every adapter weight's
    requires_grad, as PEFT reports them."""
    return [(list(layer.active_adapters), layer.disable_adapters,
             [p.requires_grad for p in layer.parameters()])
            for layer in backbone._lora_layers]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_direct_role_switch_gives_the_state_and_outputs_of_peft_own_switch(arch, batch):
    """The direct switch (the layers' active adapter and disabled flag set without PEFT's
    set_adapter) leaves every layer as PEFT's own switch followed by the explicit trainable set
    does, and the roles compute the same outputs, after any sequence of switches."""
    direct, peft = make_backbone(arch, seed=23), make_backbone(arch, seed=23)
    assert direct._direct_switch
    peft._direct_switch = False
    for backbone in (direct, peft):
        backbone.set_trainable(("policy", "critic"))
    ids, mask = batch
    for role in ("critic", None, "reward", "policy", None, "critic", "policy"):
        for backbone in (direct, peft):
            backbone._activate(role)
        assert _switch_state(direct) == _switch_state(peft), role
        got, want = outputs(direct, ids, mask), outputs(peft, ids, mask)
        for name in got:
            assert torch.equal(got[name], want[name]), (role, name)
    # after a drop_role, PEFT's delete_adapter re-activated and thawed adapters of its choosing
    for backbone in (direct, peft):
        backbone.drop_role("reward")
    assert _switch_state(direct) == _switch_state(peft)
    assert all(p.requires_grad for role in ("policy", "critic")
               for p in direct.trainable_parameters(role))


def test_direct_role_switch_only_on_peft_stock_layers(monkeypatch):
    """A LoRA layer type whose set_adapter does more than PEFT's keeps PEFT's switch."""
    from peft.tuners.lora.layer import Linear
    from peft.tuners.tuners_utils import BaseTunerLayer

    calls = []

    def counting_set_adapter(self, adapter_names, inference_mode=False):
        calls.append(adapter_names)
        return BaseTunerLayer.set_adapter(self, adapter_names, inference_mode)

    monkeypatch.setattr(Linear, "set_adapter", counting_set_adapter)
    backbone = make_backbone("llama", seed=29)
    assert not backbone._direct_switch
    calls.clear()
    backbone._activate("critic")
    assert calls and all(c == "critic" for c in calls)
    assert all(layer.active_adapters == ["critic"] for layer in backbone._lora_layers)


def test_set_trainable_freezes_a_role(batch):
    backbone = make_backbone("llama", seed=19)
    backbone.set_trainable(("policy", "critic"))
    ids, mask = batch
    assert not any(p.requires_grad for p in backbone.trainable_parameters("reward"))
    backbone.values(ids, mask)  # a role switch must not thaw it
    backbone.rewards(ids, mask)
    assert not any(p.requires_grad for p in backbone.trainable_parameters("reward"))
    assert not backbone.rewards(ids, mask).requires_grad
    report = backbone.memory_report()
    assert report["reward"]["grads"] == report["reward"]["optimizer"] == 0
    assert report["policy"]["optimizer"] == 2 * report["policy"]["params"]


# --------------------------------------------------------------------------------------------
# gradient checkpointing with two roles in one backward
# --------------------------------------------------------------------------------------------
def _two_role_step(backbone, ids, mask, order, with_reference=True):
    backbone.zero_grad(set_to_none=True)
    losses = []
    for role in order:
        losses.append(LOSSES[role](backbone, ids, mask))
        if with_reference:
            backbone.reference_logprobs(ids, mask)  # interleaved reference pass (adapters off)
    sum(losses).backward()
    return {name: p.grad.clone() for name, p in backbone.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch, order", [("llama", ("policy", "critic")),
                                         ("llama", ("critic", "policy")),
                                         ("gpt2", ("policy", "critic"))])
def test_gradient_checkpointing_is_adapter_aware(arch, order, batch):
    """Policy and critic forwards, then one backward of the summed loss: the checkpointed
    recomputation must use each layer's forward role, so the gradients equal those without
    checkpointing. Documented contract: any order of role forwards before one backward."""
    ids, mask = batch
    plain = make_backbone(arch, seed=23).train()
    checkpointed = make_backbone(arch, seed=23, gradient_checkpointing=True).train()
    want = _two_role_step(plain, ids, mask, order)
    got = _two_role_step(checkpointed, ids, mask, order)
    assert want.keys() == got.keys() and len(want) > 0
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)

    # Control: Hugging Face's own (role-unaware) checkpointing recomputes the first role's layers
    # with the second role's adapter: silently wrong gradients (with a reference pass last,
    # torch's checkpoint at least notices the different saved tensors). So the test can fail.
    for module in checkpointed.causal_lm.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if getattr(func, "_role_aware", False):
            module._gradient_checkpointing_func = func._inner
    naive = _two_role_step(checkpointed, ids, mask, order, with_reference=False)
    assert any(not torch.allclose(naive[n], want[n], atol=1e-4) for n in want)
    with pytest.raises(torch.utils.checkpoint.CheckpointError):
        _two_role_step(checkpointed, ids, mask, order)


# --------------------------------------------------------------------------------------------
# stage transitions
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_merge_into_base_makes_the_base_the_sft_model(arch, batch):
    backbone = make_backbone(arch, seed=29)
    ids, mask = batch
    policy_params = backbone.trainable_parameters("policy")
    with torch.no_grad():
        sft_logits = backbone.policy_logits(ids, mask)
    backbone.merge_into_base("policy")
    assert backbone.base_modified
    with torch.no_grad():
        ref_logits = backbone.logits(ids, mask, role=None)
        policy_logits = backbone.policy_logits(ids, mask)
    torch.testing.assert_close(ref_logits, sft_logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(policy_logits, ref_logits)  # fresh adapter: B = 0
    # re-initialised in place: the same Parameter objects, trainable, B zero, A not
    assert all(a is b for a, b in zip(policy_params, backbone.trainable_parameters("policy")))
    assert all(p.requires_grad for p in policy_params)
    names = [n for n, _ in backbone.named_parameters() if ".policy." in n]
    assert any("lora_B" in n for n in names)
    for name, param in backbone.named_parameters():
        if "lora_B.policy" in name:
            assert (param == 0).all(), name
        if "lora_A.policy" in name:
            assert param.abs().sum() > 0, name


def test_init_critic_from_reward(batch):
    backbone = make_backbone("qwen2", seed=31)
    ids, mask = batch
    backbone.init_critic_from_reward()
    with torch.no_grad():
        rewards = backbone.rewards(ids, mask)
        values = backbone.values(ids, mask)
    last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)
    torch.testing.assert_close(values[torch.arange(3), last], rewards, atol=1e-6, rtol=1e-6)
    # copies, not shared tensors: training the critic leaves the reward model alone
    critic = backbone.trainable_parameters("critic")
    reward = backbone.trainable_parameters("reward")
    assert all(c.data_ptr() != r.data_ptr() for c, r in zip(critic, reward))


# --------------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------------
def _save_tiny_base(arch: str, path: Path, seed: int = 0) -> None:
    tiny_causal_lm(arch, vocab_size=VOCAB, seed=seed).save_pretrained(str(path))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_from_pretrained_local_directory_is_the_saved_model(arch, tmp_path, batch):
    _save_tiny_base(arch, tmp_path / "hub", seed=37)
    backbone = SharedBackbone.from_pretrained(str(tmp_path / "hub"), lora=SPEC)
    plain = tiny_causal_lm(arch, vocab_size=VOCAB, seed=37)
    ids, mask = batch
    with torch.no_grad():
        want = plain(input_ids=ids, attention_mask=mask).logits
        got = backbone.logits(ids, mask, role=None)
    real = mask.bool()  # right padding: positions of real tokens equal arange
    assert torch.equal(got[real], want[real])
    assert backbone.name_or_path == str(tmp_path / "hub") and not backbone.base_modified


def test_checkpoint_of_a_relative_local_base_loads_from_another_directory(tmp_path,
                                                                            monkeypatch):
    # roles.json used to keep "hub" as given, so loading from another working directory
    # looked "hub" up on the Hugging Face hub and failed.
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    _save_tiny_base("llama", Path("hub"), seed=5)
    backbone = SharedBackbone.from_pretrained("hub", lora=SPEC)
    assert backbone.name_or_path == str(tmp_path / "a" / "hub")
    backbone.save("ckpt")
    monkeypatch.chdir(tmp_path / "b")
    loaded = SharedBackbone.load(tmp_path / "a" / "ckpt")
    for want, got in zip(backbone.causal_lm.parameters(), loaded.causal_lm.parameters()):
        assert torch.equal(want, got)


@pytest.mark.parametrize("arch, source", [("llama", "hub"), ("qwen2", "hub"), ("gpt2", "memory"),
                                          ("llama", "merged"), ("qwen2", "merged"),
                                          ("gpt2", "merged")])
def test_save_load_round_trip_is_exact(arch, source, tmp_path, batch):
    if source == "memory":
        backbone = make_backbone(arch, seed=41)
    else:
        _save_tiny_base(arch, tmp_path / "hub", seed=41)
        backbone = SharedBackbone.from_pretrained(str(tmp_path / "hub"), lora=SPEC)
        perturb(backbone, 41)
        if source == "merged":
            backbone.merge_into_base("policy")
            perturb(backbone, 43)
    backbone.set_trainable(("policy", "critic"))
    ids, mask = batch
    want = outputs(backbone, ids, mask)
    out = tmp_path / "ckpt"
    backbone.save(out)

    info = json.loads((out / "roles.json").read_text())
    assert info["roles"] == list(ROLES) and info["lora"]["rank"] == SPEC.rank
    assert info["base_saved"] == (source != "hub")
    assert info["base_config"]["model_type"] == backbone.config.model_type
    for role in ROLES:
        assert (out / "adapters" / role / "adapter_model.safetensors").is_file()
        assert (out / "adapters" / role / "adapter_config.json").is_file()
    assert (out / "heads.safetensors").is_file()
    assert (out / "base").is_dir() == (source != "hub")

    loaded = SharedBackbone.load(out)
    got = outputs(loaded, ids, mask)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert loaded.roles == backbone.roles and loaded.base_modified == backbone.base_modified
    assert not any(p.requires_grad for p in loaded.trainable_parameters("reward"))
    assert all(p.requires_grad for p in loaded.trainable_parameters("policy"))


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")
def test_saved_adapters_load_in_plain_peft(tmp_path, batch):
    from peft import PeftModel

    _save_tiny_base("llama", tmp_path / "hub", seed=47)
    backbone = SharedBackbone.from_pretrained(str(tmp_path / "hub"), lora=SPEC)
    perturb(backbone, 47)
    backbone.save(tmp_path / "ckpt")
    ids, mask = batch
    peft_model = PeftModel.from_pretrained(tiny_causal_lm("llama", vocab_size=VOCAB, seed=47),
                                           str(tmp_path / "ckpt" / "adapters" / "policy"))
    with torch.no_grad():
        want = backbone.policy_logits(ids, mask)
        got = peft_model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got[mask.bool()], want[mask.bool()])


def test_save_is_atomic(tmp_path, batch, monkeypatch):
    import safetensors.torch

    backbone = make_backbone("gpt2", seed=53)
    out = tmp_path / "ckpt"
    backbone.save(out)
    ids, mask = batch
    first = outputs(backbone, ids, mask)
    perturb(backbone, 54)
    backbone.save(out)  # overwrite an existing checkpoint
    assert not torch.equal(outputs(SharedBackbone.load(out), ids, mask)["policy"],
                           first["policy"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary left over

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    perturb(backbone, 55)
    with pytest.raises(OSError, match="disk full"):
        backbone.save(out)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    reloaded = outputs(SharedBackbone.load(out), ids, mask)  # still the second checkpoint
    assert not torch.equal(reloaded["policy"], first["policy"])


def test_load_with_a_mismatched_base_model_is_refused(tmp_path):
    backbone = make_backbone("llama", seed=59)
    backbone.save(tmp_path / "ckpt")
    other = tiny_causal_lm("llama", vocab_size=VOCAB, hidden_size=48)
    with pytest.raises(ValueError, match="hidden_size"):
        SharedBackbone.load(tmp_path / "ckpt", base_model=other)


# --------------------------------------------------------------------------------------------
# a separately trained reward model
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_plugged_sequence_classifier_reward_model(arch, tmp_path):
    backbone = make_backbone(arch, seed=61)
    rows = random_rows([5, 2, 8], seed=62)
    reward_model = tiny_reward_model(arch, vocab_size=VOCAB, seed=63)
    with torch.no_grad():
        adapter_rewards = backbone.rewards(*pad_batch(rows, "right"))
        # the RM's own forward on each unpadded row is the ground truth
        want = torch.cat([reward_model(input_ids=r[None]).logits[:, 0] for r in rows])
    backbone.use_reward_model(reward_model)
    assert not any(p.requires_grad for p in reward_model.parameters())
    with torch.no_grad():
        for side in ("left", "right"):
            got = backbone.rewards(*pad_batch(rows, side, extra=1))
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="use_reward_model"):
        backbone.init_critic_from_reward()
    assert backbone.memory_report()["reward_model"]["params"] > 0
    backbone.use_reward_model(None)
    with torch.no_grad():
        assert torch.equal(backbone.rewards(*pad_batch(rows, "right")), adapter_rewards)


def test_plugged_shared_backbone_and_callable_reward_models(batch):
    backbone = make_backbone("llama", seed=67)
    other = make_backbone("llama", seed=68)
    ids, mask = batch
    with torch.no_grad():
        want = other.rewards(ids, mask)
        backbone.use_reward_model(other)
        assert torch.equal(backbone.rewards(ids, mask), want)
    backbone.use_reward_model(lambda input_ids, attention_mask: attention_mask.sum(-1))
    assert torch.equal(backbone.rewards(ids, mask), mask.sum(-1).float())
    with pytest.raises(ValueError, match="SharedBackbone"):
        backbone.use_reward_model(42)
    with pytest.raises(ValueError, match="one label"):
        backbone.use_reward_model(tiny_causal_lm("llama", vocab_size=VOCAB))


# --------------------------------------------------------------------------------------------
# memory options
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_bf16_base_keeps_fp32_adapters_heads_and_outputs(arch, batch, tmp_path):
    _save_tiny_base(arch, tmp_path / "hub", seed=71)
    backbone = SharedBackbone.from_pretrained(str(tmp_path / "hub"), lora=SPEC,
                                              torch_dtype=torch.bfloat16)
    assert backbone.dtype == torch.bfloat16
    assert backbone.lm_head_weight().dtype == torch.bfloat16
    for role in ROLES:
        assert all(p.dtype == torch.float32 for p in backbone.trainable_parameters(role))
    ids, mask = batch
    logp = backbone.token_logprobs(ids, mask)
    values, rewards = backbone.values(ids, mask), backbone.rewards(ids, mask)
    assert logp.dtype == values.dtype == rewards.dtype == torch.float32
    assert torch.isfinite(logp).all() and torch.isfinite(values).all()
    (logp.sum() + values.sum()).backward()
    assert all(p.grad is not None for p in backbone.trainable_parameters("critic"))
    report = backbone.memory_report()
    n_base = sum(p.numel() for p in tiny_causal_lm(arch, vocab_size=VOCAB).parameters())
    assert report["base"]["params"] == 2 * n_base  # bf16, tied weights counted once


def test_bf16_sft_adapter_merge_then_round_trip(tmp_path, batch):
    """SFT through a policy-only adapter on a bf16 base, merged, saved and re-loaded."""
    backbone = SharedBackbone.from_model(
        tiny_causal_lm("qwen2", vocab_size=VOCAB, seed=97, dtype=torch.bfloat16), lora=SPEC,
        roles=("policy",))
    perturb(backbone, 97)
    ids, mask = batch
    with torch.no_grad():
        sft = backbone.policy_logits(ids, mask).float()
    backbone.merge_into_base("policy")
    with torch.no_grad():
        merged = backbone.logits(ids, mask, role=None)
    torch.testing.assert_close(merged.float(), sft, atol=5e-2, rtol=0)  # rounded to bf16
    backbone.save(tmp_path / "sft")
    loaded = SharedBackbone.load(tmp_path / "sft")
    assert loaded.roles == ("policy",) and loaded.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(loaded.logits(ids, mask, role=None), merged)
        assert torch.equal(loaded.policy_logits(ids, mask), merged)


def test_memory_report_counts_the_trainable_bytes():
    backbone = make_backbone("llama", seed=73)
    report = backbone.memory_report()
    for role in ROLES:
        n = sum(p.numel() for p in backbone.trainable_parameters(role))
        assert report[role] == {"params": 4 * n, "grads": 4 * n, "optimizer": 8 * n}
    n_base = sum(p.numel() for p in tiny_causal_lm("llama", vocab_size=VOCAB).parameters())
    assert report["base"]["params"] == 4 * n_base
    assert report["total"]["params"] == sum(report[k]["params"] for k in ("base",) + ROLES)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_model_shape_counts_match_real_models(arch):
    config = tiny_config(arch, vocab_size=VOCAB, hidden_size=48, num_layers=3, num_heads=6,
                         num_kv_heads=2, intermediate_size=80)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config)
    shape = ModelShape.from_config(config)
    assert shape.params() == sum(p.numel() for p in model.parameters())
    backbone = SharedBackbone.from_model(model, lora=LoraSpec(rank=8))
    n_adapter = sum(p.numel() for p in backbone.trainable_parameters("policy"))
    assert shape.lora_params(8) == n_adapter


def test_memory_estimate_closed_form_and_docs_table():
    from rlhf import plan

    # parameter counts of the public models: 1.54 B and 8.03 B
    assert abs(QWEN2_5_1_5B.params() - 1_543_714_304) == 0
    assert abs(LLAMA_3_8B.params() - 8_030_261_248) == 0
    shared = estimate_memory(LLAMA_3_8B, "shared-lora")
    separate = estimate_memory(LLAMA_3_8B, "separate-full")
    assert shared["weights"] < 0.3 * separate["weights"]
    assert shared["total"] == sum(shared[k] for k in ("weights", "grads", "optimizer",
                                                      "activations"))
    # Adam: two fp32 moments for each trained parameter (policy + critic adapters and value head)
    assert shared["optimizer"] == 8 * (2 * LLAMA_3_8B.lora_params(16) + 4097)
    # full fine-tuning: the policy (with lm_head) and the critic (without) + value head
    full = LLAMA_3_8B.params() + LLAMA_3_8B.backbone_params()
    assert separate["optimizer"] == 8 * (full + 4097)
    assert separate["grads"] == 2 * full + 4 * 4097
    # one estimator: the shared-lora row is `rlhf plan`'s update stage (the same batch, lengths
    # and rank) less what generation leaves resident
    for shape in (QWEN2_5_1_5B, LLAMA_3_8B):
        planned = plan.plan(shape.config(), batch=16, prompt_length=128, response_length=256)
        resident = planned["resident"]
        assert estimate_memory(shape)["total"] == (planned["stages"]["update"]["total"]
                                                   - resident["kv_cache"]
                                                   - resident["rollout_tensors"])
    with pytest.raises(ValueError, match="setup"):
        estimate_memory(LLAMA_3_8B, "trl")
    doc = (REPO / "docs" / "memory.md").read_text()
    assert memory_table_markdown() in doc, "docs/memory.md is stale: python -m rlhf.memory"


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------
def test_unknown_or_missing_roles_are_clear_errors(batch):
    ids, mask = batch
    backbone = make_backbone("llama", seed=79)
    with pytest.raises(ValueError, match="unknown role 'actor'"):
        backbone.hidden_states(ids, mask, "actor")
    with pytest.raises(ValueError, match="unknown role"):
        backbone.trainable_parameters("reference")
    with pytest.raises(ValueError, match="unknown role"):
        backbone.merge_into_base("ref")
    with pytest.raises(ValueError, match="unknown role"):
        SharedBackbone.from_model(tiny_causal_lm("llama"), roles=("policy", "judge"))
    policy_only = SharedBackbone.from_model(tiny_causal_lm("llama", vocab_size=VOCAB),
                                            roles=("policy",))
    with pytest.raises(ValueError, match="no adapter"):
        policy_only.values(ids, mask)
    with pytest.raises(ValueError, match="no real token"):
        backbone.rewards(ids, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="attention_mask"):
        backbone.values(ids, mask[:, :-1])
    with pytest.raises(ValueError, match="lm_head"):
        LoraSpec(target_modules=["q_proj", "lm_head"])


def test_a_base_model_without_lm_head_is_refused():
    from transformers import AutoModel

    with pytest.raises(ValueError, match="no lm_head"):
        SharedBackbone.from_model(AutoModel.from_config(tiny_config("llama")))


def test_check_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    def tokenizer(n_words: int, pad: bool):
        vocab = {"<pad>": 0, "<unk>": 1, **{f"w{i}": i + 2 for i in range(n_words)}}
        raw = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
        raw.pre_tokenizer = Whitespace()
        return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>",
                                       pad_token="<pad>" if pad else None)

    backbone = make_backbone("gpt2", seed=83)
    check_tokenizer(backbone, tokenizer(VOCAB - 2, pad=True))  # fits exactly
    check_tokenizer(backbone.causal_lm, tokenizer(10, pad=True))
    with pytest.raises(ValueError, match="no pad token"):
        check_tokenizer(backbone, tokenizer(10, pad=False))
    with pytest.raises(ValueError, match=f"{VOCAB + 1} tokens but the model has only {VOCAB}"):
        check_tokenizer(backbone, tokenizer(VOCAB - 1, pad=True))


def test_as_role_runs_the_hf_model_with_that_adapter(batch):
    backbone = make_backbone("llama", seed=89)
    ids, mask = batch  # right padding: HF's default positions are right for real tokens
    with torch.no_grad():
        want_policy = backbone.policy_logits(ids, mask)
        want_reference = backbone.logits(ids, mask, role=None)
        backbone.values(ids, mask)
        with backbone.as_role("policy") as lm:
            got_policy = lm(input_ids=ids, attention_mask=mask).logits
            with backbone.as_role(None):
                got_reference = lm(input_ids=ids, attention_mask=mask).logits
            assert backbone.active_role == "policy"
    assert backbone.active_role == "critic"
    real = mask.bool()
    assert torch.equal(got_policy[real], want_policy[real])
    assert torch.equal(got_reference[real], want_reference[real])


def test_checkpointing_enabled_before_wrapping_becomes_adapter_aware():
    model = tiny_causal_lm("gpt2", vocab_size=VOCAB)
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable()
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    backbone = SharedBackbone.from_model(model, lora=SPEC)
    funcs = [m._gradient_checkpointing_func for m in backbone.causal_lm.modules()
             if getattr(m, "gradient_checkpointing", False) and backbone._find_lora_layers(m)]
    assert funcs and all(getattr(f, "_role_aware", False) for f in funcs)


# --------------------------------------------------------------------------------------------
# rlhf.models: the re-exports of the modules it was split into
# --------------------------------------------------------------------------------------------
def _names_read_from_rlhf_models(path: Path) -> set[str]:
    """The names ``path`` imports from rlhf.models or reads as ``models.<name>`` after
    ``from rlhf import models``."""
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    names, aliases = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "rlhf.models":
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module == "rlhf":
            aliases.update(alias.asname or alias.name for alias in node.names
                           if alias.name == "models")
    if aliases:
        names.update(node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                     and isinstance(node.value, ast.Name) and node.value.id in aliases)
    return names


def test_rlhf_models_still_has_every_name_the_repository_reads_from_it():
    import rlhf.models

    read = {}
    for folder in ("rlhf", "rlhf_kernels", "benchmarks", "scripts", "tests", "examples"):
        for path in (REPO / folder).rglob("*.py"):
            for name in _names_read_from_rlhf_models(path):
                read.setdefault(name, path.relative_to(REPO))
    assert {"SharedBackbone", "LoraSpec", "load_causal_lm", "_position_ids",
            "resolve_pretrained"} <= set(read), read  # the scan finds what it looks for
    missing = {name: str(path) for name, path in read.items() if not hasattr(rlhf.models, name)}
    assert not missing, f"rlhf.models no longer has these names the repository reads: {missing}"
