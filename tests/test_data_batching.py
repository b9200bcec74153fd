"""Batch transform, collator, torch-only source and the global batch order (CPU, tiny, no tensorflow)."""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from prismatic.vla.constants import ACTION_TOKEN_BEGIN_IDX, IGNORE_INDEX, NUM_TOKENS, PAD_TOKEN_ID
from prismatic.vla.datasets.batching import (
    FrameToExample,
    PaddedCollator,
    RLDSIterableDataset,
    example_rng,
    normalize_batch_images,
)
from prismatic.vla.datasets.torch_source import (
    GlobalBatchSampler,
    SyntheticTorchSource,
    iterate_global_batches,
    random_batch,
)

REPO_ROOT = str(Path(__file__).resolve().parents[1])
TENSOR_KEYS = ("input_ids", "attention_mask", "pixel_values", "labels", "actions", "proprio")
# FORMAT section 10: the DINOv2 normalization actually in effect (bf16-rounded ImageNet values), then SigLIP.
DINO_MEAN, DINO_STD = (0.484375, 0.455078125, 0.40625), (0.228515625, 0.2236328125, 0.224609375)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


@pytest.fixture(scope="module")
def prompt_tokenizer():
    from prismatic.vla.prompting import PromptTokenizer
    from prismatic.vla.tokenizer import load_qwen_tokenizer

    return PromptTokenizer(load_qwen_tokenizer())


@pytest.fixture(scope="module")
def source(prompt_tokenizer):
    return SyntheticTorchSource(3, episode_length=(5, 11), seed=7, prompt_tokenizer=prompt_tokenizer)


def make_frame(key: str, rng: np.random.Generator, instruction: str = "pick up the red block") -> dict:
    actions = rng.uniform(-1, 1, size=(8, 7)).astype(np.float32)
    actions[0, :3] = (-1.0, 1.0, 0.0)  # the clip edges and the middle bin
    return {
        "image_primary": rng.integers(0, 256, size=(224, 224, 3), dtype=np.uint8),
        "image_wrist": rng.integers(0, 256, size=(224, 224, 3), dtype=np.uint8),
        "proprio": rng.uniform(-1, 1, size=8).astype(np.float32),
        "actions": actions,
        "instruction": instruction,
        "dataset_name": "unit",
        "sample_key": key,
    }


def assert_batches_equal(a: dict, b: dict) -> None:
    for k in TENSOR_KEYS:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k
    assert a["sample_keys"] == b["sample_keys"]
    assert a["dataset_names"] == b["dataset_names"]


# ----------------------------------------------------------------------------------------------- collator
def test_collator_matches_hand_built_padding():
    g = torch.Generator().manual_seed(0)
    lengths = [5, 9, 3]
    examples = []
    for i, n in enumerate(lengths):
        ids = torch.randint(0, 1000, (n,), generator=g)
        labels = torch.where(torch.arange(n) >= n - 2, ids, torch.full((n,), IGNORE_INDEX))
        examples.append(
            {
                "input_ids": ids,
                "labels": labels,
                "pixel_values": torch.randn(12, 224, 224, generator=g),
                "actions": torch.randn(8, 7, generator=g),
                "proprio": torch.randn(8, generator=g),
                "sample_key": f"k{i}",
                "dataset_name": "d",
            }
        )
    for multiple, want_len in ((None, 9), (8, 16)):
        batch = PaddedCollator(pad_to_multiple_of=multiple)(examples)
        # Reference: plain python lists padded by hand.
        ref_ids = [ex["input_ids"].tolist() + [PAD_TOKEN_ID] * (want_len - n) for ex, n in zip(examples, lengths)]
        ref_lab = [ex["labels"].tolist() + [IGNORE_INDEX] * (want_len - n) for ex, n in zip(examples, lengths)]
        ref_mask = [[j < n for j in range(want_len)] for n in lengths]
        assert batch["input_ids"].dtype == torch.long
        assert batch["input_ids"].tolist() == ref_ids
        assert batch["labels"].dtype == torch.long
        assert batch["labels"].tolist() == ref_lab
        assert batch["attention_mask"].dtype == torch.bool
        assert batch["attention_mask"].tolist() == ref_mask
        # Upstream's rule (ids != pad) gives the same mask, since these ids never contain the pad id.
        assert torch.equal(batch["attention_mask"], batch["input_ids"] != PAD_TOKEN_ID)
        assert batch["pixel_values"].shape == (3, 12, 224, 224)
        assert batch["pixel_values"].dtype == torch.float32
        assert torch.equal(batch["pixel_values"][1], examples[1]["pixel_values"])
        assert batch["actions"].shape == (3, 8, 7)
        assert torch.equal(batch["actions"][2], examples[2]["actions"])
        assert batch["proprio"].shape == (3, 8)
        assert torch.equal(batch["proprio"][0], examples[0]["proprio"])
        assert batch["sample_keys"] == ["k0", "k1", "k2"]
        assert batch["dataset_names"] == ["d"] * 3


def test_collator_mask_comes_from_lengths_not_pad_id():
    ids = torch.tensor([5, PAD_TOKEN_ID, 7])  # a pad id inside a sequence must stay attended
    ex = {"input_ids": ids, "labels": ids.clone(), "pixel_values": torch.zeros(6, 2, 2)}
    ex |= {"actions": torch.zeros(8, 7), "proprio": torch.zeros(8), "sample_key": "a", "dataset_name": "d"}
    short = {**ex, "input_ids": ids[:1], "labels": ids[:1].clone(), "sample_key": "b"}
    batch = PaddedCollator()(
        [ex, short],
    )
    assert batch["attention_mask"].tolist() == [[True, True, True], [True, False, False]]
    with pytest.raises(ValueError, match="labels"):
        PaddedCollator()([{**ex, "labels": ids[:2]}])


# ---------------------------------------------------------------------------------------- frame -> example
def test_pixel_values_order_primary_then_wrist_dino_then_siglip(prompt_tokenizer):
    frame = make_frame("unit/0/0", np.random.default_rng(1))
    pixels = FrameToExample(prompt_tokenizer, num_images=2)(frame)["pixel_values"]
    assert pixels.dtype == torch.float32
    assert pixels.shape == (12, 224, 224)
    expected = []
    for key in ("image_primary", "image_wrist"):
        x = frame[key].astype(np.float64).transpose(2, 0, 1) / 255.0  # [3, H, W]
        for mean, std in ((DINO_MEAN, DINO_STD), (SIGLIP_MEAN, SIGLIP_STD)):
            expected.append((x - np.array(mean)[:, None, None]) / np.array(std)[:, None, None])
    expected = np.concatenate(expected)  # [12, H, W]
    # float32 arithmetic on values of magnitude <= 2.7: a few ulps (~1e-6); 1e-5 leaves margin, and any
    # swapped channel block or wrong constant is off by >= 4e-3.
    np.testing.assert_allclose(pixels.numpy(), expected, rtol=0, atol=1e-5)
    one = FrameToExample(prompt_tokenizer, num_images=1)(frame)["pixel_values"]
    assert torch.equal(one, pixels[:6])


def test_uint8_hand_off_normalizes_to_the_host_values(prompt_tokenizer):
    """normalize_images=False: the collated batch carries the uint8 images, and normalize_batch_images turns it
    into exactly (bit for bit) the host-normalized batch; the other tensors are untouched. On a GPU the same
    check runs in experiments/finetune_speed_probe_gpu.sh (elementwise float32 ops round identically)."""
    rng = np.random.default_rng(3)
    frames = [make_frame(f"unit/0/{i}", rng, "pick up the red block" + " now" * i) for i in range(3)]
    collate = PaddedCollator()
    host = collate([FrameToExample(prompt_tokenizer, seed=2)(f) for f in frames])
    raw = collate([FrameToExample(prompt_tokenizer, seed=2, normalize_images=False)(f) for f in frames])
    assert raw["pixel_values"].dtype == torch.uint8
    assert raw["pixel_values"].shape == (3, 2, 224, 224, 3)
    assert raw["pixel_values"].nbytes * 8 == host["pixel_values"].nbytes
    moved = normalize_batch_images(raw, "cpu")
    assert_batches_equal(moved, host)
    assert normalize_batch_images(host) is host  # float batches pass through
    with pytest.raises(ValueError, match="B, n_images, H, W, 3"):
        normalize_batch_images({**raw, "pixel_values": raw["pixel_values"][0]})


def test_finetune_data_with_on_device_images_yields_the_host_batches(tmp_path):
    """finetune.py's training data as a GPU run builds it (uint8 hand-off, normalized as the iterator yields),
    forced on the CPU: the same steps, bit for bit, as the host-normalized path, with accumulation and a resume."""
    from prismatic.training.data_setup import build_training_data
    from prismatic.training.distributed import DistributedContext
    from prismatic.training.finetune_config import FinetuneConfig

    cfg = FinetuneConfig(vlm_path=str(tmp_path), data_source="synthetic", synthetic_num_episodes=3, batch_size=2,
                         grad_accumulation_steps=2, dataset_name="synthetic_no_noops")  # fmt: skip
    ctx = DistributedContext(0, 1, 0, torch.device("cpu"))
    for start in (0, 3):
        host = list(itertools.islice(build_training_data(cfg, ctx, on_device_images=False).train_steps(start), 3))
        device = list(itertools.islice(build_training_data(cfg, ctx, on_device_images=True).train_steps(start), 3))
        assert len(host) == len(device) == 3
        for host_step, device_step in zip(host, device):
            assert len(host_step) == len(device_step) == 2
            for a, b in zip(host_step, device_step):
                assert_batches_equal(b, a)


def test_action_slots_hold_the_chunk_tokens(prompt_tokenizer):
    frame = make_frame("unit/3/4", np.random.default_rng(2))
    ex = FrameToExample(prompt_tokenizer)(frame)
    ids, labels = ex["input_ids"].numpy(), ex["labels"].numpy()
    assert ex["input_ids"].dtype == torch.long
    assert ex["labels"].dtype == torch.long
    assert torch.equal(ex["actions"], torch.from_numpy(frame["actions"]))
    assert torch.equal(ex["proprio"], torch.from_numpy(frame["proprio"]))
    slots = np.flatnonzero(labels > ACTION_TOKEN_BEGIN_IDX)
    # Exactly the last 64 positions, preceded by the last prompt token ("\n") as the only other label.
    assert slots.tolist() == list(range(len(ids) - NUM_TOKENS, len(ids)))
    assert np.flatnonzero(labels != IGNORE_INDEX).tolist() == [len(ids) - NUM_TOKENS - 1, *slots.tolist()]
    assert ids[-NUM_TOKENS - 1] == 198
    assert np.array_equal(labels[slots], ids[slots])
    slot_ids = ids[slots]
    # Decode each id independently of the implementation: bin b = 151643 - id (1..256), and the value is the
    # centre of bin b among the 255 equal bins of [-1, 1] (bin 256 = exactly +1 shares the last centre).
    flat = frame["actions"].astype(np.float64).reshape(-1)  # [56], row-major, current action first
    for k in range(56):
        b = 151643 - int(slot_ids[k])
        assert 1 <= b <= 256
        centre = -1.0 + (min(b, 255) - 0.5) * (2.0 / 255.0)
        # Half a bin is 1/255; 1e-9 absorbs float64 rounding of the centre formula.
        assert abs(centre - flat[k]) <= 1.0 / 255.0 + 1e-9, (k, flat[k], centre)
    assert set(slot_ids[56:].tolist()) <= set(slot_ids[:56].tolist())  # the 8 extras repeat chunk ids


def test_same_frame_same_tokens_regardless_of_order(prompt_tokenizer):
    rng = np.random.default_rng(3)
    frames = [make_frame(f"unit/{i}/0", rng) for i in range(6)]
    forward = [FrameToExample(prompt_tokenizer, seed=5)(f)["input_ids"] for f in frames]
    fresh = FrameToExample(prompt_tokenizer, seed=5)
    backward = [fresh(f)["input_ids"] for f in reversed(frames)][::-1]
    assert all(torch.equal(a, b) for a, b in zip(forward, backward))
    # The 8 extra ids depend on the seed and on the key (56**-8 chance of a coincidental match per frame).
    other_seed = [FrameToExample(prompt_tokenizer, seed=6)(f)["input_ids"] for f in frames]
    assert not any(torch.equal(a[-8:], b[-8:]) for a, b in zip(forward, other_seed))
    renamed = [FrameToExample(prompt_tokenizer, seed=5)({**f, "sample_key": f["sample_key"] + "x"}) for f in frames]
    assert not any(torch.equal(a[-8:], b["input_ids"][-8:]) for a, b in zip(forward, renamed))


def test_example_rng_is_stable_across_processes():
    """python's str hash is salted per process; the draw must not be (ranks are separate processes)."""
    here = example_rng(11, "synthetic_libero/4/2").integers(0, 2**31, size=4).tolist()
    code = (
        "from prismatic.vla.datasets.batching import example_rng;"
        "print(example_rng(11, 'synthetic_libero/4/2').integers(0, 2**31, size=4).tolist())"
    )
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": REPO_ROOT}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == str(here)


def test_iterable_dataset_streams_the_same_batches(source):
    indices = [4, 0, 9, 2, 7, 1]
    loader = DataLoader(
        RLDSIterableDataset(lambda: (source.frame(i) for i in indices), source.transform),
        batch_size=3,
        num_workers=0,
        collate_fn=PaddedCollator(),
    )
    batches = list(loader)
    assert len(batches) == 2
    for batch, chunk in zip(batches, (indices[:3], indices[3:])):
        assert_batches_equal(batch, PaddedCollator()([source[i] for i in chunk]))


# ------------------------------------------------------------------------------------------- torch source
def test_torch_source_is_deterministic(source, prompt_tokenizer):
    twin = SyntheticTorchSource(3, episode_length=(5, 11), seed=7, prompt_tokenizer=prompt_tokenizer)
    other = SyntheticTorchSource(3, episode_length=(5, 11), seed=8, prompt_tokenizer=prompt_tokenizer)
    assert len(twin) == len(source)
    for i in range(len(source)):
        a, b = source[i], twin[i]
        for k in ("input_ids", "labels", "pixel_values", "actions", "proprio"):
            assert torch.equal(a[k], b[k]), (i, k)
        assert a["sample_key"] == b["sample_key"]
    assert twin.dataset_statistics() == source.dataset_statistics()
    assert not torch.equal(source[0]["pixel_values"], other[0]["pixel_values"])
    assert source.dataset_statistics() != other.dataset_statistics()
    ex = source[len(source) - 1]
    assert ex["pixel_values"].shape == (12, 224, 224)
    assert ex["sample_key"].startswith("synthetic_libero/2/")


def _reference_episodes(seed: int, num_episodes: int, lo: int, hi: int) -> list[dict]:
    from prismatic.vla.datasets.synthetic_task import episode_length, render_episode

    return [render_episode(seed, i, episode_length(seed, i, lo, hi)) for i in range(num_episodes)]


def _quantile(column: np.ndarray, q: float) -> float:
    """Linear-interpolated order statistic, written out by hand (float64)."""
    s = sorted(float(v) for v in column)
    pos = (len(s) - 1) * q
    lo = math.floor(pos)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (pos - lo)


def test_statistics_match_float64_reference(source):
    episodes = _reference_episodes(7, 3, 5, 11)
    stats = source.dataset_statistics()["synthetic_libero"]
    for field, raw in (("action", "actions"), ("proprio", "states")):
        x = np.concatenate([source_training_values(ep, raw) for ep in episodes])  # [N, D] float64
        for d in range(x.shape[1]):
            col = x[:, d]
            mean = math.fsum(col) / len(col)
            ref = {
                "mean": mean,
                "std": math.sqrt(math.fsum((v - mean) ** 2 for v in col) / len(col)),
                "min": min(col),
                "max": max(col),
                "q01": _quantile(col, 0.01),
                "q99": _quantile(col, 0.99),
            }
            for key, want in ref.items():
                # Both sides are float64 on the same float32 inputs; only summation order differs (~1e-15).
                assert stats[field][key][d] == pytest.approx(want, rel=1e-12, abs=1e-12), (field, key, d)
    assert stats["action"]["mask"] == [True] * 6 + [False]
    assert stats["num_transitions"] == sum(len(ep["actions"]) for ep in episodes) == len(source)
    assert stats["num_trajectories"] == 3


def source_training_values(episode: dict, key: str) -> np.ndarray:
    """Raw episode values as the training pipeline sees them (gripper action mapped to 1 open / 0 close)."""
    x = np.asarray(episode[key], dtype=np.float64).copy()
    if key == "actions":
        x[:, -1] = np.where(episode[key][:, -1] > 0, 0.0, 1.0)  # raw -1 open / +1 close
    return x


def test_action_chunks_repeat_the_last_action_at_episode_end(source):
    episodes = _reference_episodes(7, 3, 5, 11)
    stats = source.dataset_statistics()["synthetic_libero"]["action"]
    last = len(episodes) - 1
    acts = source_training_values(episodes[last], "actions")  # [L, 7]
    length = len(acts)

    def norm(a):  # BOUNDS_Q99 written per element, float64
        out = []
        for d, v in enumerate(a):
            lo, hi = stats["q01"][d], stats["q99"][d]
            if stats["min"][d] == stats["max"][d]:
                out.append(0.0)
            elif stats["mask"][d]:
                out.append(max(-1.0, min(1.0, 2 * (v - lo) / (hi - lo + 1e-8) - 1)))
            else:
                out.append(v)
        return out

    start = len(source) - length
    for t in range(length):
        want = [norm(acts[t + k] if t + k < length else acts[length - 1]) for k in range(8)]
        frame = source.frame(start + t)
        assert frame["sample_key"] == f"synthetic_libero/{last}/{t}"
        # The source stores float32: compare to the float64 reference within float32 rounding (|x| <= 1).
        np.testing.assert_allclose(frame["actions"], np.array(want), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------- global order
def test_global_batches_match_across_ranks_and_accumulation(source):
    n, seed = len(source), 3
    single = list(iterate_global_batches(source, 4, world_size=1, rank=0, seed=seed))
    ranks = [list(iterate_global_batches(source, 2, world_size=2, rank=r, seed=seed)) for r in range(2)]
    micro = list(iterate_global_batches(source, 2, world_size=1, rank=0, seed=seed))
    assert len(single) == n // 4
    assert all(len(r) == n // 4 for r in ranks)
    assert len(micro) >= 2 * (n // 4)
    for s, batch in enumerate(single):
        by_rank = ranks[0][s]["sample_keys"] + ranks[1][s]["sample_keys"]
        by_micro = micro[2 * s]["sample_keys"] + micro[2 * s + 1]["sample_keys"]
        assert by_rank == batch["sample_keys"] == by_micro
        for k in ("pixel_values", "actions", "proprio"):
            assert torch.equal(torch.cat([ranks[0][s][k], ranks[1][s][k]]), batch[k])
    # The order itself is DistributedSampler's seeded permutation (one replica), batched without dropping.
    reference = list(DistributedSampler(range(n), num_replicas=1, rank=0, shuffle=True, seed=seed))
    keys = [source.frame(i)["sample_key"] for i in reference[: 4 * len(single)]]
    assert keys == [key for b in single for key in b["sample_keys"]]


def test_global_batches_resume_and_epochs(source):
    full = list(iterate_global_batches(source, 2, seed=1, num_epochs=2))
    per_epoch = len(source) // 2
    assert len(full) == 2 * per_epoch
    resumed = list(iterate_global_batches(source, 2, seed=1, num_epochs=2, skip_steps=per_epoch - 1))
    assert len(resumed) == per_epoch + 1
    for a, b in zip(full[per_epoch - 1 :], resumed):
        assert_batches_equal(a, b)
    epoch0 = [k for b in full[:per_epoch] for k in b["sample_keys"]]
    epoch1 = [k for b in full[per_epoch:] for k in b["sample_keys"]]
    assert epoch0 != epoch1  # a fresh permutation per epoch
    sampler = GlobalBatchSampler(len(source), 2, world_size=2, rank=1, seed=1)
    assert len(list(sampler)) == len(sampler) == len(source) // 4
    with pytest.raises(ValueError, match="rank"):
        GlobalBatchSampler(len(source), 2, world_size=2, rank=2)


def test_random_batch_has_the_collator_layout(source):
    real = PaddedCollator()([source[0], source[1]])
    fake = random_batch(2, prompt_len=int(real["input_ids"].shape[1]) - NUM_TOKENS, seed=4)
    for k in TENSOR_KEYS:
        assert fake[k].dtype == real[k].dtype, k
        assert fake[k].shape == real[k].shape, k
    assert ((fake["labels"] > ACTION_TOKEN_BEGIN_IDX).sum(1) == NUM_TOKENS).all()
    assert (fake["labels"] != IGNORE_INDEX).sum(1).tolist() == [NUM_TOKENS + 1] * 2
    assert_batches_equal(fake, random_batch(2, prompt_len=int(real["input_ids"].shape[1]) - NUM_TOKENS, seed=4))


# ------------------------------------------------------------------------------ RLDS path vs torch source
def test_rlds_frames_batch_like_the_torch_source(source, tmp_path_factory):
    """The same rendered episodes through tf.data (JPEG, lanczos3) and through the torch source agree.

    Statistics, normalized proprio and action chunks must match (only float32-vs-float64 rounding differs);
    images only approximately (JPEG round trip + lanczos3 vs bilinear); batches have the same layout.
    tensorflow is imported lazily here, after torch and transformers (module imports / tokenizer fixture).
    """
    from prismatic.vla.datasets.statistics import dataset_statistics
    from prismatic.vla.datasets.stream import make_frame_iterator
    from prismatic.vla.datasets.synthetic_rlds import write_synthetic_rlds

    root = tmp_path_factory.mktemp("rlds")
    write_synthetic_rlds(root, "synthetic_libero", num_episodes=3, min_len=5, max_len=11, seed=7)
    stats = dataset_statistics(root, "synthetic_libero", cache_dir=root / "cache")
    want = source.dataset_statistics()["synthetic_libero"]
    for part in ("action", "proprio"):
        for key in ("mean", "std", "min", "max", "q01", "q99"):
            # Same float32 inputs, float64 maths; episode order (and so summation order) may differ.
            np.testing.assert_allclose(stats["synthetic_libero"][part][key], want[part][key], rtol=1e-12)
    # tf normalizes in float32, the torch source in float64: rounding x, q01 and q99 to float32 (eps/2 relative
    # each) is amplified by the scale 2 / (q99 - q01); 4x that bound plus 1e-6 for the final float32 rounding.
    eps32 = float(np.finfo(np.float32).eps)
    tolerance = {}
    for part in ("action", "proprio"):
        q01, q99 = np.asarray(want[part]["q01"]), np.asarray(want[part]["q99"])
        bound = 0.5 * eps32 * (2 * np.abs(q01) + 2 * np.abs(q99)) * 2 / (q99 - q01 + 1e-8)
        tolerance[part] = 4 * bound + 1e-6
    factory = lambda: make_frame_iterator(  # noqa: E731
        root, "synthetic_libero", train=False, ordered=True, statistics=stats, num_parallel_calls=1
    )
    frames = list(factory())
    assert len(frames) == len(source)
    by_episode: dict[str, list[dict]] = {}
    for f in frames:
        by_episode.setdefault(f["sample_key"].split("/")[1], []).append(f)
    torch_episodes = {}
    for i in range(len(source)):
        episode, t = source.locate(i)
        torch_episodes.setdefault(episode, []).append(source.frame(i))
    assert sorted(map(len, by_episode.values())) == sorted(map(len, torch_episodes.values()))
    for rlds_eps in by_episode.values():
        rlds_eps.sort(key=lambda f: int(f["sample_key"].rsplit("/", 1)[1]))
        rlds_actions = np.stack([f["actions"] for f in rlds_eps])  # [L, 8, 7]
        # Match by content: the torch episode with the same length and (nearly) the same actions.
        matches = [
            ep
            for ep in torch_episodes.values()
            if len(ep) == len(rlds_eps) and np.allclose(np.stack([f["actions"] for f in ep]), rlds_actions, atol=1e-5)
        ]
        assert len(matches) == 1
        for a, b in zip(rlds_eps, matches[0]):
            assert np.all(np.abs(a["actions"] - b["actions"]) <= tolerance["action"]), a["sample_key"]
            assert np.all(np.abs(a["proprio"] - b["proprio"]) <= tolerance["proprio"]), a["sample_key"]
            assert a["instruction"] == b["instruction"]
            for key in ("image_primary", "image_wrist"):
                assert a[key].dtype == np.uint8
                assert a[key].shape == b[key].shape == (224, 224, 3)
                # lanczos3 + JPEG vs bilinear: measured <= 1.3 grey levels on average; a wrong image is off by tens
                diff = np.abs(a[key].astype(np.float64) - b[key].astype(np.float64)).mean()
                assert diff < 3.0, (key, diff)
    loader = DataLoader(
        RLDSIterableDataset(factory, source.transform), batch_size=4, num_workers=0, collate_fn=PaddedCollator()
    )
    rlds_batch = next(iter(loader))
    torch_batch = PaddedCollator()([source[i] for i in range(4)])
    for k in TENSOR_KEYS:
        assert rlds_batch[k].dtype == torch_batch[k].dtype, k
        assert rlds_batch[k].shape[0] == 4
        assert rlds_batch[k].shape[2:] == torch_batch[k].shape[2:], k
    assert rlds_batch["sample_keys"] == [f["sample_key"] for f in frames[:4]]


def test_worker_processes_give_the_serial_episodes_and_batches(source, prompt_tokenizer):
    """SYNTHETIC_SOURCE_WORKERS / workers=n: forked renderers and DataLoader workers change only the wall time.
    Every episode tensor and every collated batch (2 epochs, skipped steps, rank 1 of 2) must be equal."""
    forked = SyntheticTorchSource(3, episode_length=(5, 11), seed=7, prompt_tokenizer=prompt_tokenizer, workers=2)
    assert len(forked) == len(source)
    for i in range(len(source)):
        a, b = source[i], forked[i]
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], torch.Tensor):
                assert torch.equal(a[k], b[k]), (i, k)
            else:
                assert a[k] == b[k], (i, k)
    kwargs = dict(world_size=2, rank=1, seed=5, num_epochs=2, skip_steps=1)
    serial = list(iterate_global_batches(source, 2, workers=0, **kwargs))
    parallel = list(iterate_global_batches(forked, 2, workers=2, **kwargs))
    assert len(serial) == len(parallel) > 2
    for s, p in zip(serial, parallel):
        assert s.keys() == p.keys()
        for k in s:
            if isinstance(s[k], torch.Tensor):
                assert torch.equal(s[k], p[k]), k
            else:
                assert s[k] == p[k], k
