"""Vocab-parallel cross-entropy across processes: the vocabulary split over 2 ranks on this machine
(gloo over loopback, one torch thread per rank, so the 2 cores are both used), forward+backward.

Providers, each timed on rank 0 with a barrier before every call (both ranks run identical loops):
- ``alchemy_ops``: ``ao.distributed.vocab_parallel_cross_entropy`` (fused shard kernel, one
  all-gather of [N, 6] statistics, backward with no collective);
- ``Megatron-style``: the usual composition of torch ops, as in Megatron-LM's vocab-parallel
  cross-entropy (all-reduces of the max, the target logit and the sum of exps; the softmax of the
  shard saved for backward).
"""

from __future__ import annotations

import os
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .harness import peak_extra_memory

PRESETS = {"tiny": [(64, 1000)], "quick": [(4096, 32000)], "full": [(4096, 32000), (1024, 131072)]}
WORLD = 2


class _MegatronStyle(torch.autograd.Function):
    """Megatron-LM's algorithm in plain torch ops: three all-reduces, the shard's softmax saved."""

    @staticmethod
    def forward(ctx, logits, target, start):
        x = logits.float()
        top = x.amax(1)
        dist.all_reduce(top, dist.ReduceOp.MAX)
        x = x - top[:, None]
        column = target - start
        owned = (column >= 0) & (column < x.shape[1])
        column = column.clamp(0, x.shape[1] - 1)
        picked = x.gather(1, column[:, None]).squeeze(1) * owned
        dist.all_reduce(picked)
        exp = x.exp_()
        total = exp.sum(1)
        dist.all_reduce(total)
        exp.div_(total[:, None])
        ctx.save_for_backward(exp, column, owned)
        return total.log() - picked

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, column, owned = ctx.saved_tensors
        grad = softmax.clone()
        grad[torch.arange(grad.shape[0]), column] -= owned.float()
        return grad * grad_loss[:, None], None, None


def _providers(target: torch.Tensor, start: int):
    import alchemy_ops as ao

    return {
        "alchemy_ops": lambda z: ao.distributed.vocab_parallel_cross_entropy(z, target),
        "Megatron-style": lambda z: _MegatronStyle.apply(z, target, start).mean(),
    }


def _timed(fn, warmup: int, reps: int) -> tuple[list[float], float]:
    for _ in range(warmup):
        fn()
    walls, cpu0 = [], time.process_time()
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
    return walls, (time.process_time() - cpu0) / sum(walls)


def _worker(rank: int, port: int, shapes, warmup: int, reps: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    rows = []
    for n, vocab in shapes:
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(n, vocab, generator=g) * 3
        target = torch.randint(0, vocab, (n,), generator=g)
        size = vocab // WORLD
        start = rank * size
        local = logits[:, start : start + size].contiguous()
        del logits
        losses = {}
        for name, loss_fn in _providers(target, start).items():

            def run(loss_fn=loss_fn, local=local):
                z = local.detach().requires_grad_()
                loss = loss_fn(z)
                loss.backward()
                return loss.detach()

            losses[name] = run()
            walls, cpu_per_wall = _timed(run, warmup, reps)
            extra = peak_extra_memory(run, "cpu")
            q = statistics.quantiles(walls, n=5, method="inclusive")
            rows.append({
                "op": "vocab_parallel_cross_entropy", "mode": "forward+backward", "dtype": "float32",
                "shape": [n, vocab], "world": WORLD, "provider": name,
                "median_ms": statistics.median(walls) * 1e3, "p20_ms": q[0] * 1e3, "p80_ms": q[3] * 1e3,
                "cpu_per_wall": cpu_per_wall, "peak_extra_x_shard": extra / local.nbytes,
            })  # fmt: skip
        torch.testing.assert_close(losses["Megatron-style"], losses["alchemy_ops"], atol=1e-4, rtol=1e-5)
    if rank == 0:
        torch.save(rows, out)
    dist.barrier()  # every rank is done with every collective before any tears down
    dist.destroy_process_group()


def run_distributed_cases(preset: str, warmup: int, reps: int) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.pt")
        mp.start_processes(
            _worker, args=(port, PRESETS[preset], warmup, max(reps, 3), out), nprocs=WORLD, start_method="spawn"
        )
        rows = torch.load(out)
    for r in rows:
        ours = next(o for o in rows if o["provider"] == "alchemy_ops" and o["shape"] == r["shape"])
        r["alchemy_speedup"] = r["median_ms"] / ours["median_ms"]
    return rows


def print_distributed_table(rows: list[dict]) -> None:
    if not rows:
        return
    print(
        f"\nvocab-parallel cross-entropy, {WORLD} ranks (gloo, loopback, 1 thread each), forward+backward, "
        "time on rank 0, memory per rank:"
    )
    print(
        f"{'shape':<14} {'provider':<16} {'median ms':>9} {'p20-p80 ms':>15} {'cpu/wall':>8} "
        f"{'mem x shard':>11} {'ours x faster':>13}"
    )
    for r in rows:
        speed = "" if r["provider"] == "alchemy_ops" else f"{r['alchemy_speedup']:.2f}x"
        print(
            f"{'x'.join(map(str, r['shape'])):<14} {r['provider']:<16} {r['median_ms']:>9.1f} "
            f"{r['p20_ms']:>7.1f}-{r['p80_ms']:<7.1f} {r['cpu_per_wall']:>8.2f} {r['peak_extra_x_shard']:>11.2f} "
            f"{speed:>13}"
        )
