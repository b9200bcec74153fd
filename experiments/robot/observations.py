"""Raw simulator observations -> the policy inputs training saw (shared/libero/FACTS.md 1.5).

Images: rotate 180 degrees (robosuite renders upside down; the RLDS frames are upright), JPEG round trip with
TensorFlow's defaults (quality 95, as the RLDS builder stored frames), then the training pipeline's own
``decode_and_resize`` (lanczos3, antialias, 224 px, rounded to uint8), then optionally the centre crop that
stands in for training's random 90%-area crops. A policy trained on the torch synthetic source (``--data_source
synthetic``) saw no JPEG and torch's antialiased bilinear resize instead (``torch_source.resize_uint8``, never
cropped): its images take that path (``image_preprocessing="torch_source"``), which needs no TensorFlow.

Proprio: end-effector position, axis-angle of the end-effector quaternion (LIBERO's ``quat2axisangle``, not
canonicalized), the two finger joints; normalized with the training pipeline's BOUNDS_Q99 function. TensorFlow
is imported lazily here only (import torch first).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from prismatic.vla.datasets.statistics import normalize_bounds_q99

IMAGE_SIZE = 224
CENTER_CROP_AREA = 0.9  # training's random-resized-crop area fraction
PRIMARY_CAMERA = "agentview_image"
WRIST_CAMERA = "robot0_eye_in_hand_image"
# How training turned stored frames into model inputs: the RLDS pipeline's, or the torch synthetic source's
IMAGE_PREPROCESSING = ("rlds", "torch_source")


def rotate_180(image: np.ndarray) -> np.ndarray:
    """Reverse rows and columns (the LIBERO eval's flip of robosuite's upside-down renders)."""
    return np.ascontiguousarray(np.asarray(image)[::-1, ::-1])


def resize_like_rlds(image: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 [H, W, 3] -> JPEG (TF defaults) -> the training pipeline's decode + lanczos3 resize -> uint8."""
    from prismatic.vla.datasets.rlds import import_tf
    from prismatic.vla.datasets.stream import decode_and_resize

    tf = import_tf()
    jpeg = tf.io.encode_jpeg(tf.constant(np.ascontiguousarray(image, dtype=np.uint8)))
    return decode_and_resize(jpeg, size).numpy()


def center_crop(image: np.ndarray, area: float = CENTER_CROP_AREA) -> np.ndarray:
    """Keep the central ``area`` fraction and resize back (TF ``crop_and_resize``, bilinear), as upstream.

    The image goes to float in [0, 1] (``convert_image_dtype``), box side sqrt(area) computed in float32, then
    clipped and converted back with TF's saturating conversion (scale by 255.5, truncate).
    """
    from prismatic.vla.datasets.rlds import import_tf

    tf = import_tf()
    x = tf.image.convert_image_dtype(tf.constant(np.asarray(image, dtype=np.uint8))[None], tf.float32)
    side = tf.sqrt(tf.constant(area, tf.float32))
    offset = (1.0 - side) / 2.0
    box = tf.stack([offset, offset, offset + side, offset + side])[None]
    height, width = int(image.shape[0]), int(image.shape[1])
    x = tf.image.crop_and_resize(x, box, tf.zeros([1], tf.int32), (height, width), method="bilinear")
    x = tf.clip_by_value(x, 0.0, 1.0)
    return tf.image.convert_image_dtype(x, tf.uint8, saturate=True)[0].numpy()


def resize_like_torch_source(image: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 [H, W, 3] -> the torch synthetic source's resize (antialiased bilinear, no JPEG) -> uint8."""
    from prismatic.vla.datasets.torch_source import resize_uint8

    return resize_uint8(np.asarray(image)[None], size)[0].numpy()


def check_image_preprocessing(image_preprocessing: str, crop: bool) -> None:
    """Refuse an unknown preprocessing, and a centre crop where training never cropped (the torch source)."""
    if image_preprocessing not in IMAGE_PREPROCESSING:
        raise ValueError(f"image preprocessing must be one of {IMAGE_PREPROCESSING}, got {image_preprocessing!r}")
    if crop and image_preprocessing == "torch_source":
        raise ValueError(
            "--center_crop True, but the policy was trained on the torch synthetic source, which never crops its "
            "images: pass --center_crop False"
        )


def policy_images(obs: Mapping[str, Any], num_images: int, crop: bool, image_preprocessing: str = "rlds") -> np.ndarray:
    """Camera images of one observation in model order (agent view, then wrist) -> uint8 [n, 224, 224, 3],
    preprocessed as the policy's training data were (``"rlds"`` or ``"torch_source"``, module docstring)."""
    check_image_preprocessing(image_preprocessing, crop)
    resize = resize_like_rlds if image_preprocessing == "rlds" else resize_like_torch_source
    out = []
    for key in (PRIMARY_CAMERA, WRIST_CAMERA)[:num_images]:
        image = resize(rotate_180(obs[key]))
        out.append(center_crop(image) if crop else image)
    return np.stack(out)


def quat2axisangle(quat: np.ndarray) -> np.ndarray:
    """Quaternion (x, y, z, w) -> axis-angle vector, LIBERO's convention (float64).

    w is clamped to [-1, 1]; when sqrt(1 - w^2) is 0 (``math.isclose`` with its default tolerances, as
    robosuite) the result is zeros; otherwise (x, y, z) * 2 acos(w) / sqrt(1 - w^2). Not canonicalized: w < 0
    gives angles above pi, exactly as the training data were converted.
    """
    x, y, z, w = (float(v) for v in np.asarray(quat, dtype=np.float64))
    w = min(max(w, -1.0), 1.0)
    den = math.sqrt(1.0 - w * w)
    if math.isclose(den, 0.0):
        return np.zeros(3)
    return np.array([x, y, z]) * 2.0 * math.acos(w) / den


def libero_proprio(obs: Mapping[str, Any]) -> np.ndarray:
    """The 8-D state of the LIBERO datasets: eef position (3), eef axis-angle (3), finger joints (2)."""
    return np.concatenate(
        [
            np.asarray(obs["robot0_eef_pos"], dtype=np.float64),
            quat2axisangle(obs["robot0_eef_quat"]),
            np.asarray(obs["robot0_gripper_qpos"], dtype=np.float64),
        ]
    )


def normalize_proprio(proprio: np.ndarray, stats: Mapping[str, Any]) -> np.ndarray:
    """BOUNDS_Q99 with the training pipeline's function (``stats`` = norm_stats[unnorm_key]["proprio"])."""
    return normalize_bounds_q99(np.asarray(proprio, dtype=np.float64), stats)
