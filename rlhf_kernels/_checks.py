"""Input validation shared by the ops: errors that say what was wrong and what is expected."""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class SettingError(TypeError, ValueError):
    """A scalar setting of the wrong type. Both a TypeError and a ValueError, so code written
    against either of the errors the ops raised for bad settings before keeps catching it."""


def check_float(name: str, tensor: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{name} must be a floating tensor (fp16, bf16, fp32 or fp64), got {tensor.dtype}"
        )


def check_same_shape(name: str, tensor: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if tensor.shape != ref.shape:
        raise ValueError(
            f"{name} has shape {tuple(tensor.shape)} but {ref_name} has shape "
            f"{tuple(ref.shape)}; they must match"
        )


def check_same_device(*named: tuple[str, torch.Tensor]) -> None:
    devices = {t.device for _, t in named if t is not None}
    if len(devices) > 1:
        listing = ", ".join(f"{n} on {t.device}" for n, t in named if t is not None)
        raise ValueError(f"all inputs must be on one device, got {listing}")


def as_mask(mask: torch.Tensor | None, like: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """A (…) bool/float mask -> float32 tensor of 0/1 with the shape of ``like`` (1 = counts)."""
    if mask is None:
        return torch.ones(like.shape, dtype=torch.float32, device=like.device)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    check_same_shape(name, mask, "the values", like)
    if mask.dtype == torch.bool:
        return mask.to(torch.float32)
    if mask.dtype.is_floating_point or mask.dtype in (torch.int8, torch.int16, torch.int32,
                                                      torch.int64, torch.uint8):
        return (mask != 0).to(torch.float32)
    raise ValueError(f"{name} must be bool, integer or floating, got {mask.dtype}")


REDUCTIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm",
              "token-sum")
RATIO_LEVELS = ("token", "sequence")
LOSS_TYPES = ("ppo", "cispo", "sapo")
# SAPO's gate temperatures when none are given: TRL's sapo_temperature_pos / _neg and veRL's
# tau_pos / tau_neg defaults (A > 0 tokens, A <= 0 tokens).
SAPO_DEFAULT_TAUS = (1.0, 1.05)


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not supported; expected one of {REDUCTIONS}")


def check_normalizer(normalizer) -> None:
    """None, a number > 0, or a 0-d floating/integer tensor (used as is: checking its value
    would cost a host sync, and it may be an all-reduced count still on the device)."""
    if normalizer is None:
        return
    if isinstance(normalizer, torch.Tensor):
        if normalizer.dim() != 0 or normalizer.dtype == torch.bool or normalizer.is_complex():
            raise SettingError(
                "normalizer must be a number > 0 or a 0-d real tensor, got a tensor of shape "
                f"{tuple(normalizer.shape)} and dtype {normalizer.dtype}"
            )
        return
    if isinstance(normalizer, bool) or not isinstance(normalizer, numbers.Real):
        raise SettingError(
            f"normalizer must be a number > 0 or a 0-d tensor, got {type(normalizer).__name__}"
        )
    if not 0 < normalizer < math.inf:  # also refuses NaN
        raise ValueError(
            f"normalizer must be > 0 and finite (the loss is divided by it), got {normalizer}"
        )


def normalizer_setting(normalizer):
    """A checked ``normalizer=``: None, a float (from any real number) or the 0-d tensor."""
    check_normalizer(normalizer)
    if normalizer is None or isinstance(normalizer, torch.Tensor):
        return normalizer
    return float(normalizer)


def check_dual_clip(dual_clip) -> None:
    if dual_clip is not None and not float(dual_clip) > 1.0:
        raise ValueError(
            f"dual_clip must be > 1 (veRL uses 3.0), got {dual_clip}; pass None to disable it"
        )


def check_kl_reference(kl_coef, ref_logp) -> None:
    """A KL weight without the reference log-probs it weighs is an error, not a silent no-op."""
    if ref_logp is None and kl_coef:
        raise ValueError(
            f"kl_coef={kl_coef} but ref_logp is None: the KL term is kl_coef * KL(policy || "
            "reference) and needs the reference policy's log-probs; pass ref_logp=..., or "
            "kl_coef=0 for no KL term"
        )


def check_policy_options(ratio_level: str, loss_type: str, dual_clip) -> None:
    check_dual_clip(dual_clip)
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(
            f"ratio_level={ratio_level!r} is not supported; expected one of {RATIO_LEVELS}"
        )
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not supported; expected one of {LOSS_TYPES}")
    if loss_type == "cispo" and dual_clip is not None:
        raise ValueError(
            "dual_clip applies to loss_type='ppo' only; CISPO already bounds its weight by "
            "clip_high (pass dual_clip=None)"
        )
    if loss_type == "sapo" and dual_clip is not None:
        raise ValueError(
            "dual_clip applies to loss_type='ppo' only; SAPO's sigmoid gate already bounds "
            "each token's loss by 4 |A| / tau (pass dual_clip=None)"
        )


def sapo_taus(loss_type: str, sapo_tau_pos, sapo_tau_neg) -> tuple[float, float] | None:
    """The checked SAPO gate temperatures (tau for A > 0 tokens, tau for A <= 0 tokens) ->
    floats (``SAPO_DEFAULT_TAUS`` for a None), or None when loss_type is not "sapo" (and then
    neither may be given: a temperature would be silently unused)."""
    if loss_type != "sapo":
        for name, value in (("sapo_tau_pos", sapo_tau_pos), ("sapo_tau_neg", sapo_tau_neg)):
            if value is not None:
                raise ValueError(
                    f"{name}={value!r} applies to loss_type='sapo' only (got "
                    f"loss_type={loss_type!r}); leave it None"
                )
        return None
    taus = []
    for name, value, default in (("sapo_tau_pos", sapo_tau_pos, SAPO_DEFAULT_TAUS[0]),
                                 ("sapo_tau_neg", sapo_tau_neg, SAPO_DEFAULT_TAUS[1])):
        value = real_setting(name, value, none_ok=True)
        if value is None:
            value = default
        elif not 0.0 < value < float("inf"):  # also refuses NaN
            raise ValueError(
                f"{name}={value} must be a finite number > 0 (the SAPO gate is "
                f"sigmoid(tau (r - 1)) 4 / tau; TRL and veRL default to {default})"
            )
        taus.append(value)
    return taus[0], taus[1]


def check_advantages_shape(advantages: torch.Tensor, like: torch.Tensor,
                           like_name: str = "logp") -> None:
    """Advantages are per token (the shape of ``like``) or per sequence (``like`` without its
    last, time dim)."""
    if advantages.shape != like.shape and advantages.shape != like.shape[:-1]:
        raise ValueError(
            f"advantages has shape {tuple(advantages.shape)}; expected one per token "
            f"{tuple(like.shape)} (the shape of {like_name}) or one per sequence "
            f"{tuple(like.shape[:-1])}"
        )


# --------------------------------------------------------------------------------------------
# Scalar settings (clip_low, temperature, group_size, ignore_index, ...)
# --------------------------------------------------------------------------------------------
def _refuse_setting(name: str, value, expected: str, none_ok: bool):  # -> NoReturn
    kind = type(value).__name__
    if isinstance(value, torch.Tensor):
        kind = f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    raise SettingError(
        f"{name} must be {expected}{' or None' if none_ok else ''}, got {kind}: {value!r}"
    )


def _setting_tensor(name: str, value: torch.Tensor, integral: bool, expected: str,
                    none_ok: bool):
    """A 0-d tensor used as a setting: read on the host (a device tensor costs a sync)."""
    ok_dtype = (not value.dtype.is_floating_point and not value.is_complex()
                and value.dtype != torch.bool) if integral else (
        value.dtype != torch.bool and not value.is_complex())
    if value.dim() != 0 or not ok_dtype:
        _refuse_setting(name, value, expected, none_ok)
    if value.requires_grad:
        raise ValueError(
            f"{name} is a setting, not differentiated by the op, but the tensor given requires "
            f"grad; pass {name}.detach() or a number"
        )
    return int(value) if integral else float(value)


def real_setting(name: str, value, *, none_ok: bool = False) -> float | None:
    """A real-valued setting -> float: a Python or numpy number (``numbers.Real``; not a bool)
    or a 0-d real tensor (read on the host). None only when ``none_ok``. Range checks are the
    caller's."""
    if type(value) is float:  # the common case first: these run on every call
        return value
    if value is None and none_ok:
        return None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, torch.Tensor):
        return _setting_tensor(name, value, False, "a real number", none_ok)
    _refuse_setting(name, value, "a real number", none_ok)


KL_COEF_MEANING = "the weight of the KL term kl_coef * KL(policy || reference); 0 for none"
ENTROPY_COEF_MEANING = "the weight of the entropy bonus, loss - entropy_coef * entropy; 0 for none"


def finite_setting(name: str, value, meaning: str) -> float:
    """A real setting that must be finite (a weight or a scale: NaN or +-inf only turns the loss
    into NaN / inf) -> float, as ``real_setting``; NaN and +-inf are one ValueError naming the
    setting, its value and ``meaning`` (what the setting does, what is usual)."""
    value = real_setting(name, value)
    if not -math.inf < value < math.inf:  # also refuses NaN
        raise ValueError(f"{name}={value} must be a finite number ({meaning})")
    return value


def int_setting(name: str, value, *, none_ok: bool = False, expected: str = "an int"
                ) -> int | None:
    """An integer setting -> int: a Python or numpy integer (``numbers.Integral``; not a bool,
    not a float, even 4.0) or a 0-d integer tensor (read on the host). None only when
    ``none_ok``. Range checks are the caller's (``expected`` may name the range for the type
    error's message)."""
    if type(value) is int:
        return value
    if value is None and none_ok:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, torch.Tensor):
        return _setting_tensor(name, value, True, expected, none_ok)
    _refuse_setting(name, value, expected, none_ok)
