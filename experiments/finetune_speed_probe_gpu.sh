#!/usr/bin/env bash
# One GPU call: finetune.py's step time on the task-A base (arm L's flags: LoRA r32, lr 5e-4, synthetic torch
# source) after the uint8 image hand-off, eager and compiled, to size the next closed-loop run's schedule.
# throughput_diagnostic_gpu.sh (H100, 2026-12-06) found two serial host costs: the model step is launch-bound
# (4,159 kernels, GPU busy 49 of ~130 ms at batch 64) and the float32 hand-off capped the loader at ~1,100
# samples/s. This measures, in order (each with its own timeout, ~560 s in all):
#   handoff.txt            uint8 batch normalized on the GPU == the host-normalized batch, bit for bit
#   eager-b64/             finetune.py eager, batch 64 (uint8 hand-off only)
#   ro-b64/, ro-b128/      finetune.py --compile True --compile_mode reduce-overhead (CUDA graphs)
# Each run dir keeps finetune.log and metrics.jsonl; summary.txt has the median step time after warm-up and the
# first step's perf/step_s (its compilation; start-up before the first step is not in it).
#
#   OUT=... BASE_PACK=.carry/base bash experiments/finetune_speed_probe_gpu.sh
# On a CPU (a smoke run): DEVICE=cpu EPISODES=8 STEPS_EAGER=3 STEPS_RO=3 BATCHES_RO=2 BATCH_EAGER=2 ...
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEVICE="${DEVICE:-cuda}"; EPISODES="${EPISODES:-400}"; WORKERS="${SYNTHETIC_SOURCE_WORKERS:-12}"
STEPS_EAGER="${STEPS_EAGER:-300}"; STEPS_RO="${STEPS_RO:-700}"; BATCH_EAGER="${BATCH_EAGER:-64}"
BATCHES_RO="${BATCHES_RO:-64 128}"
source experiments/gpu_base_env.sh  # draccus, environment, env.txt, $base from $BASE_PACK

timeout 60 python3 - "$DEVICE" > "$OUT/handoff.txt" 2>&1 <<'EOF'
import sys

import numpy as np
import torch

from prismatic.vla.datasets.batching import FrameToExample, PaddedCollator, normalize_batch_images
from prismatic.vla.prompting import PromptTokenizer
from prismatic.vla.tokenizer import load_qwen_tokenizer

rng = np.random.default_rng(0)
frames = [{"image_primary": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
           "image_wrist": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
           "proprio": np.zeros(8, np.float32), "actions": np.zeros((8, 7), np.float32),
           "instruction": "pick up the block", "dataset_name": "unit", "sample_key": f"unit/0/{i}"} for i in range(8)]
tok = PromptTokenizer(load_qwen_tokenizer())
host = PaddedCollator()([FrameToExample(tok)(f) for f in frames])
raw = PaddedCollator()([FrameToExample(tok, normalize_images=False)(f) for f in frames])
dev = normalize_batch_images(raw, sys.argv[1])["pixel_values"]
print("device", dev.device, "bit-identical to host:", torch.equal(dev.cpu(), host["pixel_values"]),
      "max abs diff", (dev.cpu() - host["pixel_values"]).abs().max().item())
EOF

run() {  # run <name> <batch> <steps> <timeout> [extra finetune flags...]
  local name=$1 batch=$2 steps=$3 limit=$4; shift 4
  local t0; t0=$(date +%s.%N)
  SYNTHETIC_SOURCE_WORKERS="$WORKERS" timeout "$limit" python3 vla-scripts/finetune.py --vlm_path "$base" \
    --use_minivlm True --config_file_path "$base/hf_config" --data_source synthetic \
    --synthetic_num_episodes "$EPISODES" --synthetic_until_success True --dataset_name synthetic_no_noops --seed 0 \
    --run_root_dir /tmp/probe --run_id_override "$name" --num_images_in_input 2 --use_lora True --lora_rank 32 \
    --image_aug False --batch_size "$batch" --learning_rate 5e-4 --max_steps "$steps" --save_freq 100000 \
    --device "$DEVICE" --show_progress False --wandb_mode disabled "$@" > "/tmp/probe-$name.log" 2>&1
  local rc=$? t1; t1=$(date +%s.%N)
  mkdir -p "$OUT/$name"; cp "/tmp/probe-$name.log" "$OUT/$name/finetune.log"
  cp "/tmp/probe/$name/metrics.jsonl" "$OUT/$name/" 2>/dev/null
  python3 - "$OUT/$name/metrics.jsonl" "$name" "$batch" "$rc" "$t0" "$t1" >> "$OUT/summary.txt" <<'EOF'
import json, statistics, sys
path, name, batch, rc, t0, t1 = sys.argv[1:]
try:
    rows = [json.loads(line) for line in open(path)]
except OSError:
    rows = []
steps = [r["perf/step_s"] for r in rows if "perf/step_s" in r]
tail = steps[len(steps) // 3:]
med = statistics.median(tail) if tail else float("nan")
print(f"{name}: batch {batch}, rc {rc}, wall {float(t1) - float(t0):.0f} s, {len(steps)} steps logged, "
      f"median step {1e3 * med:.1f} ms over the last {len(tail)} ({int(batch) / med:.0f} samples/s), "
      f"first step {steps[0] if steps else float('nan'):.1f} s, last loss {rows[-1].get('train/loss') if rows else None}")
EOF
}
run eager-b64 "$BATCH_EAGER" "$STEPS_EAGER" 110
for b in $BATCHES_RO; do
  run "ro-b$b" "$b" "$STEPS_RO" 210 --compile True --compile_mode reduce-overhead
done
cat "$OUT/handoff.txt" "$OUT/summary.txt"
