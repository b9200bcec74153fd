"""GradientSynchronizer's overlapped mode on 2 gloo processes: buckets launch during the backward, in order,
and the averaged gradients equal the single-process average of both ranks' micro-batches."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port
from torch import nn

from prismatic.training.distributed import JOIN_LIMIT_NUMEL, DistributedContext, GradientSynchronizer

WORLD = 2
MICRO_BATCHES = 2


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # Trainable but never in the graph; first in the buffer, hence in the last bucket, which launches in
        # reduce (a missing gradient must neither block the other buckets nor desynchronize the ranks).
        self.unused = nn.Linear(3, 3)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
        # Last in the buffer (so in the first bucket) but used at the input, so its gradient is final last: like
        # action_queries, it holds back the buffer-order launches until the learned order takes over.
        self.late = nn.Module()  # a submodule, so that parameters() lists it after body
        self.late.input_scale = nn.Parameter(torch.ones(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x * self.late.input_scale)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return Net()


def data(rank: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * rank + micro)
    return torch.randn(5, 8, generator=g), torch.randn(5, 4, generator=g)


def params(model: nn.Module) -> list[nn.Parameter]:
    return list(model.parameters())


def _worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )  # fmt: skip
    try:
        ctx = DistributedContext(rank=rank, world_size=WORLD, local_rank=rank, device=torch.device("cpu"))
        model = make_model()
        sync = GradientSynchronizer(params(model), ctx, overlap=True, bucket_numel=50)
        report = {"buckets": len(sync._overlap.bucket_ranges)}
        # An interrupted step: the last backward launches collectives, then "an exception" skips reduce (the
        # trainer then calls discard_step).
        x, y = data(rank, 0)
        sync.backward((model(x) - y).square().mean().mul(1e3), last=True)
        sync.discard_step()
        for step in range(2):  # twice: step 0 learns the launch order, step 1 uses it
            second = sync.new_buffer()
            for micro in range(MICRO_BATCHES):
                x, y = data(rank, micro)
                last = micro == MICRO_BATCHES - 1
                if last:
                    sync.reduce_now(second.fill_(float(rank + 1)))  # stands for CRaFT's g_ret
                sync.backward((model(x) - y).square().mean() / MICRO_BATCHES, last=last)
            report[f"launched_in_backward_{step}"] = len(sync._overlap.works)
            report[f"launch_log_{step}"] = list(sync._overlap.launch_log)
            report[f"hooks_{step}"] = sync._overlap.hooks_fired
            loss = torch.tensor([float(rank)])
            sync.reduce(loss)
            report[f"grads_{step}"] = sync.grad_buffer.clone()
            report[f"second_{step}"] = second.clone()
            report[f"loss_{step}"] = loss.clone()
        # all_reduce: buffers above JOIN_LIMIT_NUMEL in place, the small ones joined; all averaged
        big = torch.full((JOIN_LIMIT_NUMEL,), float(rank))
        small_a, small_b = torch.full((3,), 2.0 * rank), torch.ones(2)
        sync.all_reduce(big, small_a, small_b)
        report["all_reduce"] = (big.unique(), small_a.unique(), small_b.unique())
        report["order"] = list(sync._overlap.order)
        sync.close()
        report["hooks_after_close"] = sum(len(p._post_accumulate_grad_hooks or {}) for p in params(model))
        torch.save(report, Path(out) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_overlapped_buckets_average_like_one_process(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    reports = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    model = make_model()
    for rank in range(WORLD):
        for micro in range(MICRO_BATCHES):
            x, y = data(rank, micro)
            ((model(x) - y).square().mean() / (MICRO_BATCHES * WORLD)).backward()
    expected = torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel()) for p in params(model)])

    for report in reports:
        # buckets: 0 = [last layer, input_scale], 1 = [middle layer], 2 = [first layer], 3 = [unused layer]
        assert report["buckets"] == 4
        assert report["order"] == [1, 2, 0, 3]  # rank 0's completion order, learned in step 0
        assert report["hooks_after_close"] == 0
        assert [t.tolist() for t in report["all_reduce"]] == [[0.5], [1.0], [1.0]]
        for step in range(2):
            # before reduce: the reduce_now buffer and every bucket except the unused layer's
            assert report[f"launched_in_backward_{step}"] == report["buckets"]
        # step 0 (buffer order): bucket 0 waits for input_scale, the last gradient, and holds the others back;
        # step 1 (learned order): bucket 1 goes out while the backward still has gradients to deliver
        assert [b for b, _ in report["launch_log_0"]] == [0, 1, 2]
        assert all(fired == report["hooks_0"] for _, fired in report["launch_log_0"])
        assert [b for b, _ in report["launch_log_1"]] == [1, 2, 0]
        assert report["launch_log_1"][0][1] < report["hooks_1"]
        for step in range(2):  # the interrupted step before them left nothing behind
            torch.testing.assert_close(report[f"grads_{step}"], expected, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(report[f"second_{step}"], torch.full_like(expected, 1.5))
            torch.testing.assert_close(report[f"loss_{step}"], torch.tensor([0.5]))
    torch.testing.assert_close(reports[0]["grads_1"], reports[1]["grads_1"], rtol=0, atol=0)


def _one_process_step(sync: GradientSynchronizer, model: nn.Module, second: torch.Tensor) -> list[torch.Tensor]:
    """Two micro-batches into grad_buffer, each preceded by a backward into ``second`` (CRaFT's pattern)."""
    seen_during_backward = []
    for buffer in (sync.grad_buffer, second):
        buffer.fill_(float("nan"))  # stale contents: the step's first backward must remove them, memset or not
    for micro in range(MICRO_BATCHES):
        x, y = data(0, micro)
        out = model(x)
        sync.backward(out.square().mean() / MICRO_BATCHES, into=second, retain_graph=True)
        seen_during_backward.append(model.body[0].weight.grad)
        sync.backward((out - y).square().mean() / MICRO_BATCHES)
    sync.reduce()
    return seen_during_backward


def _autograd_sums(model: nn.Module) -> dict[str, torch.Tensor]:
    """What autograd accumulates in ``.grad`` over the micro-batches of :func:`_one_process_step`, one loss kind
    at a time, flattened in parameter order (zeros where no gradient arrived)."""
    sums = {}
    for kind in ("second", "act"):
        model.zero_grad(set_to_none=True)
        for micro in range(MICRO_BATCHES):
            x, y = data(0, micro)
            out = model(x)
            loss = out.square().mean() if kind == "second" else (out - y).square().mean()
            (loss / MICRO_BATCHES).backward()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params(model)]
        sums[kind] = torch.cat([g.reshape(-1) for g in grads])
    return sums


@pytest.mark.parametrize("micro_batches_steps", [1, 3])
def test_collect_mode_sums_what_autograd_accumulates(micro_batches_steps: int) -> None:
    """collect mode (``.grad`` None in the backward, one foreach copy/add after it, no memset) sums exactly
    what autograd accumulates in ``.grad`` (the views mode of overlap accumulates the same way), for two
    buffers, micro-batches, a parameter without gradient (its slot must be zeroed, not left stale) and repeated
    steps; afterwards ``.grad`` are views of the gradient buffer (what the optimizer and clipping read)."""
    ctx = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    model = make_model()
    sync = GradientSynchronizer(params(model), ctx)
    assert sync.collect_mode
    second = sync.new_buffer()
    for _ in range(micro_batches_steps):
        during = _one_process_step(sync, model, second)
    assert all(g is None for g in during), "collect mode leaves .grad empty during the backward"
    for p, view in zip(sync.params, sync.views(sync.grad_buffer)):
        assert p.grad is not None
        assert p.grad.data_ptr() == view.data_ptr()
    expected = _autograd_sums(make_model())
    assert torch.equal(sync.grad_buffer, expected["act"])
    assert torch.equal(second, expected["second"])
    n_unused = sum(p.numel() for p in make_model().unused.parameters())
    assert sync.grad_buffer[:n_unused].abs().max() == 0  # no gradient reached it: zero, not stale
    assert sync.grad_buffer[n_unused:].abs().max() > 0


def test_collect_mode_backward_after_sync_adds_once() -> None:
    """A backward after sync_grads accumulates into the attached views, once; binding another buffer afterwards
    neither adds the gradients again nor leaves them attached."""
    ctx = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    model = make_model()
    sync = GradientSynchronizer(params(model), ctx)
    x, y = data(0, 0)
    (model(x) - y).square().mean().backward()
    sync.sync_grads()
    once = sync.grad_buffer.clone()
    (model(x) - y).square().mean().backward()  # in place, into the views
    other = sync.new_buffer()
    sync.bind(other)
    torch.testing.assert_close(sync.grad_buffer, 2 * once, rtol=1e-6, atol=0)
    assert all(p.grad is None for p in sync.params)
    assert other.abs().max() == 0


class _FailInBackward(torch.autograd.Function):
    """Identity whose backward raises: autograd has already written the gradients of the layers after it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("failing half-way through the backward")


def _plain_step(sync: GradientSynchronizer, model: nn.Module) -> None:
    """Two micro-batches into the gradient buffer only (no CRaFT buffer, so nothing rebinds in between)."""
    for micro in range(MICRO_BATCHES):
        x, y = data(0, micro)
        sync.backward((model(x) - y).square().mean() / MICRO_BATCHES, last=micro == MICRO_BATCHES - 1)
    sync.reduce()


@pytest.mark.parametrize("after_a_step", [False, True])
def test_collect_mode_interrupted_backward_leaves_nothing_behind(after_a_step: bool) -> None:
    """A backward that raises part-way (after some parameters got gradients), then ``discard_step`` (what
    ``Trainer.step`` calls), then a clean step: the same buffer, bit for bit, as a fresh synchronizer's clean
    step. ``after_a_step``: the failure comes after a finished step, when ``.grad`` are the buffer's views."""
    ctx = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    model = make_model()
    sync = GradientSynchronizer(params(model), ctx)
    if after_a_step:
        _plain_step(sync, model)
    x, y = data(0, 0)
    hidden = _FailInBackward.apply(model.body[:2](x * model.late.input_scale))
    with pytest.raises(RuntimeError, match="half-way"):
        sync.backward((model.body[2:](hidden) - y).square().mean().mul(1e3))
    sync.discard_step()
    _plain_step(sync, model)

    fresh_model = make_model()
    fresh = GradientSynchronizer(params(fresh_model), ctx)
    _plain_step(fresh, fresh_model)
    assert torch.equal(sync.grad_buffer, fresh.grad_buffer)
