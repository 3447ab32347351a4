#!/usr/bin/env bash
# The project's GPU check: one command on one H100/H200 with no network, under 8 minutes.
#
#     PYTHONUNBUFFERED=1 bash benchmarks/gpu_check.sh            # from the repository root
#
# Nothing is installed: python3 must already hold torch (CUDA), transformers, tiktoken, safetensors, numpy, tqdm
# and pytest. The steps, each under its own time limit and all within BUDGET seconds (default 450; a step that
# finds the budget spent is skipped, and the summary says so):
#   1. pytest -m gpu on tests/test_gpu.py, tests/test_optim.py and every other test file with gpu tests
#      (named files: the whole tree would need datasketch and rouge_score to collect)
#   2. python -m gpt bench: GPT-2 124M, bf16, eager and compiled, ours, ours-pad64 (vocabulary 50,304) and
#      transformers' GPT-2: tokens/s and MFU against the measured and the published peak
#   3. python -m benchmarks.bench_optim on the GPU: one AdamW step at 124M parameters
#   4. 200 steps of configs/gpt2-124m.toml (bf16, compiled) under torchrun with one process (the DDP path),
#      on Botchan's text repeated, prepared by python -m gpt prepare
#   5. a few steps of the same with --train.parallel fsdp under torchrun
#   6. peak GPU memory and step time with --train.activation_checkpointing false and true
#   7. a few float16 steps: the gradient scaler's path
# Results go to $OUT (default gpu-check/): summary.txt (one line per measurement, ready for BENCHMARKS.md),
# bench.json, test_figures.jsonl (figures the gpu tests record) and a log per step. A run's peak memory is the
# one its metrics.jsonl records.
# The corpus and the run folders (checkpoints) stay in a temporary folder, removed at the end.
# DRY=1 runs every step on the CPU with tiny shapes (configs/tiny.toml, a few steps, nothing compiled) to
# check the script itself; PYTHON names the interpreter (default python3).
set -u
OUT=${OUT:-gpu-check}
BUDGET=${BUDGET:-450}
PY=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export GPT_TEST_FIGURES="$PWD/$OUT/test_figures.jsonl"
case $OUT in /*) GPT_TEST_FIGURES="$OUT/test_figures.jsonl" ;; esac
rm -f "$GPT_TEST_FIGURES"

if [ "${DRY:-0}" = 1 ]; then  # float32: a CPU without native bf16 emulates it, far too slowly for a check
    DEVICE=cpu CONFIG=configs/tiny.toml BENCH_CONFIG=tiny PRECISION=fp32 DTYPE=float32 COMPILE=false BATCH=4
    REPEAT=2 LONG_STEPS=6 SHORT_STEPS=3 LOG_EVERY=1 OPTIM_SIZE=16m
    BENCH_FLAGS=(--rounds 1 --steps 1 --warmup 1 --batch-size 2)
    OPTIM_FLAGS=(--rounds 1)
    MODEL_FLAGS=(--model.n_layer 1 --model.d_model 64 --model.n_head 2 --model.context_length 64)
else
    DEVICE=cuda CONFIG=configs/gpt2-124m.toml BENCH_CONFIG=gpt2-124m PRECISION=bf16 DTYPE=bfloat16 COMPILE=true
    BATCH=16 REPEAT=60 LONG_STEPS=200 SHORT_STEPS=10 LOG_EVERY=10 OPTIM_SIZE=124m
    BENCH_FLAGS=(--compile --rounds 3)
    OPTIM_FLAGS=()
    MODEL_FLAGS=()
fi
START=$SECONDS

say() { echo "$*" | tee -a "$SUMMARY"; }

step() {  # step NAME SECONDS CMD...: run CMD into $OUT/NAME.log within SECONDS (fewer when the budget runs short)
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 20 ]; then
        say "$name: skipped, the ${BUDGET} s budget is spent"
        return 1
    fi
    local started=$SECONDS rc
    timeout --kill-after=15 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    local why=""
    [ "$rc" = 124 ] && why=" (stopped at its ${limit} s limit)"
    say "$name: exit $rc in $((SECONDS - started)) s$why"
    if [ "$rc" != 0 ]; then  # the end of the log, without progress-bar lines
        tr '\r' '\n' <"$OUT/$name.log" | grep -v -e '^\s*$' -e 'it/s\]$' -e 's/it\]$' | tail -n 5 | sed 's/^/    /' |
            tee -a "$SUMMARY"
    fi
    return "$rc"
}

report() { "$PY" -m benchmarks.gpu_check_report "$@" 2>&1 | tee -a "$SUMMARY"; }

say "GPU check $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), device $DEVICE"
command -v nvidia-smi >/dev/null &&
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/gpu: /' | tee -a "$SUMMARY"
"$PY" -c "import sys, torch, transformers; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| cuda', torch.version.cuda, '| transformers', transformers.__version__)" 2>&1 | tee -a "$SUMMARY"

# 1. The gpu tests, on named files
TEST_FILES=$( (echo tests/test_gpu.py tests/test_optim.py; grep -l 'mark\.gpu' tests/test_*.py) | tr ' ' '\n' | sort -u)
step tests 200 "$PY" -m pytest -q -m gpu -rfEs -p no:cacheprovider $TEST_FILES
grep -E '^(FAILED|ERROR)|[0-9]+ (passed|failed|skipped|error)' "$OUT/tests.log" | tail -n 20 | sed 's/^/tests: /' |
    tee -a "$SUMMARY"
[ -f "$GPT_TEST_FIGURES" ] && sed 's/^/test figures: /' "$GPT_TEST_FIGURES" | tee -a "$SUMMARY"

# 2. The bench: ours (and the padded vocabulary) against transformers
step bench 200 "$PY" -m gpt bench --device "$DEVICE" --configs "$BENCH_CONFIG" --precisions "$PRECISION" \
    --contenders ours,ours-pad64,hf-gpt2 --parts train "${BENCH_FLAGS[@]}" --out "$OUT/bench.json"
[ -f "$OUT/bench.json" ] && report bench "$OUT/bench.json"

# 3. The optimizer step
step optimizer 60 "$PY" -m benchmarks.bench_optim --device "$DEVICE" --sizes "$OPTIM_SIZE" "${OPTIM_FLAGS[@]}" &&
    grep -v -e '^\s*$' "$OUT/optimizer.log" | tail -n 7 | sed 's/^/optimizer: /' | tee -a "$SUMMARY"

# 4-7. Training runs on Botchan's text (without Project Gutenberg's header and footer) repeated
"$PY" - "$WORK/corpus.txt" "$REPEAT" <<'PY'
import pathlib, sys
text = pathlib.Path("data/botchan.txt").read_text(encoding="utf-8-sig")
body = text.split("*** START OF", 1)[1].split("\n", 1)[1].split("*** END OF", 1)[0]
pathlib.Path(sys.argv[1]).write_text(body * int(sys.argv[2]), encoding="utf-8")
PY
step prepare 60 "$PY" -m gpt prepare "$WORK/corpus.txt" --out "$WORK/corpus" --val-fraction 0.1
common=(--config "$CONFIG" "${MODEL_FLAGS[@]}" --data.path "$WORK/corpus" --train.device "$DEVICE"
        --train.batch_size "$BATCH" --train.grad_accum_steps 1 --train.warmup_steps 10 --train.eval_batches 4
        --train.curves false --sample.max_new_tokens 8)
short=(--train.max_steps "$SHORT_STEPS" --train.eval_interval "$SHORT_STEPS" --train.log_interval 1
       --train.compile false)
torchrun=("$PY" -m torch.distributed.run --standalone --nproc_per_node 1 pretrain.py)

step pretrain-ddp 150 "${torchrun[@]}" "${common[@]}" --train.dtype "$DTYPE" --train.compile "$COMPILE" \
    --train.max_steps "$LONG_STEPS" --train.eval_interval $((LONG_STEPS / 2)) --train.log_interval "$LOG_EVERY" \
    --train.out_dir "$WORK/ddp"
report run "pretrain ddp (torchrun, 1 process) $DTYPE compile=$COMPILE" "$WORK/ddp"

step pretrain-fsdp 90 "${torchrun[@]}" "${common[@]}" "${short[@]}" --train.dtype "$DTYPE" --train.parallel fsdp \
    --train.out_dir "$WORK/fsdp"
report run "pretrain fsdp (torchrun, 1 process) $DTYPE eager" "$WORK/fsdp"

for checkpointing in false true; do
    step "pretrain-checkpointing-$checkpointing" 60 "$PY" pretrain.py "${common[@]}" "${short[@]}" \
        --train.dtype "$DTYPE" --train.activation_checkpointing "$checkpointing" \
        --train.out_dir "$WORK/checkpointing-$checkpointing"
    report run "pretrain $DTYPE eager, activation checkpointing $checkpointing" "$WORK/checkpointing-$checkpointing"
done

step pretrain-fp16 60 "$PY" pretrain.py "${common[@]}" "${short[@]}" --train.dtype float16 --train.out_dir "$WORK/fp16"
report run "pretrain float16 + gradient scaler eager" "$WORK/fp16"

say "GPU check done in $((SECONDS - START)) s"
