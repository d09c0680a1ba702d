#!/usr/bin/env bash
# Everything that needs a CUDA GPU. The first command to run when a GPU is at hand:
#
#   bash scripts/gpu_check.sh proof     # what proves the README's claims, <= 9 min from a bare machine
#
# Other parts (no time limit; each one on its own, for a longer session):
#   bash scripts/gpu_check.sh tests     # the whole test suite on CUDA (kernels compiled, CUDA graphs)
#   bash scripts/gpu_check.sh kernels   # python -m benchmarks (every case) + the logprobs launch sweep
#   bash scripts/gpu_check.sh e2e       # PPO at Qwen2.5 0.5B/1.5B, TRL beside it (LoRA and full)
#   bash scripts/gpu_check.sh e2e-8b    # Llama-3-8B shape under a 24 GiB cap
#   bash scripts/gpu_check.sh all       # tests kernels e2e e2e-8b (well over 30 min)
#   bash scripts/gpu_check.sh wheels    # on a machine WITH pip access: the TRL peer's wheels -> .whl/
#
# PROOF_PARTS="tests linear" bash scripts/gpu_check.sh proof   reruns only the parts named (those
# that failed or were cut); the summary keeps the other parts' rows of the last run.
#
# GPU_CHECK_DRY_RUN=1 bash scripts/gpu_check.sh proof   prints the plan (every command with its time
# budget) and runs nothing; it needs no GPU.
#
# `proof`, in priority order: a run cut off at any point keeps every part before it. Each part has a
# hard timeout (its budget, or less when the 540 s total would be passed) and writes its JSON to
# benchmarks/results/ (GPU name, torch/triton/CUDA versions, date, git SHA) as soon as it ends; the
# benchmark parts save after every case and start no new case near their budget. Budgets are the
# durations of the first H200 run (2026-11-30) with a margin; the final summary prints the real ones:
#
#   part       budget  what
#   setup        20 s  peer wheels from .whl/ into /tmp/peer-site, import checks, environment.txt
#   tests        75 s  kernel test files on CUDA (pytest -n 12 when xdist is there; no interpreter)
#   logprobs     40 s  bench_logprobs at 8x1024x151936 and 4x512x32000 bf16 (ours first; after
#                      the eager peers ours with pipelined vocabulary loops, stages 2 and 4)
#   ppo_loss     35 s  bench_ppo_loss (policy/value loss, Bradley-Terry) at 64K and 1M tokens
#   gae          20 s  bench_gae (gae, masked_whiten) at 64x1024 and 512x2048
#   kl           30 s  bench_kl at 64x1024, 128x2048, 512x2048 (fp32, bf16)
#   linear       40 s  linear_logprobs / linear_ppo_loss at V=151936 H=4096 N=16384 bf16
#   grpo         20 s  bench_grpo_loss: GRPO loss from hidden states, ours vs eager, TRL, Liger
#   e2e-1.5b    100 s  one PPO iteration, Qwen2.5-1.5B shape, + TRL 1.12 PPOTrainer LoRA (<= 65 s)
#   e2e-0.5b     95 s  one PPO iteration at the Qwen2.5-0.5B shape (no peer: the 1.5B part has
#                      TRL's), + one profiled iteration: GPU busy time per stage
#                      (--profile-stages), then the case again with the update's decoder layers
#                      compiled (--compare-torch-compile: rlhf ppo torch_compile=true, a row of
#                      its own; its warm-up iteration compiles)
#   e2e-8b       55 s  Llama-3-8B shape under --max-memory 24 (GiB)
#   report       10 s  proof_summary JSON, python -m benchmarks.report (+ --write into README.md)
#   total       540 s  (9 min; PROOF_TOTAL_S=540 caps it whatever the parts do)
#
# torch.compile peers run last within each benchmark part, so they are the first to be cut ("not
# run: the part's time budget ... was spent" in their rows). The TRL peer runs 2 steps (one timed
# step-to-step interval) in `proof`, 3 in `e2e`.
#
# The TRL peer needs trl==1.12.0 and datasets, which the GPU machine's image lacks and cannot
# download. Here, once, with pip access: `bash scripts/gpu_check.sh wheels` (pure-Python wheels
# into .whl/, git-ignored, a few MB); then copy .whl to the GPU machine with the working tree
# and run there `RLHF_GIT_SHA=<git rev-parse HEAD here> bash scripts/gpu_check.sh proof`
# (a copy of the tree without .git: RLHF_GIT_SHA is the SHA the result files record there). The code runs from the checkout (PYTHONPATH), not from
# `pip install -e` as bootstrap.sh does: that needs an index the machine cannot reach, and the
# image already has torch, triton, transformers, peft, pytest, pytest-xdist and pytest-timeout.
# proof installs them with pip --no-index --no-deps --target /tmp/peer-site and runs the peer
# through a wrapper interpreter that puts that folder first (our own run never imports them).
# PEER_PYTHON=/path/to/venv/bin/python uses an interpreter that already has trl 1.12.0 instead.
# `wheels` also puts trl 1.16.0 into .whl/kernel-peers/: the linear and grpo parts load TRL's
# fused lm head from that wheel (the one file, not the package) as their trl-chunked / trl peer.
# Without either, or if TRL fails to import, the peer is skipped and the summary says why.
#
# When $OUT is set (the device machine), benchmarks/results/ is packed into
# $OUT/gpu_check_results.tgz after every part (one file: a device call brings back 8 at most).
# Here: tar -xzf <files_at>/gpu_check_results.tgz -C benchmarks, then
# `python -m benchmarks.report --write`, and commit the results with the README.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET  # compiled kernels, never the interpreter
PY=${PYTHON:-python3}
RESULTS=${GPU_CHECK_RESULTS:-benchmarks/results}  # (tests point these two elsewhere)
README=${GPU_CHECK_README:-README.md}
LOG_DIR=${LOG_DIR:-$RESULTS/logs}
WHEELHOUSE=${WHEELHOUSE:-.whl}
PEER_SITE=${PEER_SITE:-/tmp/peer-site}  # where proof installs the wheels; $PEER_SITE-python runs them
PEER_SCRIPT=${PEER_SCRIPT:-benchmarks/peers/trl_ppo_peer.py}
PEER_TRL_VERSION=1.12.0
# the peer's wheels (pure Python) that the GPU image lacks; datasets 5.2.0 is the version that ran
# beside trl 1.12.0 here
PEER_WHEELS=${PEER_WHEELS:-"trl==1.12.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19"}
# the kernel benchmarks' TRL (its fused lm head, loaded from the wheel by bench_linear_logprobs)
KERNEL_PEER_WHEELS=${KERNEL_PEER_WHEELS:-"trl==1.16.0"}
PROOF_TOTAL_S=${PROOF_TOTAL_S:-540}
REPORT_RESERVE_S=10
# 12 of the machine's 16 cores: the part is bound by Triton compiling each test's
# specialisations on a bare machine (801 tests took 62 s at -n 8 on the first H200 run, the
# 1001 of the third 65 s at -n 12)
TEST_WORKERS=${TEST_WORKERS:-12}
DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
# The kernel test files (their op's kernels compiled on the GPU and checked against the float64
# reference), most important first.
KERNEL_TESTS=(tests/kernels/test_logprobs.py tests/kernels/test_ppo_fused.py tests/kernels/test_linear_logprobs.py
              tests/kernels/test_policy_loss.py tests/kernels/test_value_loss.py tests/kernels/test_gae_whiten.py
              tests/kernels/test_kl_rewards.py tests/kernels/test_bradley_terry.py tests/kernels/test_compile_no_sync.py
              # the rollout engine's captured decode step (the trainer's GPU mode: bf16 autocast)
              "tests/trainer/test_engine.py::test_captured_decode_matches_teacher_forced[cuda_graph]"
              tests/trainer/test_engine.py::test_captured_decode_under_autocast_follows_adapter_updates)
LINEAR_SHAPE="V=151936 H=4096 N=16384"

# PROOF_PARTS="tests linear ...": run only these parts (a rerun of what failed or was cut, in
# the same day's results); the other parts' rows of the last run stay in proof_parts.tsv
PROOF_PARTS=${PROOF_PARTS:-}
# the commit each part row is from (a PROOF_PARTS rerun keeps rows of an earlier commit)
RUN_SHA=${RLHF_GIT_SHA:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
START=$SECONDS
PARTS_TSV=$LOG_DIR/proof_parts.tsv
status=0

say() { echo "gpu_check: $*" >&2; }

# Pack the results for the trip back from the device machine (only where $OUT exists).
pack() {
    if [ "$DRY_RUN" != 1 ] && [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
        tar -czf "$OUT/gpu_check_results.tgz" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")" \
            2>/dev/null || true
    fi
}

# selected NAME: whether PROOF_PARTS (empty: every part) names this part
selected() {
    [ -z "$PROOF_PARTS" ] || [[ " $PROOF_PARTS " == *" $1 "* ]]
}

# step NAME BUDGET_S COMMAND...: run COMMAND under a hard timeout of min(BUDGET_S, time left),
# log it to $LOG_DIR/NAME.log, record "NAME status seconds budget" in $PARTS_TSV.
step() {
    local name=$1 budget=$2
    shift 2
    selected "$name" || return 0
    local left=$((START + PROOF_TOTAL_S - REPORT_RESERVE_S - SECONDS))
    local limit=$budget
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$DRY_RUN" = 1 ]; then
        printf '[plan] %-9s budget %3d s: %s\n' "$name" "$budget" "$(printf '%q ' "$@")"
        return 0
    fi
    if [ "$limit" -lt 5 ]; then
        say "$name: skipped, the ${PROOF_TOTAL_S} s total is spent"
        printf '%s\tskipped: no time left\t0\t%s\t%s\n' "$name" "$budget" "$RUN_SHA" >>"$PARTS_TSV"
        return 0
    fi
    echo "=== $name (timeout ${limit} s): $*"
    local began=$SECONDS rc
    timeout -s INT -k 10 "$limit" "$@" 2>&1 | tee "$LOG_DIR/$name.log"
    rc=${PIPESTATUS[0]}
    local took=$((SECONDS - began)) what=ok
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        what="timed out at ${limit} s"; status=1
    elif [ "$rc" -ne 0 ]; then
        what="failed (exit $rc)"; status=1
    fi
    printf '%s\t%s\t%d\t%s\t%s\n' "$name" "$what" "$took" "$budget" "$RUN_SHA" >>"$PARTS_TSV"
    say "$name: $what after ${took} s (budget ${budget} s)"
    pack
}

# e2e_part NAME BUDGET TAG PEER_TIMEOUT E2E_ARGS...: one e2e_ppo call; its file is renamed
# e2e_ppo_TAG-<device>-<date>.json so that the next shape's run (same day) does not replace it.
e2e_part() {
    local name=$1 budget=$2 tag=$3 peer_timeout=$4
    shift 4
    selected "$name" || return 0
    local stage=$RESULTS/.stage-$tag peer=()
    # a part cut short by the total loses the difference from the peer's time, not from ours
    local left=$((START + PROOF_TOTAL_S - REPORT_RESERVE_S - SECONDS))
    if [ "$DRY_RUN" != 1 ] && [ "$left" -lt "$budget" ]; then
        peer_timeout=$((peer_timeout - (budget - left)))
        [ "$peer_timeout" -lt 10 ] && peer_timeout=0
    fi
    if [ "$peer_timeout" -gt 0 ] && [ ${#PEER_ARGS[@]} -gt 0 ]; then
        peer=("${PEER_ARGS[@]}" --peer-steps 2 --peer-timeout "$peer_timeout")
    fi
    [ "$DRY_RUN" = 1 ] || { rm -rf "$stage"; mkdir -p "$stage"; }
    step "$name" "$budget" "$PY" -m benchmarks.e2e_ppo "$@" "${peer[@]}" --results-dir "$stage"
    if [ "$DRY_RUN" != 1 ]; then
        for f in "$stage"/e2e_ppo-*.json; do
            [ -e "$f" ] && mv "$f" "$RESULTS/$(basename "$f" | sed "s/^e2e_ppo-/e2e_ppo_$tag-/")"
        done
        rm -rf "$stage"
        pack
    fi
}

# Peer interpreter: the carried wheelhouse, else $PEER_PYTHON, else this interpreter; it must
# import trl 1.12.0 and datasets. Sets PEER_ARGS (empty: the peer is not run, PEER_WHY says why).
PEER_ARGS=()
PEER_WHY=""
setup_peer() {
    local peer_py=${PEER_PYTHON:-$PY}
    if compgen -G "$WHEELHOUSE/*.whl" >/dev/null; then
        if [ "$DRY_RUN" = 1 ]; then
            echo "[plan] setup     install $WHEELHOUSE/*.whl --target $PEER_SITE (the peer's only)"
        elif timeout 30 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
                --upgrade --target "$PEER_SITE" "$WHEELHOUSE"/*.whl; then
            printf '#!/bin/sh\nPYTHONPATH=%q${PYTHONPATH:+:$PYTHONPATH} exec %q "$@"\n' \
                "$PEER_SITE" "$(command -v "$PY")" >"$PEER_SITE-python"
            chmod +x "$PEER_SITE-python"
            peer_py=$PEER_SITE-python
        else
            PEER_WHY="pip could not install $WHEELHOUSE/*.whl"
        fi
    fi
    if [ ! -f "$PEER_SCRIPT" ]; then
        PEER_WHY="no $PEER_SCRIPT"
    elif [ "$DRY_RUN" = 1 ]; then
        echo "[plan] setup     peer: $peer_py must import trl==$PEER_TRL_VERSION and datasets"
    elif [ -z "$PEER_WHY" ]; then
        local found
        if found=$(timeout 30 "$peer_py" -c \
                'import trl, datasets; print(trl.__version__)' 2>"$LOG_DIR/peer_import.log"); then
            [ "$found" = "$PEER_TRL_VERSION" ] \
                || PEER_WHY="$peer_py has trl $found, the peer needs $PEER_TRL_VERSION"
        else
            PEER_WHY="$peer_py cannot import trl and datasets ($(tail -n 1 "$LOG_DIR/peer_import.log"))"
        fi
    fi
    if [ -z "$PEER_WHY" ]; then
        PEER_ARGS=(--peer-script "$PEER_SCRIPT" --peer-python "$peer_py")
        for arg in ${PEER_EXTRA_ARGS:-}; do PEER_ARGS+=("--peer-arg=$arg"); done
    else
        say "TRL peer not run: $PEER_WHY (bash scripts/gpu_check.sh wheels, then copy .whl along;" \
            "or PEER_PYTHON=<interpreter with trl==$PEER_TRL_VERSION>)"
        if [ "$DRY_RUN" != 1 ] && [ "${IN_PROOF:-0}" = 1 ]; then
            printf 'trl-peer\tnot run: %s\t0\t0\t%s\n' "$PEER_WHY" "$RUN_SHA" >>"$PARTS_TSV"
        fi
    fi
}

environment() {
    [ "$DRY_RUN" = 1 ] && { echo "[plan] setup     environment -> $LOG_DIR/environment.txt"; return; }
    {
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
        "$PY" - <<'EOF'
import importlib, platform
import torch
names = ("triton", "transformers", "peft", "accelerate")
versions = {n: getattr(importlib.import_module(n), "__version__", "?") for n in names}
print(torch.cuda.get_device_name(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "|", " | ".join(f"{k} {v}" for k, v in versions.items()), "| python",
      platform.python_version())
EOF
    } 2>&1 | tee "$LOG_DIR/environment.txt"
}

proof() {
    IN_PROOF=1
    if ! git rev-parse HEAD >/dev/null 2>&1 && [ -z "${RLHF_GIT_SHA:-}" ]; then
        say "no git repository here: the result files will say git_sha 'unknown'; start" \
            "this as RLHF_GIT_SHA=<the checkout's HEAD> bash scripts/gpu_check.sh proof"
    fi
    if [ "$DRY_RUN" != 1 ]; then
        mkdir -p "$LOG_DIR"
        if [ -n "$PROOF_PARTS" ] && [ -f "$PARTS_TSV" ]; then  # keep the parts not rerun
            awk -F'\t' -v parts=" $PROOF_PARTS " \
                'index(parts, " " $1 " ") == 0 && $1 != "setup" && $1 != "trl-peer"' \
                "$PARTS_TSV" >"$PARTS_TSV.kept"
            mv "$PARTS_TSV.kept" "$PARTS_TSV"
        else
            : >"$PARTS_TSV"
        fi
    fi
    local t0=$SECONDS
    environment
    setup_peer
    [ "$DRY_RUN" = 1 ] || printf 'setup\tok\t%d\t20\t%s\n' $((SECONDS - t0)) "$RUN_SHA" \
        >>"$PARTS_TSV"
    local xdist=() per_test=()
    if [ "$DRY_RUN" = 1 ] || "$PY" -c 'import xdist' 2>/dev/null; then
        xdist=(-n "$TEST_WORKERS")
    fi
    if [ "$DRY_RUN" = 1 ] || "$PY" -c 'import pytest_timeout' 2>/dev/null; then
        per_test=(--timeout 60)
    fi
    # (a) the kernels compiled on the GPU against the float64 reference
    step tests 75 "$PY" -m pytest -q -rfE -p no:cacheprovider "${xdist[@]}" "${per_test[@]}" \
        --junitxml="$LOG_DIR/cuda_tests.xml" "${KERNEL_TESTS[@]}"
    if ! selected tests; then
        :
    elif [ "$DRY_RUN" = 1 ]; then
        echo "[plan] tests     then: $PY -m benchmarks.proof tests $LOG_DIR/cuda_tests.xml" \
            "(-> cuda_tests JSON)"
    else
        "$PY" -m benchmarks.proof --results-dir "$RESULTS" tests "$LOG_DIR/cuda_tests.xml" \
            || status=1
        pack
    fi
    # (b) the kernel benchmarks at the design shapes; --budget-s leaves 10 s for the case in flight
    local bench=("$PY" -m benchmarks.proof --results-dir "$RESULTS" bench)
    step logprobs 40 "${bench[@]}" bench_logprobs --budget-s 30
    step ppo_loss 35 "${bench[@]}" bench_ppo_loss --budget-s 22
    step gae 20 "${bench[@]}" bench_gae --budget-s 10
    step kl 30 "${bench[@]}" bench_kl --budget-s 18
    # (c) the fused linear ops at one large shape
    step linear 40 "${bench[@]}" bench_linear_logprobs \
        --match "$LINEAR_SHAPE" --save-as linear_logprobs_large --budget-s 28
    # (c') the critic-free loss from hidden states beside TRL's and Liger's paths
    step grpo 20 "${bench[@]}" bench_grpo_loss --budget-s 12
    # (d) end to end, TRL's PPOTrainer beside ours in the same call; the design bar's shape first
    e2e_part e2e-1.5b 100 qwen2.5-1.5b 65 --shape qwen2.5-1.5b
    # (+ one profiled iteration: how busy the GPU is per stage, i.e. what host time is left to
    # remove, at the smallest shape, where the host matters most; then the same case with the
    # update's decoder layers compiled, which removes host time there. TRL's 0.5B run did not
    # fit the part's time on the H200 runs, nor did the compiled decode step's comparison
    # (--decode-compare compile), which the unbounded `e2e` part runs)
    e2e_part e2e-0.5b 95 qwen2.5-0.5b 0 --shape qwen2.5-0.5b --profile-stages \
        --compare-torch-compile
    # (e) the 8B shape under a 24 GiB cap
    e2e_part e2e-8b 55 llama-3-8b 0 --shape llama-3-8b --max-memory 24 --minibatch 4 \
        --forward-chunk 4
    # summary and the README table from the files just written
    if [ "$DRY_RUN" = 1 ]; then
        echo "[plan] report    budget  10 s: $PY -m benchmarks.proof summary $PARTS_TSV;" \
            "$PY -m benchmarks.report; $PY -m benchmarks.report --write (into $README)"
        echo "[plan] where \$OUT is set: $RESULTS packed into \$OUT/gpu_check_results.tgz after" \
            "every part"
        return
    fi
    "$PY" -m benchmarks.proof --results-dir "$RESULTS" summary "$PARTS_TSV" || status=1
    pack
    "$PY" -m benchmarks.report --results-dir "$RESULTS" || status=1
    "$PY" -m benchmarks.report --results-dir "$RESULTS" --write --readme "$README" || status=1
    echo
    echo "=== proof: $((SECONDS - START)) s in all (limit ${PROOF_TOTAL_S} s); per part:"
    column -t -s $'\t' "$PARTS_TSV" 2>/dev/null || cat "$PARTS_TSV"
}

wheels() {
    # Run where pip reaches an index (not on the device machine): CPython 3.12 x86-64, the GPU
    # image's interpreter. Pure-Python wheels, so the platform flags only satisfy pip.
    local cmd=("$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12
               --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
               --platform manylinux2014_x86_64)
    # shellcheck disable=SC2206
    local names=($PEER_WHEELS)
    if [ "$DRY_RUN" = 1 ]; then
        echo "[plan] wheels: ${cmd[*]} -d $WHEELHOUSE ${names[*]}"
        echo "[plan] wheels: ${cmd[*]} -d $WHEELHOUSE/kernel-peers $KERNEL_PEER_WHEELS"
        return
    fi
    mkdir -p "$WHEELHOUSE"
    "${cmd[@]}" -d "$WHEELHOUSE" "${names[@]}" || { say "pip download failed"; exit 1; }
    # TRL's fused lm head, the linear part's trl-chunked peer: a subfolder, so that the PPO
    # peer's install of $WHEELHOUSE/*.whl does not see a second TRL
    "${cmd[@]}" -d "$WHEELHOUSE/kernel-peers" "$KERNEL_PEER_WHEELS" \
        || say "pip download of $KERNEL_PEER_WHEELS failed: the linear part runs without it"
    ls -l "$WHEELHOUSE" "$WHEELHOUSE/kernel-peers"
    local sha
    sha=$(git rev-parse HEAD 2>/dev/null || echo "<HEAD's SHA>")
    echo "copy $WHEELHOUSE/ to the GPU machine with the working tree, and run there:" \
        "RLHF_GIT_SHA=$sha bash scripts/gpu_check.sh proof"
}

# The parts with no time limit (for a longer session), as before.
run_part() {
    case "$1" in
        tests)
            run_unbounded tests "$PY" -m pytest -q -rs ;;
        kernels)
            run_unbounded kernels "$PY" -m benchmarks
            run_unbounded kernels-sweep "$PY" -m benchmarks.bench_logprobs --sweep ;;
        e2e)
            local full=()
            [ ${#PEER_ARGS[@]} -gt 0 ] && full=("${PEER_ARGS[@]}" --peer-full)
            run_unbounded e2e "$PY" -m benchmarks.e2e_ppo --shape qwen2.5-0.5b \
                --shape qwen2.5-1.5b "${full[@]}" --decode-compare compile \
                --compare-torch-compile ;;
        e2e-8b)
            run_unbounded e2e-8b "$PY" -m benchmarks.e2e_ppo --shape llama-3-8b --max-memory 24 \
                --minibatch 4 --forward-chunk 4 ;;
        *)
            say "unknown part '$1' (proof, tests, kernels, e2e, e2e-8b, all, wheels)"
            exit 2 ;;
    esac
}

run_unbounded() {
    local name=$1
    shift
    if [ "$DRY_RUN" = 1 ]; then
        printf '[plan] %-9s no time limit: %s\n' "$name" "$(printf '%q ' "$@")"
        return
    fi
    "$@" 2>&1 | tee "$LOG_DIR/$name.log" || status=1
    pack
}

parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(all)
if [ "${parts[*]}" = wheels ]; then
    wheels
    exit 0
fi
if [ "$DRY_RUN" = 1 ]; then
    echo "gpu_check dry run: nothing is run; the plan for: ${parts[*]}"
else
    if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        say "no CUDA device visible to $PY; nothing to do (GPU_CHECK_DRY_RUN=1 shows the plan)"
        exit 2
    fi
    mkdir -p "$LOG_DIR"
fi
for part in "${parts[@]}"; do
    case "$part" in
        proof) proof ;;
        all)
            [ "$DRY_RUN" = 1 ] || environment
            setup_peer
            for p in tests kernels e2e e2e-8b; do run_part "$p"; done ;;
        wheels) say "'wheels' runs on its own (on a machine with pip access)"; exit 2 ;;
        *)
            if [ "$part" = e2e ] && [ ${#PEER_ARGS[@]} -eq 0 ] && [ -z "$PEER_WHY" ]; then
                setup_peer
            fi
            run_part "$part" ;;
    esac
done
exit $status
