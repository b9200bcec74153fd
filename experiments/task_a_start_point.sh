#!/usr/bin/env bash
# Regenerate the forgetting study's start point (docs/STUDY.md, issue 14) on one GPU: two pretraining schedules of
# vla-scripts/pretrain_synthetic_vlm.py, the second continuing the first (--init_from, questions continuing at step
# 10,000). On H100 80GB HBM3 machines with torch 2.11.0+cu130 (2026-12-06/07), the same stages as two GPU calls of
# experiments/task_a_gpu_pipeline.sh (same flags; this script itself has only run as a CPU smoke) gave:
#   stage 1 (10,000 steps, ~7 min):  weights sha256 a7645e2b...  held-out 0.825   (twice, bit for bit)
#   stage 2 (8,000 steps, ~5 min):   weights sha256 f7921b60...  held-out 0.9195  (once) <- the start point
# Determinism is promised on the same machine and software only; the script prints each stage's sha256 next to
# the expected one and says which matched (a different card or torch gives other bits, not an error).
#   bash experiments/task_a_start_point.sh [OUT_DIR]     (default /tmp/vlmS; the start point is OUT_DIR/stage2/base)
# Two stages rather than one 18,000-step schedule because the GPU calls it was made on are limited to 10 minutes;
# the study's plan then takes `--base OUT_DIR/stage2/base`. EXTRA (flags appended to both stages, the last value
# of a flag wins) is for a smoke run, e.g. EXTRA="--steps 3 --num_scenes 64 --num_heldout 32 --llm_layers 2
# --llm_hidden_size 64 --vit_embed_dims 32 48 --vit_depth 2 --compile_mode off --device cpu".
set -euo pipefail
OUT=$(realpath -m "${1:-/tmp/vlmS}")  # before the cd below: a relative OUT_DIR is the caller's
cd "$(dirname "${BASH_SOURCE[0]}")/.."
for d in "$OUT/stage1" "$OUT/stage2"; do
  [ -e "$d" ] && { echo "error: $d exists; move it away or pick another OUT_DIR (nothing is overwritten)" >&2; exit 1; }
done
# shellcheck disable=SC2206  # EXTRA is a list of flags
COMMON=(--compile_mode reduce-overhead ${EXTRA:-})
python3 vla-scripts/pretrain_synthetic_vlm.py --output_dir "$OUT/stage1" --steps 10000 "${COMMON[@]}"
python3 vla-scripts/pretrain_synthetic_vlm.py --output_dir "$OUT/stage2" --init_from "$OUT/stage1/base" \
  --first_step 10000 --steps 8000 --learning_rate 3e-4 --warmup_steps 200 "${COMMON[@]}"
python3 - "$OUT" <<'EOF'
import json
import sys

expected = {
    "stage1": "a7645e2bb59afff3b649d7b29a019ebe58a73cf9957b44c838eb0d24a3c061e0",
    "stage2": "f7921b60158fdb9589560ec16b68a29285a1729e5978951fbb7f11646c86980a",
}
for stage, sha in expected.items():
    report = json.load(open(f"{sys.argv[1]}/{stage}/pretrain_report.json"))
    got = report["weights_sha256"]
    verdict = "matches the H100 reference" if got == sha else "differs from the H100 reference (other machine?)"
    print(f"{stage}: held-out {report['heldout_accuracy']['all']['accuracy']:.4f}, weights {got[:8]}... {verdict}")
EOF
