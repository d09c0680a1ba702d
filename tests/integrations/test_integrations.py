"""Framework drop-ins (rlhf_kernels.integrations) against the frameworks' own functions.

Each drop-in is compared with the function it replaces on random inputs: values, and gradients
where the framework's function is differentiable. The kernels' Triton path is forced (under the
interpreter on a CPU). A framework that is not importable skips its tests; the patch machinery
is tested on a small fake package that is always there.
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings

import pytest
import torch

from rlhf_kernels import integrations
from tests.numerics import DEVICE


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "triton")


def _close(ours, theirs, atol=1e-5, rtol=1e-4, name=""):
    assert torch.is_tensor(ours), f"{name}: got {type(ours).__name__}"
    theirs = torch.as_tensor(theirs)
    assert ours.shape == theirs.shape, f"{name}: shape {ours.shape} != {theirs.shape}"
    torch.testing.assert_close(ours.double(), theirs.double().to(ours.device), atol=atol,
                               rtol=rtol, msg=lambda m: f"{name}: {m}")


def _grads(fn, *inputs, weight=None):
    """d(sum(weight * fn(inputs))) / d inputs for every input that is a float tensor."""
    leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    out = fn(*leaves)
    out = out[0] if isinstance(out, tuple) else out
    scalar = out.sum() if weight is None else (out * weight).sum()
    params = [x for x in leaves if x.requires_grad]
    return out.detach(), torch.autograd.grad(scalar, params, allow_unused=True)


def _assert_same_grads(ours, theirs, atol=1e-5, rtol=1e-4, name=""):
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if b is None:
            assert a is None or not a.any(), f"{name}: input {i} has a gradient only in ours"
            continue
        _close(a, b, atol, rtol, f"{name} grad[{i}]")


def _mask(B, T, kind):
    """(B, T) float 0/1 masks: right padding, left padding, holes (each row >= 1 valid)."""
    lengths = torch.randint(1, T + 1, (B,))
    positions = torch.arange(T)
    if kind == "right":
        m = positions < lengths[:, None]
    elif kind == "left":
        m = positions >= (T - lengths)[:, None]
    else:
        m = torch.rand(B, T) < 0.7
        m[:, 0] = True
    return m.to(torch.float32).to(DEVICE)


def _rollout(B=3, T=11, spread=0.4):
    """old_logp, logp, advantages with log-ratios inside and outside the clip range."""
    old = -torch.rand(B, T, device=DEVICE) * 3
    logp = old + spread * torch.randn(B, T, device=DEVICE)
    advantages = torch.randn(B, T, device=DEVICE)
    return old, logp, advantages


# --------------------------------------------------------------------------------------------
# the patch machinery, on a fake framework
# --------------------------------------------------------------------------------------------
@pytest.fixture
def fake_framework(monkeypatch):
    """fakefw.core defines helper() and Loss.forward; fakefw.user imports helper by name;
    fakefw.core.REGISTRY holds it too. Removed from sys.modules afterwards."""
    core = types.ModuleType("fakefw.core")

    def helper(x):
        return x + 1

    class Loss:
        def forward(self, x):
            return x * 2

    core.helper, core.Loss, core.REGISTRY = helper, Loss, {"h": helper}
    package = types.ModuleType("fakefw")
    user = types.ModuleType("fakefw.user")
    user.helper = helper
    for name, module in (("fakefw", package), ("fakefw.core", core), ("fakefw.user", user)):
        monkeypatch.setitem(sys.modules, name, module)
    yield types.SimpleNamespace(core=core, user=user, helper=helper, forward=Loss.forward)
    for name in [m for m in sys.modules if m == "fakefw" or m.startswith("fakefw.")]:
        sys.modules.pop(name, None)
    integrations._ORIGINALS.pop(("fakefw.core", "helper"), None)
    integrations._ORIGINALS.pop(("fakefw.core", "Loss.forward"), None)


def _fake_targets():
    @integrations.dropin
    def helper(x):
        return x + 100 if x >= 0 else integrations.original("fakefw.core", "helper")(x)

    @integrations.dropin
    def forward(self, x):
        return x * 200

    return helper, forward, [("fakefw.core", "helper", helper),
                             ("fakefw.core", "Loss.forward", forward)]


def test_patch_replaces_every_reference_and_undo_restores(fake_framework):
    fw = fake_framework
    helper, forward, targets = _fake_targets()
    patch = integrations.apply_patch("Fake", "fakefw", targets)
    assert patch.patched == ["fakefw.core.helper", "fakefw.core.Loss.forward"]
    assert fw.core.helper is helper and fw.user.helper is helper
    assert fw.core.REGISTRY["h"] is helper
    assert fw.core.Loss().forward(1) == 200
    # an option the drop-in does not cover reaches the framework's own function
    assert fw.core.helper(-5) == -4
    # a module imported while patched takes the drop-in by name; undo finds it too
    late = types.ModuleType("fakefw.late")
    late.helper = fw.core.helper
    sys.modules["fakefw.late"] = late
    patch.undo()
    assert not patch.active
    assert fw.core.helper is fw.helper and fw.user.helper is fw.helper
    assert late.helper is fw.helper and fw.core.REGISTRY["h"] is fw.helper
    assert fw.core.Loss().forward(1) == 2
    patch.undo()  # idempotent
    assert fw.core.helper is fw.helper


def test_patch_is_a_context_manager_and_nests(fake_framework):
    fw = fake_framework
    helper, _, targets = _fake_targets()
    with integrations.apply_patch("Fake", "fakefw", targets) as outer:
        with integrations.apply_patch("Fake", "fakefw", targets):
            assert fw.core.helper is helper
            assert fw.core.helper(-5) == -4  # the original is still the framework's
        assert fw.core.helper is helper and outer.active
    assert fw.core.helper is fw.helper and fw.user.helper is fw.helper


def _holders(fw, *late):
    """Every reference to the helper the framework holds: its module, a by-name import, its
    registry, and modules imported later (which copied whatever the module held then)."""
    return [fw.core.helper, fw.user.helper, fw.core.REGISTRY["h"]] + [m.helper for m in late]


def _import_late(fw, name):
    module = types.ModuleType(f"fakefw.{name}")
    module.helper = fw.core.helper  # `from fakefw.core import helper` while patched
    sys.modules[module.__name__] = module
    return module


@pytest.mark.parametrize("same_dropin", [False, True], ids=["two drop-ins", "one drop-in"])
def test_nested_patches_undone_in_either_order_restore_the_framework(fake_framework,
                                                                     same_dropin):
    """patch A, patch B, A.undo(), B.undo(): B stays in force until it is undone, and then
    the framework's own functions are back everywhere (before: B.undo() put A's drop-in back,
    leaving the framework patched with both patches inactive; with one drop-in object for
    both, A.undo() unpatched the framework under the still active B)."""
    fw = fake_framework
    helper_a, _, targets_a = _fake_targets()
    helper_b, _, targets_b = (helper_a, None, targets_a) if same_dropin else _fake_targets()
    a = integrations.apply_patch("Fake", "fakefw", targets_a)
    during_a = _import_late(fw, "during_a")
    b = integrations.apply_patch("Fake", "fakefw", targets_b)
    during_both = _import_late(fw, "during_both")
    assert all(h is helper_b for h in _holders(fw, during_a, during_both))

    a.undo()
    assert not a.active and b.active
    assert all(h is helper_b for h in _holders(fw, during_a, during_both)), \
        "undoing the outer patch undid the inner one, still active"
    assert fw.core.Loss().forward(1) == 200
    during_b = _import_late(fw, "during_b")

    b.undo()
    assert not b.active
    assert all(h is fw.helper for h in _holders(fw, during_a, during_both, during_b)), \
        "a drop-in is left in the framework after every patch was undone"
    assert fw.core.Loss().forward(1) == 2
    a.undo(), b.undo()  # idempotent
    assert all(h is fw.helper for h in _holders(fw, during_a, during_both, during_b))


def test_a_reference_replaced_between_two_patches_is_kept(fake_framework):
    """patch A, someone else sets core.helper = X, patch B: undoing B puts X back (not A's
    drop-in), and undoing A then leaves X alone."""
    fw = fake_framework
    _, _, targets_a = _fake_targets()
    helper_b, _, targets_b = _fake_targets()
    a = integrations.apply_patch("Fake", "fakefw", targets_a)

    def theirs(x):
        return x

    fw.core.helper = theirs
    b = integrations.apply_patch("Fake", "fakefw", targets_b)
    assert fw.core.helper is helper_b
    b.undo()
    assert fw.core.helper is theirs
    a.undo()
    assert fw.core.helper is theirs and fw.user.helper is fw.helper


def test_three_patches_undone_middle_first(fake_framework):
    fw = fake_framework
    patches, helpers = [], []
    for _ in range(3):
        helper, _, targets = _fake_targets()
        patches.append(integrations.apply_patch("Fake", "fakefw", targets))
        helpers.append(helper)
    patches[1].undo()
    assert all(h is helpers[2] for h in _holders(fw))
    patches[2].undo()
    assert all(h is helpers[0] for h in _holders(fw)), "the remaining patch is not in force"
    assert patches[0].active
    patches[0].undo()
    assert all(h is fw.helper for h in _holders(fw))


def test_a_mocked_framework_function_is_kept_as_the_original(fake_framework):
    """A framework function replaced by a unittest.mock object (a framework's test suite does
    that) answers every attribute, the drop-in marker too: it is still the original the
    fallbacks reach and the one undo restores."""
    from unittest import mock

    fw = fake_framework
    mocked = mock.MagicMock(side_effect=lambda x: x + 1)
    fw.core.helper = mocked
    helper, _, targets = _fake_targets()
    with integrations.apply_patch("Fake", "fakefw", targets):
        assert fw.core.helper is helper
        assert fw.core.helper(-5) == -4  # the fallback reaches the mock
        mocked.assert_called_once_with(-5)
    assert fw.core.helper is mocked


def test_patch_skips_missing_targets_with_a_warning(fake_framework):
    helper, _, targets = _fake_targets()
    targets = targets + [("fakefw.core", "absent_in_this_version", helper),
                         ("fakefw_not_installed.mod", "fn", helper)]
    with pytest.warns(UserWarning, match="absent_in_this_version"):
        patch = integrations.apply_patch("Fake", "fakefw", targets)
    assert len(patch.skipped) == 2 and len(patch.patched) == 2
    patch.undo()
    with pytest.raises(ImportError, match="nothing of Fake could be patched"):
        integrations.apply_patch("Fake", "fakefw_not_installed", targets[-1:])


def test_patch_failing_midway_leaves_nothing_patched(fake_framework):
    class Broken:
        def __getattr__(self, name):
            raise RuntimeError("a framework module that fails in an unexpected way")

    fake_framework.core.Broken = Broken()
    helper, _, targets = _fake_targets()
    with pytest.raises(RuntimeError, match="unexpected way"):
        integrations.apply_patch("Fake", "fakefw", targets + [("fakefw.core", "Broken.x", helper)])
    assert fake_framework.core.helper is fake_framework.helper
    assert fake_framework.user.helper is fake_framework.helper
    assert fake_framework.core.Loss().forward(1) == 2


def test_importing_integrations_imports_no_framework():
    code = ("import sys, rlhf_kernels.integrations, rlhf_kernels.integrations.trl, "
            "rlhf_kernels.integrations.verl, rlhf_kernels.integrations.openrlhf; "
            "print([m for m in sys.modules if m.split('.')[0] in ('trl', 'verl', 'openrlhf')])")
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------------
# TRL
# --------------------------------------------------------------------------------------------
# Without the frameworks installed (as in CI) every comparison with a framework's function below
# skips, so these framework-free checks hold the drop-ins to closed forms written here in
# float64: the drop-in code itself always runs.
def _log_softmax64(logits, temperature):
    return torch.log_softmax(logits.double() / temperature, dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trl_dropins_against_closed_forms(dtype):
    from rlhf_kernels.integrations import trl as ours

    logits = (3 * torch.randn(2, 5, 37, device=DEVICE)).to(dtype)
    index = torch.randint(0, 37, (2, 5), device=DEVICE)
    row_mask = torch.rand(2, 5, device=DEVICE) < 0.7
    row_mask[0, 0], row_mask[0, 1] = False, True
    weight = torch.randn(2, 5, device=DEVICE)

    def logp64(x):  # TRL: log_softmax(x / T)[index], 0 where row_mask == 0
        gathered = _log_softmax64(x, 0.7).gather(-1, index.unsqueeze(-1)).squeeze(-1)
        return gathered * row_mask

    def entropy64(x, temperature=1.0):
        log_p = _log_softmax64(x, temperature)
        return -(log_p.exp() * log_p).sum(-1)

    # the gradient is stored in the logits' dtype: one rounding, relative to its size
    grad_tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    # keep_fp32: the kernels' fp32 result, held to the float64 closed form
    out, grad = _grads(
        lambda x: ours.selective_log_softmax(x, index, 0.7, row_mask, keep_fp32=True), logits,
        weight=weight)
    ref, ref_grad = _grads(logp64, logits, weight=weight)
    assert out.dtype == torch.float32
    _close(out, ref, name="selective_log_softmax")
    assert bool((out[~row_mask] == 0).all())
    _assert_same_grads(grad, ref_grad, name="d logits (logp)", **grad_tol)
    # by default: TRL's dtype for the call (the logits' on a CPU), that fp32 result rounded once
    default = ours.selective_log_softmax(logits, index, 0.7, row_mask)
    assert default.dtype == dtype
    assert torch.equal(default, out.to(dtype))

    out, grad = _grads(lambda x: ours.entropy_from_logits(x, keep_fp32=True), logits,
                       weight=weight)
    ref, ref_grad = _grads(entropy64, logits, weight=weight)
    _close(out, ref, name="entropy_from_logits")
    _assert_same_grads(grad, ref_grad, name="d logits (entropy)", **grad_tol)

    def pair(fn):
        def loss(x):
            logp, ent = fn(x)
            return logp * weight + 0.5 * ent
        return loss

    out, grad = _grads(pair(lambda x: ours.selective_log_softmax_and_entropy(
        x, index, True, 0.7, row_mask, keep_fp32=True)), logits)
    ref, ref_grad = _grads(pair(lambda x: (logp64(x), entropy64(x, 0.7) * row_mask)), logits)
    _close(out, ref, name="logp*w + H/2")
    _assert_same_grads(grad, ref_grad, name="d logits (pair)", **grad_tol)


@pytest.mark.parametrize("mode", ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "k3+",
                                  "k1+"])
def test_verl_kl_penalty_against_closed_forms(mode):
    from rlhf_kernels.integrations import verl as ours

    ref_logp = -torch.rand(3, 9, device=DEVICE) * 4
    logp = ref_logp + 3 * torch.randn(3, 9, device=DEVICE)
    # both of low_var_kl's clamps bite: the log-ratio's (+-20) and the result's (+-10)
    logp[0, :3] = ref_logp[0, :3] + torch.tensor([-25.0, 25.0, -12.0], device=DEVICE)
    weight = torch.randn(3, 9, device=DEVICE)
    base = mode.rstrip("+")

    def closed_form(a, b):  # veRL's definitions, in float64
        d = a.double() - b.double()
        if base in ("kl", "k1"):
            value = d
        elif base == "abs":
            value = d.abs()
        elif base in ("mse", "k2"):
            value = 0.5 * d * d
        else:  # low_var_kl: r = ref - logp clamped to +-20, exp(r) - r - 1 clamped to +-10
            r = (-d).clamp(-20.0, 20.0)
            value = (r.exp() - r - 1.0).clamp(-10.0, 10.0)
        if mode.endswith("+"):  # straight-through: this value, the gradient of k2
            k2 = 0.5 * d * d
            value = k2 - k2.detach() + value.detach()
        return value

    kl, grad = _grads(lambda a, b: ours.kl_penalty(a, b, mode), logp, ref_logp, weight=weight)
    ref, ref_grad = _grads(closed_form, logp, ref_logp, weight=weight)
    _close(kl, ref, name=mode)
    _assert_same_grads(grad, ref_grad, name=mode)


@pytest.fixture(scope="module")
def trl_utils():
    return pytest.importorskip("trl.trainer.utils")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature, with_row_mask", [(1.0, False), (0.7, True)])
def test_trl_selective_log_softmax(trl_utils, dtype, temperature, with_row_mask):
    from rlhf_kernels.integrations import trl as ours

    logits = (3 * torch.randn(2, 5, 37, device=DEVICE)).to(dtype)
    index = torch.randint(0, 37, (2, 5), device=DEVICE)
    row_mask = (torch.rand(2, 5, device=DEVICE) < 0.7) if with_row_mask else None
    weight = torch.randn(2, 5, device=DEVICE)
    # TRL's eager path computes in the logits' dtype; ours reads bf16 and computes in fp32, so
    # the framework's function is evaluated on the same values in float64 and ours keeps fp32
    # (the dtype contract itself: tests/integrations/test_framework_contracts.py).
    logp, grad = _grads(
        lambda x: ours.selective_log_softmax(x, index, temperature, row_mask, keep_fp32=True),
        logits, weight=weight)
    ref, ref_grad = _grads(
        lambda x: trl_utils.selective_log_softmax(x.double(), index, temperature, row_mask),
        logits, weight=weight,
    )
    assert logp.dtype == torch.float32
    _close(logp, ref, name="logp")
    _assert_same_grads(grad, ref_grad, atol=1e-5 if dtype == torch.float32 else 1e-2,
                       name="d logits")


def test_trl_entropy_and_fused_pair(trl_utils):
    from rlhf_kernels.integrations import trl as ours

    logits = 2 * torch.randn(3, 4, 29, device=DEVICE)
    index = torch.randint(0, 29, (3, 4), device=DEVICE)
    row_mask = torch.rand(3, 4, device=DEVICE) < 0.6
    weight = torch.randn(3, 4, device=DEVICE)
    entropy, grad = _grads(ours.entropy_from_logits, logits, weight=weight)
    ref, ref_grad = _grads(trl_utils.entropy_from_logits, logits, weight=weight)
    _close(entropy, ref, name="entropy")
    _assert_same_grads(grad, ref_grad, name="d logits (entropy)")

    def both(fn):
        def loss(x):
            logp, ent = fn(x, index, True, 1.3, row_mask)
            return logp * weight + 0.5 * ent

        return loss

    out, grad = _grads(both(ours.selective_log_softmax_and_entropy), logits)
    ref, ref_grad = _grads(both(trl_utils.selective_log_softmax_and_entropy), logits)
    _close(out, ref, name="logp*w + H/2")
    _assert_same_grads(grad, ref_grad, name="d logits (pair)")
    _, ent = ours.selective_log_softmax_and_entropy(logits.requires_grad_(), index, False)
    assert not ent.requires_grad


def test_trl_top_k_index_falls_back_to_trl(trl_utils):
    from rlhf_kernels.integrations import trl as ours

    logits = torch.randn(2, 3, 17, device=DEVICE)
    index = torch.randint(0, 17, (2, 3, 4), device=DEVICE)
    _close(ours.selective_log_softmax(logits, index),
           trl_utils.selective_log_softmax(logits, index))


def test_patch_trl_reaches_modules_that_imported_by_name(trl_utils):
    from rlhf_kernels.integrations import patch_trl
    from rlhf_kernels.integrations import trl as ours

    own = trl_utils.selective_log_softmax
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL warns that experimental APIs are unstable
        try:
            user = importlib.import_module("trl.experimental.sdft.loss_utils")
        except ImportError:
            user = None
    with patch_trl() as patch:
        assert trl_utils.selective_log_softmax is ours.selective_log_softmax
        assert trl_utils.entropy_from_logits is ours.entropy_from_logits
        if user is not None:
            assert user.selective_log_softmax is ours.selective_log_softmax
        logits = torch.randn(2, 9, device=DEVICE)
        index = torch.randint(0, 9, (2,), device=DEVICE)
        _close(trl_utils.selective_log_softmax(logits, index), own(logits, index))
    assert not patch.active and trl_utils.selective_log_softmax is own
    if user is not None:
        assert user.selective_log_softmax is own


# --------------------------------------------------------------------------------------------
# veRL
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def verl_core():
    return pytest.importorskip("verl.trainer.ppo.core_algos")


@pytest.fixture(scope="module")
def verl_f():
    return pytest.importorskip("verl.utils.torch_functional")


class _ActorConfig(dict):
    """The few fields veRL's policy loss reads, by attribute and by .get, as its configs do."""

    __getattr__ = dict.get


@pytest.mark.parametrize("kind", ["right", "left", "holes"])
def test_verl_gae(verl_core, kind):
    from rlhf_kernels.integrations import verl as ours

    B, T = 3, 13
    rewards = torch.randn(B, T, device=DEVICE)
    values = torch.randn(B, T, device=DEVICE)
    mask = _mask(B, T, kind)
    adv, ret = ours.compute_gae_advantage_return(rewards, values, mask, 0.97, 0.9)
    ref_adv, ref_ret = verl_core.compute_gae_advantage_return(rewards, values, mask, 0.97, 0.9)
    _close(adv, ref_adv, name="advantages")  # every position, masked ones included
    _close(ret, ref_ret, name="returns")


@pytest.mark.parametrize("mode", ["k1", "abs", "mse", "low_var_kl", "k3+", "k1+", "kl"])
def test_verl_kl_penalty(verl_core, mode):
    from rlhf_kernels.integrations import verl as ours

    ref_logp = -torch.rand(3, 9, device=DEVICE) * 4
    logp = ref_logp + 3 * torch.randn(3, 9, device=DEVICE)
    # both clamps bite: the log-ratio's (+-20) and the result's (+-10)
    logp[0, :3] = ref_logp[0, :3] + torch.tensor([-25.0, 25.0, -12.0], device=DEVICE)
    weight = torch.randn(3, 9, device=DEVICE)
    kl, grad = _grads(lambda a, b: ours.kl_penalty(a, b, mode), logp, ref_logp, weight=weight)
    ref, ref_grad = _grads(lambda a, b: verl_core.kl_penalty(a, b, mode), logp, ref_logp,
                           weight=weight)
    _close(kl, ref, name=mode)
    _assert_same_grads(grad, ref_grad, name=mode)


@pytest.mark.parametrize(
    "mode, batch_info",
    [
        ("token-mean", {}),
        ("seq-mean-token-mean", {}),
        ("seq-mean-token-sum", {}),
        ("seq-mean-token-sum-norm", {}),
        ("token-mean", {"dp_size": 2, "batch_num_tokens": 57}),
        ("seq-mean-token-mean", {"dp_size": 4, "global_batch_size": 9}),
        ("seq-mean-token-sum-norm", {"dp_size": 2, "global_batch_size": 7,
                                     "loss_scale_factor": 32}),
        ("token-sum", {}),  # veRL 0.9.1: the masked sum times dp_size
    ],
)
def test_verl_policy_loss_vanilla(verl_core, mode, batch_info):
    from rlhf_kernels.integrations import verl as ours

    old, logp, advantages = _rollout()
    mask = _mask(3, 11, "holes")
    mask[1] = 0  # a fully masked row is excluded from the sequence means
    config = _ActorConfig(clip_ratio=0.2, clip_ratio_low=0.15, clip_ratio_high=0.28,
                          clip_ratio_c=3.0, global_batch_info=batch_info)

    def loss_fn(fn):
        return lambda lp: fn(old, lp, advantages, mask, mode, config)[0]

    loss, grad = _grads(loss_fn(ours.compute_policy_loss_vanilla), logp)
    ref, ref_grad = _grads(loss_fn(verl_core.compute_policy_loss_vanilla), logp)
    _close(loss, ref, name=f"{mode} loss")
    _assert_same_grads(grad, ref_grad, name=f"{mode} d logp")
    _, metrics = ours.compute_policy_loss_vanilla(old, logp, advantages, mask, mode, config)
    _, ref_metrics = verl_core.compute_policy_loss_vanilla(old, logp, advantages, mask, mode,
                                                           config)
    assert metrics.keys() == ref_metrics.keys()
    for key in metrics:
        assert metrics[key] == pytest.approx(ref_metrics[key], abs=1e-6), key


def _rollout_correction_weights(shape, generator=None):
    """veRL's rollout correction weights: truncated importance ratios in (0, 2], and 0 for the
    tokens its rejection step drops."""
    weights = (torch.rand(shape, generator=generator) * 2).to(DEVICE)
    weights[:, ::4] = 0.0
    return weights


@pytest.mark.parametrize("loss", ["vanilla", "cispo"])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_verl_policy_loss_with_rollout_correction_weights(verl_core, monkeypatch, loss, mode):
    """rollout_is_weights (veRL's rollout correction): the drop-in computes the call (no
    fallback) and gives veRL's loss, gradient and metrics, zero weights included."""
    from rlhf_kernels.integrations import verl as ours

    old, logp, advantages = _rollout(spread=0.6)
    mask = _mask(3, 11, "holes")
    weights = _rollout_correction_weights(mask.shape)
    fields = dict(clip_ratio=0.2, clip_ratio_low=0.15, clip_ratio_high=0.28, clip_ratio_c=3.0,
                  global_batch_info={})
    if loss == "cispo":  # veRL's CISPO checks the config's type
        from tests.integrations.test_integrations_critic_free import _verl_actor_config

        config = _verl_actor_config(**fields)
    else:
        config = _ActorConfig(**fields)
    name = f"compute_policy_loss_{loss}"

    def loss_fn(fn):
        return lambda lp: fn(old, lp, advantages, mask, mode, config, weights)[0]

    monkeypatch.setattr(ours, "original", lambda *a: pytest.fail(f"{a} fell back to veRL"))
    loss_value, grad = _grads(loss_fn(getattr(ours, name)), logp)
    _, metrics = getattr(ours, name)(old, logp, advantages, mask, mode, config, weights)
    monkeypatch.undo()
    ref, ref_grad = _grads(loss_fn(getattr(verl_core, name)), logp)
    _close(loss_value, ref, name=f"{loss} {mode} loss")
    _assert_same_grads(grad, ref_grad, name=f"{loss} {mode} d logp")
    _, ref_metrics = getattr(verl_core, name)(old, logp, advantages, mask, mode, config, weights)
    for key in ref_metrics:
        assert metrics[key] == pytest.approx(ref_metrics[key], abs=1e-6), key


def test_verl_vanilla_with_rollout_correction_weights_against_the_closed_form():
    """Framework-free: veRL's vanilla loss with rollout correction weights, written out in
    float64 (clipped surrogate, dual clip at c for A < 0, each token times its weight, token
    mean), and its clip fractions counted on the unweighted advantages."""
    from rlhf_kernels.integrations import verl as ours

    old, logp, advantages = _rollout(spread=0.6)
    mask = _mask(3, 11, "holes")
    mask[0, 1], advantages[0, 1], logp[0, 1] = 1.0, -1.0, old[0, 1] + 1.5  # the dual clip bites
    weights = _rollout_correction_weights(mask.shape)
    low, high, c = 0.15, 0.28, 3.0
    config = _ActorConfig(clip_ratio=0.2, clip_ratio_low=low, clip_ratio_high=high,
                          clip_ratio_c=c, global_batch_info={})

    def closed_form(lp):
        a, w, m = advantages.double(), weights.double(), mask.double()
        ratio = torch.exp((lp.double() - old.double()).clamp(-20, 20))
        loss1, loss2 = -a * ratio, -a * ratio.clamp(1 - low, 1 + high)
        clipped = torch.maximum(loss1, loss2)
        per_token = torch.where(a < 0, torch.minimum(clipped, -a * c), clipped)
        fractions = ((loss2 > loss1).double() * m).sum() / m.sum(), (
            ((clipped > -a * c) & (a < 0)).double() * m).sum() / m.sum()
        return (per_token * w * m).sum() / m.sum(), fractions

    loss_value, grad = _grads(
        lambda lp: ours.compute_policy_loss_vanilla(old, lp, advantages, mask, "token-mean",
                                                    config, weights)[0], logp)
    ref, ref_grad = _grads(lambda lp: closed_form(lp)[0], logp)
    _close(loss_value, ref, name="loss")
    _assert_same_grads(grad, ref_grad, name="d logp")
    _, metrics = ours.compute_policy_loss_vanilla(old, logp, advantages, mask, "token-mean",
                                                  config, weights)
    clipfrac, lower = closed_form(logp)[1]
    assert metrics["actor/pg_clipfrac"] == pytest.approx(clipfrac.item(), abs=1e-6)
    assert metrics["actor/pg_clipfrac_lower"] == pytest.approx(lower.item(), abs=1e-6)
    assert 0 < clipfrac < 1 and 0 < lower < 1  # both clips bite somewhere


def test_verl_policy_loss_deprecated_form(verl_core):
    from rlhf_kernels.integrations import verl as ours

    old, logp, advantages = _rollout(spread=0.6)
    mask = _mask(3, 11, "right")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # veRL marks this entry point deprecated
        args = (0.2, None, 0.3, 2.5, "seq-mean-token-mean")
        out, grad = _grads(lambda lp: ours.compute_policy_loss(old, lp, advantages, mask, *args),
                           logp)
        ref, ref_grad = _grads(
            lambda lp: verl_core.compute_policy_loss(old, lp, advantages, mask, *args), logp
        )
        stats = ours.compute_policy_loss(old, logp, advantages, mask, *args)[1:]
        ref_stats = verl_core.compute_policy_loss(old, logp, advantages, mask, *args)[1:]
    _close(out, ref, name="loss")
    _assert_same_grads(grad, ref_grad, name="d logp")
    for name, a, b in zip(("clipfrac", "ppo_kl", "clipfrac_lower"), stats, ref_stats):
        _close(a, b, atol=1e-6, name=name)


@pytest.mark.parametrize(
    "mode, options",
    [("token-mean", {}), ("seq-mean-token-sum", {}), ("seq-mean-token-sum-norm", {}),
     ("token-mean", {"dp_size": 2, "batch_num_tokens": 40}),
     ("seq-mean-token-mean", {"dp_size": 2, "global_batch_size": 8})],
)
def test_verl_value_loss(verl_core, mode, options):
    from rlhf_kernels.integrations import verl as ours

    B, T = 3, 10
    returns = torch.randn(B, T, device=DEVICE)
    old_values = returns + 0.5 * torch.randn(B, T, device=DEVICE)
    vpreds = old_values + 0.4 * torch.randn(B, T, device=DEVICE)
    mask = _mask(B, T, "right")

    def loss_fn(fn):
        return lambda v: fn(v, returns, old_values, mask, 0.2, mode, **options)[0]

    loss, grad = _grads(loss_fn(ours.compute_value_loss), vpreds)
    ref, ref_grad = _grads(loss_fn(verl_core.compute_value_loss), vpreds)
    _close(loss, ref, name="vf_loss")
    _assert_same_grads(grad, ref_grad, name="d vpreds")
    clipfrac = ours.compute_value_loss(vpreds, returns, old_values, mask, 0.2, mode, **options)[1]
    ref_clipfrac = verl_core.compute_value_loss(vpreds, returns, old_values, mask, 0.2, mode,
                                                **options)[1]
    _close(clipfrac, ref_clipfrac, atol=1e-6, name="vf_clipfrac")
    _close(clipfrac, _verl_value_clipfrac64(vpreds, returns, old_values, mask, 0.2), atol=1e-6,
           name="vf_clipfrac, float64")


def _verl_value_clipfrac64(vpreds, returns, values, mask, clip):
    """veRL's vf_clipfrac in float64: the prediction clamped into values +- clip against the
    prediction itself, averaged over the valid tokens."""
    v, r, old = vpreds.double(), returns.double(), values.double()
    clipped = torch.maximum(torch.minimum(v, old + clip), old - clip)
    over = ((clipped - r) ** 2 > (v - r) ** 2).double()
    return (over * mask).sum() / mask.sum()


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.bool, torch.int64])
def test_verl_value_clipfrac_counts_no_unclipped_token(mask_dtype):
    """Two unclipped tokens (|v - old| < 0.2) where old + (v - old) is an ulp off v in fp32, the
    op's clipping form: the drop-in counted them as clipped (vf_clipfrac 0.8 instead of veRL's
    0.4). Then a clipped token whose clipped loss is smaller (not counted), two clipped tokens
    whose clipped loss is larger (counted) and a masked one."""
    from rlhf_kernels.integrations import verl as ours

    vpreds = torch.tensor([[-0.022092705592513084, 0.05772486701607704, 1.0, 1.0, -1.0, 1.0]])
    values = torch.tensor([[0.16318640112876892, 0.23107324540615082, 0.0, 0.0, 0.0, 0.0]])
    returns = torch.tensor([[-0.10240978747606277, 0.725506067276001, 0.5, 2.0, -3.0, 2.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]]).to(mask_dtype)
    vpreds, values, returns, mask = (t.to(DEVICE) for t in (vpreds, values, returns, mask))
    assert ((vpreds - values).abs()[0, :2] < 0.2).all()
    assert not torch.equal(values + (vpreds - values), vpreds)  # the rounding trap is there
    expected = _verl_value_clipfrac64(vpreds, returns, values, mask, 0.2)
    assert expected.item() == pytest.approx(0.4)
    for mode in ("token-mean", "seq-mean-token-mean"):
        _, clipfrac = ours.compute_value_loss(vpreds, returns, values, mask, 0.2, mode)
        assert clipfrac.dtype == torch.float32
        assert clipfrac.item() == pytest.approx(expected.item(), abs=1e-7), mode


def test_verl_logprobs_and_entropy(verl_f):
    from rlhf_kernels.integrations import verl as ours

    logits = 2 * torch.randn(2, 6, 41, device=DEVICE)
    labels = torch.randint(0, 41, (2, 6), device=DEVICE)
    weight = torch.randn(2, 6, device=DEVICE)
    for name, fn, ref_fn in [
        ("logprobs", lambda x: ours.logprobs_from_logits(x, labels, inplace_backward=False),
         lambda x: verl_f.logprobs_from_logits(x, labels, inplace_backward=False)),
        ("entropy", ours.entropy_from_logits, verl_f.entropy_from_logits),
        ("entropy_chunked",
         lambda x: ours.entropy_from_logits_with_chunking(x.reshape(-1, 41), 5).view(2, 6),
         lambda x: verl_f.entropy_from_logits_with_chunking(x.reshape(-1, 41), 5).view(2, 6)),
    ]:
        out, grad = _grads(fn, logits, weight=weight)
        ref, ref_grad = _grads(ref_fn, logits, weight=weight)
        _close(out, ref, name=name)
        _assert_same_grads(grad, ref_grad, name=name)


def test_patch_verl_swaps_registries(verl_core, verl_f):
    from rlhf_kernels.integrations import patch_verl
    from rlhf_kernels.integrations import verl as ours

    own_gae = verl_core.compute_gae_advantage_return
    own_vanilla = verl_core.get_policy_loss_fn("vanilla")
    with patch_verl():
        assert verl_core.get_adv_estimator_fn("gae") is ours.compute_gae_advantage_return
        assert verl_core.get_policy_loss_fn("vanilla") is ours.compute_policy_loss_vanilla
        assert verl_f.logprobs_from_logits is ours.logprobs_from_logits
        # veRL's own callers go through the module attribute
        logits = torch.randn(2, 3, 7, device=DEVICE)
        _close(verl_core.compute_entropy_loss(logits, torch.ones(2, 3, device=DEVICE)),
               ours.entropy_from_logits(logits).mean(), name="compute_entropy_loss")
    assert verl_core.compute_gae_advantage_return is own_gae
    assert verl_core.get_adv_estimator_fn("gae") is own_gae
    assert verl_core.get_policy_loss_fn("vanilla") is own_vanilla


# --------------------------------------------------------------------------------------------
# OpenRLHF
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def openrlhf_utils():
    return pytest.importorskip("openrlhf.models.utils")


@pytest.fixture(scope="module")
def openrlhf_loss():
    return pytest.importorskip("openrlhf.models.loss")


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("unbiased", [False, True])
def test_openrlhf_approx_kl(openrlhf_utils, estimator, unbiased):
    from rlhf_kernels.integrations import openrlhf as ours

    base = -torch.rand(3, 16, device=DEVICE) * 4
    logp = base + 2 * torch.randn(3, 16, device=DEVICE)
    # the k3 bounds: below -10, between 10 and 11, beyond 11 (and the clamp of every estimator)
    logp[0, :6] = base[0, :6] + torch.tensor([-30.0, -10.5, -9.0, 10.5, 10.99, 14.0],
                                              device=DEVICE)
    old = logp + 0.3 * torch.randn(3, 16, device=DEVICE)
    weight = torch.randn(3, 16, device=DEVICE)

    def kl(fn):
        return lambda a, b: fn(a, b, old if unbiased else None, estimator, unbiased)

    out, grad = _grads(kl(ours.compute_approx_kl), logp, base, weight=weight)
    ref, ref_grad = _grads(kl(openrlhf_utils.compute_approx_kl), logp, base, weight=weight)
    _close(out, ref, name=estimator)
    _assert_same_grads(grad, ref_grad, name=estimator)


def test_openrlhf_logprobs_and_entropy(openrlhf_utils):
    from rlhf_kernels.integrations import openrlhf as ours

    logits = 2 * torch.randn(2, 7, 31, device=DEVICE)
    labels = torch.randint(0, 31, (2, 7), device=DEVICE)
    weight = torch.randn(2, 7, device=DEVICE)
    # OpenRLHF divides the caller's logits in place, so each side gets its own copy
    out, grad = _grads(lambda x: ours.log_probs_from_logits(x * 1, labels, 0.8), logits,
                       weight=weight)
    ref, ref_grad = _grads(lambda x: openrlhf_utils.log_probs_from_logits(x * 1, labels, 0.8),
                           logits, weight=weight)
    _close(out, ref, name="logp")
    _assert_same_grads(grad, ref_grad, name="d logits")
    scaled = logits.clone()
    ours.log_probs_from_logits(scaled, labels, 0.8)
    _close(scaled, logits / 0.8, name="logits scaled in place")

    compute_entropy = openrlhf_utils.compute_entropy
    # the framework's function is torch.compile'd; compare with the function it wraps
    compute_entropy = getattr(compute_entropy, "_torchdynamo_orig_callable", compute_entropy)
    out, grad = _grads(ours.compute_entropy, logits, weight=weight)
    ref, ref_grad = _grads(compute_entropy, logits, weight=weight)
    _close(out, ref, name="entropy")
    _assert_same_grads(grad, ref_grad, name="d logits (entropy)")


@pytest.mark.parametrize(
    "dual_clip, token_level, options",
    [(None, True, {}), (3.0, True, {}), (None, False, {}),
     (3.0, True, {"dp_size": 2, "batch_num_tokens": 50.0}),
     (None, False, {"dp_size": 4, "global_batch_size": 10.0})],
)
def test_openrlhf_policy_loss(openrlhf_loss, dual_clip, token_level, options):
    from rlhf_kernels.integrations import openrlhf as ours

    module = openrlhf_loss.PolicyLoss(0.2, 0.28, dual_clip=dual_clip, token_level_loss=token_level)
    old, logp, advantages = _rollout(spread=0.5)
    logp[0, 0] = old[0, 0] + 25.0  # ratio clamp; ppo_kl takes the raw log-ratio
    mask = _mask(3, 11, "holes")

    def loss_fn(fn):
        return lambda lp: fn(module, lp, old, advantages, mask, None, **options)[0]

    loss, grad = _grads(loss_fn(ours.policy_loss_forward), logp)
    ref, ref_grad = _grads(loss_fn(openrlhf_loss.PolicyLoss.forward), logp)
    _close(loss, ref, name="loss")
    _assert_same_grads(grad, ref_grad, name="d logp")
    stats = ours.policy_loss_forward(module, logp, old, advantages, mask, None, **options)
    ref_stats = module(logp, old, advantages, mask, None, **options)
    for name, a, b in zip(("clip_ratio", "ppo_kl"), stats[1:3], ref_stats[1:3]):
        _close(a, b, atol=1e-6, name=name)
    assert stats[3:] == (None, None) == tuple(ref_stats[3:])


# OpenRLHF's train/rollout correction: (policy_loss_type, level, mode, gating, threshold)
_CORRECTIONS = [
    ("ppo", "token", "mask", "ratio", (0.5, 1.6)),
    # a row's log-ratio mean has std ~0.3 / sqrt(7.7 tokens) = 0.11: a band of +-0.073 keeps
    # half the 16 rows, so all or none are filtered with probability 2 x 0.5^16 (the band
    # (0.95, 1.05) filtered every row with probability 0.65^16 = 1e-3, a failure seen)
    ("ppo", "seq", "mask", "ratio", (0.93, 1.075)),
    ("ppo", "token", "clip", "ratio", (0.7, 1.3)),
    ("ppo", "token", "mask", "binary_kl", (0.0, 0.02)),
    ("ppo", "seq", "mask", "tv", (0.0, 0.075)),
    ("gspo", "token", "mask", "ratio", (0.5, 5.0)),
]


@pytest.mark.parametrize("loss_type, level, mode, gating, threshold", _CORRECTIONS)
@pytest.mark.parametrize("dual_clip, token_level", [(None, True), (3.0, False)])
def test_openrlhf_policy_loss_with_rollout_correction(openrlhf_loss, monkeypatch, loss_type,
                                                      level, mode, gating, threshold,
                                                      dual_clip, token_level):
    """is_correction_level != "off" (vLLM rollout log-probs): computed by the kernels, no
    fallback, with OpenRLHF's loss, gradient and all four statistics, including filtered
    (coefficient 0) tokens and sequences."""
    from rlhf_kernels.integrations import openrlhf as ours

    module = openrlhf_loss.PolicyLoss(
        0.2, 0.28, dual_clip=dual_clip, token_level_loss=token_level, policy_loss_type=loss_type,
        is_correction_level=level, is_correction_mode=mode, is_correction_gating=gating,
        is_correction_threshold=threshold)
    old, logp, advantages = _rollout(B=16, spread=0.5)
    rollout = old + 0.3 * torch.randn_like(old)  # the inference engine's log-probs
    mask = _mask(16, 11, "holes")
    args = (old, advantages, mask, rollout)

    monkeypatch.setattr(ours, "original", lambda *a: pytest.fail(f"{a} fell back to OpenRLHF"))
    loss, grad = _grads(lambda lp: ours.policy_loss_forward(module, lp, *args)[0], logp)
    stats = ours.policy_loss_forward(module, logp, *args)
    monkeypatch.undo()
    ref, ref_grad = _grads(lambda lp: openrlhf_loss.PolicyLoss.forward(module, lp, *args)[0],
                           logp)
    ref_stats = module(logp, *args)
    _close(loss, ref, name="loss")
    _assert_same_grads(grad, ref_grad, name="d logp")
    for name, a, b in zip(("clip_ratio", "ppo_kl", "vllm_kl", "is_filter_ratio"), stats[1:],
                          ref_stats[1:]):
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == b.dtype, name
        _close(a, b, atol=1e-6, name=name)
    if loss_type == "ppo":
        assert 0 < ref_stats[4] < 1, "the band filters some tokens or sequences, not all"


def test_openrlhf_rollout_correction_against_the_closed_form():
    """Framework-free: OpenRLHF's token-level "mask" correction written out in float64 (each
    token's clipped surrogate times its ratio pi_old / pi_rollout inside the band, 0 outside;
    token mean), and clip_ratio counted on the unweighted advantages."""
    from rlhf_kernels.integrations import openrlhf as ours

    low, high = 0.8, 1.25
    module = types.SimpleNamespace(
        clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=None, token_level_loss=True,
        policy_loss_type="ppo", is_correction_level="token", is_correction_mode="mask",
        is_correction_gating="ratio", is_correction_threshold=(low, high))
    old, logp, advantages = _rollout(spread=0.5)
    rollout = old + 0.3 * torch.randn_like(old)
    mask = _mask(3, 11, "holes")

    def closed_form(lp):
        a, m = advantages.double(), mask.double()
        ratio = (lp.double() - old.double()).clamp(-20, 20).exp()
        surr1, surr2 = ratio * a, ratio.clamp(0.8, 1.28) * a
        is_ratio = (old.double() - rollout.double()).exp()
        coefficient = torch.where((is_ratio >= low) & (is_ratio <= high), is_ratio, 0.0)
        loss = (-torch.minimum(surr1, surr2) * coefficient * m).sum() / m.sum()
        return loss, ((surr2 < surr1).double() * m).sum() / m.sum()

    loss, grad = _grads(
        lambda lp: ours.policy_loss_forward(module, lp, old, advantages, mask, rollout)[0], logp)
    ref, ref_grad = _grads(lambda lp: closed_form(lp)[0], logp)
    _close(loss, ref, name="loss")
    _assert_same_grads(grad, ref_grad, name="d logp")
    clip_ratio = ours.policy_loss_forward(module, logp, old, advantages, mask, rollout)[1]
    _close(clip_ratio, closed_form(logp)[1], atol=1e-6, name="clip_ratio")


@pytest.mark.parametrize("clip_eps, token_level", [(0.2, True), (None, True), (0.3, False)])
def test_openrlhf_value_and_reward_losses(openrlhf_loss, clip_eps, token_level):
    from rlhf_kernels.integrations import openrlhf as ours

    module = openrlhf_loss.ValueLoss(clip_eps, token_level_loss=token_level)
    returns = torch.randn(3, 9, device=DEVICE)
    old_values = returns + 0.5 * torch.randn(3, 9, device=DEVICE)
    values = old_values + 0.4 * torch.randn(3, 9, device=DEVICE)
    mask = _mask(3, 9, "left")
    loss, grad = _grads(lambda v: ours.value_loss_forward(module, v, old_values, returns, mask),
                        values)
    ref, ref_grad = _grads(lambda v: module(v, old_values, returns, mask), values)
    _close(loss, ref, name="value loss")
    _assert_same_grads(grad, ref_grad, name="d values")

    chosen, rejected = torch.randn(6, device=DEVICE), torch.randn(6, device=DEVICE)
    margin = torch.rand(6, device=DEVICE)
    # LogExpLoss takes a margin and ignores it; so must the drop-in
    for ours_fn, cls in [(ours.pairwise_loss_forward, openrlhf_loss.PairWiseLoss),
                         (ours.log_exp_loss_forward, openrlhf_loss.LogExpLoss)]:
        out, grad = _grads(lambda c, r, f=ours_fn: f(None, c, r, margin), chosen, rejected)
        ref, ref_grad = _grads(lambda c, r, k=cls: k()(c, r, margin), chosen, rejected)
        _close(out, ref, name=cls.__name__)
        _assert_same_grads(grad, ref_grad, name=cls.__name__)


@pytest.mark.parametrize("kind", ["right", "left", "holes"])
def test_openrlhf_gae_and_returns(kind):
    experience = pytest.importorskip("openrlhf.trainer.ppo_utils.experience_maker")
    from rlhf_kernels.integrations import openrlhf as ours

    maker = experience.RemoteExperienceMaker
    B, T = 3, 12
    values, rewards = torch.randn(B, T, device=DEVICE), torch.randn(B, T, device=DEVICE)
    mask = _mask(B, T, kind)
    adv, ret = ours.get_advantages_and_returns(None, values, rewards, mask, 0.99, 0.95)
    ref_adv, ref_ret = maker.get_advantages_and_returns(None, values, rewards, mask, 0.99, 0.95)
    _close(adv, ref_adv, name="advantages")
    _close(ret, ref_ret, name="returns")
    _close(ours.get_cumulative_returns(None, rewards, mask, 0.9),
           maker.get_cumulative_returns(None, rewards, mask, 0.9), name="cumulative returns")


def test_patch_openrlhf(openrlhf_utils, openrlhf_loss):
    from rlhf_kernels.integrations import openrlhf as ours
    from rlhf_kernels.integrations import patch_openrlhf

    own_forward = openrlhf_loss.PolicyLoss.forward
    own_kl = openrlhf_utils.compute_approx_kl
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the experience maker needs Ray; skipped without it
        patch = patch_openrlhf()
    with patch:
        module = openrlhf_loss.PolicyLoss()
        assert openrlhf_loss.PolicyLoss.forward is ours.policy_loss_forward
        assert openrlhf_utils.compute_approx_kl is ours.compute_approx_kl
        old, logp, advantages = _rollout()
        _close(module(logp, old, advantages)[0], own_forward(module, logp, old, advantages)[0],
               name="patched PolicyLoss")
    assert openrlhf_loss.PolicyLoss.forward is own_forward
    assert openrlhf_utils.compute_approx_kl is own_kl
