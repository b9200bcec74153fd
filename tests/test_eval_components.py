"""Closed-loop evaluation parts that need no simulator: observation and action mappings, checkpoint resolution,
the un-normalization key, the worker message codec, the episode log, Wilson intervals and the scheduler.

References are independent of the code under test: float64 formulas written differently (atan2 instead of
acos/sqrt for the axis-angle, bisection instead of the closed form for Wilson), hand-computed values, and the
TensorFlow crop recomputed in float64 numpy.
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from experiments.robot.libero import protocol
from experiments.robot.libero.results import EpisodeLog, summarize, wilson_interval
from experiments.robot.libero.workers import EpisodeScheduler
from experiments.robot.observations import (
    center_crop,
    libero_proprio,
    normalize_proprio,
    policy_images,
    quat2axisangle,
    rotate_180,
)
from experiments.robot.policy import (
    pick_unnorm_key,
    resolve_checkpoint,
    to_env_actions,
    training_image_preprocessing,
)
from prismatic.models.checkpoints import CheckpointError
from prismatic.vla.datasets.synthetic_task import axisangle_to_quat

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- proprio -----
def _axisangle_reference(quat: np.ndarray) -> np.ndarray:
    """Angle 2 atan2(|v|, w) in [0, 2 pi] (no canonicalization, like LIBERO's), axis v / |v|, float64."""
    x, y, z, w = np.asarray(quat, dtype=np.float64)
    v = np.array([x, y, z])
    norm = np.linalg.norm(v)
    if norm == 0.0:
        return np.zeros(3)
    return v / norm * 2.0 * math.atan2(norm, w)


QUATERNIONS = [
    [0.0, 0.0, 0.0, 1.0],  # identity
    [0.0, 0.0, 0.0, -1.0],  # identity with w < 0: sqrt(1 - w^2) == 0 -> zeros
    [0.99939615, 0.02651012, -0.02245862, 0.00040542],  # LIBERO spatial rest pose (x, y, z, w), angle ~ pi
    [0.5, -0.5, 0.5, -0.5],  # w < 0: angle 4 pi / 3 > pi, kept as is
    [0.0, 0.6, 0.0, 0.8],
    [-0.2, 0.1, 0.3, -0.9273618495495703],
]


@pytest.mark.parametrize("quat", QUATERNIONS)
def test_quat2axisangle_matches_float64_reference(quat: list[float]) -> None:
    quat = np.asarray(quat) / np.linalg.norm(quat)
    np.testing.assert_allclose(quat2axisangle(quat), _axisangle_reference(quat), rtol=0, atol=1e-9)


def test_quat2axisangle_keeps_angles_above_pi_and_inverts_the_synthetic_env() -> None:
    """w < 0 gives an angle above pi (the data's convention); axisangle_to_quat is its inverse below 2 pi."""
    angle = np.linalg.norm(quat2axisangle([0.5, -0.5, 0.5, -0.5]))
    assert angle == pytest.approx(4 * math.pi / 3, abs=1e-12)
    rng = np.random.default_rng(0)
    for _ in range(50):
        axis = rng.normal(size=3)
        vector = axis / np.linalg.norm(axis) * rng.uniform(0.0, 2 * math.pi - 1e-3)
        np.testing.assert_allclose(quat2axisangle(axisangle_to_quat(vector)), vector, atol=1e-9)


def test_libero_proprio_composition_and_normalization() -> None:
    obs = {
        "robot0_eef_pos": np.array([-0.2, 0.1, 1.05]),
        "robot0_eef_quat": np.array([0.5, -0.5, 0.5, -0.5]),
        "robot0_gripper_qpos": np.array([0.039, -0.038]),
    }
    expected = np.concatenate([[-0.2, 0.1, 1.05], _axisangle_reference(obs["robot0_eef_quat"]), [0.039, -0.038]])
    np.testing.assert_allclose(libero_proprio(obs), expected, atol=1e-12)
    stats = {
        "q01": [-0.3, -0.3, 0.9, 0.0, -1.0, -1.0, 0.0, -0.04],
        "q99": [0.3, 0.3, 1.3, 3.0, 1.0, 1.0, 0.04, 0.0],
        "min": [-1.0] * 8,
        "max": [1.0] * 7 + [-1.0],  # the last dimension is constant in the data: training maps it to 0
    }
    x = expected
    hand = [2 * (x[i] - stats["q01"][i]) / (stats["q99"][i] - stats["q01"][i] + 1e-8) - 1 for i in range(8)]
    hand = np.clip(hand, -1, 1)
    hand[7] = 0.0
    np.testing.assert_allclose(normalize_proprio(x, stats), hand, atol=1e-12)


# ------------------------------------------------------------------------------------------- images ------
def _crop_reference(image: np.ndarray, area: float = 0.9) -> np.ndarray:
    """TF crop_and_resize (bilinear, box in normalized coordinates, crop size = image size) in float64, then
    TF's float -> uint8 conversion (scale by 255.5, truncate)."""
    h, w = image.shape[:2]
    x = image.astype(np.float64) / 255.0
    side = float(np.sqrt(np.float32(area)))
    y1 = x1 = (1.0 - side) / 2.0
    y2 = x2 = y1 + side
    ys = y1 * (h - 1) + np.arange(h) * (y2 - y1) * (h - 1) / (h - 1)
    xs = x1 * (w - 1) + np.arange(w) * (x2 - x1) * (w - 1) / (w - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1i, x1i = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    dy, dx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    top = x[y0][:, x0] * (1 - dx) + x[y0][:, x1i] * dx
    bottom = x[y1i][:, x0] * (1 - dx) + x[y1i][:, x1i] * dx
    out = np.clip(top * (1 - dy) + bottom * dy, 0.0, 1.0)
    return np.floor(out * 255.5).astype(np.uint8)


def test_center_crop_matches_float64_reference() -> None:
    rng = np.random.default_rng(0)
    smooth = rng.integers(0, 256, size=(28, 28, 3)).repeat(8, axis=0).repeat(8, axis=1).astype(np.uint8)
    for image in (smooth, rng.integers(0, 256, size=(224, 224, 3), dtype=np.uint8)):
        diff = np.abs(center_crop(image).astype(int) - _crop_reference(image).astype(int))
        assert diff.max() <= 1, f"crop differs from the float64 reference by {diff.max()} levels"
        assert (diff > 0).mean() < 0.01, f"{(diff > 0).mean():.2%} of values differ by one level"


def test_rotate_180_reverses_rows_and_columns() -> None:
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    np.testing.assert_array_equal(rotate_180(image), image[::-1, ::-1])
    assert rotate_180(image).flags["C_CONTIGUOUS"]


# ------------------------------------------------------------------------------------------- actions -----
def test_env_actions_gripper_mapping_by_hand() -> None:
    """Model gripper 1 = open, 0 = close -> LIBERO -1 = open, +1 = close via 2g - 1, sign, invert."""
    chunk = np.array([[0.1, -0.2, 0.3, 0.0, 0.5, -0.5, g] for g in (0.9, 0.2, 0.5, 1.3, -0.4, 0.5000001)])
    out = to_env_actions(chunk)
    np.testing.assert_array_equal(out[:, :6], chunk[:, :6])  # arm dimensions pass through
    np.testing.assert_array_equal(out[:, 6], [-1.0, 1.0, 0.0, -1.0, 1.0, -1.0])
    assert chunk[0, 6] == 0.9  # the input is not modified


def test_unnormalization_of_a_chunk_by_hand(tiny_model) -> None:
    """q01/q99 of TINY_NORM_STATS: x = 0.5 (n + 1) (q99 - q01 + 1e-8) + q01 on dims 0-5, gripper raw."""
    n = np.array([[[-1.0, 0.0, 1.0, 0.5, -0.5, 0.25, 0.7]]])
    q01 = [-0.9, -0.5, -0.25, -0.1, -0.2, -0.3]
    q99 = [0.8, 0.6, 0.35, 0.15, 0.1, 0.5]
    hand = [0.5 * (n[0, 0, i] + 1) * (q99[i] - q01[i] + 1e-8) + q01[i] for i in range(6)] + [0.7]
    np.testing.assert_allclose(tiny_model.unnormalize_actions(n)[0, 0], hand, atol=1e-12)


def test_unnorm_key_follows_upstream_rule() -> None:
    stats = {"libero_spatial_no_noops": {}, "libero_goal": {}, "libero_goal_no_noops": {}}
    assert pick_unnorm_key(stats, "libero_spatial") == "libero_spatial_no_noops"
    assert pick_unnorm_key(stats, "libero_goal") == "libero_goal"  # the suite name wins
    assert pick_unnorm_key(stats, "libero_goal", "libero_spatial_no_noops") == "libero_spatial_no_noops"
    with pytest.raises(ValueError, match=r"available keys: \['libero_goal'"):
        pick_unnorm_key(stats, "libero_10")


# --------------------------------------------------------------------------------------- checkpoints -----
def _touch(path, text: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_resolve_checkpoint_kinds(tmp_path) -> None:
    release = tmp_path / "release"
    for name in ("config.json", "model.safetensors", "action_head--checkpoint.pt"):
        _touch(release / name)
    assert resolve_checkpoint(release).kind == "release"

    base = tmp_path / "base"
    (base / "checkpoints").mkdir(parents=True)
    run = tmp_path / "runs" / "r"
    _touch(run / "finetune_config.json", json.dumps({"vlm_path": str(base), "config_file_path": str(base / "hf")}))
    for step in (5, 20, 100):
        ckpt = run / f"r--{step}_chkpt"
        (ckpt / "lora_adapter").mkdir(parents=True)
        if step != 100:  # an incomplete checkpoint (no head) is never picked
            _touch(ckpt / f"action_head--{step}_checkpoint.pt")
    resolved = resolve_checkpoint(run)
    assert resolved.path == run / "r--20_chkpt"
    assert (resolved.kind, resolved.base_model_dir, resolved.base_config_dir) == ("lora", base, base / "hf")
    override = resolve_checkpoint(run / "r--5_chkpt", vlm_path=str(release))
    assert override.base_model_dir == release

    with pytest.raises(CheckpointError, match="no action_head"):
        resolve_checkpoint(tmp_path / "runs")
    (run / "finetune_config.json").unlink()
    with pytest.raises(CheckpointError, match="--vlm_path"):
        resolve_checkpoint(run / "r--5_chkpt")


def test_torch_source_policies_see_their_training_frames_without_tensorflow(tmp_path) -> None:
    """A policy trained on the torch synthetic source gets, from the env's first observation of a training
    episode, exactly the frames the source trained it on (both cameras, bit for bit), by the source's own resize;
    the RLDS path (JPEG + lanczos3) gives other bytes for the same observation, so the choice matters. A run's
    ``finetune_config.json`` picks the path; a centre crop, which that source never applies, is refused."""
    from prismatic.vla.datasets.synthetic_task import PickLiftEnv, episode_rng
    from prismatic.vla.datasets.torch_source import render_episodes

    seed, index = 3, 5
    trained = render_episodes([(seed, index, 4, 224)], workers=0)[0]
    obs = PickLiftEnv().reset(episode_rng(seed, index))
    images = policy_images(obs, num_images=2, crop=False, image_preprocessing="torch_source")
    np.testing.assert_array_equal(images[0], trained["images"][0])
    np.testing.assert_array_equal(images[1], trained["wrist_images"][0])
    rlds = policy_images(obs, num_images=2, crop=False, image_preprocessing="rlds")
    assert np.abs(rlds.astype(int) - images.astype(int)).max() > 0
    with pytest.raises(ValueError, match="never crops"):
        policy_images(obs, num_images=2, crop=True, image_preprocessing="torch_source")
    with pytest.raises(ValueError, match="must be one of"):
        policy_images(obs, num_images=2, crop=False, image_preprocessing="pil")

    from prismatic.training.finetune_config import FinetuneConfig
    from prismatic.training.run_dir import checkpoint_record, plain_config

    for source, expected in (("synthetic", "torch_source"), ("rlds", "rlds")):
        cfg = FinetuneConfig(vlm_path=str(tmp_path), data_root_dir=str(tmp_path), data_source=source)
        ckpt = tmp_path / source / f"{source}--1_chkpt"  # the two records finetune.py writes, as it writes them
        _touch(ckpt / "training_state" / "finetune_config.json", json.dumps(checkpoint_record(cfg, 1, 1)))
        _touch(ckpt.parent / "finetune_config.json", json.dumps(plain_config(cfg)))
        _touch(ckpt / "action_head--1_checkpoint.pt")
        assert training_image_preprocessing(resolve_checkpoint(ckpt)) == expected
        (ckpt / "training_state" / "finetune_config.json").unlink()  # an older checkpoint: the run's record
        assert training_image_preprocessing(resolve_checkpoint(ckpt)) == expected
        latest = tmp_path / f"{source}-latest"  # --save_latest_checkpoint_only: the run dir is the checkpoint
        _touch(latest / "finetune_config.json", json.dumps(plain_config(cfg)))
        _touch(latest / "action_head--latest_checkpoint.pt")
        assert training_image_preprocessing(resolve_checkpoint(latest)) == expected
    release = tmp_path / "release"
    for name in ("config.json", "model.safetensors", "action_head--checkpoint.pt"):
        _touch(release / name)
    assert training_image_preprocessing(resolve_checkpoint(release)) == "rlds"


def test_the_torch_source_image_path_runs_where_tensorflow_cannot_be_imported() -> None:
    """The GPU image has no TensorFlow (a study run's evaluation failed on it): in a process where importing it
    fails, the torch-source path still preprocesses an observation, while the RLDS path does need it."""
    code = textwrap.dedent("""
        import sys
        sys.modules["tensorflow"] = None  # any import of it now raises ModuleNotFoundError
        from experiments.robot.observations import policy_images
        from prismatic.vla.datasets.synthetic_task import PickLiftEnv, episode_rng
        obs = PickLiftEnv().reset(episode_rng(0, 0))
        print(policy_images(obs, 2, False, "torch_source").shape)
        try:
            policy_images(obs, 2, False, "rlds")
        except ModuleNotFoundError:
            print("rlds needs tensorflow")
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:2] == ["(2, 224, 224, 3)", "rlds needs tensorflow"]


# -------------------------------------------------------------------------------------------- protocol ----
def test_protocol_round_trip_keeps_arrays_exact() -> None:
    rng = np.random.default_rng(0)
    message = {
        "type": "query",
        "obs": {
            "image": rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8),
            "pos": rng.normal(size=3),
            "f32": rng.normal(size=(2, 2)).astype(np.float32),
        },
        "nested": [np.int64(3), (np.arange(3), "text")],
        "none": None,
    }
    stream = io.BytesIO()
    protocol.send(stream, message)
    protocol.send(stream, {"cmd": "close"})
    stream.seek(0)
    back = protocol.receive(stream)
    for key in ("image", "pos", "f32"):
        assert back["obs"][key].dtype == message["obs"][key].dtype
        np.testing.assert_array_equal(back["obs"][key], message["obs"][key])
    assert back["nested"][0] == 3
    assert isinstance(back["nested"][1], tuple)
    np.testing.assert_array_equal(back["nested"][1][0], np.arange(3))
    assert back["none"] is None
    assert protocol.receive(stream) == {"cmd": "close"}
    with pytest.raises(protocol.WorkerClosed):
        protocol.receive(stream)
    truncated = io.BytesIO(stream.getvalue()[:20])
    with pytest.raises(protocol.WorkerClosed):
        protocol.receive(truncated)


# ------------------------------------------------------------------------------------------- results -----
def test_wilson_interval_solves_its_defining_equation() -> None:
    """The bounds p solve |s/n - p| = z sqrt(p (1 - p) / n); found here by bisection in float64."""
    z = 1.959963984540054

    def root(lo: float, hi: float, f) -> float:  # noqa: ANN001
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(lo) * f(mid) > 0 else (lo, mid)
        return (lo + hi) / 2

    for s, n in ((0, 10), (3, 10), (49, 50), (50, 50), (250, 500), (1, 1)):
        p_hat = s / n
        f = lambda p, p_hat=p_hat, n=n: (p_hat - p) ** 2 - z * z * p * (1 - p) / n  # noqa: E731
        low = 0.0 if s == 0 else root(0.0, p_hat - 1e-15, f)  # f(p_hat) <= 0 < f(0)
        high = 1.0 if s == n else root(p_hat + 1e-15, 1.0, f)
        assert wilson_interval(s, n) == pytest.approx((low, high), abs=1e-9)
    assert wilson_interval(50, 50)[0] == pytest.approx(0.9286, abs=1e-4)  # the docstring's example
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(5, 3)


def test_episode_log_survives_a_torn_line_and_summary_counts(tmp_path) -> None:
    log = EpisodeLog(tmp_path / "episodes.jsonl")
    for task, episode, success in ((0, 0, True), (0, 1, False), (1, 0, True)):
        log.append({"task_id": task, "episode": episode, "success": success, "steps": 10 + episode, "wall_s": 2.0})
    with open(log.path, "a") as f:
        f.write('{"task_id": 1, "episode": 1, "succ')  # a write cut short by a kill
    log.append({"task_id": 1, "episode": 2, "success": False, "steps": 30, "error": "boom", "wall_s": 1.0})
    records = log.read()
    assert log.torn_lines == 1
    assert sorted(records) == [(0, 0), (0, 1), (1, 0), (1, 2)]
    tasks = [{"task_id": 0, "description": "a"}, {"task_id": 1, "description": "b"}]
    planned = [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    summary = summarize(records.values(), tasks, planned)
    assert [(r["successes"], r["episodes"], r["errors"]) for r in summary["per_task"]] == [(1, 2, 0), (1, 2, 1)]
    total = summary["total"]
    assert (total["successes"], total["episodes"], total["success_rate"]) == (2, 4, 0.5)
    assert total["ci95"] == pytest.approx(list(wilson_interval(2, 4)))
    assert total["episode_seconds"] == pytest.approx(7.0)


def test_scheduler_keeps_workers_on_their_task_and_hands_out_everything_once() -> None:
    pending = [(t, k) for t in (3, 1, 2) for k in range(4) if (t, k) != (1, 0)]
    scheduler = EpisodeScheduler(pending, task_order=[1, 2, 3])
    first = scheduler.next_for(None)
    assert first == (2, 0)  # most episodes left (tasks 2 and 3: 4 each), then the task order
    second = scheduler.next_for(None, claimed={2})
    assert second == (3, 0)  # a new worker prefers a task nobody is on
    assert scheduler.next_for(3) == (3, 1)  # a worker stays on its task
    handed = [first, second, (3, 1)]
    while (nxt := scheduler.next_for(handed[-1][0])) is not None:
        handed.append(nxt)
    assert sorted(handed) == sorted(pending)
    assert len(scheduler) == 0


# ----------------------------------------------------------------------------------------- synthetic env ---
def test_synthetic_env_expert_succeeds_and_observations_are_the_data_frames() -> None:
    """The expert that wrote the training data solves the evaluation episodes (held-out scenes) well within the
    synthetic horizon; the env's LIBERO-style observation, through the eval's proprio path and rotation, gives back
    the stored state and the upright frames; its noise-free ``reference_action`` is the expert's action less the
    rotation noise (replayed from a copy of the rng) and draws nothing."""
    from experiments.robot.libero.suites import TASK_MAX_STEPS, SyntheticSuite

    suite = SyntheticSuite()
    steps_to_success = []
    for task in suite.tasks():
        for episode in range(3):
            env = suite.make_env(task.task_id, 256)
            obs = suite.start_episode(env, task.task_id, episode)
            assert env.instruction == task.description
            for step in range(TASK_MAX_STEPS["synthetic"]):
                np.testing.assert_allclose(libero_proprio(obs), env.frame["state"], atol=1e-9)
                np.testing.assert_array_equal(rotate_180(obs["agentview_image"]), env.frame["image"])
                state = env.rng.bit_generator.state
                reference = env.reference_action()  # what the closed-loop deviation is measured against
                assert env.rng.bit_generator.state == state  # draws nothing: the episode is not changed by it
                replay = np.random.default_rng()
                replay.bit_generator.state = state
                action = env.expert_action()  # = the reference plus the rotation noise the rng draws next
                noise = np.concatenate([np.zeros(3), replay.normal(0.0, env.spec.rotation_noise_std, 3), [0.0]])
                np.testing.assert_array_equal(action, reference + noise)
                obs, reward, done, _ = env.step(action)
                assert done == env.check_success()
                assert reward == float(done)
                if done:
                    steps_to_success.append(step + 1)
                    break
    assert len(steps_to_success) == 24, f"the expert failed {24 - len(steps_to_success)} evaluation episodes"
    assert max(steps_to_success) <= TASK_MAX_STEPS["synthetic"] // 2


def test_synthetic_env_grasps_only_when_closing_over_the_block_and_drops_on_open() -> None:
    from prismatic.vla.datasets.synthetic_task import PickLiftEnv

    env = PickLiftEnv()
    env.reset(np.random.default_rng(0))
    scene = env.scene
    scene.gripper, scene.height = scene.target + np.array([0.1, -0.1]), 0.0  # above the block (half side 0.146)
    env.step([0, 0, 0, 0, 0, 0, -1.0])  # open: nothing happens
    assert not scene.grasped
    scene.height = 0.1  # too high to grasp
    env.step([0, 0, 0, 0, 0, 0, 1.0])
    assert not scene.grasped
    scene.height = 0.0
    env.step([0, 0, 1.0, 0, 0, 0, 1.0])  # close at table height: grasped, and lifted by 0.1
    assert scene.grasped
    assert scene.height == pytest.approx(0.1)
    for _ in range(2):
        env.step([0, 0, 1.0, 0, 0, 0, 1.0])
    assert env.check_success()  # held 0.3 >= 0.25 above the table
    env.step([0.5, 0, 0, 0, 0, 0, -1.0])  # opening drops the block under the gripper
    assert not scene.grasped
    assert not env.check_success()
    np.testing.assert_allclose(scene.target, scene.gripper - np.array([0.5 * env.spec.step_xy, 0.0]))
