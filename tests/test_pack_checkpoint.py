"""vla-scripts/pack_checkpoint.py: a checkpoint dir survives pack -> unpack exactly, references shrink it.

Reference: the original files themselves (every tensor compared with torch.equal, other files byte for byte).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers import load_script
from safetensors.torch import load_file, save_file

pack_checkpoint = load_script("pack_checkpoint")


def _tensors(path: Path) -> dict:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return dict(pack_checkpoint._leaves(torch.load(path, map_location="cpu")))


def test_round_trip_is_exact_and_references_are_left_out(tiny_base: Path, tmp_path: Path):
    src = tmp_path / "src"
    shutil.copytree(tiny_base, src)
    (ckpt,) = (src / "checkpoints").glob("*.pt")
    groups = torch.load(ckpt, map_location="cpu")["model"]
    embedding_key = next(k for k in groups["llm_backbone"] if k.endswith("embed_tokens.weight"))
    embedding = groups["llm_backbone"][embedding_key]
    save_file({"w": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)}, str(src / "extra.safetensors"), {"a": "b"})
    # What a CUDA LoRA run saves of the tied lm_head: the frozen embedding after its bf16 cast, back in float32.
    rounded = embedding.to(torch.bfloat16).float()
    assert not torch.equal(rounded, embedding)
    save_file({"lm_head": rounded, "lm_head_bf16": embedding.to(torch.bfloat16)}, str(src / "adapter.safetensors"))
    (src / "training_state").mkdir()
    torch.save({"optimizer": torch.ones(3)}, src / "training_state" / "state.pt")
    ref = tmp_path / "ref.pt"
    torch.save({"embedding": embedding.clone()}, ref)

    plain = pack_checkpoint.pack(src, tmp_path / "plain" / "ck", [])
    with_ref = pack_checkpoint.pack(src, tmp_path / "ref" / "ck", [ref])
    size = lambda parts: sum(p.stat().st_size for p in parts)
    assert size(plain) - size(with_ref) > 0.5 * embedding.numel() * embedding.element_size()  # fp32 noise: <20% zlib
    refs = pack_checkpoint.load_references([ref])
    assert pack_checkpoint._encode(rounded, refs)[0] == "ref"  # the bf16 rounding travels as a reference too
    assert pack_checkpoint._encode(embedding.to(torch.bfloat16), refs)[0] == "ref"
    assert pack_checkpoint._encode(rounded + 1, refs)[0] == "data"

    dst = tmp_path / "dst"
    assert pack_checkpoint.unpack(tmp_path / "ref" / "ck", dst, [ref])
    for f in src.rglob("*"):
        if not f.is_file() or "training_state" in f.parts:
            continue
        out = dst / f.relative_to(src)
        if f.suffix in (".pt", ".safetensors"):
            a, b = _tensors(f), _tensors(out)
            assert a.keys() == b.keys()
            assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a), f
        else:
            assert out.read_bytes() == f.read_bytes(), f
    assert not (dst / "training_state" / "state.pt").exists()  # optimizer state stays behind

    with pytest.raises(SystemExit, match="reference tensor"):
        pack_checkpoint.unpack(tmp_path / "ref" / "ck", tmp_path / "noref", [])
    with pytest.raises(SystemExit, match="not empty"):
        pack_checkpoint.unpack(tmp_path / "ref" / "ck", dst, [ref])


def test_the_tracked_start_point_unpacks_to_its_documented_fingerprint(tmp_path: Path):
    """experiments/start_point/ (the study's base, tracked so GPU sessions need not regenerate it) unpacks with the
    regenerated seeded embedding, every file matching the pack's recorded hash, to the fingerprint its README names;
    loaded through the fine-tuning path its weights have the sha256 that the GPU pretraining run reported (a second,
    independent hash: pretrain_synthetic_vlm.weights_sha256 over the loaded model's tensors)."""
    from experiments.forgetting_study import base_sha256
    from prismatic.training.model_setup import load_start_point

    pretrain = load_script("pretrain_synthetic_vlm")
    repo = Path(__file__).resolve().parents[1]
    ref, base = tmp_path / "ref.pt", tmp_path / "base"
    pack_checkpoint.main(["seeded-embedding", str(ref)])
    pack_checkpoint.main(
        ["unpack", str(repo / "experiments" / "start_point" / "task_a_base"), str(base), "--ref", str(ref)]
    )
    fingerprint = base_sha256(base)
    assert fingerprint == "c71927811b5df222f134d90480d7d185dae94fc069519a33b11efd9a9b0379d7"
    assert fingerprint[:8] in (repo / "experiments" / "start_point" / "README.md").read_text()
    state = load_start_point(str(base), True, str(base / "hf_config")).vla.state_dict()
    keys = [k for k in state if k != pretrain.ACTION_QUERIES_KEY]
    assert pretrain.weights_sha256(state, keys) == "f7921b60158fdb9589560ec16b68a29285a1729e5978951fbb7f11646c86980a"
