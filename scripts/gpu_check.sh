#!/usr/bin/env bash
# GPU check for stars on one H200 (or any CUDA GPU), in under 8 minutes:
#   (a) install the project (carried wheels for what the image lacks, then pip install -e .)
#   (b) materialize CIFAR-10 (train shard 0 of 2 = 25,000 images, test = 10,000) from
#       data/offline/*.npz into an ImageFolder tree
#   (c) train a ResNet-34 teacher for a few epochs (stars train-teacher, bf16, channels-last,
#       compile) from configs/paper/teacher_resnet34_cifar10.yaml
#   (d) distill it into spiking_resnet18 with Fast + STARS (stars distill, bf16, compile)
#       from configs/paper/distill_cifar10_resnet34_sresnet18.yaml, a few short epochs
#   (e) time synthesis, KD and a teacher training step in isolation (scripts/gpu_bench.py),
#       and report images/s and peak GPU memory for each (scripts/gpu_report.py)
# Everything printed also goes to $OUT/gpu_check.log; the summary to $OUT/gpu_check.txt.
#
# Prepare once on the CPU machine:   bash scripts/prepare_gpu_carry.sh
# Run through the device tool:       run(command="bash scripts/gpu_check.sh",
#                                        carry=["data/offline"], timeout_s=540)
# Knobs (environment): GPU_CHECK_BUDGET_S (default 450 s for all stages together),
# TEACHER_EPOCHS (3), DISTILL_EPOCHS (5, of which DISTILL_WARMUP 2 are synthesis only),
# KD_STEPS (30 per epoch), GPU_CHECK_OFFLINE (data/offline), GPU_CHECK_WORK (/tmp/stars-gpucheck).
# For a smoke test of this script on a CPU: GPU_CHECK_DEVICE=cpu GPU_CHECK_SKIP_PIP=1 and tiny
# sizes through TEACHER_SET / DISTILL_SET / BENCH_ARGS (extra words appended to the commands).
set -euo pipefail
cd "$(dirname "$0")/.."

START=$(date +%s)
BUDGET_S=${GPU_CHECK_BUDGET_S:-450}
DEADLINE=$((START + BUDGET_S))
OFFLINE=${GPU_CHECK_OFFLINE:-data/offline}
WORK=${GPU_CHECK_WORK:-/tmp/stars-gpucheck}
OUT=${OUT:-$WORK/out}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-3}
DISTILL_EPOCHS=${DISTILL_EPOCHS:-5}
DISTILL_WARMUP=${DISTILL_WARMUP:-2}
KD_STEPS=${KD_STEPS:-30}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
read -r -a TEACHER_SET <<<"${TEACHER_SET:-}"
read -r -a DISTILL_SET <<<"${DISTILL_SET:-}"
read -r -a BENCH_ARGS <<<"${BENCH_ARGS:-}"
DATA=$WORK/cifar10
RUNS=$WORK/runs
SITE=$WORK/site
TEACHER_CFG=configs/paper/teacher_resnet34_cifar10.yaml
DISTILL_CFG=configs/paper/distill_cifar10_resnet34_sresnet18.yaml
STAGES_TSV=$WORK/stages.tsv

mkdir -p "$WORK" "$OUT" "$RUNS"
: >"$STAGES_TSV"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
TEE_PID=$!
export PYTHONUNBUFFERED=1 COLUMNS=${COLUMNS:-120} TERM=${TERM:-dumb}
STARS=(python3 -m stars.cli)
declare -A RC=()

# stage NAME CAP_SECONDS CMD... : run CMD (a command, or a shell function run in this shell)
# within min(CAP, time left of the budget); record rc, wall time and peak GPU memory used.
stage() {
  local name=$1 cap=$2
  shift 2
  local left=$((DEADLINE - $(date +%s)))
  local limit=$((cap < left ? cap : left))
  if ((limit < 15)); then
    echo "== $name: SKIPPED (${left}s of the ${BUDGET_S}s budget left)"
    RC[$name]=skipped
    printf '%s\tskip\t0\t-\n' "$name" >>"$STAGES_TSV"
    return 0
  fi
  echo
  echo "== $name (limit ${limit}s): $*"
  local smi_log=$WORK/smi_$name.txt smi_pid=""
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 \
      >"$smi_log" 2>/dev/null &
    smi_pid=$!
  fi
  local t0 t1 rc=0
  t0=$(date +%s.%N)
  if declare -F "$1" >/dev/null; then
    "$@" || rc=$?
  else
    timeout -k 15 "$limit" "$@" || rc=$?
  fi
  t1=$(date +%s.%N)
  if [[ -n $smi_pid ]]; then
    kill "$smi_pid" 2>/dev/null || true
    wait "$smi_pid" 2>/dev/null || true
  fi
  local peak secs
  peak=$( (sort -n "$smi_log" 2>/dev/null || true) | tail -n 1 | tr -d ' ')
  peak=${peak:--}
  secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
  RC[$name]=$rc
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$secs" "$peak" >>"$STAGES_TSV"
  echo "== $name: rc=$rc in ${secs}s (peak GPU memory used: ${peak} MiB)"
  if [[ $rc == 124 || $rc == 137 ]]; then echo "== $name: stopped at its time limit"; fi
}

ok() { [[ ${RC[$1]:-} == 0 ]]; }

# (a) dependencies: the image has torch & co.; spikingjelly, loguru and pydantic come as
# wheels in $OFFLINE/wheels (scripts/prepare_gpu_carry.sh). Runs in this shell (exports).
do_install() {
  local need="import spikingjelly, loguru, pydantic, typer, rich, safetensors, yaml, torchvision"
  if python3 -c "$need" 2>/dev/null; then
    echo "dependencies already importable; no wheels installed"
  else
    if ! compgen -G "$OFFLINE/wheels/*.whl" >/dev/null; then
      echo "error: dependencies missing and no wheels in $OFFLINE/wheels;" \
        "run scripts/prepare_gpu_carry.sh here and carry $OFFLINE"
      return 1
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$OFFLINE"/wheels/*.whl || return 1
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    python3 -c "$need" || return 1
  fi
  if [[ -n ${GPU_CHECK_SKIP_PIP:-} ]]; then
    echo "GPU_CHECK_SKIP_PIP set: not running pip install -e ."
  elif python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .; then
    echo "pip install -e . done"
  else
    echo "pip install -e . failed; running the package from the checkout (PYTHONPATH)"
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  fi
  STARS_CHECK_DEVICE=$DEVICE python3 - <<'EOF' || return 1
import os
import platform

import pydantic
import spikingjelly  # noqa: F401
import torch
import torchvision

import stars

print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}),"
      f" torchvision {torchvision.__version__}, pydantic {pydantic.VERSION}, stars {stars.__version__}")
if os.environ["STARS_CHECK_DEVICE"].startswith("cuda"):
    if not torch.cuda.is_available():
        raise SystemExit("error: torch sees no CUDA device")
    p = torch.cuda.get_device_properties(0)
    print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
EOF
}

finish() {
  local code=$?
  set +e
  echo
  echo "== report"
  local train_n
  train_n=$(find "$DATA/train" -type f 2>/dev/null | wc -l)
  {
    echo "stars GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(hostname)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
    echo "budget ${BUDGET_S}s; total wall $(($(date +%s) - START))s; teacher epochs" \
      "${TEACHER_EPOCHS}; distill epochs ${DISTILL_EPOCHS} (warm-up ${DISTILL_WARMUP}," \
      "${KD_STEPS} KD steps each); device ${DEVICE}, bf16, channels_last, compile"
    if [[ -n ${TEACHER_SET:-}${DISTILL_SET:-}${BENCH_ARGS:-} ]]; then
      echo "extra: TEACHER_SET=${TEACHER_SET[*]-} DISTILL_SET=${DISTILL_SET[*]-} BENCH_ARGS=${BENCH_ARGS[*]-}"
    fi
    echo
    python3 scripts/gpu_report.py --stages "$STAGES_TSV" --train-images "$train_n" \
      --teacher-run "$RUNS/teacher" --distill-run "$RUNS/distill" --bench "$WORK/gpu_bench.json"
    echo
    if grep -qi "torch.compile failed" "$OUT/gpu_check.log" 2>/dev/null; then
      echo "NOTE: torch.compile failed somewhere and fell back to eager (see gpu_check.log)"
    fi
    local failed=""
    for s in install data teacher distill bench; do
      [[ ${RC[$s]:-missing} == 0 ]] || failed+=" $s(${RC[$s]:-not run})"
    done
    if [[ -z $failed && $code == 0 ]]; then
      echo "RESULT: all stages passed"
    else
      echo "RESULT: FAILED:${failed:- script error rc=$code}"
    fi
  } 2>&1 | tee "$OUT/gpu_check.txt"
  cp -f "$RUNS/teacher/metrics.jsonl" "$OUT/teacher_metrics.jsonl" 2>/dev/null
  cp -f "$RUNS/distill/metrics.jsonl" "$OUT/distill_metrics.jsonl" 2>/dev/null
  cp -f "$RUNS/distill/summary.json" "$OUT/distill_summary.json" 2>/dev/null
  cp -f "$RUNS/distill/synthetic_grid.png" "$OUT/synthetic_grid.png" 2>/dev/null
  cp -f "$WORK/gpu_bench.json" "$OUT/gpu_bench.json" 2>/dev/null
  local status=1
  grep -q "^RESULT: all stages passed" "$OUT/gpu_check.txt" && status=0
  exec 1>&- 2>&- # let tee finish gpu_check.log before the command returns
  wait "$TEE_PID" 2>/dev/null || sleep 1
  exit "$status"
}
trap finish EXIT

echo "stars GPU check: repo $(pwd), work $WORK, out $OUT, budget ${BUDGET_S}s"
nvidia-smi -L 2>/dev/null || echo "nvidia-smi not found"

stage install 120 do_install

if ok install; then
  stage data 60 python3 scripts/materialize_subset.py "$DATA" \
    --train "$OFFLINE/train-0of2.npz" --test "$OFFLINE/test.npz"
fi

if ok data; then
  stage teacher 150 "${STARS[@]}" train-teacher "$TEACHER_CFG" --overwrite \
    --set device="$DEVICE" --set precision=bf16 --set channels_last=true --set compile=true \
    --set output_dir="$RUNS" --set name=teacher \
    --set data.root="$DATA" --set data.format=imagefolder --set data.num_workers=8 \
    --set train.epochs="$TEACHER_EPOCHS" --set evaluation.every_epochs=1000 \
    ${TEACHER_SET[@]+"${TEACHER_SET[@]}"}
fi

if ok teacher; then
  stage distill 240 "${STARS[@]}" distill "$DISTILL_CFG" --overwrite \
    --set device="$DEVICE" --set precision=bf16 --set channels_last=true --set compile=true \
    --set output_dir="$RUNS" --set name=distill \
    --set data.root="$DATA" --set data.format=imagefolder --set data.num_workers=8 \
    --set teacher.checkpoint="$RUNS/teacher/teacher.safetensors" \
    --set distill.epochs="$DISTILL_EPOCHS" --set synthesis.warmup_epochs="$DISTILL_WARMUP" \
    --set distill.synthesis_steps_per_epoch=2 --set distill.kd_steps_per_epoch="$KD_STEPS" \
    --set evaluation.every_epochs=1000 --set evaluation.max_images=2000 \
    ${DISTILL_SET[@]+"${DISTILL_SET[@]}"}
fi

if ok teacher; then
  stage bench 150 python3 scripts/gpu_bench.py "$DISTILL_CFG" --json "$WORK/gpu_bench.json" \
    --set device="$DEVICE" --set precision=bf16 --set channels_last=true --set compile=true \
    --set data.root="$DATA" --set data.format=imagefolder \
    --set teacher.checkpoint="$RUNS/teacher/teacher.safetensors" \
    --warmup 2 --synth-iters 3 --kd-iters 20 --teacher-iters 30 \
    ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"}
fi
