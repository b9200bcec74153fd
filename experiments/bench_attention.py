"""Forward + backward time of the policy's attention shapes under each SDPA backend (torch-only, GPU).

Which backend PyTorch picks (cuDNN, flash, memory-efficient) changes with version, mask and head size; a
train step of the full policy spends ~20 ms in attention (docs/BENCHMARKS.md, run F). This measures the
three hot shapes at batch 16 in isolation so a backend choice can be made from numbers:

* LLM (Qwen2.5-0.5B): 14 query heads over 2 KV heads (expanded, as transformers' SDPA path does), head 64,
  617 positions, causal, as ``is_causal`` and as an explicit boolean mask;
* DINOv2 ViT-L/14 with 4 registers: 16 heads, head 64, 261 tokens, 2 images per sample;
* SigLIP so400m/14: 16 heads, head 72, 256 tokens, 2 images per sample.

    python experiments/bench_attention.py --batch_size 16 --out_dir bench_out
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {
    "default": None,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


@dataclass(frozen=True)
class Shape:
    name: str
    batch_mult: int  # sequences per sample (images per sample for the ViTs)
    heads: int
    seq: int
    head_dim: int
    causal: str  # "none" | "is_causal" | "mask"


SHAPES = (
    Shape("llm_is_causal", 1, 14, 617, 64, "is_causal"),
    Shape("llm_bool_mask", 1, 14, 617, 64, "mask"),
    Shape("dinov2", 2, 16, 261, 64, "none"),
    Shape("siglip", 2, 16, 256, 72, "none"),
)


def attention_flops(shape: Shape, batch: int) -> float:
    """FLOPs of forward (QK^T, PV) plus backward (recomputed QK^T, dV, dP, dQ, dK: 2.5x the forward); the
    causal shapes are counted in full, as if unmasked."""
    b = batch * shape.batch_mult
    forward = 4 * b * shape.heads * shape.seq * shape.seq * shape.head_dim
    return 3.5 * forward


def time_backend(shape: Shape, batch: int, backend: str, steps: int, device: torch.device) -> dict:
    b = batch * shape.batch_mult
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (
        torch.randn(
            b, shape.heads, shape.seq, shape.head_dim, device=device, dtype=torch.bfloat16, generator=g
        ).requires_grad_(True)
        for _ in range(3)
    )
    mask = None
    if shape.causal == "mask":
        mask = torch.ones(shape.seq, shape.seq, dtype=torch.bool, device=device).tril()[None, None]
    grad = torch.randn_like(q)

    def step() -> None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=shape.causal == "is_causal")
        out.backward(grad)

    ctx = sdpa_kernel([BACKENDS[backend]]) if BACKENDS[backend] is not None else torch.enable_grad()
    try:
        with ctx:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                step()
            end.record()
            torch.cuda.synchronize()
    except RuntimeError as err:  # backend not available for this shape/mask
        return {"shape": shape.name, "backend": backend, "error": str(err).splitlines()[0][:200]}
    ms = start.elapsed_time(end) / steps
    return {
        "shape": shape.name,
        "backend": backend,
        "ms_fwd_bwd": ms,
        "tflops": attention_flops(shape, batch) / ms / 1e9,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out_dir", default=os.environ.get("OUT") or "bench_out")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention needs a CUDA device")
    device = torch.device("cuda")
    rows = [
        time_backend(shape, args.batch_size, backend, args.steps, device) for shape in SHAPES for backend in BACKENDS
    ]
    print(f"{'shape':>14} | {'backend':>9} | {'ms fwd+bwd':>10} | {'TFLOP/s':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:>14} | {r['backend']:>9} | unavailable: {r['error'][:80]}")
        else:
            print(f"{r['shape']:>14} | {r['backend']:>9} | {r['ms_fwd_bwd']:10.3f} | {r['tflops']:8.1f}")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "attention",
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "shapes": [asdict(s) for s in SHAPES],
        "results": rows,
    }
    (out / "bench_attention.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
