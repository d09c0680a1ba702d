"""The output contract shared by the drop-ins: the framework's dtype, or the kernels' precision.

The kernels compute in fp32 (fp64 for fp64 inputs). By default a drop-in rounds that result once,
at the end, to the dtype the framework's own function returns for the same call, so code written
against the framework (and the framework's own tests) sees the dtype it expects. With
``keep_fp32=True`` (a keyword of every drop-in and of ``patch_trl`` / ``patch_verl`` /
``patch_openrlhf``) the result is returned as computed: fp32, or fp64 for fp64 inputs.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable

import torch

try:  # torch built without distributed has no DTensor
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # pragma: no cover
    _DTensor = None


def installed(package: str) -> bool:
    """Whether a top-level package can be imported, without importing it (the frameworks choose
    a fused path, and with it their output dtype, by what is installed). Called once per module,
    at import, so the per-call decisions are plain flag reads for torch.compile."""
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # ValueError: a module in sys.modules without a spec
        return False


# veRL's logprobs_from_logits and OpenRLHF's log_probs_from_logits take flash-attn's cross
# entropy (whose output is fp32) when this import succeeds; on ImportError they take their
# PyTorch path (the logits' dtype). None: not tried yet.
FLASH_CE_MODULE, FLASH_CE_NAME = "flash_attn.ops.triton.cross_entropy", "cross_entropy_loss"
_flash_ce_imports: bool | None = None


@torch.compiler.assume_constant_result
def flash_attn_cross_entropy_imports() -> bool:
    """Whether ``from flash_attn.ops.triton.cross_entropy import cross_entropy_loss`` succeeds:
    the frameworks' own condition (veRL at its import, OpenRLHF at each call, both catching
    ImportError), not whether flash-attn is installed: an installed flash-attn whose CUDA
    extension fails to load (built for another torch or CUDA) raises ImportError there, and the
    frameworks then run their PyTorch path.

    Tried once, at the first call that asks (never at import: that loads flash-attn's CUDA
    extension, which the frameworks do anyway), then cached; torch.compile takes the answer as
    a constant. Any other exception also counts as unavailable (veRL's own import would fail)."""
    global _flash_ce_imports
    if _flash_ce_imports is None:
        try:
            module = importlib.import_module(FLASH_CE_MODULE)
            _flash_ce_imports = hasattr(module, FLASH_CE_NAME)
        except Exception:  # noqa: BLE001 - ImportError, or a package that fails otherwise
            _flash_ce_imports = False
    return _flash_ce_imports


def promoted(*tensors: torch.Tensor | torch.dtype | None) -> torch.dtype:
    """The dtype torch's own arithmetic gives for an expression of these tensors (type promotion;
    a dtype stands for a tensor of that dtype, e.g. a framework's ``.float()``; ``None`` skipped).
    What a framework's eager code returns when it computes in its inputs' dtypes, e.g.
    ``logprob - ref_logprob`` or ``(loss * mask).sum() / mask.sum()``."""
    dtype = None
    for t in tensors:
        if t is None:
            continue
        this = t if isinstance(t, torch.dtype) else t.dtype
        dtype = this if dtype is None else torch.promote_types(dtype, this)
    if dtype is None or not dtype.is_floating_point:
        return torch.float32
    return dtype


def dtype_under_autocast(op: Callable[[torch.Tensor], torch.Tensor],
                         like: torch.Tensor) -> torch.dtype:
    """The dtype of ``op(like)``, a torch expression a framework evaluates on ``like`` (its
    log-softmax, its entropy formula), under the autocast state in force for ``like``'s device.

    Without autocast that is ``like``'s dtype for the expressions the drop-ins ask about. Under
    autocast torch may run an op in fp32 whatever its inputs (CUDA's autocast does so for softmax,
    log_softmax, exp, log, sum, pow, ...): veRL computes log-probs and entropies inside
    ``torch.autocast``, and there its bf16 logits give fp32 results. The answer is torch's own:
    ``op`` runs once on an empty tensor of ``like``'s dtype and device (no data, no kernel on an
    accelerator, no host sync), only when autocast is on."""
    try:
        autocasting = torch.is_autocast_enabled(like.device.type)
    except RuntimeError:  # a device type autocast does not know (meta, lazy, ...)
        return like.dtype
    if not autocasting:
        return like.dtype
    return op(torch.empty((0, 1), dtype=like.dtype, device=like.device)).dtype


def widened_under_autocast(dtype: torch.dtype, device: torch.device,
                           *ops: Callable[[torch.Tensor], torch.Tensor]) -> torch.dtype:
    """``dtype`` (a framework loss's dtype by type promotion) promoted with what each of
    ``ops`` gives on a tensor of that dtype under the autocast in force for ``device``: the ops
    of the framework's formula that autocast may run in fp32 (CUDA's autocast runs sum, exp,
    pow, log in fp32, so a bf16 loss aggregated with ``.sum()`` comes out fp32; the CPU's keeps
    them in bf16). Without autocast, ``dtype``. Each op runs once on an empty (0, 1) tensor and
    must reduce over the last dim only (an empty result: no kernel, no host sync)."""
    try:
        autocasting = torch.is_autocast_enabled(device.type)
    except RuntimeError:  # a device type autocast does not know (meta, lazy, ...)
        return dtype
    if not autocasting or not dtype.is_floating_point:
        return dtype
    empty = torch.empty((0, 1), dtype=dtype, device=device)
    for op in ops:
        dtype = torch.promote_types(dtype, op(empty).dtype)
    return dtype


def autocast_sum(t: torch.Tensor) -> torch.Tensor:
    """A framework's aggregation (masked_sum, masked_mean, agg_loss), for
    ``widened_under_autocast``."""
    return t.sum(-1)


def exact_backend(logits: torch.Tensor) -> str | None:
    """The backend of a log-prob / entropy drop-in: for fp64 logits the fp64 reference (the
    frameworks' eager formulas compute fp64 logits in fp64; the kernels compute in fp32 and
    would return fp32-rounded values in an fp64 tensor), else the default (None)."""
    return "reference" if logits.dtype == torch.float64 else None


def log_softmax_last(t: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(t, dim=-1)


def entropy_formula(t: torch.Tensor) -> torch.Tensor:
    """H = logsumexp(z) - sum softmax(z) z, as veRL and OpenRLHF evaluate it (for its dtype)."""
    return torch.logsumexp(t, dim=-1) - (torch.softmax(t, dim=-1) * t).sum(-1)


def finish(out: torch.Tensor, dtype: torch.dtype, keep_fp32: bool) -> torch.Tensor:
    """``out`` (the kernels' fp32 / fp64 result) rounded once to ``dtype``, unless ``keep_fp32``.

    ``.to`` returns ``out`` itself when the dtype already matches, and an ordinary new tensor
    otherwise: no view, no host sync, nothing that breaks a torch.compile graph."""
    if keep_fp32 or out.dtype == dtype:
        return out
    return out.to(dtype)


def bind_keep_fp32(fn: Callable) -> Callable:
    """``fn`` with ``keep_fp32=True`` fixed, marked as a drop-in (what a patch installs when asked
    for fp32 outputs). The caller's arguments pass through unchanged."""

    @functools.wraps(fn)
    def keep_fp32_variant(*args, **kwargs):
        kwargs.setdefault("keep_fp32", True)
        return fn(*args, **kwargs)

    return keep_fp32_variant


def weighted_advantages(advantages: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """The advantages that make ``ppo_policy_loss`` compute a framework's policy loss whose
    per-token terms it multiplies by ``weights`` (importance-sampling corrections of the rollout
    engine, off-policy and entropy masks): ``advantages x weights``, detached weights.

    Exact for weights >= 0 (what every framework's correction gives: a truncated ratio, or 0 for
    a dropped token): each loss the op computes is positively homogeneous in A, w min(rA, cA) =
    min(r wA, c wA) for the clipped surrogate, likewise the dual clip's bound -cA and CISPO's
    -sg(c) A logp, so the loss and its gradient are the weighted ones. The op's clip statistics
    then see wA: a token of weight 0 no longer counts as clipped, so a drop-in reports the
    framework's clip metrics from the unweighted advantages. (B,) advantages stay (B,) under
    (B, 1) weights."""
    if weights is None:
        return advantages
    weights = weights.detach()
    if advantages.dim() == 1:
        if weights.dim() == 2 and weights.shape[-1] == 1:
            return advantages * weights.squeeze(-1).to(advantages.dtype)
        advantages = advantages.unsqueeze(-1)
    return advantages * weights


def nonnegative(value) -> bool:
    """Whether a clip range the frameworks take as it comes is in the kernels' domain (a number
    >= 0; +inf clips nothing). A negative or NaN one is the framework's to evaluate (it computes
    a loss from it, where the op would refuse it by a name the framework's user never set)."""
    try:
        return bool(value >= 0.0)
    except (TypeError, RuntimeError):
        return False


def in_unit_interval(value) -> bool:
    """Whether a discount or a GAE lambda is in the kernels' domain [0, 1]. The frameworks
    compute with any number (a gamma of 1.5 grows the returns, NaN makes them NaN); outside
    [0, 1] a drop-in hands the call to the framework's own function."""
    try:
        return bool(0.0 <= float(value) <= 1.0)
    except (TypeError, ValueError, RuntimeError):
        return False


def broadcast_advantages(advantages: torch.Tensor, log_prob: torch.Tensor) -> torch.Tensor:
    """Advantages as the frameworks' policy losses read them against the log-probs
    (``-advantages * ratio``: torch broadcasting), as a view without a copy: a (B, 1) column,
    a (T,) or (1, T) row, a 0-d scalar, ... each broadcast to ``log_prob``'s shape. The op takes
    one value per token (B, T) or per sequence (B,), and the drop-ins' shape checks and clip
    statistics then see the framework's shapes.

    A (B,) vector is torch's (T,) row where B == T (what the framework computes, one value per
    token position); otherwise torch cannot broadcast it (the framework raises) and it is
    returned unchanged: the op reads it as one advantage per sequence. Any other shape that does
    not broadcast to ``log_prob`` is returned unchanged (the op names what it expects)."""
    if advantages.shape == log_prob.shape:
        return advantages
    try:
        shape = torch.broadcast_shapes(advantages.shape, log_prob.shape)
    except RuntimeError:
        return advantages
    return advantages.expand_as(log_prob) if shape == log_prob.shape else advantages


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a torch.distributed DTensor (e.g. logits sharded over the vocabulary under
    tensor parallelism). The kernels take plain tensors (an op of theirs has no sharding rule),
    so a drop-in hands such a call to the framework's own function, which DTensor runs."""
    return _DTensor is not None and isinstance(t, _DTensor)
