"""A tiny, learnable pick-and-lift task rendered with numpy, stored like LIBERO RLDS.

Why: tests and smoke runs need data with the exact LIBERO layout whose actions can actually be learned from the
images and the instruction, without downloading anything. This module is numpy-only (no TensorFlow import), so
the torch-only in-memory source can use it too; `vla-scripts/make_synthetic_rlds.py` writes it to disk as TFDS.

The scene (third-person camera, 256x256): a textured table, a target block and a distractor block of two
different colours, and the gripper seen from above as a dark ring (open) or disk (closed) whose radius grows with
height. The wrist camera is centred on the gripper: the blocks appear at their offset from the gripper, and the
fingers are two bars whose gap shows how far the gripper is open. The instruction names the target colour.

Policy (a deterministic function of what the images and instruction show):
  * approach: xy = clip(GAIN * (target - gripper)), z = clip(GAIN * (0 - height)), gripper open;
  * once the gripper is within GRASP_RADIUS of the target at table height: close and lift (z = +LIFT_ACTION),
    the block moves with the gripper; above HOLD_HEIGHT the arm holds still (xyz = 0, gripper closed).
  * rotation actions are a constant per target colour (readable from the instruction) plus tiny noise.

Conventions are those of the real LIBERO RLDS files (see rlds.py):
  * action[6] (gripper) is stored as -1 = open, +1 = close; the reader maps it to 1 = open, 0 = close;
  * state = eef position (3) + eef axis-angle (3) + two finger joint positions (2); joint_state has 7 values.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SyntheticTaskSpec:
    """Constants of the synthetic task (all episodes share them)."""

    image_size: int = 256
    state_dim: int = 8
    joint_dim: int = 7
    action_dim: int = 7
    color_names: tuple[str, ...] = ("red", "green", "blue", "yellow")
    color_rgb: tuple[tuple[int, int, int], ...] = ((220, 40, 40), (40, 170, 60), (50, 80, 220), (230, 200, 30))
    instruction_templates: tuple[str, ...] = ("pick up the {} block", "lift the {} block")
    block_half_px: int = 14  # half side of a block in the third-person image
    workspace_margin_px: int = 32  # positions in [-1, 1] map to [margin, size - margin] pixels
    gain: float = 4.0  # action = clip(gain * displacement, -1, 1)
    step_xy: float = 0.12  # workspace units moved per unit action and step
    step_z: float = 0.1
    grasp_radius: float = 0.06
    table_eps: float = 0.02  # "at table height" threshold
    lift_action: float = 0.5
    hold_height: float = 0.5
    open_finger: float = 0.04  # finger joint position when fully open (LIBERO-like magnitude, metres)
    image_noise_std: float = 6.0  # per-frame texture noise (the "small per-frame variety")
    noise_cell_px: int = 8  # texture cell size
    rotation_noise_std: float = 0.005
    # Raw (on-disk) gripper action convention, as in the LIBERO RLDS files.
    gripper_open_raw: float = -1.0
    gripper_close_raw: float = 1.0


SPEC = SyntheticTaskSpec()


def episode_rng(seed: int, episode_index: int) -> np.random.Generator:
    """Independent, reproducible random stream per (seed, episode)."""
    return np.random.default_rng([int(seed), int(episode_index), 0x5EED])


def episode_length(seed: int, episode_index: int, min_len: int, max_len: int) -> int:
    """Length of one episode, drawn uniformly in [min_len, max_len] (deterministic, shared by all writers)."""
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
    rng = np.random.default_rng([int(seed), int(episode_index), 0x1E17])
    return int(rng.integers(min_len, max_len + 1))


def _to_px(pos: np.ndarray, spec: SyntheticTaskSpec) -> np.ndarray:
    """Workspace [-1, 1]^2 -> pixel (col, row) in the third-person image."""
    half_span = (spec.image_size - 2 * spec.workspace_margin_px) / 2.0
    return spec.image_size / 2.0 + pos * half_span


def _draw_square(img: np.ndarray, center_px: np.ndarray, half: float, rgb: tuple[int, int, int]) -> None:
    h, w = img.shape[:2]
    c0, r0 = int(round(center_px[0] - half)), int(round(center_px[1] - half))
    c1, r1 = int(round(center_px[0] + half)), int(round(center_px[1] + half))
    img[max(r0, 0) : min(r1, h), max(c0, 0) : min(c1, w)] = rgb


def _draw_gripper_marker(img: np.ndarray, center_px: np.ndarray, radius: float, closed: bool) -> None:
    h, w = img.shape[:2]
    rows, cols = np.ogrid[:h, :w]
    dist = np.sqrt((rows - center_px[1]) ** 2 + (cols - center_px[0]) ** 2)
    mask = dist <= radius if closed else (dist <= radius) & (dist >= radius - 4.0)
    img[mask] = (25, 25, 25)


def _background(rng: np.random.Generator, base_rgb: tuple[int, int, int], spec: SyntheticTaskSpec) -> np.ndarray:
    s, cell = spec.image_size, spec.noise_cell_px
    noise = rng.normal(0.0, spec.image_noise_std, size=(s // cell, s // cell, 1))
    noise = noise.repeat(cell, axis=0).repeat(cell, axis=1)  # blocky texture: varies per frame, compresses well
    return np.clip(np.asarray(base_rgb, dtype=np.float64) + noise, 0, 255)


def _render_primary(
    rng: np.random.Generator,
    blocks: list[tuple[np.ndarray, float, tuple[int, int, int]]],
    gripper_xy: np.ndarray,
    height: float,
    closed: bool,
    spec: SyntheticTaskSpec,
) -> np.ndarray:
    img = _background(rng, (196, 168, 128), spec)
    for pos, block_height, rgb in blocks:  # a lifted block is drawn larger (closer to the camera)
        _draw_square(img, _to_px(pos, spec), spec.block_half_px * (1.0 + 0.5 * block_height), rgb)
    _draw_gripper_marker(img, _to_px(gripper_xy, spec), 10.0 + 12.0 * height, closed)
    return img.astype(np.uint8)


def _render_wrist(
    rng: np.random.Generator,
    blocks: list[tuple[np.ndarray, float, tuple[int, int, int]]],
    gripper_xy: np.ndarray,
    height: float,
    openness: float,
    spec: SyntheticTaskSpec,
) -> np.ndarray:
    s = spec.image_size
    img = _background(rng, (120, 120, 125), spec)
    zoom = s / 1.5  # the wrist camera sees +-0.75 workspace units around the gripper
    for pos, block_height, rgb in blocks:
        rel_height = max(block_height - height, 0.0) if block_height > 0 else 0.0
        half = 24.0 / (1.0 + 2.0 * height) + 8.0 * rel_height
        _draw_square(img, s / 2.0 + (pos - gripper_xy) * zoom, half, rgb)
    gap = int(10 + 60 * openness)  # fingers: two dark bars at the bottom
    img[s - 60 :, s // 2 - gap - 14 : s // 2 - gap] = (30, 30, 30)
    img[s - 60 :, s // 2 + gap : s // 2 + gap + 14] = (30, 30, 30)
    return img.astype(np.uint8)


def render_episode(seed: int, episode_index: int, length: int, spec: SyntheticTaskSpec = SPEC) -> dict:
    """Render one deterministic episode.

    Returns numpy arrays (raw, as stored on disk): images / wrist_images uint8 [L, 256, 256, 3],
    states float32 [L, 8], joint_states float32 [L, 7], actions float32 [L, 7] (gripper -1 open / +1 close),
    rewards float32 [L] (1 on the last step), instruction str, file_path str.
    """
    if length < 1:
        raise ValueError(f"episode length must be >= 1, got {length}")
    rng = episode_rng(seed, episode_index)
    n_colors = len(spec.color_names)
    target_c = int(rng.integers(n_colors))
    distractor_c = int((target_c + rng.integers(1, n_colors)) % n_colors)
    instruction = spec.instruction_templates[int(rng.integers(len(spec.instruction_templates)))].format(
        spec.color_names[target_c]
    )
    target = rng.uniform(-0.7, 0.7, size=2)
    distractor = rng.uniform(-0.7, 0.7, size=2)
    while np.linalg.norm(distractor - target) < 0.5:
        distractor = rng.uniform(-0.7, 0.7, size=2)
    gripper = rng.uniform(-0.8, 0.8, size=2)
    height = float(rng.uniform(0.2, 0.5))
    openness, grasped = 1.0, False
    base_rot = np.array([np.pi, 0.0, 0.25 * (target_c - (n_colors - 1) / 2.0)])
    joint_offsets = rng.uniform(-0.3, 0.3, size=7)

    arrays: dict[str, list] = {k: [] for k in ("images", "wrist_images", "states", "joint_states", "actions")}
    for _ in range(length):
        block_height = height if grasped else 0.0
        target_pos = gripper.copy() if grasped else target
        blocks = [
            (distractor, 0.0, spec.color_rgb[distractor_c]),
            (target_pos, block_height, spec.color_rgb[target_c]),
        ]
        arrays["images"].append(_render_primary(rng, blocks, gripper, height, openness < 0.5, spec))
        arrays["wrist_images"].append(_render_wrist(rng, blocks, gripper, height, openness, spec))
        rot = base_rot + rng.normal(0.0, 0.01, size=3)
        finger = spec.open_finger * openness
        arrays["states"].append(np.concatenate([gripper, [height], rot, [finger, -finger]]))
        arrays["joint_states"].append(joint_offsets + np.concatenate([gripper, [height], rot, [openness]]))

        if not grasped and np.linalg.norm(target - gripper) < spec.grasp_radius and height < spec.table_eps:
            grasped = True
        if not grasped:
            xyz = np.clip(spec.gain * np.array([*(target - gripper), -height]), -1.0, 1.0)
            grip = spec.gripper_open_raw
        elif height < spec.hold_height:
            xyz, grip = np.array([0.0, 0.0, spec.lift_action]), spec.gripper_close_raw
        else:
            xyz, grip = np.zeros(3), spec.gripper_close_raw
        d_rot = 0.1 * base_rot[2:3].repeat(3) * np.array([1.0, -1.0, 0.5])
        d_rot = d_rot + rng.normal(0.0, spec.rotation_noise_std, size=3)
        arrays["actions"].append(np.concatenate([xyz, d_rot, [grip]]))

        gripper = np.clip(gripper + spec.step_xy * xyz[:2], -1.0, 1.0)
        height = float(np.clip(height + spec.step_z * xyz[2], 0.0, 1.0))
        openness = float(np.clip(openness + (0.5 if grip == spec.gripper_open_raw else -0.5), 0.0, 1.0))

    out = {k: np.stack(v) for k, v in arrays.items()}
    for key in ("states", "joint_states", "actions"):
        out[key] = out[key].astype(np.float32)
    rewards = np.zeros(length, dtype=np.float32)
    rewards[-1] = 1.0
    out["rewards"] = rewards
    out["instruction"] = instruction
    out["file_path"] = f"/synthetic/{instruction.replace(' ', '_')}_demo.hdf5"
    return out


def episode_fingerprint(episode: dict) -> str:
    """Short content hash of a rendered episode (debugging aid; the reader derives its own ids from disk)."""
    h = hashlib.sha1()
    for key in ("states", "actions"):
        h.update(np.ascontiguousarray(episode[key]).tobytes())
    h.update(episode["instruction"].encode())
    return h.hexdigest()[:16]
