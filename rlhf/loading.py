"""Loading a pretrained causal LM or tokenizer by path, hub name or named model, with errors
that say what was wrong.

``resolve_pretrained`` checks where ``from_pretrained`` would read a value before anything loads:
a missing path, a directory without the files needed, a saved backbone given where a model goes,
or a hub name that is neither cached nor reachable (``hub_offline_reason`` probes the hub in
seconds instead of a minute of HTTP retries) is one ValueError naming the setting.
``load_tokenizer`` and ``load_causal_lm`` wrap ``AutoTokenizer`` / ``AutoModelForCausalLM``
with it; ``load_causal_lm`` also loads a bitsandbytes-quantized base (rlhf/quant.py) and refuses
a checkpoint whose weights would start random.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import torch

__all__ = ["HUB_PROBE_TIMEOUT_S", "hub_offline_reason", "load_causal_lm", "load_tokenizer",
           "resolve_pretrained"]

# bitsandbytes (imported by PEFT when installed) logs on a CPU with AVX512-BF16 that it could not
# load a CPU 4-bit gemv kernel from the Hugging Face hub. That kernel serves its repacked
# inference format, which this trainer turns off (quant.keep_4bit_layers_trainable_on_cpu): the
# line concerns nothing that runs here, and it was the first thing `rlhf pipeline` printed.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def _resolve_dtype(torch_dtype) -> torch.dtype | None:
    if torch_dtype is None or isinstance(torch_dtype, torch.dtype):
        return torch_dtype
    if isinstance(torch_dtype, str) and isinstance(getattr(torch, torch_dtype, None), torch.dtype):
        return getattr(torch, torch_dtype)
    raise ValueError(f"torch_dtype must be a torch.dtype or its name (e.g. 'bfloat16'), got "
                     f"{torch_dtype!r}")


# Seconds to wait for a TCP connection to the hub before calling it unreachable. Without the
# probe, a hub name on a machine with no network costs ~50 s of HTTP retries and ends in a
# page of traceback.
HUB_PROBE_TIMEOUT_S = 3.0
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                    "spiece.model")


def _looks_like_path(text: str) -> bool:
    """A hub repo id is `name` or `org/name` of letters, digits, `-`, `_`, `.`; anything else
    (a leading / . ~, more than one /) can only be meant as a local path."""
    import re

    return text.startswith(("/", ".", "~")) or not re.fullmatch(
        r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", text)


def hub_offline_reason() -> str | None:
    """Why the Hugging Face hub cannot be used from here (offline mode, no connection), or None
    when a TCP connection to it (or to the HTTPS proxy) opens within HUB_PROBE_TIMEOUT_S."""
    import socket
    from urllib.parse import urlparse

    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(variable, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"offline mode is on ({variable}={os.environ[variable]})"
    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except Exception:  # noqa: BLE001 - an old or broken huggingface_hub: use the default
        endpoint = "https://huggingface.co"
    proxy = next((os.environ[v] for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
                  if os.environ.get(v)), None)
    target = urlparse(proxy if proxy else endpoint)
    host, port = target.hostname, target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as error:
        via = f" through the proxy {proxy}" if proxy else ""
        return f"{endpoint} cannot be reached{via} ({error.strerror or error})"
    return None


def _in_hub_cache(repo_id: str, filenames: Iterable[str]) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    for filename in filenames:
        try:
            if isinstance(try_to_load_from_cache(repo_id, filename), str):
                return True
        except Exception:  # noqa: BLE001 - an invalid repo id is simply not cached
            return False
    return False


def _model_inside(path: Path) -> str | None:
    """The model folder of a run directory (``runs/sft`` -> ``model``), or None: a folder with
    a run.json and a ``model`` subfolder holding config.json."""
    if (path / "run.json").is_file() and (path / "model" / "config.json").is_file():
        return "model"
    return None


def resolve_pretrained(name_or_path, *, what: str = "model", setting: str = "model"
                       ) -> tuple[str, dict]:
    """Check where ``from_pretrained`` would read ``name_or_path`` before anything loads.

    Returns ``(source, extra from_pretrained kwargs)``; raises a ValueError naming ``setting``
    (the config key, e.g. "model") and the value when it is a path that does not exist, a
    directory without the files ``what`` ("model" or "tokenizer") needs, or a hub name that is
    neither cached nor reachable. A cached hub name loads from the cache alone when the hub is
    unreachable (``local_files_only``), without a minute of retries. A named model
    (``rlhf.named_models``, e.g. ``smollm2-135m-instruct``) resolves to its cached folder, made
    on first use.
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    from rlhf import named_models

    if not path.exists() and named_models.is_named(text):  # e.g. smollm2-135m-instruct
        path = named_models.model_dir(text, setting=setting)
    if path.is_dir():
        names = {entry.name for entry in path.iterdir()}
        has_config = "config.json" in names
        if what == "tokenizer" and not names.intersection(_TOKENIZER_FILES):
            if not has_config:
                raise ValueError(f"{setting}={text!r} is not a Hugging Face model directory: it "
                                 f"has no config.json and no tokenizer files; point {setting}= "
                                 f"at a directory written by save_pretrained")
            raise ValueError(f"{setting}={text!r} holds no tokenizer (no "
                             f"{' or '.join(_TOKENIZER_FILES[:2])}); save the model's tokenizer "
                             f"there too (tokenizer.save_pretrained)")
        if what == "model" and not has_config and "roles.json" in names:
            # a saved SharedBackbone (runs/rm/backbone): adapters over a base named inside
            base = _backbone_base(path)
            raise ValueError(f"{setting}={text!r} is a saved backbone (adapters and heads, "
                             f"roles.json), not a causal LM; this setting takes a model "
                             f"directory" + (f", such as its base {base!r}" if base else "")
                             + " (the RL stages take the backbone: rlhf ppo / grpo model=...)")
        if what == "model" and not has_config and "adapter_config.json" in names:
            base = _adapter_base(path)  # a PEFT adapter saved alone: weights over a base model
            raise ValueError(f"{setting}={text!r} is a PEFT adapter (adapter_config.json), not a "
                             f"whole model" + (f"; its base model is {base!r}" if base else "")
                             + ": merge it into its base and save that (peft: "
                             "model.merge_and_unload().save_pretrained(dir), with the tokenizer), "
                             f"then give {setting}= that directory")
        if what == "model" and not has_config:
            inside = _model_inside(path)
            if inside is not None:  # a run's directory (runs/sft) instead of its model
                raise ValueError(f"{setting}={text!r} is a run's directory, not a model: did you "
                                 f"mean {setting}={str(Path(text) / inside)!r}?")
            raise ValueError(f"{setting}={text!r} is not a Hugging Face model directory: it has "
                             f"no config.json (save_pretrained writes config.json and "
                             f"model.safetensors); check the path")
        return str(path), {}
    if path.exists():
        raise ValueError(f"{setting}={text!r} is a file; expected a model directory "
                         f"(config.json + weights, as save_pretrained writes) or a hub name")
    if _looks_like_path(text):
        raise ValueError(f"{setting}={text!r} does not exist (no such directory); check the "
                         f"path (a hub name looks like org/name)")
    offline = hub_offline_reason()
    if offline is None:
        return text, {}
    if _in_hub_cache(text, ("config.json",) if what == "model" else _TOKENIZER_FILES[:2]):
        return text, {"local_files_only": True}
    named = named_models.suggestion(text)
    hint = (f"; or the named model {setting}={named} "
            f"({named_models.NAMED_MODELS[named].description}, made from a pip package, no hub)"
            if named else "")
    raise ValueError(f"{setting}={text!r} is not a local directory, not in the Hugging Face "
                     f"cache, and the hub cannot be used: {offline}; give the path of a local "
                     f"model directory, or download the model where there is a network{hint}")


def _adapter_base(path: Path) -> str | None:
    """The base model a PEFT adapter's adapter_config.json names, or None."""
    try:
        base = json.loads((path / "adapter_config.json").read_text()).get(
            "base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return base if isinstance(base, str) and base else None


def _backbone_base(path: Path) -> str | None:
    """The base model a saved backbone's roles.json names, or None."""
    try:
        base = json.loads((path / "roles.json").read_text()).get("base_model")
    except (OSError, ValueError, AttributeError):
        return None
    return base if isinstance(base, str) else None


def _loading_error(error: Exception, what: str, setting: str, text: str) -> ValueError:
    first = next((line.strip() for line in str(error).splitlines() if line.strip()),
                 type(error).__name__)
    return ValueError(f"could not load the {what} of {setting}={text!r}: {first}")


def load_tokenizer(name_or_path, *, setting: str = "tokenizer", trust_remote_code: bool = False):
    """``AutoTokenizer.from_pretrained`` after ``resolve_pretrained``; a failure is one
    ValueError that names the setting, the value and the library's reason."""
    from transformers import AutoTokenizer

    source, extra = resolve_pretrained(name_or_path, what="tokenizer", setting=setting)
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError, KeyError, ImportError) as error:
        raise _loading_error(error, "tokenizer", setting, str(name_or_path)) from error


def load_causal_lm(name_or_path, *, setting: str = "model", torch_dtype=None,
                   attn_implementation=None, trust_remote_code: bool = False,
                   quantization=None, device=None):
    """``AutoModelForCausalLM.from_pretrained`` (safetensors, or torch.load with weights_only)
    after ``resolve_pretrained``; a failure is one ValueError naming the setting and value.

    ``quantization`` ("nf4", "fp4", "int8", or a ``BitsAndBytesConfig``; None / "none": off)
    loads the decoder linears quantized onto ``device`` (default cpu) with the lm_head dense
    (rlhf/quant.py); ``torch_dtype`` then defaults to the compute dtype (bf16 on a GPU, fp32 on
    the CPU) for what stays dense."""
    from transformers import AutoModelForCausalLM

    source, kwargs = resolve_pretrained(name_or_path, what="model", setting=setting)
    kwargs["trust_remote_code"] = trust_remote_code
    dtype = _resolve_dtype(torch_dtype)
    if quantization is not None and quantization != "none":
        from rlhf import quant

        dtype = quant.compute_dtype(device, dtype)
        kwargs["quantization_config"] = (quant.bnb_config(quant.check_quantization(
            quantization, f"{setting} quantization"), dtype=dtype)
            if isinstance(quantization, str) else quantization)
        kwargs["device_map"] = {"": str(torch.device(device or "cpu"))}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    from safetensors import SafetensorError

    try:
        model, info = AutoModelForCausalLM.from_pretrained(source, output_loading_info=True,
                                                           **kwargs)
    except (OSError, ValueError, KeyError, ImportError) as error:
        raise _loading_error(error, "model", setting, str(name_or_path)) from error
    except SafetensorError as error:  # a weights file cut off or damaged
        raise ValueError(f"could not load the model of {setting}={str(name_or_path)!r}: its "
                         f"safetensors weights cannot be read ({error}); the file is damaged "
                         f"or was cut off while being written or copied: save or copy it "
                         f"again") from error
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        # e.g. an encoder (BertModel) saved without an LM head: transformers builds the head
        # with random weights and trains on, so say it instead
        raise ValueError(
            f"{setting}={str(name_or_path)!r} does not hold a complete causal language model: "
            f"{len(missing)} weights of the {type(model).__name__} it loads as are not in its "
            f"files (e.g. {missing[0]!r}) and would start random (its config.json names "
            f"{getattr(model.config, 'architectures', None) or 'no architecture'}); give the "
            f"directory of a causal LM (a ...ForCausalLM checkpoint written by save_pretrained)")
    from rlhf import quant

    quant.keep_4bit_layers_trainable_on_cpu(model)  # (bitsandbytes' CPU repacking: quant.py)
    return model


def _load_causal_lm(name_or_path: str, torch_dtype=None, attn_implementation=None,
                    trust_remote_code: bool = False, quantization=None, device=None):
    return load_causal_lm(name_or_path, torch_dtype=torch_dtype,
                          attn_implementation=attn_implementation,
                          trust_remote_code=trust_remote_code, quantization=quantization,
                          device=device)
