"""Image preprocessing (FORMAT.md section 10) against a float64 numpy reference, and processor save/load."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import upstream_sha256
from PIL import Image

from prismatic.extern.hf.processing_prismatic import (
    PrismaticImageProcessor,
    PrismaticProcessor,
    normalize_uint8_images,
)
from prismatic.vla.prompting import build_inference_prompt
from prismatic.vla.tokenizer import TOKENIZER_FILE_NAMES, tokenizer_files

BUNDLED_PROCESSOR_DIR = Path(__file__).resolve().parents[1] / "prismatic" / "assets" / "processor"
# The released config files: the shared upstream copies when available, else the bundled byte copies.
REFERENCE_CONFIG_DIR = BUNDLED_PROCESSOR_DIR  # equal to upstream's: test_bundled_processor_configs_equal_upstream

# FORMAT.md section 10: the statistics in effect upstream (bf16-rounded ImageNet for DINO; 0.5 for SigLIP).
DINO_MEAN = np.array([0.484375, 0.455078125, 0.40625])
DINO_STD = np.array([0.228515625, 0.2236328125, 0.224609375])
SIGLIP_MEAN = np.array([0.5, 0.5, 0.5])
SIGLIP_STD = np.array([0.5, 0.5, 0.5])

# Outputs are float32 with |value| < 2.7, where one float32 ulp is 2.4e-7. The implementation rounds the two
# affine constants, the product and the sum (each <= half an ulp of its magnitude, < 5e-7 together), so 1e-6
# bounds it with margin while still catching any wrong constant (the bf16 vs ImageNet difference is ~8e-3).
TOL = 1e-6


def reference_pixels(uint8_images: list[np.ndarray]) -> np.ndarray:
    """float64 [6 * n, H, W]: per image, (x / 255 - mean) / std for DINO then SigLIP, images in order."""
    planes = []
    for image in uint8_images:
        unit = image.astype(np.float64) / 255.0  # [H, W, 3]
        for mean, std in ((DINO_MEAN, DINO_STD), (SIGLIP_MEAN, SIGLIP_STD)):
            normalized = (unit - mean) / std
            planes.extend(normalized[:, :, c] for c in range(3))
    return np.stack(planes)


def random_image(seed: int, height: int = 256, width: int = 256) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def pil_bicubic_224(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB").resize((224, 224), Image.Resampling.BICUBIC))


@pytest.fixture(scope="module")
def processor():
    return PrismaticImageProcessor()


def test_released_config_uses_bf16_statistics(processor):
    from_file = PrismaticImageProcessor.from_pretrained(BUNDLED_PROCESSOR_DIR)
    for candidate in (processor, from_file):
        np.testing.assert_array_equal(candidate.normalize_means, [DINO_MEAN, SIGLIP_MEAN])
        np.testing.assert_array_equal(candidate.normalize_stds, [DINO_STD, SIGLIP_STD])
    # Without tvf_normalize_params, upstream derives the statistics from means/stds.
    config = from_file.to_dict()
    del config["tvf_normalize_params"]
    derived = PrismaticImageProcessor.from_dict(config)
    np.testing.assert_array_equal(derived.normalize_means[0], [0.485, 0.456, 0.406])


def test_resized_image_matches_float64_reference(processor):
    image = random_image(0)
    got = processor(image)
    assert got.dtype == torch.float32
    assert got.shape == (6, 224, 224)
    np.testing.assert_allclose(got.numpy(), reference_pixels([pil_bicubic_224(image)]), rtol=0, atol=TOL)


def test_non_square_and_non_rgb_inputs_are_resized_naively(processor):
    wide = random_image(1, height=180, width=320)  # no aspect preservation: squashed to 224x224
    gray = random_image(2).convert("L")
    got = processor([wide, gray])
    expected = reference_pixels([pil_bicubic_224(wide), pil_bicubic_224(gray)])
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=TOL)


def test_224_input_is_not_resized(processor):
    pixels = np.asarray(random_image(3, 224, 224))
    expected = reference_pixels([pixels])
    for image in (Image.fromarray(pixels), pixels):
        np.testing.assert_allclose(processor(image).numpy(), expected, rtol=0, atol=TOL)


def test_two_images_channel_order(processor):
    first, second = np.asarray(random_image(4, 224, 224)), np.asarray(random_image(5, 224, 224))
    got = processor([Image.fromarray(first), Image.fromarray(second)]).numpy()
    assert got.shape == (12, 224, 224)
    dino = lambda x: (x.astype(np.float64) / 255 - DINO_MEAN) / DINO_STD
    siglip = lambda x: (x.astype(np.float64) / 255 - SIGLIP_MEAN) / SIGLIP_STD
    for block, expected in enumerate([dino(first), siglip(first), dino(second), siglip(second)]):
        np.testing.assert_allclose(got[3 * block : 3 * block + 3], expected.transpose(2, 0, 1), rtol=0, atol=TOL)


def test_fast_uint8_path_equals_pil_path(processor):
    frames = [[random_image(10 + 2 * b, 224, 224), random_image(11 + 2 * b, 224, 224)] for b in range(3)]
    uint8 = torch.from_numpy(np.stack([[np.asarray(im) for im in frame] for frame in frames]))  # [3, 2, H, W, 3]
    fast = normalize_uint8_images(uint8)
    assert fast.shape == (3, 12, 224, 224)
    assert fast.is_contiguous()
    for b, frame in enumerate(frames):
        torch.testing.assert_close(fast[b], processor(frame), rtol=0, atol=TOL)
    torch.testing.assert_close(processor.preprocess_batch(frames), fast, rtol=0, atol=TOL)
    torch.testing.assert_close(normalize_uint8_images(uint8[0, 0]), processor(frames[0][0]), rtol=0, atol=TOL)


def test_every_uint8_value_within_tolerance():
    values = np.repeat(np.arange(256, dtype=np.uint8), 3).reshape(16, 16, 3)  # all 256 levels in each channel
    got = normalize_uint8_images(torch.from_numpy(values)).numpy()
    np.testing.assert_allclose(got, reference_pixels([values]), rtol=0, atol=TOL)


def test_rejects_unsupported_inputs(processor):
    with pytest.raises(ValueError, match="uint8"):
        processor(np.zeros((224, 224, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="uint8"):
        normalize_uint8_images(torch.zeros(2, 224, 224, 3))
    with pytest.raises(ValueError, match="letterbox"):
        PrismaticImageProcessor(tvf_do_letterbox=True)


def test_processor_save_load_round_trip(tmp_path):
    processor = PrismaticProcessor.default()
    processor.save_pretrained(tmp_path)
    for name in ("preprocessor_config.json", "processor_config.json"):
        written = json.loads((tmp_path / name).read_text())
        upstream = json.loads((REFERENCE_CONFIG_DIR / name).read_text())
        assert sorted(written) == sorted(upstream), name
        for field in upstream:
            assert written[field] == upstream[field], (name, field)
    for source in tokenizer_files():
        assert (tmp_path / source.name).read_bytes() == source.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [*TOKENIZER_FILE_NAMES, "preprocessor_config.json", "processor_config.json"]
    )

    reloaded = PrismaticProcessor.from_pretrained(tmp_path)
    assert reloaded.image_processor.to_dict() == processor.image_processor.to_dict()
    prompt = build_inference_prompt("pick up the bowl")
    frame = [random_image(20), random_image(21)]
    out = reloaded(prompt, frame)
    assert out["input_ids"].tolist() == [processor.tokenizer(prompt).input_ids]
    assert out["attention_mask"].dtype == torch.bool
    assert out["attention_mask"].all()
    assert out["pixel_values"].shape == (1, 12, 224, 224)
    expected = reference_pixels([pil_bicubic_224(im) for im in frame])
    np.testing.assert_allclose(out["pixel_values"][0].numpy(), expected, rtol=0, atol=TOL)


def test_bundled_processor_configs_equal_upstream():
    for name in ("preprocessor_config.json", "processor_config.json"):
        assert hashlib.sha256((BUNDLED_PROCESSOR_DIR / name).read_bytes()).hexdigest() == upstream_sha256(name)
