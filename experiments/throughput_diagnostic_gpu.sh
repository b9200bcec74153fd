#!/usr/bin/env bash
# One GPU call: why does finetune.py on the synthetic torch source train the task-A base at ~613 samples/s at
# batch 64 and 128 alike (H100, 2026-12-06, MFU 2.3%, data wait 0.2%; craft_progress.md phase 5)? Three views of
# the same model, everything small enough to come back under $OUT (at most ~545 s of timeouts, the most
# informative part first):
#   bench-*.txt / bench/     bench_train_step.py on the base's config, LoRA r32, random batches made on the GPU
#                            (no loader): samples/s at batch 64 and 128, and a profile of batch 64
#   loader.jsonl             experiments/loader_throughput.py: the loader alone, and the main thread under load
#   finetune.log, profile/   finetune.py with arm L's flags for $STEPS steps, --profile_steps 5 from step $PSTART
#                            (data fetch, step and reads on the device timeline), metrics.jsonl
# If bench is several times faster than finetune, the cost is in the loader or its hand-off; if not, in the model.
#
#   OUT=... BASE_PACK=.carry/base bash experiments/throughput_diagnostic_gpu.sh
# BASE_PACK as in experiments/task_a_gpu_pipeline.sh (the carried task-A base; .whl/ for draccus). On a CPU (a
# smoke run): DEVICE=cpu BATCHES="2" STEPS=3 PSTART=1 EPISODES=8 LOADER_ARGS="--batch_size 4 --batches 2".
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEVICE="${DEVICE:-cuda}"; BATCHES="${BATCHES:-64 128}"; STEPS="${STEPS:-260}"; PSTART="${PSTART:-200}"
EPISODES="${EPISODES:-1600}"; WORKERS="${SYNTHETIC_SOURCE_WORKERS:-12}"; first="${BATCHES%% *}"
source experiments/gpu_base_env.sh  # draccus, environment, env.txt, $base from $BASE_PACK

# 1. finetune.py as arm L ran it, profiled over 5 iterations (a throwaway run root).
rm -rf /tmp/diag
SYNTHETIC_SOURCE_WORKERS="$WORKERS" timeout 210 python3 vla-scripts/finetune.py --vlm_path "$base" --use_minivlm True \
  --config_file_path "$base/hf_config" --data_source synthetic --synthetic_num_episodes "$EPISODES" \
  --synthetic_until_success True --dataset_name synthetic_no_noops --seed 0 --run_root_dir /tmp/diag \
  --run_id_override L --num_images_in_input 2 --use_lora True --lora_rank 32 --image_aug False \
  --batch_size "$first" --learning_rate 5e-4 --max_steps "$STEPS" --save_freq 100000 --device "$DEVICE" \
  --profile_steps 5 --profile_start_step "$PSTART" --show_progress False --wandb_mode disabled \
  > "$OUT/finetune.log" 2>&1
# 2. The model alone: random batches on the device, then a profile of the first batch size.
timeout 150 python3 experiments/bench_train_step.py --config "$base/hf_config" --device "$DEVICE" --lora_rank 32 \
  --variants plain --batch_sizes $BATCHES --phase_steps 5 --out_dir "$OUT/bench" > "$OUT/bench.txt" 2>&1
timeout 80 python3 experiments/bench_train_step.py --config "$base/hf_config" --device "$DEVICE" --lora_rank 32 \
  --variants plain --batch_sizes "$first" --steps 3 --warmup 3 --phase_steps 0 --profile --out_dir "$OUT/bench" \
  --tag profile > "$OUT/bench-profile.txt" 2>&1
# 3. The loader alone and next to a main-thread load.
SYNTHETIC_SOURCE_WORKERS="$WORKERS" timeout 100 python3 experiments/loader_throughput.py --device "$DEVICE" \
  --episodes 400 ${LOADER_ARGS:---batch_size 64} > "$OUT/loader.jsonl" 2> "$OUT/loader.err"
cp -r /tmp/diag/L/profile "$OUT/" 2>/dev/null; cp /tmp/diag/L/metrics.jsonl "$OUT/" 2>/dev/null
grep -E "result:|wrote" "$OUT/bench.txt" | tail -4; grep -A12 "^profile of" "$OUT/bench-profile.txt" | head -14
cat "$OUT/loader.jsonl"; grep -E "profile|GPU kernels|step: span|device busy" "$OUT/finetune.log" | head -14
