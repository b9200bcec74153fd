# Sourced by the one-call GPU probes that train on the carried task-A base (finetune_speed_probe_gpu.sh,
# throughput_diagnostic_gpu.sh): from the repo root, installs draccus from .whl/ where the image lacks it, sets the
# environment, records the machine in $OUT/env.txt and unpacks $BASE_PACK into $BASE_DIR (default
# /tmp/vlmA/base, a new dir), leaving its path in $base. Exits the caller if the unpack fails.
if ! python3 -c "import draccus" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 WANDB_MODE=disabled
mkdir -p "$OUT"
{ date -u; nvidia-smi -L 2>/dev/null; git rev-parse HEAD 2>/dev/null; nproc; } > "$OUT/env.txt" 2>&1
base="${BASE_DIR:-/tmp/vlmA/base}"
python3 vla-scripts/pack_checkpoint.py seeded-embedding /tmp/ref.pt > "$OUT/pack.log" 2>&1
python3 vla-scripts/pack_checkpoint.py unpack "$BASE_PACK" "$base" --ref /tmp/ref.pt >> "$OUT/pack.log" 2>&1 \
  || { echo "unpack failed"; tail -5 "$OUT/pack.log"; exit 1; }
