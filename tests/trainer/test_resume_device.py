"""--resume of a run started with ``device=auto`` on a machine where auto is another device
type. The setting compares equal ("auto" both times), so the run went on on a GPU after a CPU
start (or the other way): its second part computed with other kernels and, with bf16=true, in
bf16 autocast instead of fp32, and its results mixed both."""

from __future__ import annotations

import json

import pytest
import torch

from rlhf.checkpoint import MANIFEST_FILE, RunDirectoryError, open_run

CONFIG = {"output_dir": "x", "device": "auto", "lr": 0.1}


def _start(directory, monkeypatch, gpu: bool, **options):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    with open_run(directory, "sft", CONFIG, **options) as run:
        (directory / "metrics.jsonl").write_text('{"step": 1}\n')  # a run that did something
        return run


def test_a_run_resumed_where_device_auto_is_another_device_is_refused(tmp_path, monkeypatch):
    first = _start(tmp_path, monkeypatch, gpu=False, resume=False)
    assert json.loads((tmp_path / MANIFEST_FILE).read_text())["auto_device"] == "cpu"
    with pytest.raises(RunDirectoryError, match=r"started with device=auto on cpu, and "
                                                r"device=auto is cuda on this machine.*"
                                                r"CUDA_VISIBLE_DEVICES= rlhf"):
        _start(tmp_path, monkeypatch, gpu=True, resume=True)
    assert _start(tmp_path, monkeypatch, gpu=False, resume=True).run_id == first.run_id


def test_a_run_json_without_the_device_resumes_as_before(tmp_path, monkeypatch):
    _start(tmp_path, monkeypatch, gpu=True, resume=False)
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert manifest.pop("auto_device") == "cuda"
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))  # an earlier version's
    assert _start(tmp_path, monkeypatch, gpu=False, resume=True).resumed


def test_a_resume_with_another_kernels_backend_warns(tmp_path, monkeypatch):
    """RLHF_KERNELS_BACKEND is kept in run.json: a resume under another backend (the same
    function in other roundings) says that its second part is not the bit-for-bit
    continuation, and how to get it; the same backend, or a run.json of an earlier version
    without it, resumes without a word."""
    import warnings

    monkeypatch.delenv("RLHF_KERNELS_BACKEND", raising=False)
    _start(tmp_path, monkeypatch, gpu=False, resume=False)
    assert json.loads((tmp_path / MANIFEST_FILE).read_text())["kernels_backend"] == "auto"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _start(tmp_path, monkeypatch, gpu=False, resume=True)
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "Reference")
    with pytest.warns(RuntimeWarning, match=r"ran with RLHF_KERNELS_BACKEND=auto and "
                                            r"continues with RLHF_KERNELS_BACKEND=reference.*"
                                            r"resume with RLHF_KERNELS_BACKEND=auto"):
        _start(tmp_path, monkeypatch, gpu=False, resume=True)
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert manifest["kernels_backend"] == "reference"  # the backend of the latest part
    del manifest["kernels_backend"]
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))  # an earlier version's
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _start(tmp_path, monkeypatch, gpu=False, resume=True).resumed
