#!/usr/bin/env bash
# Set up the environment (once) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
export TF_CPP_MIN_LOG_LEVEL=3 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
set +e
# --durations: the slowest tests are listed at the end, so a CI log shows where the 15-minute budget goes.
"$ROOT/.venv/bin/python" -m pytest -q -p no:cacheprovider --durations=15 "$@"
rc=$?
set -e
# pytest exits 5 when it collected no tests: that is not a failure of the code under test.
if [ "$rc" -eq 5 ]; then echo "pytest: no tests collected"; exit 0; fi
exit "$rc"
