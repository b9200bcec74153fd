"""A Python interpreter that imports what vla-scripts/finetune.py imports, then waits for the script to run.

Started by ``helpers.run_script`` one run ahead, so that these imports (~8 s on two cores, most of a short
test run) happen while the previous test is still running. The job is one JSON line on stdin,
``{"script": ..., "args": [...], "cwd": ...}``; the script then runs as ``python <script> <args>`` would: as
``__main__``, with its folder first on ``sys.path``, in a process of its own (own hash seed, own module state),
and its exit status is the interpreter's (an uncaught exception's traceback starts with two more frames, this
file's and runpy's). Only modules finetune.py imports at its top are imported here, so a finetune.py run never
sees a module it would not have loaded itself (other scripts, such as the probe of tests/test_warm_interpreter.py,
would: build_craft_cache.py finds ``prismatic.training.trainer`` and ``model_setup`` loaded, which only define
classes and functions at import).
"""

import json
import os
import runpy
import sys

import draccus  # noqa: F401
import torch  # noqa: F401

import prismatic.models.checkpoints  # noqa: F401
import prismatic.training.model_setup  # noqa: F401
import prismatic.training.trainer  # noqa: F401

job_line = sys.stdin.readline()
if not job_line:  # released unused
    sys.exit(0)
job = json.loads(job_line)
devnull = os.open(os.devnull, os.O_RDONLY)
os.dup2(devnull, 0)  # the script reads an empty stdin, not this job pipe
os.chdir(job["cwd"])
sys.argv = [job["script"], *job["args"]]
sys.path[0] = os.path.dirname(os.path.abspath(job["script"]))
runpy.run_path(job["script"], run_name="__main__")
