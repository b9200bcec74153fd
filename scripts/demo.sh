#!/usr/bin/env bash
# The README's demo: everything end to end on CPU with 2 processes, in a few minutes.
#   1. a tiny random Prismatic base checkpoint and a synthetic LIBERO-format RLDS dataset (both generated here);
#   2. the CRaFT anchor cache, built by 2 processes;
#   3. plain LoRA fine-tuning and CRaFT fine-tuning, each with torchrun --nproc-per-node 2 (gloo);
#   4. a PNG of the curves (L_act, L_ret with its budget, lambda, ...).
# Outputs go to $DEMO_OUT (default ./demo_out). Set DEMO_STEPS to train longer.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
OUT="${DEMO_OUT:-$ROOT/demo_out}"
STEPS="${DEMO_STEPS:-120}"
PY="$ROOT/.venv/bin/python"
export OMP_NUM_THREADS=1 TF_CPP_MIN_LOG_LEVEL=3 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc-per-node 2)
rm -rf "$OUT"
mkdir -p "$OUT"

echo "== 1/4 tiny base checkpoint and synthetic LIBERO-format RLDS data"
"$PY" vla-scripts/make_tiny_checkpoint.py --output_dir "$OUT/checkpoints" --format base --seed 0 >/dev/null
"$PY" vla-scripts/make_synthetic_rlds.py --data_root_dir "$OUT/rlds" --dataset_name synthetic_libero \
  --num_episodes 16 --min_len 12 --max_len 20 --seed 0
BASE="$OUT/checkpoints/base"
START=(--use_minivlm True --config_file_path "$BASE/hf_config" --data_root_dir "$OUT/rlds"
       --dataset_name synthetic_libero --seed 7)

echo "== 2/4 CRaFT anchor cache (2 processes)"
"${TORCHRUN[@]}" vla-scripts/build_craft_cache.py --pretrained_checkpoint "$BASE" "${START[@]}" \
  --output_dir "$OUT/craft_cache" --batch_size 8 --device cpu

TRAIN=(--vlm_path "$BASE" "${START[@]}" --run_root_dir "$OUT/runs" --batch_size 4 --max_steps "$STEPS"
       --save_freq "$STEPS" --lora_rank 8 --learning_rate 5e-3 --lr_warmup_steps 5 --shuffle_buffer_size 1000
       --image_aug False --device cpu --wandb_log_freq 10)

ANCHOR=(--use_craft True --craft_anchor_source cache --craft_cache_dir "$OUT/craft_cache" --craft_retention_budget 0.02)
echo "== 3/4 fine-tuning: plain, then CRaFT (2 processes each)"
# "plain" only *measures* L_ret: lambda is pinned to 0 and the projection is off, so its update is plain
# fine-tuning's, and the plot can show the drift CRaFT prevents.
"${TORCHRUN[@]}" vla-scripts/finetune.py "${TRAIN[@]}" --run_id_override plain "${ANCHOR[@]}" \
  --craft_lambda_max 0 --craft_enable_projection False
"${TORCHRUN[@]}" vla-scripts/finetune.py "${TRAIN[@]}" --run_id_override craft "${ANCHOR[@]}" \
  --craft_dual_lr 20 --craft_lambda_max 10

echo "== 4/4 curves"
"$PY" vla-scripts/plot_metrics.py "$OUT/runs/plain" "$OUT/runs/craft" --out "$OUT/curves.png"
echo "Done. Curves: $OUT/curves.png   Checkpoints and metrics.jsonl: $OUT/runs/{plain,craft}/"
