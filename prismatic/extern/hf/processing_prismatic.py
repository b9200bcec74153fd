"""Image processor and processor of the Prismatic/OpenVLA checkpoints (FORMAT.md section 10).

Every camera image goes through: RGB, resize to 224x224 (PIL bicubic, which always antialiases; skipped when the
image is already 224x224), center-crop 224 (a no-op after the resize), scale to [0, 1], then one normalization per
vision branch. The result stacks [DINO-normalized RGB, SigLIP-normalized RGB] on channels, and the images of one
frame ([third-person, wrist]) are concatenated on channels: [6 * n_images, 224, 224].

Normalization uses the ``tvf_normalize_params`` of preprocessor_config.json: for the DINO branch these are the
bf16-rounded ImageNet statistics, not the [0.485, 0.456, 0.406] / [0.229, 0.224, 0.225] stored in
``means`` / ``stds``.

The data pipeline already has 224x224 uint8 frames; ``normalize_uint8_images`` handles them without PIL.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature, PreTrainedTokenizerBase

from prismatic.vla.tokenizer import BUNDLED_TOKENIZER_DIR, load_qwen_tokenizer, save_tokenizer_files

PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"
PROCESSOR_CONFIG_NAME = "processor_config.json"

IMAGE_SIZE = 224
DINO_MEAN = (0.484375, 0.455078125, 0.40625)  # bf16-rounded ImageNet mean, the values in effect upstream
DINO_STD = (0.228515625, 0.2236328125, 0.224609375)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
DEFAULT_MEANS = (DINO_MEAN, SIGLIP_MEAN)  # per branch: [featurizer (DINOv2), fused_featurizer (SigLIP)]
DEFAULT_STDS = (DINO_STD, SIGLIP_STD)

# Fields of the released preprocessor_config.json that are not per-branch transform parameters.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_PIL_BICUBIC = 3  # torchvision's legacy int code for bicubic, as stored in tvf_resize_params
_INTERPOLATION_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
_METADATA_KEYS = ("auto_map", "image_processor_type", "processor_class")
_IMAGE_PROCESSOR_AUTO_MAP = {
    "AutoImageProcessor": "processing_prismatic.PrismaticImageProcessor",
    "AutoProcessor": "processing_prismatic.PrismaticProcessor",
}
_PROCESSOR_CONFIG = {
    "auto_map": {"AutoProcessor": "processing_prismatic.PrismaticProcessor"},
    "processor_class": "PrismaticProcessor",
}

ImageInput = Image.Image | np.ndarray | Sequence[Image.Image | np.ndarray]


def normalize_uint8_images(
    images: torch.Tensor,
    means: Sequence[Sequence[float]] = DEFAULT_MEANS,
    stds: Sequence[Sequence[float]] = DEFAULT_STDS,
) -> torch.Tensor:
    """uint8 images [..., n_images, H, W, 3] (or one [H, W, 3]) -> float32 [..., 3 * n_branches * n_images, H, W].

    Per branch b and channel c: ``x * (1 / (255 std)) + (-mean / std)``, one affine with constants computed in
    float64, which stays within 1e-6 of ``(x / 255 - mean) / std`` (the float32 rounding of the constants,
    product and sum). Channels come out as [img0 branch0 RGB, img0 branch1 RGB, img1 branch0 RGB, ...].
    """
    if images.dtype != torch.uint8 or images.ndim < 3 or images.shape[-1] != 3:
        raise ValueError(
            f"Expected uint8 images [..., n_images, H, W, 3] or [H, W, 3], got {images.dtype} {tuple(images.shape)}"
        )
    if images.ndim == 3:
        images = images.unsqueeze(0)  # [1, H, W, 3]
    scale, bias = _affine_constants(means, stds, images.device)  # [n_branches, 3, 1, 1] each
    *lead, n_images, height, width, _ = images.shape
    channels_first = images.movedim(-1, -3).unsqueeze(-4)  # [..., n, 1, 3, H, W]
    out = torch.empty((*lead, n_images, scale.shape[0], 3, height, width), dtype=torch.float32, device=images.device)
    torch.mul(channels_first, scale, out=out)  # [..., n, n_branches, 3, H, W]
    out.add_(bias)
    return out.view(*lead, n_images * scale.shape[0] * 3, height, width)


def _affine_constants(
    means: Sequence[Sequence[float]], stds: Sequence[Sequence[float]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(means, dtype=torch.float64)  # [n_branches, 3]
    std = torch.tensor(stds, dtype=torch.float64)
    if mean.ndim != 2 or mean.shape[1] != 3 or mean.shape != std.shape:
        raise ValueError(f"means/stds must both be [n_branches, 3], got {list(means)} and {list(stds)}")
    scale = (1.0 / (255.0 * std)).float()[..., None, None]
    bias = (-mean / std).float()[..., None, None]
    return scale.to(device), bias.to(device)


class PrismaticImageProcessor:
    """Image processor configured like the released preprocessor_config.json (defaults = released values)."""

    def __init__(
        self,
        use_fused_vision_backbone: bool = True,
        image_resize_strategy: str = "resize-naive",
        input_sizes: Sequence[Sequence[int]] | None = None,
        interpolations: Sequence[str] | None = None,
        means: Sequence[Sequence[float]] | None = None,
        stds: Sequence[Sequence[float]] | None = None,
        tvf_resize_params: Sequence[dict[str, Any]] | None = None,
        tvf_crop_params: Sequence[dict[str, Any]] | None = None,
        tvf_normalize_params: Sequence[dict[str, Any]] | None = None,
        tvf_do_letterbox: bool = False,
        tvf_letterbox_fill: Any = None,
    ) -> None:
        n_branches = 2 if use_fused_vision_backbone else 1
        self.use_fused_vision_backbone = use_fused_vision_backbone
        self.image_resize_strategy = image_resize_strategy
        self.input_sizes = _lists(input_sizes or [[3, IMAGE_SIZE, IMAGE_SIZE]] * n_branches)
        self.interpolations = list(interpolations or ["bicubic"] * n_branches)
        self.means = _lists(means or [_IMAGENET_MEAN, SIGLIP_MEAN][:n_branches])
        self.stds = _lists(stds or [_IMAGENET_STD, SIGLIP_STD][:n_branches])
        self.tvf_resize_params = [dict(p) for p in tvf_resize_params or [_default_resize()] * n_branches]
        self.tvf_crop_params = [dict(p) for p in tvf_crop_params or [_default_crop()] * n_branches]
        if tvf_normalize_params is None:  # upstream derives them from means/stds when absent
            default = means is None and stds is None
            tvf_normalize_params = [
                {"inplace": False, "mean": list(m), "std": list(s)}
                for m, s in zip(DEFAULT_MEANS if default else self.means, DEFAULT_STDS if default else self.stds)
            ][:n_branches]
        self.tvf_normalize_params = [dict(p) for p in tvf_normalize_params]
        self.tvf_do_letterbox = tvf_do_letterbox
        self.tvf_letterbox_fill = tvf_letterbox_fill
        self._validate(n_branches)

    def _validate(self, n_branches: int) -> None:
        """Reject configurations this implementation does not reproduce, naming the offending field."""
        for name in ("tvf_resize_params", "tvf_crop_params", "tvf_normalize_params"):
            if len(getattr(self, name)) != n_branches:
                raise ValueError(f"{name} must have {n_branches} entries, got {getattr(self, name)}")
        if self.image_resize_strategy != "resize-naive" or self.tvf_do_letterbox:
            raise ValueError(
                f"Only image_resize_strategy 'resize-naive' without letterbox is supported, got "
                f"{self.image_resize_strategy!r} (tvf_do_letterbox={self.tvf_do_letterbox})"
            )
        for field in ("tvf_resize_params", "tvf_crop_params"):
            params = getattr(self, field)
            if any(p != params[0] for p in params):
                raise ValueError(f"All branches must share {field}, got {params}")
        resize = self.tvf_resize_params[0]
        if resize.get("interpolation") not in _INTERPOLATION_NAMES or resize.get("antialias") is False:
            raise ValueError(f"Unsupported tvf_resize_params {resize}: need a PIL filter code and antialias")
        self.resize_hw = _pair(resize["size"], "tvf_resize_params.size")
        self.crop_hw = _pair(self.tvf_crop_params[0]["output_size"], "tvf_crop_params.output_size")
        if self.crop_hw[0] > self.resize_hw[0] or self.crop_hw[1] > self.resize_hw[1]:
            raise ValueError(f"Crop {self.crop_hw} is larger than the resized image {self.resize_hw}")

    @property
    def normalize_means(self) -> list[list[float]]:
        return [list(p["mean"]) for p in self.tvf_normalize_params]

    @property
    def normalize_stds(self) -> list[list[float]]:
        return [list(p["std"]) for p in self.tvf_normalize_params]

    @property
    def channels_per_image(self) -> int:
        return 3 * len(self.tvf_normalize_params)

    def __call__(self, images: ImageInput) -> torch.Tensor:
        """One frame's camera images ([third-person, wrist]) -> float32 [channels_per_image * n_images, H, W]."""
        return self.normalize_uint8(torch.from_numpy(self.to_uint8_array(images)))

    def preprocess_batch(self, frames: Sequence[ImageInput]) -> torch.Tensor:
        """Several frames (each as for ``__call__``, same camera count) -> float32 [B, C * n_images, H, W]."""
        arrays = [self.to_uint8_array(frame) for frame in frames]
        counts = {a.shape[0] for a in arrays}
        if len(counts) != 1:
            raise ValueError(f"All frames must have the same number of images, got counts {sorted(counts)}")
        return self.normalize_uint8(torch.from_numpy(np.stack(arrays)))

    def normalize_uint8(self, images: torch.Tensor) -> torch.Tensor:
        """``normalize_uint8_images`` with this processor's per-branch statistics (no resize)."""
        return normalize_uint8_images(images, self.normalize_means, self.normalize_stds)

    def to_uint8_array(self, images: ImageInput) -> np.ndarray:
        """Resize and center-crop one frame's images -> uint8 [n_images, crop_h, crop_w, 3]."""
        if isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)
        elif isinstance(images, Image.Image | np.ndarray):
            images = [images]
        if not images:
            raise ValueError("Expected at least one image")
        return np.stack([self._one_image(image) for image in images])

    def _one_image(self, image: Image.Image | np.ndarray) -> np.ndarray:
        """RGB, resize (skipped at the target size), center-crop -> uint8 [crop_h, crop_w, 3]."""
        height, width = self.resize_hw
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
                raise ValueError(f"Expected a uint8 [H, W, 3] array, got {image.dtype} {image.shape}")
            array = image
            if array.shape[:2] != (height, width):
                array = np.asarray(Image.fromarray(array).resize((width, height), self._resample()))
        elif isinstance(image, Image.Image):
            image = image if image.mode == "RGB" else image.convert("RGB")
            if image.size != (width, height):
                image = image.resize((width, height), self._resample())
            array = np.asarray(image)
        else:
            raise TypeError(f"Expected a PIL image or uint8 numpy array, got {type(image).__name__}")
        return _center_crop(array, self.crop_hw)

    def _resample(self) -> Image.Resampling:
        return Image.Resampling(self.tvf_resize_params[0]["interpolation"])

    def to_dict(self) -> dict[str, Any]:
        """The preprocessor_config.json content, with the released file's fields."""
        return {
            "auto_map": dict(_IMAGE_PROCESSOR_AUTO_MAP),
            "image_processor_type": "PrismaticImageProcessor",
            "image_resize_strategy": self.image_resize_strategy,
            "input_sizes": _lists(self.input_sizes),
            "interpolations": list(self.interpolations),
            "means": _lists(self.means),
            "processor_class": "PrismaticProcessor",
            "stds": _lists(self.stds),
            "tvf_crop_params": [dict(p) for p in self.tvf_crop_params],
            "tvf_do_letterbox": self.tvf_do_letterbox,
            "tvf_letterbox_fill": self.tvf_letterbox_fill,
            "tvf_normalize_params": [dict(p) for p in self.tvf_normalize_params],
            "tvf_resize_params": [dict(p) for p in self.tvf_resize_params],
            "use_fused_vision_backbone": self.use_fused_vision_backbone,
        }

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> PrismaticImageProcessor:
        fields = {k: v for k, v in config.items() if k not in _METADATA_KEYS}
        try:
            return cls(**fields)
        except TypeError as error:
            raise ValueError(f"Unexpected field in preprocessor config {sorted(fields)}: {error}") from None

    def save_pretrained(self, save_directory: str | Path) -> Path:
        path = Path(save_directory) / PREPROCESSOR_CONFIG_NAME
        _write_json(path, self.to_dict())
        return path

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> PrismaticImageProcessor:
        path = Path(directory) / PREPROCESSOR_CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"No {PREPROCESSOR_CONFIG_NAME} in {directory}")
        return cls.from_dict(json.loads(path.read_text()))


class PrismaticProcessor:
    """Tokenizer + image processor: ``(text, images)`` -> input_ids, attention_mask, pixel_values."""

    def __init__(
        self,
        image_processor: PrismaticImageProcessor,
        tokenizer: PreTrainedTokenizerBase,
        tokenizer_dir: str | Path | None = None,
    ) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else BUNDLED_TOKENIZER_DIR

    def __call__(self, text: str | Sequence[str], images: ImageInput | Sequence[ImageInput]) -> BatchFeature:
        """Tokenize prompt string(s) as given (right-padded) and preprocess one frame per prompt.

        Returns input_ids [B, T] long, attention_mask [B, T] bool, pixel_values [B, 6 * n_images, 224, 224].
        """
        texts = [text] if isinstance(text, str) else list(text)
        frames = [images] if isinstance(text, str) else list(images)
        if len(frames) != len(texts):
            raise ValueError(f"Got {len(texts)} prompts but {len(frames)} frames of images")
        encoded = self.tokenizer(texts, padding="longest", return_tensors="pt")
        return BatchFeature(
            {
                "input_ids": encoded["input_ids"],
                "attention_mask": encoded["attention_mask"].bool(),
                "pixel_values": self.image_processor.preprocess_batch(frames),
            }
        )

    def save_pretrained(self, save_directory: str | Path) -> None:
        """Write preprocessor_config.json, processor_config.json and the tokenizer files (FORMAT.md §6)."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.image_processor.save_pretrained(directory)
        _write_json(directory / PROCESSOR_CONFIG_NAME, _PROCESSOR_CONFIG)
        save_tokenizer_files(directory, self.tokenizer_dir)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> PrismaticProcessor:
        return cls(
            PrismaticImageProcessor.from_pretrained(directory),
            load_qwen_tokenizer(directory),
            tokenizer_dir=directory,
        )

    @classmethod
    def default(cls) -> PrismaticProcessor:
        """Released image-processor settings with the bundled tokenizer."""
        return cls(PrismaticImageProcessor(), load_qwen_tokenizer())


def _center_crop(array: np.ndarray, crop_hw: tuple[int, int]) -> np.ndarray:
    """torchvision's center crop offsets (round((size - crop) / 2)) on an [H, W, 3] array."""
    height, width = array.shape[:2]
    top = int(round((height - crop_hw[0]) / 2.0))
    left = int(round((width - crop_hw[1]) / 2.0))
    return array[top : top + crop_hw[0], left : left + crop_hw[1]]


def _default_resize() -> dict[str, Any]:
    return {"antialias": True, "interpolation": _PIL_BICUBIC, "max_size": None, "size": [IMAGE_SIZE, IMAGE_SIZE]}


def _default_crop() -> dict[str, Any]:
    return {"output_size": [IMAGE_SIZE, IMAGE_SIZE]}


def _pair(value: Any, name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if len(value) != 2:
        raise ValueError(f"{name} must be an int or [height, width], got {value}")
    return int(value[0]), int(value[1])


def _lists(rows: Sequence[Sequence[Any]]) -> list[list[Any]]:
    return [list(row) for row in rows]


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
