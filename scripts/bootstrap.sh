#!/usr/bin/env bash
# One-step set-up used by both README commands. Idempotent: a second run changes nothing.
#
# torch: kept if already installed (e.g. a CUDA build on a GPU machine, or a CPU build installed
# first); otherwise `pip install torch==2.13.0`. Which build that is depends on pip's
# configuration: where pip finds a local CPU wheel (a find-links folder, as on our CI machines)
# it takes it; from PyPI alone, the Linux wheel brings the CUDA libraries (several GB). On a
# CPU-only machine without such a wheel, install the CPU build first:
#   pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
# Then this repository in editable mode with the trainer and test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "[bootstrap] installing torch==2.13.0"
    "$PY" -m pip install --quiet "torch==2.13.0"
fi
echo "[bootstrap] installing rlhf-kernels[dev] (editable)"
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[dev]"
# The native CPU kernels (csrc/cpu), on a machine without CUDA (where every op runs on them):
# built here, once per machine, so the first `rlhf pipeline` or test run does not pay for the
# compile. Cached in torch's extensions directory; without a compiler or ninja the ops run the
# plain-PyTorch reference (one warning says why).
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "[bootstrap] building the native CPU kernels (once per machine, about 20 s of CPU)"
    "$PY" -c "from rlhf_kernels import _native as n; print('[bootstrap] native CPU kernels:', 'ready' if n.available() else 'unavailable, ' + str(n.failure_reason()))"
fi
