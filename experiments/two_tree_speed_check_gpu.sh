#!/usr/bin/env bash
# Issue 15's speed check: run I's `ro` rows (plain, craft_cache, craft_online at batch 16, CUDA graphs; docs/
# BENCHMARKS.md) for the tree before the refactor and this tree, in one call, the trees alternating.
#
# A cold `ro` build compiled for 160-204 s per configuration on earlier H100 hosts, so one call cannot build both
# trees cold. A session runs it as back-to-back calls on one machine kept warm (released 30 s after a call; /tmp,
# and so torch's compilation cache, survive between calls):
#   STAGE=warm TREES=before   one round of the before tree: fills the machine's compilation cache
#   STAGE=warm TREES=after    the same for this tree
#   STAGE=measure             ROUNDS rounds (default 2) of both trees, before/after in round 1, after/before in 2,
#                             ...: the figures that count (same call, same machine)
# Every call prints the table so far (experiments/compare_bench_trees.py). Made here, carried (with .whl):
#   mkdir -p .carry && git archive --format=tar.gz -o .carry/before.tgz d881414 \
#     prismatic experiments/__init__.py experiments/bench_train_step.py experiments/assets pyproject.toml
# (d881414: the commit before the two-call gradient sync, the refactor's first step; ~4 MB.)
# Inputs (environment): OUT (required), STAGE, TREES (warm: which trees, default "before after"), ROUNDS,
# BEFORE_TGZ (default .carry/before.tgz), CALL_LIMIT (seconds, default 590: nothing starts that EXPECTED_S says
# would end after it), EXPECTED_S (one tree's process, default 240 warm / 120 measure), BENCH_FLAGS (default run I's
# flags with --phase_steps 0, identical for both trees).
# Comes back under $OUT: <tree>-r<round>/ (the benchmark's JSON and log), timeline.txt, env.txt, summary.md/.json.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
: "${OUT:?OUT must be set}"
STAGE=${STAGE:-measure}; ROUNDS=${ROUNDS:-2}; CALL_LIMIT=${CALL_LIMIT:-590}
BEFORE_TGZ=${BEFORE_TGZ:-.carry/before.tgz}
BENCH_FLAGS=${BENCH_FLAGS:-"--config experiments/assets/openvla_config.json --batch_sizes 16 --warmup 6 --steps 20
  --phase_steps 0 --variants plain craft_cache craft_online --compile --compile_vision --compile_mode reduce-overhead"}
case "$STAGE" in
  warm) EXPECTED_S=${EXPECTED_S:-240}; ROUNDS=1 ;;
  measure) EXPECTED_S=${EXPECTED_S:-120} ;;
  *) echo "STAGE must be warm or measure, not $STAGE"; exit 2 ;;
esac
mkdir -p "$OUT"; OUT=$(realpath "$OUT")
mark() { echo "$* at $(el)s" | tee -a "$OUT/timeline.txt"; }
if ! python3 -c "import draccus" 2>/dev/null && compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
fi
{ date -u; nvidia-smi -L 2>/dev/null; git rev-parse HEAD 2>/dev/null; nproc; python3 -c "import torch; print(torch.__version__)"
  echo "BENCH_FLAGS=$BENCH_FLAGS"; } >> "$OUT/env.txt" 2>&1

# The two trees side by side under /tmp, each run from its own root (its own prismatic/ first on the path). The
# compilation cache stays in the machine's default place, shared by the calls of a warm machine.
declare -A ROOT=([after]="$PWD" [before]=/tmp/tree_before)
if [ ! -d /tmp/tree_before/prismatic ]; then
  [ -f "$BEFORE_TGZ" ] || { mark "no $BEFORE_TGZ (see the header for how to make it)"; exit 1; }
  mkdir -p /tmp/tree_before && tar xzf "$BEFORE_TGZ" -C /tmp/tree_before || exit 1
fi
# the archive names its commit (git archive writes it into the tar's header)
BEFORE_COMMIT=$( (gzip -dc "$BEFORE_TGZ" | git get-tar-commit-id) 2>/dev/null || echo unknown)
mark "stage $STAGE, rounds $ROUNDS, before tree $BEFORE_COMMIT"

run_tree() {  # tree round
  local dir="$OUT/$1-r$2" left=$(( CALL_LIMIT - $(el) ))
  if [ "$left" -lt "$EXPECTED_S" ]; then mark "not started: $1 round $2 ($left s left, $EXPECTED_S expected)"; return 1; fi
  mkdir -p "$dir"
  mark "start $1 round $2"
  # shellcheck disable=SC2086
  (cd "${ROOT[$1]}" && PYTHONPATH="${ROOT[$1]}:/tmp/site" PYTHONUNBUFFERED=1 timeout $(( left - 10 )) \
    python3 experiments/bench_train_step.py $BENCH_FLAGS --out_dir "$dir" > "$dir/log.txt" 2>&1)
  mark "end $1 round $2 rc=$?"
}

if [ "$STAGE" = warm ]; then
  for tree in ${TREES:-before after}; do run_tree "$tree" 1 || break; done
else
  for r in $(seq 1 "$ROUNDS"); do
    if [ $(( r % 2 )) -eq 1 ]; then order="before after"; else order="after before"; fi
    for tree in $order; do run_tree "$tree" "$r" || break 2; done
  done
fi
python3 experiments/compare_bench_trees.py "$OUT" | tee "$OUT/summary.md"
mark "done"
