"""unpatch_trl / unpatch_verl / unpatch_openrlhf: every active patch of a framework undone at
once, each replaced object restored by identity.

veRL and OpenRLHF are replaced by stand-in packages holding one distinct object under every name
their patch targets (plus a module that imported a function by name, the registries, and a
module imported while patched), so these tests run whatever is installed.
"""

from __future__ import annotations

import sys
import types
import warnings

import pytest

from rlhf_kernels import integrations
from rlhf_kernels.integrations import openrlhf as our_openrlhf
from rlhf_kernels.integrations import trl as our_trl
from rlhf_kernels.integrations import verl as our_verl


def _stand_in_package(monkeypatch, package, targets):
    """Modules for every target, each attribute a new object (a class for dotted paths) ->
    {(module, path): (owner, name, original)}."""
    slots = {}
    for module_name, path, _ in targets:
        parts = module_name.split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            if not isinstance(sys.modules.get(name), _StandIn):
                monkeypatch.setitem(sys.modules, name, _StandIn(name))
        owner = sys.modules[module_name]
        *classes, attr = path.split(".")
        for cls in classes:
            if not hasattr(owner, cls):
                setattr(owner, cls, type(cls, (), {}))
            owner = getattr(owner, cls)

        def fn(*args, **kwargs):
            return "framework"

        fn.__name__ = attr
        setattr(owner, attr, fn)
        slots[(module_name, path)] = (owner, attr, fn)
    assert all(m.startswith(package) for m, _, _ in targets)
    return slots


class _StandIn(types.ModuleType):
    pass


@pytest.fixture
def stand_ins(monkeypatch):
    """Stand-in veRL and OpenRLHF; the kept originals are this test's own."""
    monkeypatch.setattr(integrations, "_ORIGINALS", {})
    monkeypatch.setattr(integrations, "_ACTIVE", {})
    verl = _stand_in_package(monkeypatch, "verl", our_verl._patch_targets(False))
    core = sys.modules["verl.trainer.ppo.core_algos"]
    core.POLICY_LOSS_REGISTRY = {key: getattr(core, fn.__name__)
                                 for key, fn in our_verl.POLICY_LOSSES.items()}
    core.ADV_ESTIMATOR_REGISTRY = {key: getattr(core, fn.__name__)
                                   for key, fn in our_verl.ADVANTAGE_ESTIMATORS.items()}
    losses = _StandIn("verl.workers.utils.losses")  # `from core_algos import kl_penalty`
    losses.kl_penalty, losses.compute_value_loss = core.kl_penalty, core.compute_value_loss
    monkeypatch.setitem(sys.modules, losses.__name__, losses)
    openrlhf = _stand_in_package(monkeypatch, "openrlhf", our_openrlhf._patch_targets(False))
    trainer = _StandIn("openrlhf.trainer.ppo_trainer")  # `from models.utils import ...`
    trainer.compute_approx_kl = sys.modules["openrlhf.models.utils"].compute_approx_kl
    monkeypatch.setitem(sys.modules, trainer.__name__, trainer)
    yield {"verl": verl, "openrlhf": openrlhf}
    for name in [m for m in sys.modules if isinstance(sys.modules[m], _StandIn)]:
        sys.modules.pop(name)


def _snapshot(package):
    """id of every object held by a loaded module of the package or by a module-level dict of
    one, by (container, key)."""
    held = {}
    for name, module in list(sys.modules.items()):
        if name == package or name.startswith(package + "."):
            for key, value in vars(module).items():
                held[(name, key)] = value
                if isinstance(value, dict) and not key.startswith("__"):
                    held.update({(name, key, k): v for k, v in value.items()})
                if isinstance(value, type):
                    held.update({(name, key, k): v for k, v in vars(value).items()})
    return held


FRAMEWORKS = {
    "verl": (integrations.patch_verl, integrations.unpatch_verl),
    "openrlhf": (integrations.patch_openrlhf, integrations.unpatch_openrlhf),
}


def _patch(framework, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every target of the stand-in is there
        return FRAMEWORKS[framework][0](**kwargs)


def _assert_restored(framework, before, slots):
    after = _snapshot(framework)
    changed = [key for key in before if after.get(key) is not before[key]]
    assert not changed, f"not restored to the very same objects: {changed}"
    for owner, name, fn in slots.values():
        assert getattr(owner, name) is fn
        assert not integrations._is_dropin(getattr(owner, name))


@pytest.mark.parametrize("framework", list(FRAMEWORKS))
def test_unpatch_restores_every_original_and_patches_again(stand_ins, framework):
    slots, unpatch = stand_ins[framework], FRAMEWORKS[framework][1]
    before = _snapshot(framework)
    patch = _patch(framework)
    assert sorted(patch.patched) == sorted(f"{m}.{p}" for m, p in slots)
    assert all(integrations._is_dropin(getattr(o, n)) for o, n, _ in slots.values())
    # a module imported while patched copies the drop-in by name; unpatch finds it too
    late = _StandIn(f"{framework}.late")
    module_name, path = next(iter(slots))
    late.fn = getattr(sys.modules[module_name], path) if "." not in path else None
    sys.modules[late.__name__] = late
    unpatch()
    assert not patch.active
    assert late.fn is None or late.fn is slots[(module_name, path)][2]
    del sys.modules[late.__name__]
    _assert_restored(framework, before, slots)
    unpatch()  # idempotent
    _assert_restored(framework, before, slots)
    patch.undo()  # and the Patch agrees
    _assert_restored(framework, before, slots)

    again = _patch(framework)  # patch -> unpatch -> patch
    assert all(integrations._is_dropin(getattr(o, n)) for o, n, _ in slots.values())
    # the fallbacks still reach the framework's own functions
    for (module_name, path), (_, _, fn) in slots.items():
        assert integrations.original(module_name, path) is fn
    unpatch()
    assert not again.active
    _assert_restored(framework, before, slots)


@pytest.mark.parametrize("framework", list(FRAMEWORKS))
def test_unpatch_undoes_every_active_patch(stand_ins, framework):
    slots, unpatch = stand_ins[framework], FRAMEWORKS[framework][1]
    before = _snapshot(framework)
    first, undone, last = (_patch(framework), _patch(framework, keep_fp32=True),
                           _patch(framework))
    undone.undo()
    unpatch()
    assert not (first.active or last.active)
    _assert_restored(framework, before, slots)
    # the other framework's patch is not touched
    other = next(f for f in FRAMEWORKS if f != framework)
    kept = _patch(other)
    unpatch()
    assert kept.active
    FRAMEWORKS[other][1]()
    assert not kept.active


def test_unpatch_without_a_patch_is_a_no_op_and_imports_nothing(monkeypatch):
    monkeypatch.setattr(integrations, "_ACTIVE", {})
    loaded = set(sys.modules)
    for unpatch in (integrations.unpatch_verl, integrations.unpatch_openrlhf,
                    integrations.unpatch_trl):
        unpatch()
        unpatch()
    assert set(sys.modules) == loaded


def test_one_unpatch_per_framework_everywhere_it_is_exported():
    for name, module in (("unpatch_trl", our_trl), ("unpatch_verl", our_verl),
                         ("unpatch_openrlhf", our_openrlhf)):
        assert name in integrations.__all__ and name in module.__all__
        assert getattr(module, name) is getattr(integrations, name)
