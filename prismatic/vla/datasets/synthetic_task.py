"""A tiny, learnable pick-and-lift task rendered with numpy, stored like LIBERO RLDS.

Why: tests and smoke runs need data with the exact LIBERO layout whose actions can actually be learned from the
images and the instruction, without downloading anything. This module is numpy-only (no TensorFlow import), so
the torch-only in-memory source can use it too; `vla-scripts/make_synthetic_rlds.py` writes it to disk as TFDS.

The scene (third-person camera, 256x256): a textured table, a target block and a distractor block of two
different colours, and the gripper seen from above as a dark ring (open) or disk (closed) whose radius grows with
height. The wrist camera is centred on the gripper: the blocks appear at their offset from the gripper, and the
fingers are two bars whose gap shows how far the gripper is open. The instruction names the target colour.

Expert policy (a deterministic function of what the images and instruction show):
  * approach: xy = clip(GAIN * (target - gripper)), z = clip(GAIN * (0 - height)), gripper open;
  * once the gripper is within GRASP_RADIUS of the target at table height: close and lift (z = +LIFT_ACTION),
    the block moves with the gripper; above HOLD_HEIGHT the arm holds still (xyz = 0, gripper closed).
  * rotation actions are a constant per target colour (readable from the instruction) plus tiny noise.

``PickLiftEnv`` is the task as a closed-loop environment (LIBERO's observation keys, ``step``,
``check_success``): the data generator drives it with the expert, the closed-loop evaluation
(experiments/robot/libero/run_libero_eval.py --task_suite_name synthetic) with a policy.

Conventions are those of the real LIBERO RLDS files (see rlds.py):
  * action[6] (gripper) is stored as -1 = open, +1 = close; the reader maps it to 1 = open, 0 = close;
  * state = eef position (3) + eef axis-angle (3) + two finger joint positions (2); joint_state has 7 values.
"""

from __future__ import annotations

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


@dataclass
class _Scene:
    """Mutable state of one episode (workspace units: xy in [-1, 1], height in [0, 1], openness in [0, 1])."""

    target_c: int
    distractor_c: int
    instruction: str
    target: np.ndarray
    distractor: np.ndarray
    gripper: np.ndarray
    height: float
    base_rot: np.ndarray
    joint_offsets: np.ndarray
    openness: float = 1.0
    grasped: bool = False


class PickLiftEnv:
    """The pick-and-lift task as a closed-loop environment, with LIBERO's observation keys and conventions.

    One class serves both sides: ``render_episode`` (the training data) drives it with ``expert_action``, and the
    closed-loop evaluation drives it with a policy. So the frames, states and dynamics a policy meets in closed
    loop are by construction those it was trained on.

    LIBERO conventions reproduced: camera images come out rotated by 180 degrees (robosuite renders upside down;
    the eval rotates them back, as for LIBERO), proprio arrives as ``robot0_eef_pos`` (3), ``robot0_eef_quat``
    (4, x y z w) and ``robot0_gripper_qpos`` (2), actions are 7-D with the gripper at -1 = open / +1 = close,
    and ``step`` returns ``done = check_success()``.

    Grasping: a closing command grasps the target block when the gripper centre is above the block (within its
    half side, ``block_half_px`` in workspace units, per axis) at table height; an opening command drops it. The
    expert closes only within ``grasp_radius`` of the block centre, a subset of that region, so the expert's
    episodes are the ones the data generator always produced. Success: the block is held at least
    ``LIFT_SUCCESS_HEIGHT`` above the table.
    """

    LIFT_SUCCESS_HEIGHT = 0.25  # half of SPEC.hold_height, where the expert stops lifting

    def __init__(self, spec: SyntheticTaskSpec = SPEC) -> None:
        self.spec = spec
        self.rng: np.random.Generator | None = None
        self.scene: _Scene | None = None
        self.frame: dict[str, np.ndarray] = {}  # the current upright images and state vectors, as stored on disk

    # -------------------------------------------------------------------------------------------- episode --
    def reset(
        self, rng: np.random.Generator, target_color: int | None = None, template: int | None = None
    ) -> dict[str, np.ndarray]:
        """Draw a scene from ``rng`` (which the episode keeps using) and return the first observation.

        ``target_color`` / ``template`` fix the target colour index and the instruction template (evaluation
        tasks); the draws for them are still made, so the rest of the scene is the same as without them.
        """
        spec, n_colors = self.spec, len(self.spec.color_names)
        target_c = int(rng.integers(n_colors))
        if target_color is not None:
            if not 0 <= target_color < n_colors:
                raise ValueError(f"target_color must be in 0..{n_colors - 1}, got {target_color}")
            target_c = target_color
        distractor_c = int((target_c + rng.integers(1, n_colors)) % n_colors)
        template_index = int(rng.integers(len(spec.instruction_templates)))
        if template is not None:
            template_index = template
        instruction = spec.instruction_templates[template_index].format(spec.color_names[target_c])
        target = rng.uniform(-0.7, 0.7, size=2)
        distractor = rng.uniform(-0.7, 0.7, size=2)
        while np.linalg.norm(distractor - target) < 0.5:
            distractor = rng.uniform(-0.7, 0.7, size=2)
        gripper = rng.uniform(-0.8, 0.8, size=2)
        height = float(rng.uniform(0.2, 0.5))
        base_rot = np.array([np.pi, 0.0, 0.25 * (target_c - (n_colors - 1) / 2.0)])
        joint_offsets = rng.uniform(-0.3, 0.3, size=7)
        self.rng = rng
        self.scene = _Scene(target_c, distractor_c, instruction, target, distractor, gripper, height, base_rot,
                            joint_offsets)  # fmt: skip
        self._render()
        return self.observation()

    @property
    def instruction(self) -> str:
        return self._require_scene().instruction

    def step(self, action: np.ndarray | list[float]) -> tuple[dict[str, np.ndarray], float, bool, dict]:
        """Apply one 7-D action (clipped to [-1, 1] as robosuite's controller does); LIBERO's return signature."""
        self._advance(np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0))
        self._render()
        success = self.check_success()
        return self.observation(), float(success), success, {}

    def check_success(self) -> bool:
        scene = self._require_scene()
        return scene.grasped and scene.height >= self.LIFT_SUCCESS_HEIGHT

    def expert_action(self) -> np.ndarray:
        """The scripted policy that produced the training data: ``reference_action`` plus rotation noise drawn
        from the episode rng (N(0, rotation_noise_std) on the three rotation dimensions)."""
        action = self.reference_action()
        action[3:6] += self._require_rng().normal(0.0, self.spec.rotation_noise_std, size=3)
        return action

    def reference_action(self) -> np.ndarray:
        """The expert's action for the current scene without its noise; draws nothing from the rng, so the
        closed-loop evaluation can compare a policy's actions with it without changing the episode.

        approach: xy = clip(gain * (target - gripper)), z = clip(gain * (0 - height)), gripper open; once within
        grasp_radius of the target at table height: close and lift (+lift_action); above hold_height: hold still.
        Rotation: a constant per target colour, readable from the instruction.
        """
        spec, scene = self.spec, self._require_scene()
        will_hold = scene.grasped or (
            np.linalg.norm(scene.target - scene.gripper) < spec.grasp_radius and scene.height < spec.table_eps
        )
        if not will_hold:
            xyz = np.clip(spec.gain * np.array([*(scene.target - scene.gripper), -scene.height]), -1.0, 1.0)
            grip = spec.gripper_open_raw
        elif scene.height < spec.hold_height:
            xyz, grip = np.array([0.0, 0.0, spec.lift_action]), spec.gripper_close_raw
        else:
            xyz, grip = np.zeros(3), spec.gripper_close_raw
        d_rot = 0.1 * scene.base_rot[2:3].repeat(3) * np.array([1.0, -1.0, 0.5])
        return np.concatenate([xyz, d_rot, [grip]])

    # ---------------------------------------------------------------------------------------- observation --
    def observation(self) -> dict[str, np.ndarray]:
        """LIBERO-style observation: 180-degree-rotated camera images and the robot's proprio keys."""
        state = self.frame["state"].astype(np.float64)
        return {
            "agentview_image": np.ascontiguousarray(self.frame["image"][::-1, ::-1]),
            "robot0_eye_in_hand_image": np.ascontiguousarray(self.frame["wrist_image"][::-1, ::-1]),
            "robot0_eef_pos": state[0:3],
            "robot0_eef_quat": axisangle_to_quat(state[3:6]),
            "robot0_gripper_qpos": state[6:8],
        }

    # ----------------------------------------------------------------------------------------- internals --
    def _require_scene(self) -> _Scene:
        if self.scene is None:
            raise RuntimeError("PickLiftEnv: call reset() before using the environment")
        return self.scene

    def _require_rng(self) -> np.random.Generator:
        self._require_scene()
        return self.rng  # type: ignore[return-value]

    def _advance(self, action: np.ndarray) -> None:
        """Dynamics of one step: grasp or drop on the gripper command, then move and open/close."""
        spec, scene = self.spec, self._require_scene()
        closing = action[6] > 0
        if closing and not scene.grasped and self._gripper_above_block() and scene.height < spec.table_eps:
            scene.grasped = True
        elif not closing and scene.grasped:  # dropped: the block falls onto the table under the gripper
            scene.grasped = False
            scene.target = scene.gripper.copy()
        xyz = action[:3]
        scene.gripper = np.clip(scene.gripper + spec.step_xy * xyz[:2], -1.0, 1.0)
        scene.height = float(np.clip(scene.height + spec.step_z * xyz[2], 0.0, 1.0))
        scene.openness = float(np.clip(scene.openness + (-0.5 if closing else 0.5), 0.0, 1.0))

    def _gripper_above_block(self) -> bool:
        scene = self._require_scene()
        half_side = self.spec.block_half_px / ((self.spec.image_size - 2 * self.spec.workspace_margin_px) / 2.0)
        return bool(np.all(np.abs(scene.target - scene.gripper) <= half_side))

    def _render(self) -> None:
        """Draw both cameras and the state vectors of the current scene (draws texture and rotation noise)."""
        spec, scene, rng = self.spec, self._require_scene(), self._require_rng()
        block_height = scene.height if scene.grasped else 0.0
        target_pos = scene.gripper.copy() if scene.grasped else scene.target
        blocks = [
            (scene.distractor, 0.0, spec.color_rgb[scene.distractor_c]),
            (target_pos, block_height, spec.color_rgb[scene.target_c]),
        ]
        image = _render_primary(rng, blocks, scene.gripper, scene.height, scene.openness < 0.5, spec)
        wrist = _render_wrist(rng, blocks, scene.gripper, scene.height, scene.openness, spec)
        rot = scene.base_rot + rng.normal(0.0, 0.01, size=3)
        finger = spec.open_finger * scene.openness
        xyz = [*scene.gripper, scene.height]
        self.frame = {
            "image": image,
            "wrist_image": wrist,
            "state": np.concatenate([xyz, rot, [finger, -finger]]),
            "joint_state": scene.joint_offsets + np.concatenate([xyz, rot, [scene.openness]]),
        }


def axisangle_to_quat(axis_angle: np.ndarray) -> np.ndarray:
    """Axis-angle vector (angle = norm, any angle in [0, 2 pi)) -> unit quaternion (x, y, z, w), robosuite's order.

    The inverse of LIBERO's quat2axisangle for angles below 2 pi (that function does not canonicalize: w < 0
    gives an angle above pi), so the eval's proprio path recovers the stored axis-angle.
    """
    v = np.asarray(axis_angle, dtype=np.float64)
    angle = float(np.linalg.norm(v))
    if angle < 1e-12:
        return np.array([0.0, 0.0, 0.0, 1.0])
    return np.concatenate([v / angle * np.sin(angle / 2.0), [np.cos(angle / 2.0)]])


def steps_to_success(seed: int, episode_index: int, spec: SyntheticTaskSpec = SPEC, max_steps: int = 500) -> int:
    """Expert actions after which the episode's task first succeeds: the length of a demo that ends at success,
    as LIBERO's demos do (``render_episode(seed, i, steps_to_success(seed, i))``).

    Why: with a fixed 20-40 step length most frames come after success (the arm holds still), so x/y is zero in
    ~80% of the training frames and an L1 head stays on the constant-predictor plateau far longer
    (experiments/head_localisation_probe.py). The expert's motion and the success check read only the scene, never
    the rng, so the images are not rendered here.
    """
    env = PickLiftEnv(spec)
    env.reset(episode_rng(seed, episode_index))
    for t in range(1, max_steps + 1):
        env._advance(env.expert_action())
        if env.check_success():
            return t
    raise RuntimeError(f"the expert did not succeed within {max_steps} steps (seed {seed}, episode {episode_index})")


def demo_length(seed: int, episode_index: int, lengths: int | tuple[int, int] | str) -> int:
    """One episode's length: fixed (int), drawn from an inclusive (min, max) range, or ``"success"``
    (:func:`steps_to_success`). The one rule for the torch source and the RLDS writer."""
    if lengths == "success":
        return steps_to_success(seed, episode_index)
    if isinstance(lengths, str):
        raise ValueError(f"episode lengths must be an int, a (min, max) range or 'success', got {lengths!r}")
    lo, hi = (lengths, lengths) if isinstance(lengths, int) else lengths
    return episode_length(seed, episode_index, lo, hi)


def render_episode(seed: int, episode_index: int, length: int, spec: SyntheticTaskSpec = SPEC) -> dict:
    """Render one deterministic expert episode: ``PickLiftEnv`` driven by ``expert_action``.

    Returns numpy arrays (raw, as stored on disk): images / wrist_images uint8 [L, 256, 256, 3] (upright),
    states float32 [L, 8], joint_states float32 [L, 7], actions float32 [L, 7] (gripper -1 open / +1 close),
    rewards float32 [L] (1 on the last step), instruction str, file_path str.
    """
    if length < 1:
        raise ValueError(f"episode length must be >= 1, got {length}")
    env = PickLiftEnv(spec)
    env.reset(episode_rng(seed, episode_index))
    arrays: dict[str, list] = {k: [] for k in ("images", "wrist_images", "states", "joint_states", "actions")}
    for t in range(length):
        for key, frame_key in (("images", "image"), ("wrist_images", "wrist_image"), ("states", "state"),
                               ("joint_states", "joint_state")):  # fmt: skip
            arrays[key].append(env.frame[frame_key])
        action = env.expert_action()
        arrays["actions"].append(action)
        env._advance(action)
        if t < length - 1:  # the frame after the last action is never stored
            env._render()

    out = {k: np.stack(v) for k, v in arrays.items()}
    for key in ("states", "joint_states", "actions"):
        out[key] = out[key].astype(np.float32)
    rewards = np.zeros(length, dtype=np.float32)
    rewards[-1] = 1.0
    out["rewards"] = rewards
    out["instruction"] = env.instruction
    out["file_path"] = f"/synthetic/{env.instruction.replace(' ', '_')}_demo.hdf5"
    return out
