#!/usr/bin/env bash
# The GPU work of the performance section in one script: the CUDA tests, a short real-size training run
# (vit_h, S = 1024, bf16, batch 8, 7 sentences per image; with and without --compile), torchrun with NCCL,
# and the three benchmarks (bench/encoder.py, bench/train_speed.py, bench/dataloader.py). Everything it
# measures lands in $OUT (default ./gpu-session-out): one log per step, JSON where a benchmark writes one,
# and summary.txt (step, exit code, seconds).
#
#   bash bench/gpu_session.sh prepare      # on a machine with PyPI, in the repo root: .whl/ (the packages a bare
#                                          # GPU image lacks: segment-anything, pycocotools, ftfy, wcwidth, for
#                                          # Python 3.12) and .data/refcoco-mini (a copy of ../shared/refcoco-mini)
#   bash bench/gpu_session.sh a            # on the GPU machine (.whl and .data carried along: both are
#                                          # git-ignored), one group per command, each under 10 minutes:
#   bash bench/gpu_session.sh b            #   a: env tests encoder torchrun   b: verify verify_compile dataloader
#   bash bench/gpu_session.sh c            #   c: train_vit_h train_vit_b      d: encoder_compile suite
#   bash bench/gpu_session.sh d            # (groups in order of value; steps can also be named one by one)
#   bash bench/gpu_session.sh all          # every step in one go, where no per-command time limit applies
#   bash bench/gpu_session.sh --dry-run a  # print the commands instead of running them
#   SMOKE=1 bash bench/gpu_session.sh all  # every step on a CPU at toy sizes (tiny preset, S = 128): a check of
#                                          # the script, no figures
#
# Each step runs under `timeout` (seconds in STEP_LIMIT below), so a group ends in time even when a step
# hangs; a failing step is logged and the next one runs. Environment: PYTHON (default python3), OUT, WORK
# (scratch: runs, caches; default /tmp/gpu-session), REFCOCO_MINI (default .data/refcoco-mini, else
# ../shared/refcoco-mini). With a .whl folder in the repo root its wheels are installed to /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu-session-out}
WORK=${WORK:-/tmp/gpu-session}
DRY=0
if [ "${SMOKE:-0}" = 1 ]; then
  DEVICE=cpu BIG=tiny SMALL=tiny PRESETS=tiny S=128 STEPS=4 LOG=2 VERIFY_STEPS=4 ITERS=1 BATCH=2 WORKERS="0 1"
  BATCHES=3 PREC=fp32
  LIMIT_SCALE=${LIMIT_SCALE:-4}  # a 2-core CPU compiles and trains far slower than the GPU machine
else
  DEVICE=cuda BIG=vit_h SMALL=vit_b PRESETS="vit_h vit_b" S=1024 STEPS=30 LOG=10 VERIFY_STEPS=40 ITERS=10 BATCH=8
  WORKERS="0 4 8 16" BATCHES=50 PREC=bf16
fi
# Seconds per step; each group's sum stays under 10 minutes (560 s), the device's limit on one command.
declare -A STEP_LIMIT=([env]=30 [tests]=240 [encoder]=200 [torchrun]=90 [verify]=150 [verify_compile]=250
                       [dataloader]=150
                       [train_vit_h]=400 [train_vit_b]=160 [encoder_compile]=400 [suite]=160)
declare -A STEP_GROUPS=([a]="env tests encoder torchrun" [b]="verify verify_compile dataloader" [c]="train_vit_h train_vit_b"
                   [d]="encoder_compile suite")

run() {  # run NAME LIMIT CMD...: the command under timeout, output to $OUT/NAME.log, a line in summary.txt
  local name=$1 limit=$(($2 * ${LIMIT_SCALE:-1})); shift 2
  if [ "$DRY" = 1 ]; then printf '[%s, limit %ss] ' "$name" "$limit"; printf '%q ' "$@"; echo; return 0; fi
  local start=$SECONDS rc
  echo "=== $name ($(date -Is), limit ${limit}s): $*" | tee -a "$OUT/$name.log"
  PYTHONUNBUFFERED=1 timeout --kill-after=20 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - start)) s$([ "$rc" = 124 ] && echo ' (TIMED OUT)')" \
    | tee -a "$OUT/$name.log"
  printf '%-16s exit %-4s %5d s  %s\n' "$name" "$rc" "$((SECONDS - start))" "$(date -Is)" >>"$OUT/summary.txt"
  return 0
}

data_root() {  # the refcoco-mini fixture, and a 100x repeated copy of it under $WORK (made once)
  local mini=${REFCOCO_MINI:-}
  for candidate in "$mini" .data/refcoco-mini ../shared/refcoco-mini shared/refcoco-mini; do
    if [ -n "$candidate" ] && [ -f "$candidate/refcoco/refs(unc).p" ]; then mini=$candidate; break; fi
  done
  if [ ! -f "$mini/refcoco/refs(unc).p" ]; then
    echo "no refcoco-mini fixture: run 'bash bench/gpu_session.sh prepare' here first, or set REFCOCO_MINI" >&2
    return 1
  fi
  MINI=$mini
  ROOT=$WORK/refcoco-mini-x100
  if [ "$DRY" = 0 ] && [ ! -f "$ROOT/refcoco/refs(unc).p" ]; then
    "$PY" bench/refer_repeat.py "$MINI" "$ROOT" --copies 100 >/dev/null || return 1
  fi
}

prepare() {  # on a machine with PyPI: wheels for Python 3.12 x86-64 and the fixture, both git-ignored
  set -e
  rm -rf .whl && mkdir -p .whl .data
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl segment-anything==1.0 pycocotools==2.0.11 ftfy==6.3.1 wcwidth==0.9.4
  rm -rf .data/refcoco-mini && cp -rL ../shared/refcoco-mini .data/refcoco-mini && chmod -R u+w .data/refcoco-mini
  git rev-parse HEAD >.data/COMMIT 2>/dev/null || true
  ls -l .whl .data
  echo "now, on the GPU machine (carry .whl and .data): bash bench/gpu_session.sh a   (then b, c, d)"
}

setup() {  # on the GPU machine: the carried wheels, then a check that the project imports
  if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && [ "$DRY" = 0 ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  [ "$DRY" = 1 ] || mkdir -p "$OUT" "$WORK"
}

step_env() {
  run env "${STEP_LIMIT[env]}" bash -c "nvidia-smi; echo; '$PY' -c 'import sys, torch, numpy; print(sys.version); \
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"cudnn\", torch.backends.cudnn.version(), \
\"numpy\", numpy.__version__); print(torch.cuda.get_device_name() if torch.cuda.is_available() else \"NO CUDA\"); \
import maris, data, train, evaluate; print(\"project imports: ok\")'; echo commit \$(cat .data/COMMIT 2>/dev/null \
|| git rev-parse HEAD 2>/dev/null || echo unknown); nproc; free -g; df -h /tmp ."
}

step_tests() {  # the CUDA tests: every test whose name says gpu (they skip without CUDA)
  run tests "${STEP_LIMIT[tests]}" "$PY" -m pytest -q tests -k gpu -rs -p no:cacheprovider
}

step_encoder() {  # encoder throughput and MFU, eager: vit_h and vit_b, fp32 / bf16, stock / sdpa
  run encoder "${STEP_LIMIT[encoder]}" "$PY" bench/encoder.py --preset $PRESETS --image-size $S --device $DEVICE \
    --batch $BATCH --dtype fp32 bf16 --attention stock sdpa --compile eager --warmup 3 --iters $ITERS \
    --json "$OUT/encoder.json"
}

step_encoder_compile() {  # the same with torch.compile of the whole encoder, bf16 only (compiling takes minutes)
  run encoder_compile "${STEP_LIMIT[encoder_compile]}" "$PY" bench/encoder.py --preset $PRESETS --image-size $S \
    --device $DEVICE --batch $BATCH --dtype bf16 --attention stock sdpa --compile compiled --warmup 3 --iters $ITERS \
    --json "$OUT/encoder_compile.json"
}

step_torchrun() {  # the launcher path with one process, then NCCL + DDP around MARIS (bench/ddp_check.py says why)
  run torchrun "${STEP_LIMIT[torchrun]}" bash -c "set -o pipefail;
    '$PY' -m torch.distributed.run --standalone --nproc_per_node 1 train.py --preset tiny --image-size 64 \
      --batch-size 4 --train-limit 32 --max-steps 3 --val-split '' --device $DEVICE --no-progress \
      --out-dir '$WORK/torchrun' && echo 'torchrun train.py: ok' &&
    '$PY' -m torch.distributed.run --standalone --nproc_per_node 1 bench/ddp_check.py"
}

# A train.py run, then a check of its metrics.jsonl: every loss finite, items/s per window, peak GPU memory.
VERIFY_PY="import json, math, sys, torch, train
out = sys.argv[1]
train.main(sys.argv[2:])
records = [json.loads(line) for line in open(out + '/metrics.jsonl')]
losses = [r['loss'] for r in records if r['kind'] == 'train']
print('losses', losses, 'items/s', [round(r['items_per_s'], 2) for r in records if r['kind'] == 'train'])
print('all losses finite:', all(map(math.isfinite, losses)))
if torch.cuda.is_available():
    print('peak GiB', round(torch.cuda.max_memory_allocated() / 2**30, 2), 'of',
          round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))"

verify_args() {  # real size: vit_h, S = 1024, bf16, batch 8, K = 7 sentences per image, 40 steps
  VERIFY_ARGS=(--dataset refcoco --data-root "$ROOT" --preset "$BIG" --image-size "$S" --precision "$PREC"
               --batch-size 8 --sentences-per-image 7 --max-steps "$VERIFY_STEPS" --log-every "$LOG" --val-split ""
               --device "$DEVICE" --no-progress)
}

step_verify() {  # the real-size run, eager
  data_root || return 0
  verify_args
  rm -rf "$WORK/verify"  # a fresh run: train.py appends to an existing metrics.jsonl
  run verify "${STEP_LIMIT[verify]}" "$PY" -c "$VERIFY_PY" "$WORK/verify" "${VERIFY_ARGS[@]}" --out-dir "$WORK/verify"
}

step_verify_compile() {  # the same with --compile, logging every recompilation (TORCH_LOGS=recompiles)
  data_root || return 0
  verify_args
  rm -rf "$WORK/verify_compile"
  run verify_compile "${STEP_LIMIT[verify_compile]}" env TORCH_LOGS=recompiles "$PY" -c "$VERIFY_PY" \
    "$WORK/verify_compile" "${VERIFY_ARGS[@]}" --compile --out-dir "$WORK/verify_compile"
  [ "$DRY" = 1 ] || echo "recompilations logged: $(grep -c 'Recompiling' "$OUT/verify_compile.log")" \
    | tee -a "$OUT/verify_compile.log"
}

step_dataloader() {  # items/s the training DataLoader delivers at S = 1024 with 0, 4, 8, 16 workers
  data_root || return 0
  run dataloader "${STEP_LIMIT[dataloader]}" "$PY" bench/dataloader.py --repeated-root "$ROOT" --workers $WORKERS \
    --batches $BATCHES --image-size 1024 --json "$OUT/dataloader.json"
}

step_train_vit_h() {  # training items/s and peak memory against the encode-once floor
  data_root || return 0
  run train_vit_h "${STEP_LIMIT[train_vit_h]}" "$PY" bench/train_speed.py --preset $BIG --image-size $S \
    --device $DEVICE --refcoco-mini "$MINI" --steps $STEPS --log-every $LOG --work-dir "$WORK/train_vit_h" \
    --json "$OUT/train_vit_h.json"
}

step_train_vit_b() {
  data_root || return 0
  run train_vit_b "${STEP_LIMIT[train_vit_b]}" "$PY" bench/train_speed.py --preset $SMALL --image-size $S \
    --device $DEVICE --refcoco-mini "$MINI" --steps $STEPS --log-every $LOG --work-dir "$WORK/train_vit_b" \
    --json "$OUT/train_vit_b.json"
}

step_suite() {  # the whole CPU suite under this image's torch (tests that need ../shared skip)
  run suite "${STEP_LIMIT[suite]}" "$PY" -m pytest -q tests -x -p no:cacheprovider
}

main() {  # a function, so bash has read the whole script before it runs (editing it mid-run changes nothing)
  if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
  if [ "${1:-}" = "prepare" ]; then prepare; return $?; fi
  local steps=() arg s
  for arg in "${@:-all}"; do
    if [ "$arg" = all ]; then steps+=(${STEP_GROUPS[a]} ${STEP_GROUPS[b]} ${STEP_GROUPS[c]} ${STEP_GROUPS[d]})
    elif [ -n "${STEP_GROUPS[$arg]:-}" ]; then steps+=(${STEP_GROUPS[$arg]})
    elif [ -n "${STEP_LIMIT[$arg]:-}" ]; then steps+=("$arg")
    else echo "unknown step or group '$arg': groups ${!STEP_GROUPS[*]}, steps ${!STEP_LIMIT[*]}, or prepare" >&2
      return 2
    fi
  done
  setup
  [ "$DRY" = 1 ] || echo "steps: ${steps[*]} -> $OUT" | tee -a "$OUT/summary.txt"
  for s in "${steps[@]}"; do "step_$s"; done
  [ "$DRY" = 1 ] || { echo "steps ${steps[*]}: $SECONDS s in all" >>"$OUT/summary.txt"; cat "$OUT/summary.txt"; }
}

main "$@"; exit $?
