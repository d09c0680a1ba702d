"""The distributed checks on CUDA: ``python tests/trainer/distributed_gpu_check.py [OUT_DIR]``.

tests/trainer/test_distributed.py's scenarios with ``device=cuda`` (bf16 off, so that the numbers
can be compared): 2 ranks (nccl, one GPU each, when there are 2 GPUs; on one GPU both ranks share
it over gloo, since NCCL refuses two ranks on one device) against the same runs in this
process. Prints one JSON line per check and ``RESULT ok|FAILED``; exits 1 on a failure.
Each scenario runs in its own group, so one that fails does not hide the others.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))
os.environ["RLHF_TEST_DEVICE"] = "cuda"

import distributed_worker as worker  # noqa: E402
import torch  # noqa: E402

SKIP = {"rollout_s", "scoring_s", "update_s", "iteration_s", "tokens_per_s", "pairs_per_s",
        "peak_memory_mb", "tokens_padded", "tokens_processed", "value/explained_variance"}


def compare(one: Path, two: Path) -> str | None:
    from safetensors.torch import load_file

    ws1 = [json.loads(line) for line in open(one / "metrics.jsonl")]
    ws2 = [json.loads(line) for line in open(two / "metrics.jsonl")]
    if len(ws1) != len(ws2):
        return f"{len(ws1)} vs {len(ws2)} records"
    for a, b in zip(ws1, ws2, strict=True):
        for key, value in a.items():
            if key in SKIP or not isinstance(value, float):
                continue
            if not math.isclose(value, b.get(key, math.nan), rel_tol=1e-4, abs_tol=1e-5):
                return f"{key}: {value} vs {b.get(key)}"
    p1 = load_file(sorted((one / "checkpoints").iterdir())[-1] / "params.safetensors")
    p2 = load_file(sorted((two / "checkpoints").iterdir())[-1] / "params.safetensors")
    worst = max(float((p1[k] - p2[k]).abs().max()) for k in p1)
    return None if worst < 1e-4 else f"params differ by {worst}"


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/distributed_gpu_check")
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RLHF_KERNELS_BACKEND", "reference")
    gpus = torch.cuda.device_count()
    env = {"RLHF_TEST_DEVICE": "cuda"}
    if gpus < 2:
        env.update(RLHF_DIST_BACKEND="gloo", LOCAL_RANK="0", CUDA_VISIBLE_DEVICES="0")
    print(json.dumps({"gpus": gpus, "backend": env.get("RLHF_DIST_BACKEND", "nccl"),
                      "kernels": os.environ["RLHF_KERNELS_BACKEND"],
                      "torch": torch.__version__}), flush=True)
    tokenizer = worker.make_tokenizer(out / "ws2" / "tokenizer")
    failed = False
    for scenario in sys.argv[2:] or ["engine", "engine@fsdp2", "ppo", "grpo", "grpo@fsdp2",
                                     "rm@fsdp2"]:
        started = time.time()
        ranks = worker.launch([scenario], out / "ws2", env=env, timeout=240)
        line = {"scenario": scenario, "seconds": round(time.time() - started, 1),
                "returncodes": [r.returncode for r in ranks]}
        if any(r.returncode for r in ranks):
            failed = True
            line["error"] = next(r.stderr for r in ranks if r.returncode)[-1500:]
        elif scenario.startswith("engine"):
            result = json.loads((out / "ws2" / scenario / "result.json").read_text())
            line.update(result)
            failed |= not all(result["same"])
        else:
            reference = scenario.partition("@")[0]
            if not (out / "ws1" / reference).exists():
                worker.run_scenario(reference, out / "ws1", tokenizer)
            line["difference"] = compare(out / "ws1" / reference, out / "ws2" / scenario)
            failed |= line["difference"] is not None
        print(json.dumps(line), flush=True)
    print("RESULT", "FAILED" if failed else "ok", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
