"""Can the bridge-attention L1 action head learn to read *where* a token is, when the features say it cleanly?

Why: every closed-loop learning attempt on the synthetic pick-and-lift task (issue 12) learned z, gripper and
rotation but predicted x/y like a constant (craft_progress.md, phase 5). This probe removes the VLM: the head
(`L1RegressionActionHead`, the real module) reads P synthetic "patch" tokens, each = background colour + a fixed
position code + noise, where one token has the target colour and one a distractor colour; the label's x/y is the
target token's column/row in [-1, 1] (the other 5 action dimensions are 0). Every LLM layer the head reads gets
the same tokens; the 64 action-query states are fixed random vectors, the same for every sample (as for a frozen
VLM with no instruction-dependent queries) except on --sparse "do not move" samples (all-zero action), where a
fixed cue is added to them, as the gripper state tells those frames apart in the real task. It measures how
long the head stays on the constant-predictor plateau as P, the loss, the gate initialisation, the block type
and label sparsity change.

    python experiments/head_localisation_probe.py --num_tokens 64 --steps 1500

prints held-out x/y L1 / the best constant's every --eval_every steps (1.0 = plateau). CPU, one thread, seeded.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prismatic.models.action_heads import L1RegressionActionHead  # noqa: E402

NUM_QUERIES = 64  # action-query positions the head reads after the task tokens


def make_batch(
    n: int, generator: torch.Generator, codes: dict[str, torch.Tensor], num_blocks: int, sparse: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Head input [n, blocks+1, P+64, D] and normalized actions [n, 8, 7] (x/y = the target's column/row)."""
    pos, colours, queries = codes["pos"], codes["colours"], codes["queries"]
    num_tokens, dim = pos.shape
    side = math.isqrt(num_tokens)
    target = torch.randint(num_tokens, (n,), generator=generator)
    distractor = torch.randint(num_tokens, (n,), generator=generator)
    rows = torch.arange(n)
    tokens = colours[0] + pos + 0.3 * torch.randn(n, num_tokens, dim, generator=generator)
    tokens[rows, target] += colours[1] - colours[0]
    tokens[rows, distractor] += colours[2] - colours[0]
    xy = torch.stack([(target % side).float(), (target // side).float()], 1) / (side - 1) * 2 - 1
    actions = torch.zeros(n, 8, 7)
    actions[:, :, :2] = xy[:, None]
    still = torch.rand(n, generator=generator) < sparse  # frames whose label says "do not move"
    actions[still] = 0
    # ... and say so in the query states (as the gripper state in proprio does in the real task), so the best
    # prediction given the input is still the target's position on the other frames.
    query_states = queries[None] + still[:, None, None, None] * codes["still"]
    hidden = torch.cat((tokens[:, None].expand(n, num_blocks + 1, -1, -1), query_states), dim=2)
    return hidden, actions


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    if math.isqrt(args.num_tokens) ** 2 != args.num_tokens:
        raise SystemExit(f"--num_tokens must be a square (a patch grid), got {args.num_tokens}")
    g = torch.Generator().manual_seed(args.seed)
    codes = {
        "pos": torch.randn(args.num_tokens, args.dim, generator=g) * 0.5,
        "colours": torch.randn(3, args.dim, generator=g),  # background, target, distractor
        "queries": torch.randn(args.num_blocks + 1, NUM_QUERIES, args.dim, generator=g),
        "still": torch.randn(args.dim, generator=g),  # the cue of a "do not move" frame
    }
    torch.manual_seed(args.seed)
    head = L1RegressionActionHead(
        input_dim=args.dim,
        hidden_dim=args.dim,
        num_blocks=args.num_blocks,
        num_task_tokens=args.num_tokens,
        num_heads=args.num_heads,
        use_pro_version=args.block == "pro",
    )
    with torch.no_grad():
        for block in head.model.mlp_resnet_blocks:
            block.gating_factor.fill_(args.gate_init)
    optimizer = torch.optim.AdamW(head.parameters(), lr=args.learning_rate, weight_decay=0.0)
    val_gen = torch.Generator().manual_seed(10_007)
    val_hidden, val_actions = make_batch(512, val_gen, codes, args.num_blocks, args.sparse)
    val_xy = val_actions[:, 0, :2]
    constant = (val_xy - val_xy.median(0).values).abs().mean().item()
    train_gen = torch.Generator().manual_seed(args.seed + 1)
    curve, t0 = [], time.time()
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            head.eval()
            with torch.no_grad():
                err = (head(val_hidden)[:, 0, :2] - val_xy).abs().mean().item()
            curve.append({"step": step, "xy_l1_over_constant": round(err / constant, 3)})
            print(json.dumps(curve[-1]), flush=True)
            head.train()
        if step == args.steps:
            break
        hidden, actions = make_batch(args.batch_size, train_gen, codes, args.num_blocks, args.sparse)
        err = head(hidden) - actions
        loss = err.abs().mean() if args.loss == "l1" else err.pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return {"flags": vars(args), "constant_xy_l1": constant, "curve": curve, "wall_s": round(time.time() - t0, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_tokens", type=int, default=256, help="P task tokens (a square grid)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--num_blocks", type=int, default=2)
    p.add_argument("--num_heads", type=int, default=8)
    p.add_argument("--block", choices=("pro", "original"), default="pro")
    p.add_argument("--loss", choices=("l1", "mse"), default="l1")
    p.add_argument("--gate_init", type=float, default=0.0, help="gating_factor at init (tanh of it gates the task)")
    p.add_argument("--sparse", type=float, default=0.0, help="share of samples whose action is all zero (cued)")
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--eval_every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the curve and flags as JSON here")
    args = p.parse_args()
    result = run(args)
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
