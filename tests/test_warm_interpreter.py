"""The test helper's warm interpreters run a script as a plain ``python script.py args`` does."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, WARM_INTERPRETERS, script_env

PROBE = """
import json, os, sys
print(json.dumps({"argv": sys.argv, "name": __name__, "path0": sys.path[0], "cwd": os.getcwd(),
                  "stdin": sys.stdin.read(), "env": os.environ.get("PROBE_VALUE")}))
print("to stderr", file=sys.stderr)
sys.exit(int(sys.argv[1]))
"""


def test_a_warm_run_matches_a_plain_subprocess(tmp_path: Path) -> None:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = {**script_env(), "PROBE_VALUE": "x y"}
    for code in ("0", "3"):
        args = [code, "--flag=a b"]
        plain = subprocess.run([sys.executable, str(script), *args], cwd=REPO, env=env, capture_output=True,
                               text=True, timeout=60)  # fmt: skip
        warm = WARM_INTERPRETERS.run(script, args, env, timeout=120)
        assert (warm.returncode, warm.stdout, warm.stderr) == (plain.returncode, plain.stdout, plain.stderr)
        assert plain.returncode == int(code)


def test_the_next_test_finds_a_warm_interpreter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pytest sets PYTEST_CURRENT_TEST anew for every test: runs must not carry it, or no warm interpreter
    would ever serve the test after the one it was started in."""
    script = tmp_path / "probe.py"
    script.write_text("import sys\n")
    WARM_INTERPRETERS.run(script, [], script_env(), timeout=120)
    before = WARM_INTERPRETERS.cold_starts
    monkeypatch.setenv("PYTEST_CURRENT_TEST", "tests/another.py::test_next (call)")
    assert WARM_INTERPRETERS.run(script, [], script_env(), timeout=120).returncode == 0
    assert WARM_INTERPRETERS.cold_starts == before


def test_a_run_past_its_timeout_is_killed_and_the_next_run_works(tmp_path: Path) -> None:
    """As ``subprocess.run(..., timeout=)``: TimeoutExpired, the process killed (not waited for: the 60 s sleep
    would hold the test), and the next run gets a working interpreter. As with a plain subprocess, the limit also
    covers the interpreter's start (here possibly its imports, if it is not warm yet)."""
    sleeper, probe = tmp_path / "sleeper.py", tmp_path / "ok.py"
    sleeper.write_text("import time\ntime.sleep(60)\n")
    probe.write_text("print('ok')\n")
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        WARM_INTERPRETERS.run(sleeper, [], script_env(), timeout=3)
    assert time.monotonic() - start < 30
    after = WARM_INTERPRETERS.run(probe, [], script_env(), timeout=120)
    assert (after.returncode, after.stdout) == (0, "ok\n")
