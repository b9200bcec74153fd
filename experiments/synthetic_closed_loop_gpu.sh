#!/usr/bin/env bash
# GPU variant of experiments/synthetic_closed_loop.sh (training half): vla-scripts/finetune.py, full fine-tuning of
# the tiny random Prismatic base (make_tiny_checkpoint.py --format base --seed 0) on the torch-only synthetic
# source (--data_source synthetic: the pick-and-lift task rendered in memory, no tensorflow), several
# configurations at once on one GPU. Evaluate the checkpoints on a CPU machine afterwards (the eval's image path
# needs tensorflow): experiments/synthetic_closed_loop.sh's eval loop, or
#   python experiments/robot/libero/run_libero_eval.py --pretrained_checkpoint <run>/<id>--<step>_chkpt \
#     --task_suite_name synthetic --unnorm_key synthetic_no_noops --center_crop False --num_trials_per_task 3 \
#     --device cpu
#
#   RUNS="a:1e-3:64:20000 b:3e-4:64:20000" EPISODES=2000 bash experiments/synthetic_closed_loop_gpu.sh
#
# RUNS: space-separated id:lr:batch:steps[:images[:pos[:lora]]] (images: --num_images_in_input, default 2; evaluate a
# 1-image policy with --num_images_in_input 1; pos: the tiny base's ViT position tables, make_tiny_checkpoint.py
# --pos_embed_init random|sincos, default $POS_EMBED or random; lora: 1 = LoRA of rank $LORA_RANK (default 32),
# default 0 = full fine-tuning). BASE=<base run dir> starts every run from that base VLM instead (e.g. the task-A
# VLM of vla-scripts/pretrain_synthetic_vlm.py: BASE=<out>/base, its hf_config next to it is used).
# UNTIL_SUCCESS=1 ends every episode at the expert's success (--synthetic_until_success True; LIBERO demos end
# there too) instead of a 20-40 step length that is mostly "hold still" frames with x/y = 0.
# VAL_FREQ=N (default 0) validates every N steps on VAL_BATCHES (default 15) held-out batches: metrics.jsonl then
# holds val/l1_current_dim<i>, the current action's L1 per dimension. Each run warms up for 2% of its steps, decays the LR x0.1 for its
# last sixth and saves every SAVE_EVERY steps (default steps/4). Data: --seed 0, so episode i of the torch source
# is episode i of make_synthetic_rlds.py --seed 0 (same scene, states and actions over their common steps); it
# differs in length (20-40 steps here, 12-20 in synthetic_closed_loop.sh), in the images (raw here, JPEG in RLDS;
# bilinear 256 -> 224 here, lanczos3 there and in the eval) and hence slightly in the dataset statistics.
# FINETUNE_FLAGS: extra finetune.py flags for every run (e.g. "--compile True --compile_mode reduce-overhead").
# SYNTHETIC_SOURCE_WORKERS (default 3) worker processes per run render the episodes and build the batches.
# Throughput measured on one H200 (2026-12-05, 16 host cores, 300 episodes, 2 images, eager): 4 runs at once at
# batch 64 / 64 / 128 / 256 gave ~430 / 430 / 520 / 570 samples/s each (~1,950 in total); one run alone at batch
# 256 ~830 samples/s. Host-bound: each sample's float32 pixels (2 images x 6 channels x 224 x 224 = 2.4 MB) are
# copied several times on their way to the GPU. Startup: ~5 ms per rendered frame per worker (2,000 episodes of
# 20-40 steps + 250 held-out episodes ~ 67k frames) and ~9 GB of host memory per 1,000 episodes per run
# (2 x 150 KB per frame, computed; plus the prefetched batches).
# On one H100 (2026-12-05, 16 host cores, 2 images, eager): 4 runs at once gave ~12 steps/s each at batch 64
# (~770 samples/s each, GPU 80-95% busy) and ~16.5 steps/s each at batch 32; rendering 1,000-1,500 episodes per
# run took 120-150 s before the first step.
# Result so far: NOT a learning success (see craft_progress.md): up to 192k samples per run, x/y never learned.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-closed_loop_gpu_out}"; EPISODES="${EPISODES:-2000}"; RUNS="${RUNS:-a:1e-3:64:20000}"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled SYNTHETIC_SOURCE_WORKERS="${SYNTHETIC_SOURCE_WORKERS:-3}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
PY="${PYTHON:-python3}"  # the interpreter that holds torch (plain python3 on the GPU image)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the repo, when it is not pip-installed (GPU image)
if ! $PY -c "import draccus" 2>/dev/null; then
  $PY -m pip install --quiet --no-index --no-deps .whl/*.whl  # draccus + its pure-Python deps (no network)
fi
mkdir -p "$OUT"
pids=()
for spec in $RUNS; do
  IFS=: read -r id lr bs steps images pos lora <<<"$spec"
  pos="${pos:-${POS_EMBED:-random}}"; base="${BASE:-$OUT/tiny-$pos/base}"
  [ -d "$base" ] || $PY vla-scripts/make_tiny_checkpoint.py --output_dir "$OUT/tiny-$pos" --format base --seed 0 \
    --pos_embed_init "$pos"
  if [ "${lora:-0}" = 1 ]; then lora_flags=(--use_lora True --lora_rank "${LORA_RANK:-32}"); else lora_flags=(--use_lora False); fi
  save="${SAVE_EVERY:-$((steps / 4))}"
  $PY vla-scripts/finetune.py --vlm_path "$base" --use_minivlm True \
    --config_file_path "$base/hf_config" --data_source synthetic --synthetic_num_episodes "$EPISODES" \
    --synthetic_until_success "$([ "${UNTIL_SUCCESS:-0}" = 1 ] && echo True || echo False)" \
    --dataset_name synthetic_no_noops --seed 0 --run_root_dir "$OUT/runs" --run_id_override "$id" \
    --num_images_in_input "${images:-2}" "${lora_flags[@]}" --image_aug False --batch_size "$bs" --learning_rate "$lr" \
    --lr_warmup_steps $((steps / 50)) --num_steps_before_decay $((steps * 5 / 6)) --max_steps "$steps" \
    --save_freq "$save" --val_freq "${VAL_FREQ:-0}" --val_batches "${VAL_BATCHES:-15}" --device "${DEVICE:-cuda}" --show_progress False --wandb_mode disabled ${FINETUNE_FLAGS:-} >"$OUT/$id.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
