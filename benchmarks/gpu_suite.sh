#!/usr/bin/env bash
# fastkd on a lent GPU machine: install, GPU-marked tests, kernel benchmarks, end-to-end benchmark.
#
#   OUT=/path bash benchmarks/gpu_suite.sh [STAGE ...]      (default: all stages, in order)
#
# Stages (each fits one 10-minute device command; run them as consecutive commands of one lease):
#   install     pip install the project (no deps; the machine brings torch/triton/timm) + carried wheels/
#   tests       pytest -m gpu: the Triton kernels compiled for real, against the fp64 reference
#   kernels_bf16, kernels_fp32
#               benchmarks/attention_kl.py at the standard GPU shapes (fastkd, eager as a user writes it,
#               torch.compile compiled fresh per shape, the FlexAttention construction), one dtype per command;
#               `kernels` runs both
#   importance  benchmarks/head_importance.py
#   train224, train384, trainloader
#               benchmarks/train_step.py (DeiT-S <- DeiT-B, bf16, batch 128/256): 224 px and 384 px without data,
#               then 224 px through the loader; `train` runs all three (too long for one command)
#   traincompile
#               benchmarks/train_step.py, 224 px, batch 256: no KD, Hinton, 12-layer attention KD (fastkd and the
#               eager bf16-maps baseline), SSTA, AttnDistill, each eager and with train.compile; prints the KD
#               overhead over the no-KD step and the host syncs per step
#   model       fastkd bench model: the cost model's predictions for this GPU's kernels (predicted beside measured;
#               record the model's error in benchmarks/NOTES.md from the kernels stage's design_bound_ms column)
#   dali        DALI's GPU ("mixed") pipeline, if a DALI wheel was carried in wheels/ (the tests/data GPU test and
#               the data benchmark on the GPU); records what happened either way
#   cache       benchmarks/teacher_cache.py on the GPU: logit-KD step with the teacher online, cached, none
#   summary     print a short table of what came back
# With 15 minutes of device time (start-up included), run two commands:
#   1) `install tests kernels_bf16`   2) `model traincompile summary`
# and the rest (kernels_fp32 importance train224 train384 trainloader dali cache) when more time is lent.
# Everything (CSVs, plots, logs, junit XML) lands in $OUT; copy the CSVs/PNGs to benchmarks/results/.
# DRY_RUN=1 runs every stage at smoke size on a CPU-only machine (GPU parts skipped) to check the script.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(install tests kernels_bf16 kernels_fp32 model importance train224 train384 trainloader
                                  traincompile dali cache summary)
DRY=${DRY_RUN:-0}

log() { echo "[gpu_suite $(date -u +%H:%M:%S)] $*" | tee -a "$OUT/suite.log"; }

stage_install() {
  { nvidia-smi || true; $PY -c "import sys,torch,triton; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"; } > "$OUT/env.txt" 2>&1
  if [ -d wheels ] && ls wheels/*.whl >/dev/null 2>&1; then
    $PY -m pip install --no-index --find-links wheels --no-deps wheels/*.whl > "$OUT/pip_wheels.log" 2>&1 \
      && log "installed carried wheels" || log "carried wheels failed (see pip_wheels.log)"
  fi
  $PY -m pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 && log "installed fastkd" \
    || { log "install failed (see install.log)"; return 1; }
  $PY -m fastkd info > "$OUT/info.txt" 2>&1; cat "$OUT/info.txt"
}

stage_tests() {
  # modules whose optional imports (DALI, DeepSpeed) are missing there must not stop the GPU tests
  local args=(-m gpu -q tests --continue-on-collection-errors --junitxml="$OUT/gpu_tests.xml" -p no:cacheprovider)
  [ "$DRY" = 1 ] && args=(-q tests/kernels -k "N17 or fp32" --junitxml="$OUT/gpu_tests.xml" -p no:cacheprovider)
  timeout 540 $PY -m pytest "${args[@]}" > "$OUT/gpu_tests.log" 2>&1
  log "gpu tests rc=$? ($(tail -n 1 "$OUT/gpu_tests.log"))"
}

_kernels() {
  local dtype=$1
  local args=(--dtypes "$dtype" --out "$OUT/attention_kl_gpu_$dtype.csv")
  [ "$DRY" = 1 ] && args=(--dtypes "$dtype" --out "$OUT/attention_kl_gpu_$dtype.csv" --shapes "1,2,65,16"
                          --providers fastkd,eager,flex --rep-ms 5)
  timeout 560 $PY benchmarks/attention_kl.py "${args[@]}" > "$OUT/bench_attention_kl_$dtype.log" 2>&1
  log "attention_kl benchmark ($dtype) rc=$? (rows are written as they are measured)"
}
stage_kernels_bf16() { _kernels bf16; }
stage_kernels_fp32() { _kernels fp32; }
stage_kernels() { stage_kernels_bf16; stage_kernels_fp32; }

stage_importance() {
  local args=(--out "$OUT/head_importance_gpu.csv" --overwrite)
  [ "$DRY" = 1 ] && args+=(--shapes 1x2x33x16 --reps 1)
  timeout 500 $PY benchmarks/head_importance.py "${args[@]}" > "$OUT/bench_head_importance.log" 2>&1
  log "head_importance benchmark rc=$?"
}

# the end-to-end benchmark in pieces of about 5 minutes each: train224, train384, trainloader
_train() {
  local tag=$1; shift
  local args=(--out "$OUT/train_step" --workdir /tmp/fastkd_train_step "$@")
  # shellcheck disable=SC2206  # TRAIN_DRY_EXTRA (a stage's local) is a word list on purpose
  [ "$DRY" = 1 ] && args=(--out "$OUT/train_step" --tiny --data none ${TRAIN_DRY_EXTRA:-})
  timeout 560 $PY benchmarks/train_step.py "${args[@]}" > "$OUT/bench_train_step_$tag.log" 2>&1
  log "train_step benchmark ($tag) rc=$?"
}
stage_train224() { _train 224 --img-size 224 --data none; }
stage_train384() { _train 384 --img-size 384 --data none; }
stage_trainloader() { _train loader --img-size 224 --data loader --variants none hinton attn12 attn12_eager; }
stage_train() { stage_train224; stage_train384; stage_trainloader; }
stage_traincompile() {
  local TRAIN_DRY_EXTRA="--compile both --variants none hinton ssta attndistill"  # DRY_RUN: the same at smoke size
  _train compile --img-size 224 --batch 256 --data none --compile both \
    --variants none hinton attn12 attn12_eager ssta attndistill
  # the closing table: step time eager and compiled, KD overhead over the no-KD step, host syncs per step
  sed -n '/^step summary/,$p' "$OUT/bench_train_step_compile.log"
}

stage_model() {
  local args=(--hardware H100)
  [ "$DRY" = 1 ] && args+=(--no-csv --N 197)
  $PY -c "import torch; print(torch.cuda.get_device_name(0))" 2>/dev/null | grep -q H200 && args=(--hardware H200)
  timeout 300 $PY -m fastkd bench model "${args[@]}" --out "$OUT/attention_kl_model.csv" > "$OUT/bench_model.log" 2>&1
  log "cost model rc=$?"
}

stage_dali() {
  if ! $PY -c "import nvidia.dali" 2>/dev/null; then
    log "dali: not installed on this machine (carry its wheel in wheels/ to try the GPU pipeline)"; return 0
  fi
  [ "$DRY" = 1 ] && { log "dali: dry run, GPU pipeline skipped"; return 0; }
  timeout 300 $PY -m pytest -q -m gpu tests/data -p no:cacheprovider > "$OUT/dali_gpu_tests.log" 2>&1
  log "dali GPU tests rc=$? ($(tail -n 1 "$OUT/dali_gpu_tests.log"))"
  timeout 240 $PY benchmarks/data_pipeline.py --out "$OUT" > "$OUT/bench_data.log" 2>&1
  log "data benchmark rc=$?"
}

stage_cache() {
  local args=(--out "$OUT/teacher_cache_gpu.csv")
  [ "$DRY" = 1 ] && args+=(--steps 2 --teacher-epochs 1)
  timeout 400 $PY benchmarks/teacher_cache.py "${args[@]}" > "$OUT/bench_teacher_cache.log" 2>&1
  log "teacher cache benchmark rc=$?"
}

stage_summary() {
  # every benchmark CSV has the long schema of benchmarks/_common.py (one measured quantity per row)
  $PY - "$OUT" <<'PYEOF'
import csv, glob, json, os, sys
out = sys.argv[1]
for path in sorted(glob.glob(os.path.join(out, "*.csv")) + glob.glob(os.path.join(out, "*", "*.csv"))):
    rows = list(csv.DictReader(open(path)))
    print(f"\n{os.path.basename(path)}: {len(rows)} rows")
    if rows and "metric" not in rows[0]:
        continue
    shown = [r for r in rows if r["metric"] in ("time", "step_time", "images_per_s", "kd_overhead", "host_syncs", "") and r["mode"] in ("full", "train", "tiny", "")]
    for r in shown[:24]:
        extra = f" floor={r['floor_ms']} design={r['design_bound_ms']}" if r.get("floor_ms") else ""
        print(f"  {r['benchmark']} {r['op']} {r['provider']} {r['mode']} {json.dumps(json.loads(r['config'] or '{}'))} "
              f"{r['status']} {r['metric']}={r['p50']} {r['unit']}{extra} {r['note'][:80]}")
PYEOF
}

for s in "${STAGES[@]}"; do
  log "stage $s"
  "stage_$s" || log "stage $s failed"
done
