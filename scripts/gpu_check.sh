#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in the order to run it, each part on its own so that a
# time-limited session can run them in separate calls:
#
#   bash scripts/gpu_check.sh tests     # the test suite on CUDA (kernels compiled, CUDA graphs)
#   bash scripts/gpu_check.sh kernels   # python -m benchmarks + the logprobs launch sweep
#   bash scripts/gpu_check.sh e2e       # PPO at Qwen2.5 0.5B/1.5B (+ TRL beside it, see below)
#   bash scripts/gpu_check.sh e2e-8b    # Llama-3-8B shape under a 24 GiB cap
#   bash scripts/gpu_check.sh all
#
# Results go to benchmarks/results/ (JSON with GPU, versions, date and git SHA) and logs to
# $LOG_DIR (default benchmarks/results/logs). TRL's PPOTrainer runs beside ours when
# PEER_SCRIPT names its runner (default benchmarks/peers/trl_ppo_peer.py, our TRL 1.12 runner)
# and trl==1.12.0 + datasets import. trl 1.12 ignores gradient_checkpointing=True; for TRL with
# checkpointing really on: PEER_SCRIPT=benchmarks/peers/trl_ppo_peer.py PEER_ARGS=--enable-gc.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
LOG_DIR=${LOG_DIR:-benchmarks/results/logs}
PY=${PYTHON:-python3}

if ! $PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA device visible to $PY; nothing to do" >&2
    exit 2
fi
mkdir -p "$LOG_DIR"
$PY - <<'EOF' | tee "$LOG_DIR/environment.txt"
import torch, triton, transformers, peft
print(torch.cuda.get_device_name(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| triton", triton.__version__, "| transformers", transformers.__version__,
      "| peft", peft.__version__)
EOF

peer_args=()
PEER_SCRIPT=${PEER_SCRIPT:-benchmarks/peers/trl_ppo_peer.py}
if [ -f "$PEER_SCRIPT" ] && $PY -c 'import trl, datasets' 2>/dev/null; then
    peer_args=(--peer-script "$PEER_SCRIPT" --peer-full)
    for arg in ${PEER_ARGS:-}; do peer_args+=("--peer-arg=$arg"); done
else
    echo "gpu_check: TRL peer not run (needs $PEER_SCRIPT and trl==1.12.0 + datasets)" >&2
fi

status=0
run_part() {
    case "$1" in
        tests)
            $PY -m pytest -q -rs 2>&1 | tee "$LOG_DIR/tests.log" || status=1 ;;
        kernels)
            { $PY -m benchmarks && $PY -m benchmarks.bench_logprobs --sweep; } 2>&1 \
                | tee "$LOG_DIR/kernels.log" || status=1 ;;
        e2e)
            $PY -m benchmarks.e2e_ppo --shape qwen2.5-0.5b --shape qwen2.5-1.5b \
                "${peer_args[@]}" 2>&1 | tee "$LOG_DIR/e2e.log" || status=1 ;;
        e2e-8b)
            $PY -m benchmarks.e2e_ppo --shape llama-3-8b --max-memory 24 --minibatch 4 \
                --forward-chunk 4 2>&1 | tee "$LOG_DIR/e2e-8b.log" || status=1 ;;
        *)
            echo "gpu_check: unknown part '$1' (tests, kernels, e2e, e2e-8b, all)" >&2
            exit 2 ;;
    esac
}

parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(all)
for part in "${parts[@]}"; do
    if [ "$part" = all ]; then
        for p in tests kernels e2e e2e-8b; do run_part "$p"; done
    else
        run_part "$part"
    fi
done
exit $status
