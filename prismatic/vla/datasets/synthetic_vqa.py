"""Task A of the forgetting study: single-token questions about rendered tabletop scenes (numpy only).

Why: CRaFT claims to keep what a pretrained VLM knows while it learns actions; that needs a start model with a
skill that can be measured and lost. These scenes are drawn like the pick-and-lift task's third-person camera
(same 256-px image, workspace-to-pixel map, block size, table texture and, in half the scenes, the dark gripper
marker), so a VLM pretrained on them sees task B's images in distribution.

A scene: 1-4 objects, each a distinct (colour, shape) pair out of 6 colours x 4 shapes (block, ball, ring,
cross), at least ``min_separation`` apart, on one of four table colours. Objects are drawn in their exact RGB on a
noisy table, so a pixel-level reader can recover them (the tests do).

Questions (type: template -> answers), every answer one Qwen token, asked only when unambiguous:
  colour:   "what colour is the ball?" (the shape occurs once)              -> red | green | ... | orange
  shape:    "what shape is the red object?" (the colour occurs once)        -> block | ball | ring | cross
  count:    "how many objects are there?" / "how many balls are there?"     -> zero | one | two | three | four
  exist:    "is there a green block?"                                       -> yes | no (balanced)
  relation: "is the red ball left or right of the blue block?" (|dx| >= 0.2) -> left | right
  column:   "is the red ball on the left, in the middle or on the right?"  -> left | middle | right
  row:      "is the red ball at the top, in the middle or at the bottom?"  -> top | middle | bottom
Column and row thirds split [-1, 1] at +-1/3; an object closer than ``band_margin`` to a split is not asked about.
Task B (pick up the <colour> block) needs colour and position (``TASK_B_SKILLS``); shape, count, existence and
relations are what fine-tuning can make the model forget.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prismatic.vla.datasets.synthetic_task import SPEC as TASK_SPEC

QUESTION_TYPES = ("colour", "shape", "count", "exist", "relation", "column", "row")
TASK_B_SKILLS = ("colour", "column", "row")  # what picking "the <colour> block" needs from task A
COUNT_WORDS = ("zero", "one", "two", "three", "four")


@dataclass(frozen=True)
class VQASpec:
    """Constants of the scene generator (shared by pretraining, the study and the tests)."""

    color_names: tuple[str, ...] = (*TASK_SPEC.color_names, "purple", "orange")
    color_rgb: tuple[tuple[int, int, int], ...] = (*TASK_SPEC.color_rgb, (150, 60, 190), (240, 130, 30))
    shape_names: tuple[str, ...] = ("block", "ball", "ring", "cross")
    table_rgb: tuple[tuple[int, int, int], ...] = ((196, 168, 128), (150, 150, 160), (110, 140, 110), (205, 205, 195))
    max_objects: int = 4
    position_range: float = 0.8  # object centres uniform in [-range, range]^2 (workspace units)
    min_separation: float = 0.4  # centre distance between objects (and the gripper marker): no overlaps
    band_margin: float = 0.06  # column/row questions skip objects this close to a third's border
    relation_min_dx: float = 0.2
    gripper_probability: float = 0.5
    size_px: int = 15  # half extent of every shape (a block's half side is TASK_SPEC.block_half_px = 14)


VQA_SPEC = VQASpec()


@dataclass(frozen=True)
class SceneObject:
    color: int
    shape: int
    xy: tuple[float, float]  # workspace units, x -> image column, y -> image row


@dataclass(frozen=True)
class VQAExample:
    image: np.ndarray  # uint8 [256, 256, 3], upright
    question: str
    answer: str
    qtype: str
    objects: tuple[SceneObject, ...]


def scene_rng(seed: int, index: int, split: str) -> np.random.Generator:
    """Independent stream per (seed, scene index, split): train and held-out scenes never share a stream."""
    salt = {"train": 0x7A11, "heldout": 0xE7A1}[split]
    return np.random.default_rng([int(seed), int(index), salt])


def _shape_mask(shape: str, center_px: np.ndarray, size: int, half: int) -> np.ndarray:
    rows, cols = np.ogrid[:size, :size]
    dr, dc = rows - center_px[1], cols - center_px[0]
    if shape == "block":
        block = TASK_SPEC.block_half_px
        return (np.abs(dr) < block) & (np.abs(dc) < block)
    dist = np.sqrt(dr**2 + dc**2)
    if shape == "ball":
        return dist <= half
    if shape == "ring":
        return (dist <= half + 1) & (dist >= half - 5)
    if shape == "cross":
        return ((np.abs(dr) <= 4) & (np.abs(dc) <= half)) | ((np.abs(dc) <= 4) & (np.abs(dr) <= half))
    raise ValueError(f"unknown shape {shape!r}")


def to_pixels(xy: np.ndarray | tuple[float, float]) -> np.ndarray:
    """Workspace (x, y) -> pixel (col, row), the pick-and-lift task's map."""
    half_span = (TASK_SPEC.image_size - 2 * TASK_SPEC.workspace_margin_px) / 2.0
    return TASK_SPEC.image_size / 2.0 + np.asarray(xy, dtype=np.float64) * half_span


def render_scene(rng: np.random.Generator, spec: VQASpec = VQA_SPEC) -> tuple[np.ndarray, tuple[SceneObject, ...]]:
    """Draw a scene from ``rng``: the upright uint8 image [256, 256, 3] and its objects."""
    size = TASK_SPEC.image_size
    n = int(rng.integers(1, spec.max_objects + 1))
    pairs = rng.choice(len(spec.color_names) * len(spec.shape_names), size=n, replace=False)
    centers: list[np.ndarray] = []
    while len(centers) < n + 1:  # the last centre is the gripper marker's (drawn or not)
        xy = rng.uniform(-spec.position_range, spec.position_range, size=2)
        if all(np.linalg.norm(xy - c) >= spec.min_separation for c in centers):
            centers.append(xy)
    table = spec.table_rgb[int(rng.integers(len(spec.table_rgb)))]
    cell = TASK_SPEC.noise_cell_px
    noise = rng.normal(0.0, TASK_SPEC.image_noise_std, size=(size // cell, size // cell, 1))
    image = np.clip(np.asarray(table, dtype=np.float64) + noise.repeat(cell, 0).repeat(cell, 1), 0, 255)
    image = image.astype(np.uint8)
    objects = []
    for pair, xy in zip(pairs, centers[:n]):
        color, shape = divmod(int(pair), len(spec.shape_names))
        image[_shape_mask(spec.shape_names[shape], to_pixels(xy), size, spec.size_px)] = spec.color_rgb[color]
        objects.append(SceneObject(color, shape, (float(xy[0]), float(xy[1]))))
    if rng.uniform() < spec.gripper_probability:
        radius, closed = float(rng.uniform(10.0, 22.0)), bool(rng.integers(2))
        rows, cols = np.ogrid[:size, :size]
        center = to_pixels(centers[n])
        dist = np.sqrt((rows - center[1]) ** 2 + (cols - center[0]) ** 2)
        image[(dist <= radius) if closed else (dist <= radius) & (dist >= radius - 4.0)] = (25, 25, 25)
    return image, tuple(objects)


def _third(value: float, names: tuple[str, str, str], margin: float) -> str | None:
    """Which third of [-1, 1] ``value`` lies in, or None within ``margin`` of a border."""
    if min(abs(value + 1 / 3), abs(value - 1 / 3)) < margin:
        return None
    return names[0] if value < -1 / 3 else names[2] if value > 1 / 3 else names[1]


def ask(
    objects: tuple[SceneObject, ...], rng: np.random.Generator, qtype: str, spec: VQASpec = VQA_SPEC
) -> tuple[str, str] | None:
    """One (question, answer) of type ``qtype`` about ``objects``, or None when the scene allows none."""
    colors, shapes = spec.color_names, spec.shape_names

    def name(o: SceneObject) -> str:
        return f"{colors[o.color]} {shapes[o.shape]}"

    def pick(candidates: list[SceneObject]) -> SceneObject | None:
        return candidates[int(rng.integers(len(candidates)))] if candidates else None

    if qtype == "colour":
        unique = [o for o in objects if sum(p.shape == o.shape for p in objects) == 1]
        o = pick(unique)
        return None if o is None else (f"what colour is the {shapes[o.shape]}?", colors[o.color])
    if qtype == "shape":
        unique = [o for o in objects if sum(p.color == o.color for p in objects) == 1]
        o = pick(unique)
        return None if o is None else (f"what shape is the {colors[o.color]} object?", shapes[o.shape])
    if qtype == "count":
        if rng.uniform() < 0.5:
            return "how many objects are there?", COUNT_WORDS[len(objects)]
        shape = int(rng.integers(len(shapes)))
        return f"how many {shapes[shape]}s are there?", COUNT_WORDS[sum(o.shape == shape for o in objects)]
    if qtype == "exist":
        present = {(o.color, o.shape) for o in objects}
        if rng.uniform() < 0.5:
            o = pick(list(objects))
            return f"is there a {name(o)}?", "yes"
        absent = [(c, s) for c in range(len(colors)) for s in range(len(shapes)) if (c, s) not in present]
        c, s = absent[int(rng.integers(len(absent)))]
        return f"is there a {colors[c]} {shapes[s]}?", "no"
    if qtype == "relation":
        pairs = [(a, b) for a in objects for b in objects if abs(a.xy[0] - b.xy[0]) >= spec.relation_min_dx]
        if not pairs:
            return None
        a, b = pairs[int(rng.integers(len(pairs)))]
        return f"is the {name(a)} left or right of the {name(b)}?", "left" if a.xy[0] < b.xy[0] else "right"
    if qtype in ("column", "row"):
        axis, names = (0, ("left", "middle", "right")) if qtype == "column" else (1, ("top", "middle", "bottom"))
        askable = [o for o in objects if _third(o.xy[axis], names, spec.band_margin) is not None]
        o = pick(askable)
        if o is None:
            return None
        answer = _third(o.xy[axis], names, spec.band_margin)
        if qtype == "column":
            return f"is the {name(o)} on the left, in the middle or on the right?", answer
        return f"is the {name(o)} at the top, in the middle or at the bottom?", answer
    raise ValueError(f"unknown question type {qtype!r}; choose from {QUESTION_TYPES}")


def make_example(seed: int, index: int, split: str = "train", spec: VQASpec = VQA_SPEC) -> VQAExample:
    """Scene ``index`` of ``split`` with one question; the type is uniform over those the scene allows."""
    rng = scene_rng(seed, index, split)
    image, objects = render_scene(rng, spec)
    return VQAExample(image, *draw_question(objects, rng, spec), objects)


def draw_question(
    objects: tuple[SceneObject, ...], rng: np.random.Generator, spec: VQASpec = VQA_SPEC
) -> tuple[str, str, str]:
    """(question, answer, type) with the type uniform over those the scene can answer (count always can)."""
    for k in rng.permutation(len(QUESTION_TYPES)):  # the first answerable type in a random order
        qa = ask(objects, rng, QUESTION_TYPES[k], spec)
        if qa is not None:
            return qa[0], qa[1], QUESTION_TYPES[k]
    raise AssertionError("unreachable: a count question is always possible")


def answer_vocabulary(spec: VQASpec = VQA_SPEC) -> tuple[str, ...]:
    """Every answer word any question can have (each must be one token)."""
    words = (*spec.color_names, *spec.shape_names, *COUNT_WORDS, "yes", "no", "left", "middle", "right")
    return tuple(dict.fromkeys((*words, "top", "bottom")))
