#!/usr/bin/env bash
# One GPU call, start to finish: pretrain the task-A VLM (vla-scripts/pretrain_synthetic_vlm.py), pack its base
# for the trip back, fine-tune task-B arms from it (experiments/synthetic_closed_loop_gpu.sh with BASE=) and pack
# the arm with the lowest held-out x/y L1 if it fits next to the base. Everything that comes back is under $OUT:
#   base.partNN              the base VLM without its seeded embedding (vla-scripts/pack_checkpoint.py)
#   ck_<arm>.partNN          that arm's newest checkpoint without what equals the base (and without optimizer state)
#   small.tgz                env.txt, logs, pretrain_report.json, curves, each arm's metrics.jsonl and
#                            finetune_config.json (packed at the end: at most 8 files come back from a call)
#   timeline.txt, pretrain.log   written as the call goes, so a call cut short by its limit still returns them
#                            (the timeline is also printed as it happens)
# Scratch of an earlier call on the same warm machine (/tmp/vlmA, /tmp/cl, /tmp/small, /tmp/pk_*, /tmp/snap_*) is
# removed first: those paths belong to this script.
# Unpack on the CPU machine (same paths as on the GPU, since a LoRA checkpoint names its base):
#   python vla-scripts/pack_checkpoint.py seeded-embedding /tmp/ref.pt
#   python vla-scripts/pack_checkpoint.py unpack <files>/base /tmp/vlmA/base --ref /tmp/ref.pt
#   python vla-scripts/pack_checkpoint.py unpack <files>/ck_L <run>/L/L--<step>_chkpt --ref /tmp/ref.pt \
#     /tmp/vlmA/base/checkpoints/*.pt          (+ small/config-L.json as <run>/L/finetune_config.json)
#
#   OUT=... PLIMIT=200 PSTEPS=4000 RUNS="L:5e-4:64:2000:2:random:1" EPISODES=400 SAVE_EVERY=400 VAL_FREQ=200 \
#     DEADLINE=540 bash experiments/task_a_gpu_pipeline.sh       # RUNS=none: pretraining only
# INIT_PACK=<prefix> pretrains from an earlier call's base.partNN (carried in; --init_from) instead of from the
# seeded random weights: PARGS gives the second schedule (--first_step, --learning_rate, --warmup_steps).
# BASE_PACK=<prefix> skips pretraining: the base comes from an earlier call's base.partNN (carried in), and only
# arms come back (as many as fit, best held-out x/y L1 first).
# TINY_RUNS="<same format as RUNS>" also runs arms from the tiny random base (make_tiny_checkpoint.py, its pos
# field picks random|sincos tables) next to them, stopped at the same DEADLINE and selected with them (their run
# ids must differ from RUNS'; the tiny base is deterministic, so regenerate it on the CPU machine to unpack).
# SNAPSHOT=1 packs each new checkpoint into $OUT while the arm runs (one arm: a cut-short call still returns one;
# not with pretraining in the same call: 9 files, over the 8 that come back).
# FINETUNE_FLAGS (e.g. "--compile True --compile_mode reduce-overhead") reaches every arm's finetune.py.
# PLIMIT: seconds of pretraining steps (--time_limit_s); DEADLINE: seconds after start at which the arms are
# stopped (their newest checkpoint is used). CALL_LIMIT (default 590): the call's own limit in seconds, counted
# from this script's start; the pretraining loop also stops 75 s before it (--stop_at_unix), leaving time for its
# final evaluation, save and pack (a 16,000-step pretraining call on a warm machine, 2026-12-06, ran into the
# call's limit and returned nothing). The exit status is 0 only if pretraining and packing succeeded.
# Draccus and its pure-Python deps come from .whl/*.whl when the image lacks them (tools/device README). A
# scene-rendering pool with torch's default threads ran 250x slower on a 16-core H100 host (2026-12-06); the
# script now pins one thread per worker.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
if ! python3 -c "import draccus" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 WANDB_MODE=disabled
rm -rf /tmp/vlmA /tmp/cl /tmp/small /tmp/pk_* /tmp/snap_*
S=/tmp/small; mkdir -p "$S" "$OUT"
mark() { echo "$* at $(el)s" | tee -a "$OUT/timeline.txt"; }  # progress, kept and shown as it happens
CALL_LIMIT=${CALL_LIMIT:-590}; fail=0
{ date -u; nvidia-smi -L; git rev-parse HEAD; python3 -c "import torch; print(torch.__version__)"; nproc; uptime
  echo "python processes already running: $(pgrep -c python || true)"; } > "$S/env.txt" 2>&1
python3 vla-scripts/pack_checkpoint.py seeded-embedding /tmp/ref.pt ${REFARGS:-} >> "$S/pack.log" 2>&1
if [ -n "${BASE_PACK:-}" ]; then
  python3 vla-scripts/pack_checkpoint.py unpack "$BASE_PACK" /tmp/vlmA/base --ref /tmp/ref.pt >> "$S/pack.log" 2>&1 \
    || { mark "unpacking $BASE_PACK failed: $(tail -1 "$S/pack.log")"; exit 1; }
  mark "base unpacked from $BASE_PACK"
else
  if [ -n "${INIT_PACK:-}" ]; then  # continue pretraining from an earlier call's base (PARGS sets --first_step)
    rm -rf /tmp/vlmI
    python3 vla-scripts/pack_checkpoint.py unpack "$INIT_PACK" /tmp/vlmI/base --ref /tmp/ref.pt >> "$S/pack.log" 2>&1 \
      || { mark "unpacking $INIT_PACK failed: $(tail -1 "$S/pack.log")"; exit 1; }
    PARGS="${PARGS:-} --init_from /tmp/vlmI/base"; mark "start point unpacked from $INIT_PACK"
  fi
  mark "pretraining starts"
  left=$((CALL_LIMIT - $(el) - 20)); [ "$left" -ge 1 ] || left=1  # timeout 0 would mean no limit at all
  timeout "$left" python3 vla-scripts/pretrain_synthetic_vlm.py --output_dir /tmp/vlmA \
    --steps "$PSTEPS" --time_limit_s "$PLIMIT" --stop_at_unix $((T0 + CALL_LIMIT - 75)) ${PARGS:-} \
    > "$OUT/pretrain.log" 2>&1
  rc=$?; mark "pretraining rc=$rc"; [ "$rc" = 0 ] || fail=1
  cp /tmp/vlmA/pretrain_report.json /tmp/vlmA/curves.jsonl /tmp/vlmA/curves.png "$S/" 2>/dev/null
  if python3 vla-scripts/pack_checkpoint.py pack /tmp/vlmA/base "$OUT/base" --ref /tmp/ref.pt >> "$S/pack.log" 2>&1
  then mark "base packed"; else mark "packing the base failed: $(tail -1 "$S/pack.log")"; fail=1; fi
fi
if [ "$RUNS" != none ]; then
  launch() {  # launch <runs> <log> [env ...]: synthetic_closed_loop_gpu.sh in its own process group, prints its pid
    local runs="$1" log="$2"; shift 2
    setsid env "$@" OUT=/tmp/cl RUNS="$runs" EPISODES="$EPISODES" SAVE_EVERY="$SAVE_EVERY" \
      UNTIL_SUCCESS="${UNTIL_SUCCESS:-0}" VAL_FREQ="$VAL_FREQ" bash experiments/synthetic_closed_loop_gpu.sh \
      > "$log" 2>&1 &
    echo $!
  }
  pids=("$(launch "$RUNS" "$S/arms.log" BASE=/tmp/vlmA/base)")
  # TINY_RUNS: arms from the tiny random base next to them (no BASE: per-run base, see RUNS' pos field)
  [ -n "${TINY_RUNS:-}" ] && pids+=("$(launch "$TINY_RUNS" "$S/arms-tiny.log")")
  running() { local p; for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }
  # SNAPSHOT=1 (one arm): pack each new checkpoint into $OUT as it appears (checkpoints are published by an atomic
  # rename), with the arm's config and metrics, so a call cut short (rc 124: a smaller limit than planned) still
  # returns the newest one. The selection below replaces it with the same or a newer one.
  declare -A snapped=()
  snapshot() {
    local d id ck
    for d in /tmp/cl/runs/*/; do
      [ -d "$d" ] || continue
      id=$(basename "$d"); ck=$(ls -d "$d$id"--*_chkpt 2>/dev/null | sort -V | tail -1)
      [ -n "$ck" ] && [ "$ck" != "${snapped[$id]:-}" ] || continue
      rm -rf "/tmp/snap_$id" && mkdir -p "/tmp/snap_$id"
      python3 vla-scripts/pack_checkpoint.py pack "$ck" "/tmp/snap_$id/ck" --ref /tmp/ref.pt \
        /tmp/vlmA/base/checkpoints/*.pt >> "$S/pack.log" 2>&1 || continue
      rm -f "$OUT/ck_$id".part*
      for p in "/tmp/snap_$id"/ck.part*; do mv "$p" "$OUT/ck_$id.${p##*.}"; done
      cp "$d/finetune_config.json" "$OUT/config-$id.json"; cp "$d/metrics.jsonl" "$OUT/metrics-$id.jsonl"
      snapped[$id]=$ck; mark "snapshot of $(basename "$ck")"
    done
  }
  while running && [ "$(el)" -lt "$DEADLINE" ]; do
    sleep 5; [ "${SNAPSHOT:-0}" = 1 ] && snapshot
  done
  for p in "${pids[@]}"; do kill -- -"$p" 2>/dev/null; done
  sleep 3; mark "arms stopped"
  # Anything of the arms' process groups still alive would slow a next call on the same machine: name it, stop it.
  for p in "${pids[@]}"; do
    if pgrep -a -g "$p" >> "$S/left_running.txt"; then  # -g: the process group setsid gave the arms
      kill -9 -- -"$p" 2>/dev/null; mark "killed what was left of arm group $p (left_running.txt)"
    fi
  done
  for f in /tmp/cl/*.log; do cp "$f" "$S/arm-$(basename "$f")"; done
  for d in /tmp/cl/runs/*/; do
    id=$(basename "$d"); cp "$d/metrics.jsonl" "$S/metrics-$id.jsonl"; cp "$d/finetune_config.json" "$S/config-$id.json"
  done
  python3 - > "$S/select.txt" 2>&1 <<'PY'
import glob, json, os, subprocess
out = os.environ["OUT"]
arms = {}
for m in glob.glob("/tmp/small/metrics-*.jsonl"):
    arm = os.path.basename(m).removeprefix("metrics-").removesuffix(".jsonl")
    val = [json.loads(line) for line in open(m) if "val/l1_current_dim0" in line]
    ckpts = sorted(glob.glob(f"/tmp/cl/runs/{arm}/{arm}--*_chkpt"), key=lambda p: int(p.rsplit("--", 1)[1].split("_")[0]))
    if ckpts:  # an arm without a validation row still comes back (last in line)
        xy = (val[-1]["val/l1_current_dim0"] + val[-1]["val/l1_current_dim1"]) / 2 if val else float("inf")
        arms[arm] = (xy, val[-1]["step"] if val else None, ckpts[-1])
print("arm: (last val x/y L1, its step, newest checkpoint)", arms)
size = lambda pattern: sum(os.path.getsize(p) for p in glob.glob(pattern)) / 2**20
for arm, (xy, step, ckpt) in sorted(arms.items(), key=lambda kv: kv[1][0]):
    refs = ["/tmp/ref.pt", *glob.glob("/tmp/vlmA/base/checkpoints/*.pt")]
    subprocess.run(["python3", "vla-scripts/pack_checkpoint.py", "pack", ckpt, f"/tmp/pk_{arm}/ck", "--ref", *refs], check=True)
    mib = size(f"/tmp/pk_{arm}/ck.part*")
    for p in glob.glob(f"{out}/ck_{arm}.part*"):  # SNAPSHOT=1's copy of this arm: replaced by the newest
        os.remove(p)
    print(f"{arm}: {mib:.1f} MiB next to {size(out + '/*.part*'):.1f} MiB already brought back")
    if mib + size(out + "/*.part*") < 60:
        for p in glob.glob(f"/tmp/pk_{arm}/ck.part*"):
            os.rename(p, f"{out}/ck_{arm}.{p.rsplit('.', 1)[1]}")
        print("brought back", arm)
PY
fi
mark done
tar czf "$OUT/small.tgz" -C /tmp small
cat "$S/select.txt" 2>/dev/null
if [ -f "$OUT/pretrain.log" ]; then tr '\r' '\n' < "$OUT/pretrain.log" | grep -v "rendering\|it/s" | tail -5; fi
exit "$fail"
