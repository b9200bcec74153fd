"""Pack a checkpoint dir into <= 15 MiB parts, losslessly, leaving out what the receiver can rebuild.

Why: moving a run from a GPU machine whose returned files are capped (e.g. 16 MiB each, 64 MiB in all) to the
CPU machine that runs the closed-loop evaluation. A task-A base (vla-scripts/pretrain_synthetic_vlm.py) keeps its
39M-row token embedding frozen at its seeded values, and a fine-tuned run shares most tensors with its base, so
both travel as the tensors that changed.

    python vla-scripts/pack_checkpoint.py pack   <dir> <prefix> [--ref FILE ...]   # writes <prefix>.partNN
    python vla-scripts/pack_checkpoint.py unpack <prefix> <dir> [--ref FILE ...]   # rebuilds every file, checked
    python vla-scripts/pack_checkpoint.py seeded-embedding <out.pt> --seed 0 --llm_layers 8 --llm_hidden_size 256 \\
        --vit_embed_dims 128 192 --vit_depth 4        # the study VLM's seeded embedding (pretraining freezes it)

A tensor byte-equal to one in a ``--ref`` file (.pt of nested dicts of tensors, or .safetensors), or to a float32
one's bfloat16 rounding (as bf16 or as float32), is stored as a reference to it; unpack needs the same reference
files. Other tensors are split into byte planes and zlib-compressed (the sign/exponent plane of float weights
compresses well). ``training_state/*.pt`` (optimizer state) is left out. Unpack rewrites .pt files with
torch.save of the same nested dicts and .safetensors files with their metadata, and checks each file's
tensor-content sha256 (names, dtypes, shapes, bytes) against the packer's; other files are copied and checked
byte for byte.
"""

from __future__ import annotations

import argparse
import hashlib
import pickle
import sys
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

PART_BYTES = 15 * 2**20
Key = tuple[str, tuple[int, ...], str]


def _bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _key(t: torch.Tensor) -> Key:
    return str(t.dtype), tuple(t.shape), hashlib.sha256(_bytes(t)).hexdigest()


def _leaves(obj: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, (*prefix, k))
    else:
        raise TypeError(f"only nested dicts of tensors can be packed; found {type(obj).__name__} at {prefix}")


def content_sha256(pairs: Sequence[tuple[tuple[str, ...], torch.Tensor]]) -> str:
    digest = hashlib.sha256()
    for path, t in sorted(pairs, key=lambda kv: repr(kv[0])):
        for part in (repr(path), str(t.dtype), repr(tuple(t.shape))):
            digest.update(part.encode())
        digest.update(_bytes(t))
    return digest.hexdigest()


def _read(path: Path) -> Any:
    return load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu")


def file_content_sha256(path: Path) -> str:
    """``content_sha256`` of a .pt or .safetensors file: what ``unpack`` checks, the same on any torch version."""
    return content_sha256(list(_leaves(_read(path))))


def load_references(files: Sequence[str | Path]) -> dict[Key, torch.Tensor]:
    """Every tensor of ``files`` by content, plus each float32 tensor's bfloat16 rounding (in bf16 and back in
    float32): a CUDA run keeps frozen base weights in bf16 (prepare_policy), so what it saves of them (e.g. the
    tied lm_head in a LoRA adapter) is the reference's bf16 rounding, not the reference itself."""
    refs: dict[Key, torch.Tensor] = {}
    for f in files:
        for _, t in _leaves(_read(Path(f))):
            refs[_key(t)] = t
            if t.dtype == torch.float32:
                rounded = t.to(torch.bfloat16)
                for variant in (rounded, rounded.to(torch.float32)):
                    refs.setdefault(_key(variant), variant)
    return refs


def _encode(t: torch.Tensor, refs: dict[Key, torch.Tensor]) -> tuple:
    key = _key(t)
    if key in refs:
        return ("ref", key)
    raw = np.frombuffer(_bytes(t), dtype=np.uint8)
    width = t.element_size()
    planes = raw.reshape(-1, width).T if width > 1 and raw.size else raw.reshape(1, -1)
    return (
        "data",
        str(t.dtype).removeprefix("torch."),
        tuple(t.shape),
        [zlib.compress(p.tobytes(), 6) for p in planes],
    )


def _decode(entry: tuple, refs: dict[Key, torch.Tensor]) -> torch.Tensor:
    if entry[0] == "ref":
        if entry[1] not in refs:
            raise SystemExit(f"a reference tensor {entry[1][:2]} is missing: pass the same --ref files as the packer")
        return refs[entry[1]].clone()
    _, dtype, shape, planes = entry
    arrays = [np.frombuffer(zlib.decompress(p), dtype=np.uint8) for p in planes]
    raw = np.stack(arrays, axis=1).reshape(-1) if len(arrays) > 1 else arrays[0]
    out = torch.empty(shape, dtype=getattr(torch, dtype))
    if raw.size:
        out.view(-1).view(torch.uint8).copy_(torch.from_numpy(raw.copy()))
    return out


def _nest(pairs: Sequence[tuple[tuple[str, ...], torch.Tensor]]) -> dict:
    root: dict = {}
    for path, t in pairs:
        node = root
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = t
    return root


def pack(src: Path, prefix: Path, ref_files: Sequence[str | Path]) -> list[Path]:
    refs = load_references(ref_files)
    files: dict[str, tuple] = {}
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        if "training_state" in f.relative_to(src).parts and f.suffix == ".pt":
            continue  # optimizer state: not needed to evaluate, and the largest file of a run
        rel = str(f.relative_to(src))
        if f.suffix in (".pt", ".safetensors"):
            pairs = list(_leaves(_read(f)))
            meta = None
            if f.suffix == ".safetensors":
                with safe_open(str(f), "pt") as handle:
                    meta = handle.metadata()
            files[rel] = (f.suffix, [(k, _encode(t, refs)) for k, t in pairs], content_sha256(pairs), meta)
        else:
            data = f.read_bytes()
            files[rel] = ("raw", zlib.compress(data, 9), hashlib.sha256(data).hexdigest(), None)
    blob = pickle.dumps(files, protocol=5)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    parts = []
    for n, start in enumerate(range(0, len(blob), PART_BYTES)):
        parts.append(prefix.with_name(f"{prefix.name}.part{n:02d}"))
        parts[-1].write_bytes(blob[start : start + PART_BYTES])
    print(f"packed {len(files)} files of {src}: {len(blob) / 2**20:.1f} MiB in {len(parts)} part(s)")
    return parts


def unpack(prefix: Path, dst: Path, ref_files: Sequence[str | Path]) -> bool:
    parts = sorted(prefix.parent.glob(prefix.name + ".part*"))
    if not parts:
        raise SystemExit(f"no {prefix}.partNN files")
    if dst.exists() and any(dst.iterdir()):
        raise SystemExit(f"{dst} is not empty; unpack into a new dir (nothing is overwritten)")
    refs = load_references(ref_files)
    files = pickle.loads(b"".join(p.read_bytes() for p in parts))
    bad = []
    for rel, (kind, payload, sha, meta) in files.items():
        out = dst / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        if kind == "raw":
            data = zlib.decompress(payload)
            out.write_bytes(data)
            ok = hashlib.sha256(data).hexdigest() == sha
        else:
            pairs = [(k, _decode(e, refs)) for k, e in payload]
            ok = content_sha256(pairs) == sha
            if kind == ".pt":
                torch.save(_nest(pairs), out)
            else:
                save_file({k[0]: t.contiguous() for k, t in pairs}, str(out), metadata=meta)
        if not ok:
            bad.append(rel)
    print(f"unpacked {len(files)} files into {dst}; " + (f"MISMATCH in {bad}" if bad else "every file checked"))
    return not bad


def seeded_embedding(out: Path, args: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from make_tiny_checkpoint import build_tiny_policy

    vla = build_tiny_policy(
        args.seed, num_images=1, pos_embed_init="sincos", llm_hidden_size=args.llm_hidden_size,
        vit_embed_dims=tuple(args.vit_embed_dims), llm_layers=args.llm_layers, vit_depth=args.vit_depth,
    ).vla  # fmt: skip
    torch.save({"embedding": vla.get_input_embeddings().weight.detach().clone()}, out)
    print(f"wrote {out}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=("pack", "unpack", "seeded-embedding"))
    p.add_argument("paths", nargs="+", type=Path)
    p.add_argument("--ref", nargs="*", default=[], help="reference tensor files (.pt / .safetensors)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--llm_layers", type=int, default=8)
    p.add_argument("--llm_hidden_size", type=int, default=256)
    p.add_argument("--vit_embed_dims", type=int, nargs=2, default=(128, 192))
    p.add_argument("--vit_depth", type=int, default=4)
    args = p.parse_args(argv)
    if args.command == "seeded-embedding":
        seeded_embedding(args.paths[0], args)
        return 0
    if len(args.paths) != 2:
        p.error(f"{args.command} takes two paths")
    if args.command == "pack":
        pack(args.paths[0], args.paths[1], args.ref)
        return 0
    return 0 if unpack(args.paths[0], args.paths[1], args.ref) else 1


if __name__ == "__main__":
    sys.exit(main())
