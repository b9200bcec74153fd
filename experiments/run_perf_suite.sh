#!/usr/bin/env bash
# The GPU measurements of docs/BENCHMARKS.md in one command, baselines included (ratios only mean something
# within one machine). Each benchmark has its own time limit and writes its JSON report after every
# configuration, so a limit that hits keeps what was measured. Reports and logs go to $OUT (or ./bench_out).
#
#   bash experiments/run_perf_suite.sh single   # 1 GPU: eager PEFT baseline, CUDA graphs plain/cache/online
#   bash experiments/run_perf_suite.sh multi    # 1 vs 2 GPUs, CUDA graphs, joined vs overlapped all-reduce
#   bash experiments/run_perf_suite.sh profile  # CUDA graphs, plain + CRaFT cache with torch.profiler traces
#
# Budget: ~8 min for "single" on a cold machine (compilation dominates), ~9 min for "multi".
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-bench_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
BENCH=(experiments/bench_train_step.py --config experiments/assets/openvla_config.json --batch_sizes 16
       --warmup 6 --steps 10 --out_dir "$OUT")
GRAPHS=(--compile --compile_vision --compile_mode reduce-overhead)

bench() {  # bench LIMIT_S TAG LAUNCHER... -- ARGS...
  local limit=$1 tag=$2
  shift 2
  local launcher=()
  while [ "$1" != "--" ]; do launcher+=("$1"); shift; done
  shift
  # shellcheck disable=SC2086  # SUITE_EXTRA: extra flags for smoke runs, e.g. "--tiny --device cpu --steps 1"
  timeout "$limit" "${launcher[@]}" "${BENCH[@]}" --tag "$tag" "$@" ${SUITE_EXTRA:-} > "$OUT/log_$tag.txt" 2>&1
  echo "== $tag (exit $?)"
  grep -E "result:|Error" "$OUT/log_$tag.txt" | sed 's/.*result: //' | cut -c1-200
}

case "${1:-single}" in
  single)
    bench 120 eager_peft python -- --variants plain --peft_lora --phase_steps 0
    bench 420 graphs python -- --variants plain craft_cache craft_online --phase_steps 2 "${GRAPHS[@]}"
    ;;
  multi)  # 2 ranks compiling from a cold cache took > 170 s once: the joined all-reduce (the comparison) goes last
    bench 230 graphs_1gpu python -- --variants plain craft_cache --phase_steps 2 "${GRAPHS[@]}"
    bench 210 graphs_2gpu_overlap torchrun --standalone --nproc-per-node 2 -- --variants plain craft_cache \
      --phase_steps 2 --overlap_grad_sync "${GRAPHS[@]}"
    bench 140 graphs_2gpu torchrun --standalone --nproc-per-node 2 -- --variants plain --phase_steps 2 "${GRAPHS[@]}"
    ;;
  profile)  # where do CRaFT's extra ~100 ms go (second backward, projection, the 12 ms optimizer phase)?
    bench 420 graphs_profile python -- --variants plain craft_cache --phase_steps 2 --profile "${GRAPHS[@]}"
    ;;
  *)
    echo "usage: $0 single|multi|profile" >&2
    exit 2
    ;;
esac
