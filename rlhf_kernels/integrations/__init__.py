"""Drop-in replacements for other RLHF frameworks' helpers, and explicit patch functions.

Each framework module (``trl``, ``verl``, ``openrlhf``) holds functions with the framework's own
signature and semantics, computed with rlhf_kernels' ops, plus one ``patch_<framework>()`` that
swaps them into the framework's modules. Nothing is patched at import, and importing this
package imports no framework::

    from rlhf_kernels.integrations import patch_verl

    with patch_verl():              # or: patch = patch_verl(); ...; patch.undo()
        trainer.fit()

``unpatch_trl()``, ``unpatch_verl()``, ``unpatch_openrlhf()`` undo every patch of that framework
still active (their ``undo()``, newest first), for code that did not keep the ``Patch``.

A patch replaces each function in the module that defines it and, in the framework's already
imported modules, every other reference to that same function object: names imported with
``from ... import name`` and entries of module-level registries (veRL's policy-loss and
advantage-estimator tables). Modules imported while the patch is active pick the drop-in up
through their own ``from ... import``; ``undo()`` finds those references too and restores them.

Where a call uses an option the kernels do not cover, the drop-in calls the framework's original
function for that call (``original()``). Every difference that remains is listed in
docs/integrations.md.

Outputs keep the framework's contract: the kernels compute in fp32 (fp64 for fp64 inputs) and
each drop-in rounds the result once to the dtype (and gives it the shape) that the framework's
own function returns for the same call. ``keep_fp32=True``, a keyword of every drop-in and of
every ``patch_<framework>()``, returns the kernels' fp32 result unrounded instead.

Processes: a patch changes the current Python process only. Frameworks that run their training
in Ray workers (veRL, OpenRLHF) need the patch applied inside each worker process.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Patch", "dropin", "original", "patch_openrlhf", "patch_trl", "patch_verl",
           "unpatch_openrlhf", "unpatch_trl", "unpatch_verl"]

# The framework's own function for each patched target, keyed by (module name, attribute path),
# kept from the first patch so fallbacks reach it even while the module holds the drop-in.
_ORIGINALS: dict[tuple[str, str], Callable] = {}
_DROPIN_FLAG = "_rlhf_kernels_dropin"


def dropin(fn: Callable) -> Callable:
    """Mark ``fn`` as one of our drop-ins (so a second patch never records it as an original)."""
    setattr(fn, _DROPIN_FLAG, True)
    return fn


def _is_dropin(obj: Any) -> bool:
    # ``is True``: an object that answers every attribute (a unittest.mock stand-in for a
    # framework function) is not a drop-in
    try:
        return getattr(obj, _DROPIN_FLAG, False) is True
    except Exception:  # noqa: BLE001 - an object whose __getattr__ raises something else
        return False


def _owner_and_name(module: Any, path: str) -> tuple[Any, str]:
    """'PolicyLoss.forward' in a module -> (the PolicyLoss class, 'forward')."""
    *owners, name = path.split(".")
    owner = module
    for part in owners:
        owner = getattr(owner, part)
    return owner, name


def original(module_name: str, path: str) -> Callable:
    """The framework's own function behind a target, patched or not.

    module_name: the module that defines it (e.g. "verl.trainer.ppo.core_algos"); path: the
    attribute, dotted for class members (e.g. "PolicyLoss.forward"). Imports the framework.
    """
    key = (module_name, path)
    if key in _ORIGINALS:
        return _ORIGINALS[key]
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(
            f"this call needs the framework's own {module_name}.{path} (an option the kernels do "
            f"not cover), but {module_name} cannot be imported: {err}"
        ) from err
    owner, name = _owner_and_name(module, path)
    fn = getattr(owner, name)
    if _is_dropin(fn):
        raise RuntimeError(f"{module_name}.{path} holds our drop-in but its original was not kept")
    return fn


@dataclass
class _Change:
    container: Any  # a module, a class or a dict
    key: str
    previous: Any  # what the slot held when the patch was applied (maybe another drop-in)
    replacement: Any
    base: Any = None  # the framework's own value under every patch (set by _record)

    def current(self) -> Any:
        if isinstance(self.container, dict):
            return self.container.get(self.key)
        return getattr(self.container, self.key, None)

    def set(self, value: Any) -> None:
        _assign(self.container, self.key, value)


def _assign(container: Any, key: str, value: Any) -> None:
    if isinstance(container, dict):
        container[key] = value
    else:
        setattr(container, key, value)


# Every change still applied, per slot (id of the container, key), oldest first. Patches may be
# undone in any order: undoing one takes its changes off their stacks; a change that was on top
# puts back what it found (or, when that is a drop-in no active patch applies any more, the
# framework's own value), one with a change above hands what it found to that change. So the
# newest active patch stays in force and the last undo restores the framework's functions; a
# reference someone else replaced meanwhile is left alone.
_APPLIED: dict[tuple[int, str], list[_Change]] = {}


def _slot(change: _Change) -> tuple[int, str]:
    return id(change.container), change.key


def _base_of(value: Any) -> Any:
    """The framework's own value behind ``value``: itself, or what the active patch that put
    this drop-in in place found under it."""
    for stack in _APPLIED.values():
        for change in stack:
            if change.replacement is value:
                return change.base
    return value


def _record(change: _Change) -> None:
    stack = _APPLIED.setdefault(_slot(change), [])
    change.base = stack[0].base if stack else _base_of(change.previous)
    stack.append(change)


def _unstack(change: _Change) -> _Change | None:
    """Take ``change`` off its slot's stack -> the change above it (None: it was on top)."""
    slot = _slot(change)
    stack = _APPLIED.get(slot, [])
    position = next((i for i, c in enumerate(stack) if c is change), None)
    if position is None:
        return None
    del stack[position]
    above = stack[position] if position < len(stack) else None
    if not stack:
        del _APPLIED[slot]
    return above


@dataclass
class Patch:
    """What a ``patch_<framework>()`` call replaced; ``undo()`` (or leaving ``with``) restores it.

    ``patched``: "module.attribute" of every function replaced at its definition;
    ``skipped``: targets left alone, with the reason (module not importable, attribute absent in
    this version of the framework); ``active``: False once undone.
    """

    framework: str
    package: str
    patched: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    active: bool = True
    _changes: list[_Change] = field(default_factory=list, repr=False)

    def undo(self) -> None:
        """Put back what this patch replaced (idempotent). Patches may be undone in any order:
        while another patch of the same targets is active its drop-ins stay in force, and once
        every patch is undone the framework holds its own functions again."""
        if not self.active:
            return
        unstacked = [(change, _unstack(change)) for change in reversed(self._changes)]
        live = {id(c.replacement) for stack in _APPLIED.values() for c in stack}

        def found(change: _Change) -> Any:  # what the change found, or its base for a dead drop-in
            value = change.previous
            return change.base if _is_dropin(value) and id(value) not in live else value

        for change, above in unstacked:
            if above is None:
                if change.current() is change.replacement:  # else: replaced by someone since
                    change.set(found(change))
            elif above.previous is change.replacement:
                above.previous = found(change)
        # Modules imported while the patch was active copied the drop-in with `from ... import`
        # (no change records them). A drop-in another active patch still applies stays: that
        # patch's undo finds it.
        restore = {id(c.replacement): c.base for c in self._changes
                   if id(c.replacement) not in live}
        for container, key, value in _references(self.package, set(restore)):
            _assign(container, key, restore[id(value)])
        # Another patch may have found one of this patch's drop-ins in such a module: it now
        # restores the framework's own value there.
        for stack in _APPLIED.values():
            for change in stack:
                if _is_dropin(change.previous) and id(change.previous) not in live:
                    change.previous = change.base
        self.active = False
        active = _ACTIVE.get(self.package, [])
        active[:] = [p for p in active if p is not self]

    def __enter__(self) -> Patch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.undo()


def _package_modules(package: str) -> list[Any]:
    prefix = package + "."
    return [
        module
        for name, module in list(sys.modules.items())
        if module is not None and (name == package or name.startswith(prefix))
    ]


def _references(package: str, ids: set[int]) -> list[tuple[Any, str, Any]]:
    """(container, key, value) for every module attribute or module-level dict entry of the
    package's loaded modules whose value is one of the objects in ``ids``."""
    found = []
    for module in _package_modules(package):
        try:
            namespace = vars(module)
        except TypeError:
            continue
        for name, value in list(namespace.items()):
            if id(value) in ids:
                found.append((module, name, value))
            elif isinstance(value, dict) and not name.startswith("__"):
                for key, entry in list(value.items()):
                    if id(entry) in ids and isinstance(key, str):
                        found.append((value, key, entry))
    return found


def apply_patch(
    framework: str, package: str, targets: list[tuple[str, str, Callable]]
) -> Patch:
    """Replace each ``(module name, attribute path, drop-in)`` target; returns the ``Patch``.

    A module that cannot be imported (an optional heavy dependency of the framework is missing)
    or an attribute this version of the framework does not have is skipped with a warning; if
    no target at all can be patched, ImportError.
    """
    patch = Patch(framework=framework, package=package)
    try:
        _apply(patch, targets)
    except BaseException:
        patch.undo()  # an import that failed in another way: leave nothing half-patched
        raise
    if not patch.patched:
        raise ImportError(
            f"nothing of {framework} could be patched; is it installed? " + "; ".join(patch.skipped)
        )
    if patch.skipped:
        warnings.warn(
            f"patch_{framework.lower()}: left unpatched: " + "; ".join(patch.skipped),
            stacklevel=3,
        )
    _ACTIVE.setdefault(package, []).append(patch)
    return patch


# The patches applied and not yet undone, per framework package ("trl", ...), oldest first:
# what unpatch_<framework>() undoes. Patch.undo() takes a patch off.
_ACTIVE: dict[str, list[Patch]] = {}


def unpatch(package: str) -> None:
    """Undo every patch of ``package`` ("trl", "verl", "openrlhf") still active, newest first:
    the same as calling each one's ``undo()``. Idempotent; nothing to do (and nothing imported)
    when the framework was never patched."""
    while _ACTIVE.get(package):
        _ACTIVE[package][-1].undo()  # takes itself off the list


def _apply(patch: Patch, targets: list[tuple[str, str, Callable]]) -> None:
    replaced: dict[int, tuple[Any, Callable]] = {}
    for module_name, path, replacement in targets:
        try:
            module = importlib.import_module(module_name)
            owner, name = _owner_and_name(module, path)
            current = getattr(owner, name)
        except (ImportError, AttributeError) as err:
            patch.skipped.append(f"{module_name}.{path}: {type(err).__name__}: {err}")
            continue
        if not _is_dropin(current):
            _ORIGINALS.setdefault((module_name, path), current)
        change = _Change(owner, name, current, replacement)
        change.set(replacement)
        _record(change)
        patch._changes.append(change)
        patch.patched.append(f"{module_name}.{path}")
        if "." not in path:  # module-level functions may be referenced elsewhere
            replaced[id(current)] = (current, replacement)
    for container, key, value in _references(patch.package, set(replaced)):
        previous, replacement = replaced[id(value)]
        change = _Change(container, key, previous, replacement)
        change.set(replacement)
        _record(change)
        patch._changes.append(change)


def patch_trl(keep_fp32: bool = False) -> Patch:
    """Patch TRL's log-prob / entropy helpers; see ``rlhf_kernels.integrations.trl``.
    ``keep_fp32``: return the kernels' fp32 results instead of TRL's dtype."""
    from rlhf_kernels.integrations import trl

    return trl.patch_trl(keep_fp32)


def unpatch_trl() -> None:
    """Undo every ``patch_trl()`` still active, newest first (the same as their ``undo()``):
    TRL holds its own functions again, the very objects it held before the first patch.
    Idempotent, and a no-op when TRL was never patched."""
    unpatch("trl")


def patch_verl(keep_fp32: bool = False) -> Patch:
    """Patch veRL's core_algos / torch_functional helpers; see
    ``rlhf_kernels.integrations.verl``. ``keep_fp32``: return the kernels' fp32 results instead
    of veRL's dtype."""
    from rlhf_kernels.integrations import verl

    return verl.patch_verl(keep_fp32)


def patch_openrlhf(keep_fp32: bool = False) -> Patch:
    """Patch OpenRLHF's loss / log-prob / KL / GAE helpers; see
    ``rlhf_kernels.integrations.openrlhf``. ``keep_fp32``: return the kernels' fp32 results
    instead of OpenRLHF's dtype."""
    from rlhf_kernels.integrations import openrlhf

    return openrlhf.patch_openrlhf(keep_fp32)


def unpatch_verl() -> None:
    """Undo every ``patch_verl()`` still active, newest first (the same as their ``undo()``):
    veRL's modules, by-name imports and registries hold its own functions again, the very
    objects they held before the first patch. Idempotent, and a no-op when veRL was never
    patched."""
    unpatch("verl")


def unpatch_openrlhf() -> None:
    """Undo every ``patch_openrlhf()`` still active, newest first (the same as their
    ``undo()``): OpenRLHF's modules and loss classes hold its own functions again, the very
    objects they held before the first patch. Idempotent, and a no-op when OpenRLHF was never
    patched."""
    unpatch("openrlhf")
