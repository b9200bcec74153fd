"""Latency of one batched ``predict_action`` call, as the closed-loop evaluation makes it (one call per round of
worker queries): prompt ids + 2 images + proprio -> an un-normalized 8 x 7 action chunk per row.

By default the model is the full-size VLA-Adapter architecture (experiments/assets/openvla_config.json: Qwen2.5-0.5B,
DINOv2 + SigLIP, Pro head with 24 blocks) with random weights, on a GPU in bf16, as upstream evaluates; inputs are
real LIBERO prompts and random pixels (the compute does not depend on the values). Torch only (no tensorflow):
the CPU-side image path of the eval is timed separately by ``--observation_path`` on a machine with tensorflow.

    python experiments/bench_policy_latency.py --batch_sizes 1 8 16 --reps 30 [--out bench_out/policy_latency.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from prismatic.extern.hf.configuration_prismatic import OpenVLAConfig  # noqa: E402
from prismatic.extern.hf.modeling_prismatic import OpenVLAForActionPrediction  # noqa: E402
from prismatic.models.action_heads import L1RegressionActionHead  # noqa: E402
from prismatic.models.projectors import ProprioProjector  # noqa: E402
from prismatic.vla.constants import ACTION_DIM, NUM_ACTIONS_CHUNK, PROPRIO_DIM  # noqa: E402
from prismatic.vla.prompting import PromptTokenizer  # noqa: E402
from prismatic.vla.tokenizer import load_qwen_tokenizer  # noqa: E402

CONFIG = REPO / "experiments" / "assets" / "openvla_config.json"
INSTRUCTIONS = [  # libero_spatial's, so prompt lengths are the real ones
    "pick up the black bowl between the plate and the ramekin and place it on the plate",
    "pick up the black bowl next to the ramekin and place it on the plate",
    "pick up the black bowl from table center and place it on the plate",
    "pick up the black bowl on the cookie box and place it on the plate",
]


def build_policy(device: torch.device, dtype: torch.dtype) -> tuple:
    config = OpenVLAConfig.from_pretrained(CONFIG)
    config.norm_stats = {"bench": {"action": {"q01": [-1.0] * 7, "q99": [1.0] * 7, "mask": [True] * 6 + [False]}}}
    with torch.device(device):
        vla = OpenVLAForActionPrediction(config)
        head = L1RegressionActionHead(
            input_dim=config.llm_hidden_size,
            hidden_dim=config.llm_hidden_size,
            action_dim=ACTION_DIM,
            num_actions_chunk=NUM_ACTIONS_CHUNK,
            num_blocks=config.num_llm_layers,
            num_task_tokens=2 * config.num_patches_per_image,
            use_pro_version=True,
        )
        proprio = ProprioProjector(config.llm_hidden_size, PROPRIO_DIM)
    for module in (vla, head, proprio):
        module.to(dtype=dtype).eval().requires_grad_(False)
    return vla, head, proprio


def time_batch(vla, head, proprio, tokenizer: PromptTokenizer, batch: int, reps: int, warmup: int, device) -> dict:
    instructions = [INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(batch)]
    ids, mask = tokenizer.batch_inference_ids(instructions)
    ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
    dtype = next(vla.parameters()).dtype
    pixels = torch.randn(batch, 12, 224, 224, device=device, dtype=dtype)
    state = torch.rand(batch, PROPRIO_DIM, device=device) * 2 - 1
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup + reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        actions, _ = vla.predict_action(ids, pixels, head, state, proprio, unnorm_key="bench", attention_mask=mask)
        # predict_action returns numpy actions: the device work is finished when it returns
        if i >= warmup:
            times.append(1000.0 * (time.perf_counter() - start))
    assert actions.shape == (batch, NUM_ACTIONS_CHUNK, ACTION_DIM)
    row = {
        "batch": batch,
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "ms_per_chunk": statistics.median(times) / batch,
    }
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def time_observation_path(reps: int) -> dict:
    """CPU time of the eval's image + proprio path for one observation (needs tensorflow)."""
    from experiments.robot.observations import libero_proprio, policy_images

    rng = np.random.default_rng(0)
    obs = {
        "agentview_image": rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
        "robot0_eye_in_hand_image": rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
        "robot0_eef_pos": np.zeros(3),
        "robot0_eef_quat": np.array([1.0, 0.0, 0.0, 0.0]),
        "robot0_gripper_qpos": np.zeros(2),
    }
    policy_images(obs, 2, crop=True)  # tensorflow start-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        policy_images(obs, 2, crop=True)
        libero_proprio(obs)
        times.append(1000.0 * (time.perf_counter() - start))
    return {"observation_path_median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--observation_path", action="store_true", help="time the CPU image path instead")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.observation_path:
        report = time_observation_path(args.reps)
    else:
        device = torch.device(args.device)
        vla, head, proprio = build_policy(device, getattr(torch, args.dtype))
        tokenizer = PromptTokenizer(load_qwen_tokenizer())
        rows = [time_batch(vla, head, proprio, tokenizer, b, args.reps, args.warmup, device) for b in args.batch_sizes]
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        report = {"device": name, "dtype": args.dtype, "torch": torch.__version__, "rows": rows}
        print(f"{'batch':>5} {'median ms':>10} {'min':>8} {'max':>8} {'ms/chunk':>9}  ({name}, {args.dtype})")
        for r in rows:
            print(
                f"{r['batch']:>5} {r['median_ms']:>10.1f} {r['min_ms']:>8.1f} {r['max_ms']:>8.1f} "
                f"{r['ms_per_chunk']:>9.2f}"
            )
    report["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    print(json.dumps(report))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
