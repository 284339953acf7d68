#!/usr/bin/env bash
# The GPU checks of one session (issue 6), in priority order, each under its own time limit:
#   1. tests/test_cuda.py (kernels, decoder, generation, tokenizer, trainer and pipelines on CUDA);
#   2. the Stage-1 GPU preset (fsq_f16_256_gpu.yaml, bf16, streaming 256 px shards) for a few steps;
#   3. the Stage-2 GPU preset (base_gpu.yaml, 103M, bf16) on that tokenizer's codes for a few steps;
#   4. bench_decoder_train / bench_generation at the base preset's dimensions, bf16, vs transformers;
#   5. bench_streaming with 0..16 DataLoader workers; 6. bench_scaling (base dims).
# Usage on a GPU machine, from the repository root:  OUT=DIR bash benchmarks/gpu_check.sh [BUDGET_S]
# Writes DIR/gpu.log (everything), DIR/results.jsonl (the benchmarks' JSON lines, the runs' last log
# lines) and two PNGs; exits non-zero if any step failed or ran out of time. Wheels in .whl/ (packages
# the machine lacks) are installed to /tmp/site first.
set -u
OUT=${OUT:-/tmp/gpu_check}
BUDGET=${1:-560}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH="/tmp/site:$PWD"
fi
LOG="$OUT/gpu.log"
RES="$OUT/results.jsonl"
START=$(date +%s)
FAILED=""
WORK=/tmp/gpu_work
rm -rf "$WORK" && mkdir -p "$WORK"

step() {  # step NAME LIMIT_S CMD...: run under min(LIMIT, what is left of BUDGET); STEPS="a b" picks some
    local name=$1 limit=$2
    shift 2
    [[ -z "${STEPS:-}" || " $STEPS " == *" $name "* ]] || return 0
    local left=$((BUDGET - ($(date +%s) - START)))
    ((left < limit)) && limit=$left
    if ((limit < 10)); then
        echo "=== $name: skipped, budget spent" | tee -a "$LOG"
        return
    fi
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local t0=$(date +%s)
    timeout -k 10 "$limit" "$@" >"$WORK/$name.out" 2>&1
    local rc=$?
    ((rc != 0)) && FAILED="$FAILED $name"
    cat "$WORK/$name.out" >>"$LOG"
    grep -h '^{"bench"' "$WORK/$name.out" >>"$RES"
    echo "=== $name rc=$rc in $(($(date +%s) - t0))s" | tee -a "$LOG"
    grep -v '^{' "$WORK/$name.out" | tail -n 12
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, transformers, accelerate, sys; print(sys.version.split()[0], torch.__version__, \
transformers.__version__, accelerate.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee -a "$LOG"

step tests 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py ${PYTEST_K:+-k "$PYTEST_K"}

step shards 40 python3 -m data.build --dataset shapes --num 2000 --resolution 256 --out "$WORK/shards" \
    --shard_size 250 --no_progress
step stage1 130 python3 -m accelerate.commands.launch --num_processes 1 --mixed_precision bf16 -m tokenizers_mm.train \
    --config tokenizers_mm/configs/fsq_f16_256_gpu.yaml --train_data "[$WORK/shards]" --max_steps 100 \
    --num_workers 8 --disc_start 50 --eval_num 64 --eval_every 0 --save_every 0 --output_dir "$WORK/stage1"
tail -n 1 "$WORK/stage1/log.jsonl" 2>/dev/null | sed 's/^{/{"run": "stage1_fsq_f16_256_gpu", /' >>"$RES"
cp "$WORK/stage1/reconstructions.png" "$OUT/stage1_reconstructions.png" 2>/dev/null

step stage2 130 python3 -m accelerate.commands.launch --num_processes 1 --mixed_precision bf16 -m ar_model.train \
    --config ar_model/configs/base_gpu.yaml --tokenizer "$WORK/stage1/final" --train_num 2000 --val_num 64 \
    --max_steps 60 --warmup_steps 10 --log_every 10 --eval_every 0 --sample_every 0 --save_every 0 \
    --output_dir "$WORK/stage2"
tail -n 1 "$WORK/stage2/log.jsonl" 2>/dev/null | sed 's/^{/{"run": "stage2_base_gpu", /' >>"$RES"
cat "$WORK/stage2/metrics.json" >>"$LOG" 2>/dev/null
find "$WORK/stage2" -name '*.png' 2>/dev/null | head -n 1 | xargs -r -I{} cp {} "$OUT/stage2_samples.png"

step train_base 60 python3 benchmarks/bench_decoder_train.py --preset base --seq-len 2048 --batch 8
step train_base_flex 80 python3 benchmarks/bench_decoder_train.py --preset base --seq-len 2048 --batch 8 \
    --attn-impl flex
step generation_base 60 python3 benchmarks/bench_generation.py --preset base --new 64 --repeats 2
step streaming 45 python3 benchmarks/bench_streaming.py --shards "$WORK/shards" --workers 0 4 8 16
step scaling_base 90 python3 benchmarks/bench_scaling.py --preset base --seq-lens 256 1024 4096 \
    --tokens-per-step 16384 --image-sides 4 16 --peak-sizes 4096 8192 --repeats 2
echo "=== all done in $(($(date +%s) - START))s; failed or timed out:${FAILED:- none}" | tee -a "$LOG"
[[ -z "$FAILED" ]]  # the exit status says whether every step that ran passed
