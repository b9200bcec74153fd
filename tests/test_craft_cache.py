"""CRaFT's offline anchor cache: alignment with the frozen model, resume, 2-process build, refusals, fingerprint.

One tiny synthetic RLDS dataset (4 episodes, 4-6 steps) and the session's tiny model, saved as an HF start
point, serve every test. The reference cache is built once, in-process, with batch 2 and chunks of 4 frames.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import traceback
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
import torch  # torch before tensorflow in every process
from helpers import limit_tf_threads, load_script

from prismatic.training.craft_cache import (
    FEATURES_FILE,
    KEYS_FILE,
    METADATA_FILE,
    BadChunkError,
    CachedAnchor,
    CacheMismatchError,
    ChunkWorkspace,
    CorruptCacheError,
    FeatureCache,
    MissingKeysError,
    _load_chunk,
    expected_metadata,
    model_fingerprint,
    workspace_dir,
)
from prismatic.training.craft_utils import CRaFTConfig
from prismatic.training.model_setup import apply_lora, load_start_point
from prismatic.training.trainer import PolicyModules
from prismatic.vla.constants import ACTION_TOKEN_BEGIN_IDX

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "vla-scripts" / "build_craft_cache.py"
NAME, DATA_SEED, NUM_EPISODES, MIN_LEN, MAX_LEN = "craft_cache_synthetic_no_noops", 5, 4, 4, 6
BATCH, SHARD = 2, 4
NUM_IMAGES = 2
SUBPROCESS_TIMEOUT_S = 420


@pytest.fixture(scope="module")
def builder() -> ModuleType:
    return load_script("build_craft_cache")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from prismatic.vla.datasets.synthetic_rlds import write_synthetic_rlds

    limit_tf_threads()
    root = tmp_path_factory.mktemp("craft_cache_rlds")
    write_synthetic_rlds(
        root, NAME, num_episodes=NUM_EPISODES, min_len=MIN_LEN, max_len=MAX_LEN, seed=DATA_SEED, num_shards=2
    )
    return root


@pytest.fixture(scope="module")
def statistics(data_root: Path) -> dict:
    from prismatic.vla.datasets.statistics import dataset_statistics

    return dataset_statistics(data_root, NAME, num_parallel_calls=1)


@pytest.fixture(scope="module")
def start_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model) -> Path:
    """The tiny model as an HF start point (what --pretrained_checkpoint / finetune's --vlm_path load)."""
    path = tmp_path_factory.mktemp("craft_cache_start") / "hf"
    tiny_model.save_pretrained(path)
    return path


def build_args(start_dir: Path, data_root: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        f"--pretrained_checkpoint={start_dir}",
        f"--data_root_dir={data_root}",
        f"--dataset_name={NAME}",
        f"--output_dir={output_dir}",
        f"--batch_size={BATCH}",
        f"--shard_size={SHARD}",
        f"--num_images_in_input={NUM_IMAGES}",
        "--num_parallel_calls=1",
        "--device=cpu",
        "--show_progress=False",
        *extra,
    ]


@pytest.fixture(scope="module")
def reference_cache(builder, start_dir, data_root, tmp_path_factory) -> Path:
    """One uninterrupted single-process build."""
    out = tmp_path_factory.mktemp("craft_cache_ref") / "cache"
    result = builder.main(build_args(start_dir, data_root, out))
    assert result.finalized
    return out


def expected_for(model, statistics, **overrides) -> dict:
    kwargs = dict(num_images=NUM_IMAGES, anchor_layer_idx=None, use_mean_pooling=True, feature_variant="full")
    kwargs.update(overrides)
    return expected_metadata(model, statistics, **kwargs)


def stream_frames(data_root: Path, **kwargs) -> list[dict]:
    from prismatic.vla.datasets.stream import make_frame_iterator

    count = kwargs.pop("count", None)
    frames = make_frame_iterator(data_root, NAME, num_parallel_calls=1, **kwargs)
    return list(itertools.islice(frames, count))


def collate(frames: list[dict]) -> dict:
    from prismatic.vla.datasets.batching import FrameToExample, PaddedCollator
    from prismatic.vla.prompting import PromptTokenizer
    from prismatic.vla.tokenizer import load_qwen_tokenizer

    transform = FrameToExample(PromptTokenizer(load_qwen_tokenizer()), num_images=NUM_IMAGES, seed=11)
    return PaddedCollator()([transform(f) for f in frames])


def reference_features_fp64(model, batch: dict, anchor_layer: int) -> np.ndarray:
    """[B, 2D] float64: [mean C_R; mean C_AQ] re-derived in numpy from an fp64 forward's hidden states.

    Written independently of the model's craft-feature path: patches are rows 1..P of the anchor layer, the
    64 read-out rows of the last layer are P + s_k - 1 for the slot text indices s_k (labels > begin id).
    """
    model64 = copy.deepcopy(model).double()
    slots = (batch["labels"] > ACTION_TOKEN_BEGIN_IDX).numpy()  # [B, T]
    with torch.no_grad():
        out = model64(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"].double(),
            action_slot_mask=torch.from_numpy(slots),
            output_hidden_states=True,
            return_logits=False,
        )
    hidden = [h.numpy() for h in out.hidden_states]
    num_patches = 256 * NUM_IMAGES
    rows = []
    for b in range(slots.shape[0]):
        s = np.flatnonzero(slots[b])
        assert s.size == 64
        c_r = hidden[anchor_layer][b, 1 : 1 + num_patches].mean(axis=0)
        c_aq = hidden[-1][b, num_patches + s - 1].mean(axis=0)
        rows.append(np.concatenate([c_r, c_aq]))
    return np.stack(rows)


# ------------------------------------------------------------------------------------------- fingerprint --
def test_fingerprint_ignores_peft_wrapping_and_sees_weight_changes(tiny_model):
    base_fp = model_fingerprint(tiny_model)
    assert model_fingerprint(tiny_model) == base_fp  # deterministic

    peft = apply_lora(copy.deepcopy(tiny_model), rank=4, dropout=0.0)
    names = [n for n, _ in peft.named_parameters(remove_duplicate=False)]
    assert any("lora_A" in n for n in names)
    assert any(n.endswith("lm_head.base_layer.weight") for n in names)  # the tied, wrapped LM head
    assert model_fingerprint(peft) == base_fp

    # One ulp in the middle of a large tensor (not among the first/last 16 values): the checksums see it.
    changed = copy.deepcopy(tiny_model)
    weight = changed.projector.fc1.weight.data.view(-1)
    mid = weight.numel() // 2
    weight[mid] = torch.nextafter(weight[mid], torch.tensor(float("inf")))
    assert model_fingerprint(changed) != base_fp

    # Swapping two values keeps every plain sum: the position-weighted checksum still sees it.
    swapped = copy.deepcopy(tiny_model)
    w = swapped.projector.fc1.weight.data.view(-1)
    a, b = w[mid].clone(), w[mid + 7].clone()
    assert a != b
    w[mid], w[mid + 7] = b, a
    assert model_fingerprint(swapped) != base_fp

    # A base weight changed under the PEFT wrapper changes the PEFT model's fingerprint too.
    with torch.no_grad():
        peft.base_model.model.action_queries.weight[3, 5] += 1.0
    assert model_fingerprint(peft) != base_fp


# ------------------------------------------------------------------------------------------- alignment ---
def test_cache_matches_frozen_model_on_shuffled_stream(reference_cache, data_root, statistics, tiny_model):
    cache = FeatureCache.open(reference_cache)
    ordered_keys = [f["sample_key"] for f in stream_frames(data_root, train=False, ordered=True)]
    assert len(ordered_keys) == statistics[NAME]["num_transitions"] == len(cache)
    assert sorted(cache.keys) == sorted(ordered_keys)  # every frame exactly once

    # The in-memory model's fingerprint equals the one of the model the builder loaded from disk.
    anchor = CachedAnchor.from_cache_dir(reference_cache, expected_for(tiny_model, statistics))
    assert cache.metadata["anchor_layer"] == 2  # middle of 5 hidden states

    frames = stream_frames(data_root, train=True, image_aug=False, seed=1234, shuffle_buffer_size=8, count=6)
    keys = [f["sample_key"] for f in frames]
    assert len(set(keys)) == len(keys)
    assert keys != [k for k in ordered_keys if k in set(keys)]  # really shuffled
    batch = collate(frames)
    f0 = anchor.features(batch, torch.device("cpu"))
    assert f0.dtype == torch.float32
    assert f0.shape == (len(frames), cache.feature_dim)

    reference = reference_features_fp64(tiny_model, batch, anchor_layer=2)
    # Tolerance: fp16 storage keeps 11 significant bits, a relative error <= 2^-11 = 4.9e-4 per element;
    # rtol 2e-3 leaves 4x margin. The cache was computed in fp32 (other batch compositions, other padding):
    # that deviates from fp64 by ~1e-6 of the activation scale, covered by atol = 1e-4 * max|f|.
    rtol, atol = 2e-3, 1e-4 * np.abs(reference).max()
    np.testing.assert_allclose(f0.numpy(), reference, rtol=rtol, atol=atol)
    # The check can fail: with this tolerance, no frame's reference matches another frame's cached feature.
    for i, j in itertools.permutations(range(len(frames)), 2):
        assert not np.allclose(f0[j].numpy(), reference[i], rtol=rtol, atol=atol), (keys[i], keys[j])


# ---------------------------------------------------------------------------------------------- resume ---
def test_interrupted_build_resumes_byte_identical(builder, reference_cache, start_dir, data_root, tmp_path):
    out = tmp_path / "cache"
    args = build_args(start_dir, data_root, out)
    first = builder.main([*args, "--stop_after_chunks=2"])
    assert not first.finalized
    assert first.chunks_written == 2
    assert not out.exists()
    chunks = sorted(workspace_dir(out).glob("chunk-*.npz"))
    assert len(chunks) == 2

    # Resuming with other feature settings is refused before anything is computed, naming the field.
    with pytest.raises(CacheMismatchError, match="pooling: cached 'mean', expected 'max'"):
        builder.main([*args, "--use_mean_pooling=False"])

    second = builder.main(args)
    total = len(FeatureCache.open(reference_cache))
    assert second.finalized
    assert second.frames_skipped == 2 * SHARD  # finished chunks are not recomputed
    assert second.frames_computed == total - 2 * SHARD
    assert not workspace_dir(out).exists()
    for name in (FEATURES_FILE, KEYS_FILE):
        assert (out / name).read_bytes() == (reference_cache / name).read_bytes(), name

    third = builder.main(args)  # a finished cache is recognized, not rebuilt
    assert third.finalized
    assert third.frames_computed == 0
    assert third.num_samples == total


@pytest.mark.slow
def test_two_process_build_equals_single_process(reference_cache, start_dir, data_root, tmp_path):
    out = tmp_path / "cache"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(SCRIPT),
        *build_args(start_dir, data_root, out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers
        output, _ = proc.communicate()
        pytest.fail(f"2-process build timed out after {SUBPROCESS_TIMEOUT_S} s:\n{output[-4000:]}")
    assert proc.returncode == 0, output[-4000:]
    assert "Total samples cached" in output

    two, one = FeatureCache.open(out), FeatureCache.open(reference_cache)
    assert two.metadata["created"]["world_size"] == 2
    assert set(two.metadata["chunks_by_rank"]) == {"0", "1"}  # both ranks did part of the work
    assert two.keys == one.keys  # same frames, same canonical (sorted) order
    a, b = np.asarray(two.features, np.float64), np.asarray(one.features, np.float64)
    # Different batch compositions change fp32 summation order (~1e-6 relative); after fp16 rounding that
    # is at most one fp16 ulp (2^-10 relative) apart: rtol 2e-3, and atol for values near zero.
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-4 * np.abs(b).max())


# -------------------------------------------------------------------------------------------- refusals ---
def copy_cache(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_corrupt_caches_are_refused(reference_cache, tmp_path):
    truncated = copy_cache(reference_cache, tmp_path / "truncated")
    size = (truncated / FEATURES_FILE).stat().st_size
    with open(truncated / FEATURES_FILE, "r+b") as f:
        f.truncate(size - 2)
    with pytest.raises(CorruptCacheError, match=rf"features\.f16 has {size - 2} bytes, expected .* = {size}"):
        FeatureCache.open(truncated)

    incomplete = copy_cache(reference_cache, tmp_path / "incomplete")
    meta = json.loads((incomplete / METADATA_FILE).read_text())
    del meta["pooling"]
    (incomplete / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(CorruptCacheError, match=r"lacks the fields \['pooling'\]"):
        FeatureCache.open(incomplete)

    duplicated = copy_cache(reference_cache, tmp_path / "duplicated")
    keys = json.loads((duplicated / KEYS_FILE).read_text())
    keys[1] = keys[0]
    (duplicated / KEYS_FILE).write_text(json.dumps(keys))
    with pytest.raises(CorruptCacheError, match="more than once"):
        FeatureCache.open(duplicated)

    (duplicated / KEYS_FILE).unlink()
    with pytest.raises(CorruptCacheError, match="keys.json is missing"):
        FeatureCache.open(duplicated)

    intact = FeatureCache.open(reference_cache)
    intact.verify_checksum()
    flipped = copy_cache(reference_cache, tmp_path / "flipped")
    data = bytearray((flipped / FEATURES_FILE).read_bytes())
    data[10] ^= 0x01
    (flipped / FEATURES_FILE).write_bytes(bytes(data))
    with pytest.raises(CorruptCacheError, match="sha256"):
        FeatureCache.open(flipped)


# ------------------------------------------------------------------------------------------- integrity ---
def last_traceback_line(err: BaseException) -> str:
    """The line a user sees last when ``err`` escapes (after any chained cause)."""
    return "".join(traceback.format_exception(err)).rstrip().splitlines()[-1]


def flip_byte(path: Path, offset: int) -> None:
    """Change one byte in place (same size, every other byte untouched)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x40]))


def test_same_size_corruption_is_refused_naming_the_file(reference_cache, statistics, tiny_model, tmp_path):
    expected = expected_for(tiny_model, statistics)
    CachedAnchor.from_cache_dir(reference_cache, expected)  # the untouched cache opens (and verifies)
    recorded = json.loads((reference_cache / METADATA_FILE).read_text())
    assert {"features_sha256", "keys_sha256"} <= recorded.keys()

    size = (reference_cache / FEATURES_FILE).stat().st_size
    for offset in (size // 2 + 1, size - 1):  # a byte in the middle and the last byte, not only the first ones
        bad = copy_cache(reference_cache, tmp_path / f"flipped_{offset}")
        flip_byte(bad / FEATURES_FILE, offset)
        assert (bad / FEATURES_FILE).stat().st_size == size
        with pytest.raises(CorruptCacheError) as info:
            CachedAnchor.from_cache_dir(bad, expected)  # what finetune's CachedAnchor.open calls
        message = str(info.value)
        assert f"CRaFT cache file {bad / FEATURES_FILE} is corrupt" in message
        assert f"records features_sha256 {recorded['features_sha256']}" in message  # expected ...
        assert "its sha256 is " in message  # ... vs found
        assert f"rm -r {bad}" in message
        assert "build_craft_cache.py" in message
        assert recorded["created"]["command"] in message  # the command that built it
        assert str(bad / FEATURES_FILE) in last_traceback_line(info.value)
        FeatureCache.open(bad, verify=False)  # the explicit opt-out still opens it

    # A key list that is still valid JSON but altered (two keys swapped: same set, wrong rows).
    swapped = copy_cache(reference_cache, tmp_path / "swapped_keys")
    keys = json.loads((swapped / KEYS_FILE).read_text())
    keys[0], keys[-1] = keys[-1], keys[0]
    (swapped / KEYS_FILE).write_text(json.dumps(keys, indent=2))
    with pytest.raises(CorruptCacheError, match=rf"cache file {swapped / KEYS_FILE} is corrupt"):
        FeatureCache.open(swapped)

    # Backwards compatibility: a cache from before keys_sha256 is verified by features_sha256 alone; one without
    # any recorded hash is refused, asking for a rebuild.
    old = copy_cache(reference_cache, tmp_path / "old")
    meta = json.loads((old / METADATA_FILE).read_text())
    del meta["keys_sha256"]
    (old / METADATA_FILE).write_text(json.dumps(meta))
    FeatureCache.open(old)
    flip_byte(old / FEATURES_FILE, size // 3)
    with pytest.raises(CorruptCacheError, match=rf"cache file {old / FEATURES_FILE} is corrupt"):
        FeatureCache.open(old)
    del meta["features_sha256"]
    (old / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(CorruptCacheError, match=r"records no features_sha256.*rebuild it"):
        FeatureCache.open(old)


def test_bad_chunks_are_named_then_deleted_and_recomputed(
    builder, reference_cache, start_dir, data_root, tmp_path, caplog
):
    out = tmp_path / "cache"
    args = build_args(start_dir, data_root, out)
    first = builder.main([*args, "--stop_after_chunks=3"])
    assert not first.finalized
    assert first.chunks_written == 3
    workspace = ChunkWorkspace(workspace_dir(out))
    intact, truncated, flipped = workspace.chunk_paths()

    # Chunk 1 truncated (as by a crash on a filesystem without atomic renames), chunk 2 changed in place
    # in the middle of its feature data (same size), plus the temp file of a chunk write that was killed.
    raw = truncated.read_bytes()
    truncated.write_bytes(raw[: len(raw) // 2])
    with np.load(flipped) as data:
        feature_bytes = data["features"].tobytes()
    start = flipped.read_bytes().index(feature_bytes)
    flip_byte(flipped, start + len(feature_bytes) // 2)
    stray = workspace.directory / f".{truncated.name}.tmpkilled"
    stray.write_bytes(raw[:100])

    # Reading them names the file (and the real cause), as the last line of the traceback.
    with pytest.raises(BadChunkError, match=rf"chunk file {truncated} cannot be read \(BadZipFile") as info:
        workspace.finished_keys()
    assert str(truncated) in last_traceback_line(info.value)
    with pytest.raises(BadChunkError, match=rf"chunk file {flipped} cannot be read \(BadZipFile: Bad CRC-32"):
        _load_chunk(flipped)  # what the merge does with every chunk

    # The resumed build deletes both bad chunks and the temp file, says so, and recomputes their frames.
    caplog.set_level("WARNING")
    second = builder.main(args)
    assert second.finalized
    assert len(second.chunks_discarded) == 3
    for path in (truncated, flipped, stray):
        assert any(str(path) in line for line in second.chunks_discarded), (path, second.chunks_discarded)
        assert str(path) in caplog.text
    total = len(FeatureCache.open(reference_cache))
    assert second.frames_skipped == SHARD  # only the intact chunk's frames
    assert second.frames_computed == total - SHARD
    for name in (FEATURES_FILE, KEYS_FILE):
        assert (out / name).read_bytes() == (reference_cache / name).read_bytes(), name
    assert not workspace.directory.exists()


def test_mismatched_caches_are_refused_naming_each_field(reference_cache, statistics, tiny_model):
    other_model = copy.deepcopy(tiny_model)
    with torch.no_grad():
        other_model.action_queries.weight[0, 0] += 0.5
    other_data = {"another_dataset_no_noops": statistics[NAME]}
    cases = {
        "model_fingerprint": expected_for(other_model, statistics),
        "datasets": expected_for(tiny_model, other_data),
        "anchor_layer": expected_for(tiny_model, statistics, anchor_layer_idx=1),
        "pooling": expected_for(tiny_model, statistics, use_mean_pooling=False),
        "feature_variant": expected_for(tiny_model, statistics, feature_variant="raw_only"),
        "num_images": expected_for(tiny_model, statistics, num_images=1),
    }
    for field, expected in cases.items():
        with pytest.raises(CacheMismatchError) as info:
            CachedAnchor.from_cache_dir(reference_cache, expected)
        named = {line.split(":")[0].strip() for line in str(info.value).splitlines()[1:]}
        want = {field, "feature_dim"} if field == "feature_variant" else {field}
        assert named == want, (field, str(info.value))
    with pytest.raises(CacheMismatchError, match=r"anchor_layer: cached 2, expected 1"):
        CachedAnchor.from_cache_dir(reference_cache, cases["anchor_layer"])

    everything = expected_for(other_model, other_data, anchor_layer_idx=1, use_mean_pooling=False)
    with pytest.raises(CacheMismatchError) as info:
        CachedAnchor.from_cache_dir(reference_cache, everything)
    for field in ("model_fingerprint", "datasets", "anchor_layer", "pooling"):
        assert f"\n  {field}: cached " in str(info.value)

    # A base-VLM start point (fresh action queries drawn from --seed): the mismatch names --seed as the cause.
    with pytest.raises(CacheMismatchError) as info:
        CachedAnchor.from_cache_dir(reference_cache, cases["model_fingerprint"], fresh_query_seed=11)
    assert "draw them from --seed (this run: 11)" in str(info.value)
    with pytest.raises(CacheMismatchError) as info:  # other mismatches get no --seed note
        CachedAnchor.from_cache_dir(reference_cache, cases["anchor_layer"], fresh_query_seed=11)
    assert "--seed" not in str(info.value)


def test_missing_key_is_named(reference_cache, statistics, tiny_model):
    anchor = CachedAnchor.from_cache_dir(reference_cache, expected_for(tiny_model, statistics))
    good = anchor.cache.keys[3]
    with pytest.raises(MissingKeysError, match="not_a_dataset/0/7") as info:
        anchor.features({"sample_keys": [good, "not_a_dataset/0/7"]}, "cpu")
    assert isinstance(info.value, KeyError)
    assert "1 of 2 sample keys" in str(info.value)


def test_open_from_finetune_pieces(reference_cache, statistics, tiny_model):
    """``CachedAnchor.open`` with a PEFT student at init, as vla-scripts/finetune.py calls it."""
    peft = apply_lora(copy.deepcopy(tiny_model), rank=4, dropout=0.0)
    modules = PolicyModules(vla=peft, action_head=torch.nn.Linear(1, 1), proprio_projector=None)
    data = SimpleNamespace(dataset_statistics=statistics, num_images=NUM_IMAGES)
    with pytest.raises(ValueError, match="--craft_cache_dir"):
        CachedAnchor.open(CRaFTConfig(), modules, data)
    config = CRaFTConfig(anchor_source="cache", cache_dir=str(reference_cache))
    anchor = CachedAnchor.open(config, modules, data)
    keys = anchor.cache.keys[:3]
    expected = np.asarray(anchor.cache.features[:3], dtype=np.float32)
    np.testing.assert_array_equal(anchor.features({"sample_keys": keys}, "cpu").numpy(), expected)
    with pytest.raises(CacheMismatchError, match="anchor_layer"):
        CachedAnchor.open(CRaFTConfig(anchor_source="cache", cache_dir=str(reference_cache), anchor_layer_idx=-1),
                          modules, data)  # fmt: skip


def test_start_point_round_trip_keeps_fingerprint(start_dir, tiny_model):
    """The builder's loader gives back the very weights (what makes the fingerprint check meaningful)."""
    loaded = load_start_point(str(start_dir), use_minivlm=False).vla
    assert model_fingerprint(loaded) == model_fingerprint(tiny_model)
