"""Process-group set-up and explicit gradient synchronization.

We do not wrap the model in ``DistributedDataParallel``. Instead every trainable parameter (the VLA's LoRA
weights, ``action_queries``, the action head and the proprio projector alike) is registered with one
:class:`GradientSynchronizer`, which all-reduces the flattened gradients once per optimizer step, after the
last micro-batch. Why:

* accumulation needs no ``no_sync`` bookkeeping: micro-batches only accumulate locally;
* CRaFT needs ``g_act`` and ``g_ret`` *both* averaged over ranks before it projects; with an explicit
  synchronizer both go through the same call, and no second backward escapes the all-reduce;
* upstream's bug (head and projector called through ``.module`` so their gradients were never reduced)
  cannot happen: synchronization is by parameter list, not by module wrapper.

By default the all-reduce runs after the backward. With ``overlap=True`` the gradient buffer is cut into
buckets of whole parameters and, during the step's last backward, parameter hooks launch each bucket's
all-reduce as soon as it and every bucket before it in the launch order are final, while the backward
continues. The launch order is the buffer's end first (head, LLM, vision) for the first step, then the order in
which rank 0 saw the buckets complete (broadcast once). Every rank always uses the same order, so ranks issue
identical collective sequences even if a parameter received no gradient (its bucket then waits for
:meth:`GradientSynchronizer.reduce`).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in the job. ``world_size == 1`` means no process group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()


def init_distributed(device: str = "auto", timeout_s: int = 1800) -> DistributedContext:
    """Join the ``torchrun`` process group if one is described by the environment.

    ``device``: "auto" (CUDA if available, else CPU), "cuda" or "cpu". NCCL is used on CUDA, gloo on CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device='cuda' was requested but CUDA is not available")
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    elif device == "cpu":
        torch_device = torch.device("cpu")
    else:
        raise ValueError(f"device must be 'auto', 'cuda' or 'cpu', got {device!r}")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        kwargs = {"device_id": torch_device} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device)


def shutdown_distributed(ctx: DistributedContext) -> None:
    """End the process group cleanly: a barrier first, since gloo can abort when a peer exits early."""
    if ctx.is_distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def abort_distributed(ctx: DistributedContext) -> None:
    """Tear the process group down after an error, without a barrier that failed peers would never reach."""
    if ctx.is_distributed and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_parameters(params: Sequence[torch.nn.Parameter], ctx: DistributedContext) -> None:
    """Make every rank start from rank 0's values (what DDP does at construction)."""
    if not ctx.is_distributed or not params:
        return
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    dist.broadcast(flat, src=0)
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(flat[offset : offset + n].view_as(p))
            offset += n


def all_reduce_mean(tensor: torch.Tensor, ctx: DistributedContext) -> torch.Tensor:
    """Average a tensor over ranks in place (no-op for one process) and return it."""
    if ctx.is_distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(ctx.world_size)
    return tensor


JOIN_LIMIT_NUMEL = 1 << 20  # buffers at least this large get their own all-reduce instead of a joined copy


class GradientSynchronizer:
    """Owns the gradients of a fixed list of fp32 parameters in flat buffers.

    A step's gradients end up in one flat fp32 buffer, so the all-reduce is a single collective over one
    contiguous tensor and the optimizer and CRaFT see each parameter's ``.grad`` as a view into it.
    The buffer holds the parameters in the order given (``offsets``); :meth:`offsets_of` finds a run of them.

    A trainer needs two calls per step (plus :meth:`discard_step` if a step is abandoned by an exception)::

        for i, batch in enumerate(micro_batches):
            sync.backward(retention_loss, into=g_ret, last=i == n - 1, retain_graph=True)  # CRaFT only
            sync.backward(action_loss, last=i == n - 1)
        sync.reduce(loss_vector)        # every buffer + the losses averaged over ranks; .grad ready
        optimizer.step()

    Buffers are zeroed by the first backward into them in a step, so what :meth:`reduce` left stays readable
    until the next step begins (the optimizer, CRaFT's gradient transform). The methods below the step surface
    (``bind``, ``collect``, ``reduce_now``, ...) are its building blocks.

    How a backward's gradients reach the bound buffer (same sums, bit for bit):

    * ``collect`` mode (without overlap): during the backward ``.grad`` is ``None``, so autograd hands
      each parameter its fresh gradient tensor without a kernel; :meth:`collect` (the trainer calls it after
      every backward), :meth:`bind` or :meth:`sync_grads` adds them all into the buffer with one
      ``_foreach_add_`` (a handful of launches; a copy, and no memset before it, for the first backward into
      a :meth:`clear`-ed buffer). Accumulating into views instead costs one add kernel per parameter and
      backward: ~1,100 tiny kernels a step for the full model's 800 LoRA/head tensors (docs/BENCHMARKS.md,
      log item 15).
    * ``views`` mode (overlap): ``.grad`` is a view into the buffer during the backward, autograd accumulates
      in place, and the overlap hooks reduce buckets of the buffer as they become final.
    """

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        ctx: DistributedContext,
        overlap: bool = False,
        bucket_numel: int = 25_000_000,
    ) -> None:
        self.params = [p for p in params if p.requires_grad]
        bad = [tuple(p.shape) for p in self.params if p.dtype != torch.float32]
        if bad:
            raise TypeError(f"trainable parameters must be fp32 (autocast handles bf16 compute); got {bad[:3]}")
        devices = {p.device for p in self.params}
        if len(devices) > 1:
            raise ValueError(f"trainable parameters live on several devices: {devices}")
        self.ctx = ctx
        self.device = next(iter(devices)) if devices else ctx.device
        # offsets[i]: where parameter i starts; offsets[-1]: the buffer size
        self.offsets, end = [], 0
        for p in self.params:
            self.offsets.append(end)
            end += p.numel()
        self.offsets.append(end)
        self.numel = end
        self.grad_buffer = self.new_buffer()
        self._views: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {}  # id(buffer) -> (buffer, views)
        self._overlap = _OverlappedReduction(self, bucket_numel) if overlap and ctx.is_distributed else None
        self.collect_mode = self._overlap is None
        self._attached = False  # collect mode: .grad are views of grad_buffer (after sync_grads)
        self._cleared: set[int] = set()  # collect mode: ids of buffers that are logically zero (see clear)
        self._bound: torch.Tensor | None = None
        self.bind(self.grad_buffer)
        self._queued: list[torch.Tensor] = []  # buffers handed to reduce_now, not yet reduced
        self._step_buffers: set[int] | None = None  # ids of the buffers the open step wrote; None: no open step

    # --- the step surface ---
    def backward(
        self, loss: torch.Tensor, into: torch.Tensor | None = None, *, last: bool = False, retain_graph: bool = False
    ) -> None:
        """Back-propagate ``loss`` and add its gradients to ``into`` (default: the gradient buffer).

        The first backward after :meth:`reduce` (or :meth:`discard_step`) opens a new step; the first backward
        into a buffer within a step overwrites it instead of adding. ``last=True`` marks the step's last
        backward into that buffer: with overlap the gradient buffer's buckets are reduced while this backward
        runs and another buffer's reduction is launched right after it; without overlap everything is reduced
        in :meth:`reduce`.
        """
        buffer = self.grad_buffer if into is None else into
        self._open_step(buffer)
        self._ensure_bound(buffer)
        if last and buffer is self.grad_buffer:
            self.begin_last_backward()
        loss.backward(retain_graph=retain_graph)
        self.collect()  # into the buffer now: with CUDA graphs the next replay reuses the gradients' memory
        if last and buffer is not self.grad_buffer:
            self.reduce_now(buffer)

    def reduce(self, *extra: torch.Tensor) -> None:
        """Close the step: average the gradient buffer, the other buffers of ``backward(..., last=True)`` and
        ``extra`` (e.g. a loss vector) over ranks, in place; ``.grad`` are then views of the gradient buffer."""
        self._open_step(self.grad_buffer)  # a step without any backward into it reduces zeros, not stale values
        self._ensure_bound(self.grad_buffer)
        self.sync_grads(*extra)
        self._step_buffers = None

    def discard_step(self) -> None:
        """Abandon an open step (an exception between its backwards and :meth:`reduce`): its pending
        collectives are awaited and dropped, and the next backward starts from zeroed buffers."""
        if self._overlap is not None:
            self._overlap.reset()
        if self.collect_mode:  # a backward that raised part-way left some gradients in .grad: drop them
            self._detach()
        self._queued = []
        self._step_buffers = None

    def _ensure_bound(self, buffer: torch.Tensor) -> None:
        """:meth:`bind` only when needed: another buffer was bound, the optimizer's attached views are still in
        place (collect mode), or something reset ``.grad`` (views mode). A plain step then rebinds nothing: a
        bind walks all ~800 parameters on the host."""
        stale_views = not self.collect_mode and bool(self.params) and self.params[0].grad is None
        if buffer is not self._bound or self._attached or stale_views:
            self.bind(buffer)

    def _open_step(self, buffer: torch.Tensor) -> None:
        if self._step_buffers is None:
            self.discard_step()  # nothing of an earlier, unfinished step may leak into this one
            self._step_buffers = set()
        if id(buffer) not in self._step_buffers:
            self.clear(buffer)
            self._step_buffers.add(id(buffer))

    def offsets_of(self, params: Sequence[torch.nn.Parameter]) -> list[int]:
        """Where ``params`` lie in the flat buffers: [start of params[0], ..., start of params[-1], end].

        Matched by identity; they must be registered and one contiguous run in buffer order, else ValueError."""
        index = {id(p): i for i, p in enumerate(self.params)}
        unknown = [f"#{k} {tuple(p.shape)}" for k, p in enumerate(params) if id(p) not in index]
        if unknown:
            raise ValueError(f"{len(unknown)} parameters not registered with this synchronizer: {unknown[:5]}")
        if not params:
            raise ValueError("no parameters given")
        first = index[id(params[0])]
        for k, p in enumerate(params):
            if index[id(p)] != first + k:
                raise ValueError(
                    f"parameters are not one contiguous run of the gradient buffer: #{k} {tuple(p.shape)} is "
                    f"registered at {index[id(p)]}, expected {first + k} (right after #{k - 1})"
                )
        return self.offsets[first : first + len(params) + 1]

    def new_buffer(self) -> torch.Tensor:
        """A zeroed flat fp32 buffer with one slot per registered parameter element."""
        return torch.zeros(self.numel, dtype=torch.float32, device=self.device)

    def views(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        """Each parameter's slice of ``buffer``, shaped like the parameter (made once per buffer)."""
        cached = self._views.get(id(buffer))
        if cached is None or cached[0] is not buffer:
            if buffer.numel() != self.numel:
                raise ValueError(f"buffer has {buffer.numel()} elements, expected {self.numel}")
            views = [buffer[lo : lo + p.numel()].view_as(p) for p, lo in zip(self.params, self.offsets)]
            cached = self._views[id(buffer)] = (buffer, views)
        return cached[1]

    def bind(self, buffer: torch.Tensor) -> None:
        """Make ``buffer`` where the next backward's gradients accumulate (after collecting the previous
        backward's into the buffer bound before)."""
        views = self.views(buffer)
        if self.collect_mode:
            self._collect()
            self._detach()
        else:
            for p, v in zip(self.params, views):
                p.grad = v
        self._bound = buffer

    def collect(self) -> None:
        """Move the last backward's gradients into the bound buffer now (collect mode; no-op otherwise).

        Call after every backward: with CUDA graphs those gradients live in the graph pool, and the next
        micro-batch's replay (``cudagraph_mark_step_begin``) reuses that memory."""
        if self.collect_mode:
            self._collect()

    def _collect(self) -> None:
        """collect mode: add the gradients autograd left in ``.grad`` into the bound buffer; ``.grad`` -> None.

        After :meth:`sync_grads` attached the buffer's views, a backward accumulates into them in place:
        nothing to add then."""
        if self._bound is None or self._attached:
            return
        targets, grads, missing = [], [], []
        for p, v in zip(self.params, self.views(self._bound)):
            if p.grad is None:
                missing.append(v)
            else:
                targets.append(v)
                grads.append(p.grad)
        if id(self._bound) in self._cleared:  # logically zero: overwrite, and zero what got no gradient
            self._cleared.discard(id(self._bound))
            if targets:
                torch._foreach_copy_(targets, grads)
            if missing:
                torch._foreach_zero_(missing)
        elif targets:
            torch._foreach_add_(targets, grads)
        self._detach()

    def clear(self, buffer: torch.Tensor) -> None:
        """Zero ``buffer`` for a new step. In collect mode no memset: the buffer is marked, and its first
        collection writes every element (a copy instead of an add)."""
        if self.collect_mode:
            self.views(buffer)  # validates the size
            self._cleared.add(id(buffer))
        else:
            buffer.zero_()

    def _detach(self) -> None:
        for p in self.params:
            p.grad = None
        self._attached = False

    def _attach(self) -> None:
        """collect mode: point ``.grad`` at the gradient buffer's views for clipping and the optimizer."""
        for p, v in zip(self.params, self.views(self.grad_buffer)):
            p.grad = v
        self._attached = True

    def all_reduce(self, *buffers: torch.Tensor) -> None:
        """Average flat fp32 buffers over ranks, in place (no-op for one process).

        Large buffers (gradients, CRaFT's g_ret) are reduced where they are, one collective each; concatenating
        them would copy ~2 GB twice per CRaFT step. Small ones (loss vectors) share one joined collective.
        """
        if not self.ctx.is_distributed or not buffers:
            return
        small = [b for b in buffers if b.numel() < JOIN_LIMIT_NUMEL]
        for b in buffers:
            if b.numel() >= JOIN_LIMIT_NUMEL:
                all_reduce_mean(b, self.ctx)
        if small:
            joined = torch.cat([b.reshape(-1) for b in small])
            all_reduce_mean(joined, self.ctx)
            offset = 0
            for b in small:
                b.copy_(joined[offset : offset + b.numel()].view_as(b))
                offset += b.numel()

    def close(self) -> None:
        """Remove the overlap hooks from the parameters (they keep this synchronizer's buffers alive)."""
        if self._overlap is not None:
            self._overlap.close()
            self._overlap = None

    def begin_last_backward(self) -> None:
        """Call before the step's last backward into ``grad_buffer``: with overlap, its hooks start reducing."""
        if self._overlap is not None:
            self._overlap.arm()

    def reduce_now(self, buffer: torch.Tensor) -> None:
        """``buffer`` is final: all-reduce it now (overlap) or together with the gradients in :meth:`sync_grads`."""
        if self._overlap is not None:
            self._overlap.launch_buffer(buffer)
        else:
            self._queued.append(buffer)

    def sync_grads(self, *extra: torch.Tensor) -> None:
        """Average the gradient buffer, the buffers given to :meth:`reduce_now` and ``extra`` (e.g. a loss
        vector) over ranks, in place. Without overlap all of it happens here, after the backward; with it, the
        remaining buckets and buffers are launched and every pending reduction is awaited."""
        queued, self._queued = self._queued, []
        if self.collect_mode:
            self._collect()
            self._attach()
        if self._overlap is not None:
            self._overlap.finish(extra)
        else:
            self.all_reduce(self.grad_buffer, *queued, *extra)


class _OverlappedReduction:
    """Bucketed, hook-driven asynchronous all-reduce of a :class:`GradientSynchronizer`'s gradient buffer.

    Buckets are contiguous runs of whole parameters, cut from the buffer's end (the head, whose gradients are
    final first) to its start. They launch in ``order``: at first buffer-end first; after the first overlapped
    step, in the order rank 0 saw them complete (broadcast, so every rank keeps issuing the same collectives).
    That order matters: a parameter used at the LLM input (``action_queries``) gets its gradient only after the
    vision backward, and in buffer order it would hold back every bucket behind it.
    """

    def __init__(self, sync: GradientSynchronizer, bucket_numel: int) -> None:
        if bucket_numel < 1:
            raise ValueError(f"bucket_numel must be >= 1, got {bucket_numel}")
        self.sync = sync
        self.bucket_ranges: list[tuple[int, int]] = []
        self.param_bucket: list[int] = [0] * len(sync.params)
        hi = sync.numel
        for index in reversed(range(len(sync.params))):
            lo = sync.offsets[index]
            self.param_bucket[index] = len(self.bucket_ranges)
            if hi - lo >= bucket_numel or index == 0:
                self.bucket_ranges.append((lo, hi))
                hi = lo
        self.bucket_sizes = [self.param_bucket.count(b) for b in range(len(self.bucket_ranges))]
        self.order = list(range(len(self.bucket_ranges)))
        self.order_learned = False
        self.works: list[tuple[torch.Tensor, object]] = []
        self._start_step(armed=False)
        self.handles = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(sync.params)]

    def _hook(self, index: int):  # noqa: ANN202 - a hook closure
        def hook(_: torch.Tensor) -> None:
            if not self.armed:
                return
            self.hooks_fired += 1
            bucket = self.param_bucket[index]
            self.pending[bucket] -= 1
            if self.pending[bucket] == 0:
                self.completed.append(bucket)
            while self.position < len(self.order) and self.pending[self.order[self.position]] == 0:
                self._launch_next()

        return hook

    def _start_step(self, armed: bool) -> None:
        """Per-step bookkeeping of the hooks (``works`` is left alone)."""
        self.armed = armed
        self.pending = list(self.bucket_sizes)  # gradients each bucket still waits for
        self.position = 0  # index into ``order`` of the next bucket to launch
        self.completed: list[int] = []  # buckets in the order their last gradient arrived
        self.launch_log: list[tuple[int, int]] = []  # (bucket, hooks fired so far)
        self.hooks_fired = 0

    def arm(self) -> None:
        if self.sync._bound is not self.sync.grad_buffer:
            raise RuntimeError("begin_last_backward: the gradient buffer must be bound")
        self._start_step(armed=True)  # works may already hold this step's reduce_now buffers (g_ret): keep them

    def reset(self) -> None:
        """Forget a step that did not reach :meth:`finish` (an exception): wait out its collectives, disarm."""
        for _, work in self.works:
            work.wait()
        self.works = []
        self._start_step(armed=False)

    def _launch_next(self) -> None:
        bucket = self.order[self.position]
        lo, hi = self.bucket_ranges[bucket]
        self.launch_buffer(self.sync.grad_buffer[lo:hi])
        self.launch_log.append((bucket, self.hooks_fired))
        self.position += 1

    def launch_buffer(self, buffer: torch.Tensor) -> None:
        self.works.append((buffer, dist.all_reduce(buffer, op=dist.ReduceOp.SUM, async_op=True)))

    def finish(self, extra: Sequence[torch.Tensor]) -> None:
        armed = self.armed
        if armed:
            while self.position < len(self.order):  # buckets whose hooks did not all fire
                self._launch_next()
        else:  # no begin_last_backward this step: reduce the whole buffer now
            self.launch_buffer(self.sync.grad_buffer)
        self.armed = False
        for buffer in extra:
            self.launch_buffer(buffer)
        works, self.works = self.works, []
        world = self.sync.ctx.world_size
        for buffer, work in works:
            work.wait()
            buffer.div_(world)
        if armed and not self.order_learned:
            self._learn_order()

    def _learn_order(self) -> None:
        """Adopt rank 0's completion order of this step's buckets (one small broadcast, once)."""
        observed = self.completed + [b for b in range(len(self.bucket_ranges)) if b not in self.completed]
        order = torch.tensor(observed, dtype=torch.int64, device=self.sync.device)
        dist.broadcast(order, src=0)
        self.order = order.tolist()
        self.order_learned = True

    def close(self) -> None:
        self.reset()
        for handle in self.handles:
            handle.remove()
        self.handles = []
