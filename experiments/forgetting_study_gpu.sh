#!/usr/bin/env bash
# One GPU call of the forgetting study (docs/STUDY.md, amendment 3): train the chosen runs to the end, evaluate
# each closed loop, measure its representation diagnostics (amendment 6), and return their small results; nothing
# a later call needs stays on the GPU machine.
#
# The plan and start.json are tracked in experiments/study_state/ (its README: how they were made). On the CPU
# machine, once per checkout: mkdir -p runs/study && cp experiments/study_state/*.json runs/study/
# Each call (carry .whl; the start point's parts and the state are tracked):
#   RUN_IDS="$(python experiments/forgetting_study.py todo --out runs/study --phase 1 --limit 1 | tail -1)"
#   OUT=$OUT BASE_PACK=experiments/start_point/task_a_base STATE=experiments/study_state RUN_IDS="$RUN_IDS" \
#     bash experiments/forgetting_study_gpu.sh
# (one run per call on one GPU: a run alone ends its training 323-426 s into the call, and two sharing an H100 step
# at half speed each, measured 2026-12-07; docs/STUDY.md amendment 4)
# Compilation cache: on a fresh machine step 0 compiles for ~99 s, with a warm cache for ~18 s (H100, 2026-12-07).
# SAVE_INDUCTOR_CACHE=1 brings the cache back as inductor.tgz.part*; put those parts in .carry/ind here and carry
# that folder too (INDUCTOR_CACHE=.carry/ind, the default): a later call unpacks them if the machine has no cache.
# Back on the CPU machine:
#   python experiments/forgetting_study.py unpack --out runs/study --src <files>/study_call.tgz
# and for a kept checkpoint (KEEP_CHECKPOINTS below; the base unpacked at /tmp/vlmA/base, as on the GPU):
#   python vla-scripts/pack_checkpoint.py unpack <files>/ck_<id> runs/study/runs/<id>/<id>--3000_chkpt \
#     --ref /tmp/ref.pt /tmp/vlmA/base/checkpoints/*.pt
#
# Inputs (environment): BASE_PACK (pack_checkpoint.py prefix of the task-A base, unpacked to BASE_DIR, default
# /tmp/vlmA/base: the path the plan names), STATE (a folder with the plan files and, if made, start.json and
# epsilon.json: copied into STUDY, default runs/study), PHASE (1), RUN_IDS (space-separated, required),
# PARALLEL (finetune.py processes sharing the GPU, default 1), SYNTHETIC_SOURCE_WORKERS (per run; default: the
# host's cores less two, divided by PARALLEL, at most 6), EXPECTED_RUN_S (a run's duration: one that would
# end after the training deadline is not started; default 0), CALL_LIMIT (the call's own limit in seconds,
# default 590), EVAL_RESERVE_S (seconds kept for the closed-loop evaluations, default 100: one run's 40 episodes
# took 46-47 s on an H100), INDUCTOR_CACHE, SAVE_INDUCTOR_CACHE (above), KEEP_CHECKPOINTS (below), TRIALS (episodes
# per synthetic task, default 5), PROBE_SCENES (task-A scenes of the diagnostics, default 600), EVAL_PARALLEL
# (default 4), EVAL_FLAGS (default "--num_workers 4"), DEVICE
# (start and evaluation; default cuda; the runs' device is the plan's).
# Training stops at CALL_LIMIT - EVAL_RESERVE_S - 40 s and evaluation at CALL_LIMIT - 40 s after the start;
# a run or evaluation cut off there is left out of the pack (pack --require_closed_loop) and rerun later.
# Each call starts from the carried state alone: an existing STUDY or BASE_DIR is moved aside (<dir>.before-<time>).
# Comes back under $OUT: study_call.tgz (pack), timeline.txt, env.txt, start.json + start.log when this call
# measured the start point, progress.tgz (every run's log and metrics.jsonl, finished or not: speed; not merged)
# and, on a GPU, gpu_util.csv (utilisation and memory every 5 s while training and evaluating). Exit status: pack's.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
: "${OUT:?OUT must be set}" "${RUN_IDS:?RUN_IDS must name the runs of this call}" "${BASE_PACK:?}" "${STATE:?}"
if ! python3 -c "import draccus" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 WANDB_MODE=disabled
# Each run renders its 1,600 episodes and builds its batches in this many forked workers (the same data and batch
# order for any count, torch_source.py): serially, rendering alone takes ~110 s per run on one core (measured on
# the CPU machine, 70 ms per until-success episode). The host's cores, less two, shared by the parallel runs (<= 6).
WORKERS=$(( ($(nproc) - 2) / ${PARALLEL:-1} )); [ "$WORKERS" -gt 6 ] && WORKERS=6; [ "$WORKERS" -lt 0 ] && WORKERS=0
export SYNTHETIC_SOURCE_WORKERS="${SYNTHETIC_SOURCE_WORKERS:-$WORKERS}"
mkdir -p "$OUT"; OUT_ABS=$(realpath "$OUT")
mark() { echo "$* at $(el)s" | tee -a "$OUT/timeline.txt"; }
CALL_LIMIT=${CALL_LIMIT:-590}; EVAL_RESERVE_S=${EVAL_RESERVE_S:-100}
STUDY=${STUDY:-runs/study}; BASE_DIR=${BASE_DIR:-/tmp/vlmA/base}; PHASE=${PHASE:-1}
S="python3 experiments/forgetting_study.py"
# torch's compilation cache (speed only: the same generated kernels the first compile would make and cache here).
# Before any python3 that imports torch, which may create the folder empty; a machine's own cache is kept.
IND_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/torchinductor_$(id -un)}
if [ ! -d "$IND_DIR/fxgraph" ] && compgen -G "${INDUCTOR_CACHE:-.carry/ind}/inductor.tgz.part*" > /dev/null; then
  mkdir -p "$IND_DIR" && cat "${INDUCTOR_CACHE:-.carry/ind}"/inductor.tgz.part* | tar xzf - -C "$IND_DIR" \
    && mark "compilation cache unpacked into $IND_DIR"
fi
{ date -u; nvidia-smi -L; git rev-parse HEAD; python3 -c "import torch; print(torch.__version__)"; nproc
  echo "SYNTHETIC_SOURCE_WORKERS=$SYNTHETIC_SOURCE_WORKERS"; } \
  > "$OUT/env.txt" 2>&1

python3 vla-scripts/pack_checkpoint.py seeded-embedding /tmp/ref.pt > /tmp/pack.log 2>&1
# A warm machine keeps /tmp and the repo's ignored runs/ between calls: start from the carried state alone
# (a stopped run of an earlier call must not be resumed, amendment 3c; another script's base must not be used).
# What is there is moved aside, not deleted.
for d in "$STUDY" "$BASE_DIR"; do [ -e "$d" ] && mv "$d" "$d.before-$T0"; done
python3 vla-scripts/pack_checkpoint.py unpack "$BASE_PACK" "$BASE_DIR" --ref /tmp/ref.pt >> /tmp/pack.log 2>&1 \
  || { mark "unpacking $BASE_PACK failed: $(tail -1 /tmp/pack.log)"; exit 1; }
mkdir -p "$STUDY"
ls "$STATE"/phase"$PHASE".json > /dev/null 2>&1 || { mark "$STATE has no phase$PHASE.json"; exit 1; }
cp "$STATE"/*.json "$STUDY/"
mark "base and state ready"
if [ ! -f "$STUDY/start.json" ]; then
  if $S start --out "$STUDY" --base "$BASE_DIR" --device "${DEVICE:-cuda}" > "$OUT/start.log" 2>&1; then
    cp "$STUDY/start.json" "$OUT/"; mark "start point measured"
  else mark "start failed: $(tail -1 "$OUT/start.log")"; fi
fi
set -o pipefail
# GPU load while the runs share the card (how many runs one GPU takes is what the first slices measure)
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 5 > "$OUT/gpu_util.csv" 2>&1 &
  SMI=$!
  trap 'kill "$SMI" 2> /dev/null' EXIT  # also when the call ends early
fi
# shellcheck disable=SC2086  # RUN_IDS is a list
$S run --out "$STUDY" --phase "$PHASE" --only $RUN_IDS --parallel "${PARALLEL:-1}" \
  --deadline_unix $((T0 + CALL_LIMIT - EVAL_RESERVE_S - 40)) --expected_run_s "${EXPECTED_RUN_S:-0}" 2>&1 \
  | tee -a "$OUT/timeline.txt"
mark "training rc=$?"
$S closed_loop --out "$STUDY" --device "${DEVICE:-cuda}" --trials "${TRIALS:-5}" --parallel "${EVAL_PARALLEL:-4}" \
  --eval_flags="${EVAL_FLAGS---num_workers 4}" --deadline_unix $((T0 + CALL_LIMIT - 40)) 2>&1 \
  | tee -a "$OUT/timeline.txt"
mark "evaluation rc=$?"
# amendment 6's representation diagnostics (probes, CKA) of each evaluated run, in the time that is left (less
# 30 s when checkpoints are to be packed); a run whose diagnostics are cut off still counts, packed without them
DRIFT_END=$((CALL_LIMIT - 40)); [ -n "${KEEP_CHECKPOINTS:-}" ] && DRIFT_END=$((DRIFT_END - 30))
$S drift --out "$STUDY" --device "${DEVICE:-cuda}" --probe_scenes "${PROBE_SCENES:-600}" --parallel 1 \
  --deadline_unix $((T0 + DRIFT_END)) 2>&1 | tee -a "$OUT/timeline.txt"
mark "diagnostics rc=$?"
[ -n "${SMI:-}" ] && kill "$SMI" 2> /dev/null
$S pack --out "$STUDY" --dest "$OUT/study_call.tgz" --require_closed_loop 2>&1 | tee -a "$OUT/timeline.txt"
rc=$?; mark "pack rc=$rc"
# Every run's log and metrics, finished or not (not for merging: a stopped run's progress shows its speed)
(cd "$STUDY" && find . \( -name '*.log' -o -name metrics.jsonl \) -not -path '*_chkpt*' -print0 \
  | tar czf "$OUT_ABS/progress.tgz" --null -T -)
# Optional parts come back only if they fit: at most 8 files in all, and under 60 MiB (the return limit is 64)
fits() {
  local parts have bytes
  parts=$(find "$1" -type f | wc -l); have=$(find "$OUT" -maxdepth 1 -type f | wc -l)
  bytes=$(cat "$OUT"/* "$1"/* 2> /dev/null | wc -c)
  [ $((parts + have)) -le 8 ] && [ "$bytes" -le $((60 * 1048576)) ]
}
# KEEP_CHECKPOINTS: run ids whose final checkpoint comes back too (ck_<id>.partNN, without what equals the base),
# only for runs that finished and were evaluated; e.g. for an evaluation on the CPU machine at another horizon
for id in ${KEEP_CHECKPOINTS:-}; do
  ck=$($S final_checkpoint --out "$STUDY" --only "$id" 2> /dev/null | tail -1)
  [ -n "$ck" ] && [ -d "$ck" ] || { mark "$id has no finished, evaluated final checkpoint to keep"; continue; }
  rm -rf "/tmp/keep_$id" && mkdir -p "/tmp/keep_$id"
  if python3 vla-scripts/pack_checkpoint.py pack "$ck" "/tmp/keep_$id/ck" --ref /tmp/ref.pt \
    "$BASE_DIR"/checkpoints/*.pt >> /tmp/pack.log 2>&1; then
    if fits "/tmp/keep_$id"; then
      for part in "/tmp/keep_$id"/ck.part*; do mv "$part" "$OUT/ck_$id.${part##*.}"; done
      mark "kept $(basename "$ck") ($(find "$OUT" -name "ck_$id.part*" | wc -l) part(s))"
    else mark "$(basename "$ck") not kept: its parts do not fit next to what comes back"; fi
  else mark "packing $ck failed: $(tail -1 /tmp/pack.log)"; fi
done
if [ "${SAVE_INDUCTOR_CACHE:-0}" = 1 ] && [ -d "$IND_DIR" ]; then
  rm -rf /tmp/ind_parts && mkdir -p /tmp/ind_parts
  (cd "$IND_DIR" && tar czf - .) | split -b 15m -d - /tmp/ind_parts/inductor.tgz.part
  if fits /tmp/ind_parts; then mv /tmp/ind_parts/* "$OUT/"; mark "compilation cache saved"
  else mark "compilation cache not saved: its parts do not fit next to what comes back"; fi
fi
exit "$rc"
