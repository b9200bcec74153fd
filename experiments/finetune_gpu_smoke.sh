#!/usr/bin/env bash
# finetune.py itself on one GPU: a random-weight full-size start point (experiments/assets/openvla_config.json),
# the torch-only synthetic data source, CUDA graphs, a few dozen steps, then the final checkpoint is written.
# Meant for the GPU machine, whose image has torch/transformers/peft/timm but no draccus/tensorflow/wandb:
# wheels for draccus and its small pure-Python dependencies can be placed in .whl/ (installed without network).
#
#   bash experiments/finetune_gpu_smoke.sh [extra finetune flags, e.g. --use_craft True]
#
# Logs and metrics go to $OUT (or ./bench_out); the run directory (checkpoints) to /tmp/finetune_gpu_smoke.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-bench_out}"
RUN_DIR=/tmp/finetune_gpu_smoke
mkdir -p "$OUT" "$RUN_DIR"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the repo, when it is not pip-installed (GPU image)
if ! python -c "import draccus" 2>/dev/null; then
  python -m pip install --quiet --no-index --no-deps .whl/*.whl
fi
START="$RUN_DIR/start"
if [ ! -f "$START/config.json" ]; then
  python - "$START" <<'EOF'
import sys
import time

import torch

from prismatic.extern.hf.configuration_prismatic import OpenVLAConfig
from prismatic.extern.hf.modeling_prismatic import OpenVLAForActionPrediction

t0 = time.perf_counter()
config = OpenVLAConfig.from_pretrained("experiments/assets/openvla_config.json")
with torch.device("cuda"):  # random init on the GPU (seconds, not minutes), saved from there
    model = OpenVLAForActionPrediction(config)
model.save_pretrained(sys.argv[1])
print(f"random full-size start point written to {sys.argv[1]} in {time.perf_counter() - t0:.0f} s")
EOF
fi
python vla-scripts/finetune.py \
  --vlm_path "$START" --data_source synthetic --run_root_dir "$RUN_DIR/runs" --run_id_override smoke \
  --batch_size 16 --max_steps 40 --save_freq 1000 --wandb_mode disabled --show_progress False \
  --compile True --compile_mode reduce-overhead "$@" 2>&1 | tee "$OUT/finetune_gpu_smoke.log"
cp "$RUN_DIR/runs/smoke/metrics.jsonl" "$OUT/" 2>/dev/null || find "$RUN_DIR/runs" -name "*.jsonl" -exec cp {} "$OUT/" \;
