#!/usr/bin/env bash
# One GPU call: task-A pretraining (vla-scripts/pretrain_synthetic_vlm.py, default model size, batch 128) eager and
# with --compile_mode reduce-overhead, same call, same card: steps per second after compilation, from the
# elapsed_s of curves.jsonl (rows every 25 steps; the rate is taken over the last half of each run's rows), and
# whether CUDA graphs run with deterministic algorithms and the held-out evaluation. Fewer scenes than the real
# run (rendering is not what is measured). ~300 s in all with LIMIT=30 (the compiled run has a 180 s guard). The
# eval's last held-out batch is smaller (512 = 2 x 256 here: none), else it records graphs of its own.
#   OUT=... bash experiments/pretrain_speed_probe_gpu.sh
# On a CPU (smoke): DEVICE=cpu MODES="off default" LIMIT=5 SIZE="--llm_layers 2 --llm_hidden_size 64 --vit_embed_dims 32 48 --vit_depth 2"
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
DEVICE="${DEVICE:-cuda}"; MODES="${MODES:-off reduce-overhead}"; LIMIT="${LIMIT:-40}"
mkdir -p "$OUT"
{ date -u; nvidia-smi -L 2>/dev/null; git rev-parse HEAD 2>/dev/null; nproc; } > "$OUT/env.txt" 2>&1
for mode in $MODES; do
  rm -rf "/tmp/pt-$mode"
  limit=$LIMIT; [ "$mode" != off ] && limit=$((LIMIT + 60))  # + compilation
  timeout $((limit + 90)) python3 vla-scripts/pretrain_synthetic_vlm.py --output_dir "/tmp/pt-$mode" --device "$DEVICE" \
    --num_scenes 4000 --num_heldout 512 --eval_every 100000 --time_limit_s "$limit" --compile_mode "$mode" \
    ${SIZE:-} > "$OUT/pretrain-$mode.log" 2>&1
  echo "rc=$?" >> "$OUT/pretrain-$mode.log"
  cp "/tmp/pt-$mode/curves.jsonl" "$OUT/curves-$mode.jsonl" 2>/dev/null
  cp "/tmp/pt-$mode/pretrain_report.json" "$OUT/report-$mode.json" 2>/dev/null
  python3 - "$OUT/curves-$mode.jsonl" "$mode" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
try:
    rows = [r for r in map(json.loads, open(sys.argv[1])) if "elapsed_s" in r]
except OSError:
    rows = []
half = rows[len(rows) // 2:]
if len(half) < 2:
    print(f"{sys.argv[2]}: too few rows ({len(rows)})")
else:
    rate = (half[-1]["step"] - half[0]["step"]) / (half[-1]["elapsed_s"] - half[0]["elapsed_s"])
    print(f"{sys.argv[2]}: {rows[-1]['step']} steps in {rows[-1]['elapsed_s']:.0f} s of loop, {rate:.1f} steps/s "
          f"over steps {half[0]['step']}-{half[-1]['step']} ({128 * rate:.0f} samples/s), last loss {rows[-1]['loss']:.3f}")
PY
  grep -E "held-out accuracy|Error|error" "$OUT/pretrain-$mode.log" | tail -3
done
