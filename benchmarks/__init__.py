"""Benchmarks: one script per op plus an end-to-end PPO iteration (see benchmarks/README.md).

Without CUDA the scripts only have a smoke mode, which must time our Triton kernels (under the
interpreter), not the PyTorch reference the "auto" backend picks on a CPU. TRITON_INTERPRET has to
be set before rlhf_kernels' op modules define their @triton.jit functions, so it is set here, once,
before any script imports them.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
