"""ao.distributed.vocab_parallel_cross_entropy over real process groups: 2 and 3 ranks on CPU with
gloo over loopback. Every rank runs every case on its slice of the same logits; this process then
checks that all ranks got the same loss, equal to cross-entropy of the whole vocabulary in float64,
and that the ranks' gradients concatenate to that loss's gradient. Bad input on one rank must make
every rank raise, with no rank left waiting in a collective."""

from __future__ import annotations

import math
import os
import socket
import time
import traceback
import warnings
import zlib

import pytest
import torch
import torch.multiprocessing as mp
from conftest import BACKENDS, TOLERANCES

from alchemy_ops import reference

TIMEOUT_S = 240


def _case(name, sizes, n=9, dtype=torch.float32, backend="cpp", grad="random", starts=None, **kwargs):
    return dict(name=name, sizes=sizes, n=n, dtype=dtype, backend=backend, grad=grad, starts=starts, kwargs=kwargs)


def _cases(world: int) -> list[dict]:
    even = [7] * world
    uneven = [5, 1, 11][:world]
    cases = [
        _case("mean", even, grad="one"),
        _case("mean uneven", uneven),
        _case("sum weight ignore", uneven, reduction="sum", weight=True, ignore=True),
        _case("mean weight ignore", uneven, weight=True, ignore=True),
        _case("none", even, reduction="none"),
        _case("smoothing", uneven, label_smoothing=0.1),
        _case("smoothing weight ignore", uneven, label_smoothing=0.3, weight=True, ignore=True),
        _case("z_loss softcap", even, z_loss=1e-3, softcap=5.0, ignore=True),
        # weighted mean: the z term is a mean over the non-ignored tokens, the cross-entropy over the weights
        _case("z_loss weight ignore", uneven, z_loss=1e-2, weight=True, ignore=True),
        _case("bf16", uneven, dtype=torch.bfloat16, label_smoothing=0.1),
        _case("fp64", uneven, dtype=torch.float64, weight=True, label_smoothing=0.2, ignore=True),
        _case("extreme logits", even, extreme=True, label_smoothing=0.1),
        _case("empty batch", even, n=0, reduction="sum"),
        _case("all ignored", even, ignore="all"),
        _case("vocab_start", uneven, starts="reversed", weight=True),
        _case("reference backend", uneven, backend="reference", label_smoothing=0.1, weight=True),
        _case("ignore_index 0", even, ignore_index=0, label_smoothing=0.1),
    ]
    if "triton" in BACKENDS:
        cases.append(_case("triton", uneven, n=4, backend="triton", label_smoothing=0.1, weight=True, ignore=True))
    # unchecked: a class index out of range gives NaN at its position (and gradient row), never a wrong number
    cases.append(_case("unchecked bad target", uneven, reduction="none", check_target=False, bad="unchecked"))
    # bad input: every rank must raise, the bad one with its own message
    cases += [
        _case("bad: target out of range", even, bad="target"),
        _case("bad: float logits on rank 1 only", even, bad="dtype on 1"),
        _case("bad: wrong target shape on rank 1", even, bad="shape on 1"),
        _case("bad: targets differ", even, bad="targets differ"),
        _case("bad: slices overlap", even, bad="overlap"),
        _case("bad: options differ", even, bad="options differ"),
    ]
    return cases


def _ok_cases(world: int) -> list[dict]:
    return [c for c in _cases(world) if "bad" not in c["kwargs"]]


def _make(case: dict, world: int):
    """The whole problem, the same on every rank: logits [N, V], target [N], weight [V] or None."""
    g = torch.Generator().manual_seed(zlib.crc32(case["name"].encode()) + world)
    n, vocab = case["n"], sum(case["sizes"])
    kw = dict(case["kwargs"])
    logits = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 3
    if kw.pop("extreme", False) and n >= 3:
        logits[0, 1], logits[1, 2:5], logits[2, -1] = 1e4, -math.inf, -1e4
        logits[2, : case["sizes"][0]] = -math.inf  # rank 0's whole slice of this token
    logits = logits.to(case["dtype"])
    ignore_index = kw.get("ignore_index", -100)
    target = torch.randint(0, vocab, (n,), generator=g)
    ignore = kw.pop("ignore", False)
    if ignore == "all":
        target[:] = ignore_index
    elif ignore and n >= 4:
        target[[1, 3]] = ignore_index
    weight = torch.rand(vocab, generator=g, dtype=torch.float64) + 0.2 if kw.pop("weight", False) else None
    upstream = None if case["grad"] == "one" else torch.rand((n,) if kw.get("reduction") == "none" else (), generator=g)
    return logits, target, weight, upstream, kw


def _slices(case: dict) -> list[int]:
    """Each rank's first class: rank order, or ("reversed") rank 0 holding the last slice."""
    sizes = case["sizes"]
    if case["starts"] == "reversed":
        return [sum(sizes[r + 1 :]) for r in range(len(sizes))]
    return [sum(sizes[:r]) for r in range(len(sizes))]


def _run_case(case: dict, rank: int, world: int):
    import alchemy_ops as ao

    logits, target, weight, upstream, kw = _make(case, world)
    bad = kw.pop("bad", None)
    start, size = _slices(case)[rank], case["sizes"][rank]
    local = logits[:, start : start + size].clone().requires_grad_()
    w = None if weight is None else weight[start : start + size].to(reference.acc_dtype(logits.dtype))
    vocab_start = start if case["starts"] or bad == "overlap" else None
    if bad in ("target", "unchecked"):
        target = target.clone()
        target[2] = sum(case["sizes"]) + 4
    elif bad == "dtype on 1" and rank == 1:
        local = local.detach().long()
    elif bad == "shape on 1" and rank == 1:
        target = target[:-1]
    elif bad == "targets differ" and rank == 1:
        target = (target + 1) % sum(case["sizes"])
    elif bad == "options differ" and rank == 0:
        kw["label_smoothing"] = 0.05
    elif bad == "overlap" and rank == 1:
        vocab_start = 0
    with ao.backend(case["backend"]):
        loss = ao.distributed.vocab_parallel_cross_entropy(local, target, weight=w, vocab_start=vocab_start, **kw)
    if loss.requires_grad:
        loss.backward(upstream if upstream is not None else torch.ones_like(loss))
    return loss.detach(), local.grad


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import faulthandler

    import torch.distributed as dist

    faulthandler.enable()  # a crash prints every thread's Python stack to the test's captured stderr
    path = os.path.join(out_dir, f"rank{rank}.pt")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = {"complete": False}
    for case in _cases(world):
        try:
            results[case["name"]] = ("ok", *_run_case(case, rank, world))
        except Exception as e:
            results[case["name"]] = ("error", type(e).__name__, str(e), traceback.format_exc())
        torch.save(results, path)  # after every case: a crash leaves the last case it finished
    dist.barrier()  # every rank is done with every collective before any tears down
    results["complete"] = True
    torch.save(results, path)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def world_results(request, tmp_path_factory):
    world = request.param
    out = tmp_path_factory.mktemp(f"world{world}")
    ctx = mp.start_processes(
        _worker, args=(world, _free_port(), str(out)), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    for p in ctx.processes:
        p.join(max(0.0, deadline - time.monotonic()))
    if any(p.is_alive() for p in ctx.processes):
        for p in ctx.processes:
            p.kill()
        pytest.fail(f"{world} ranks did not finish in {TIMEOUT_S} s: a collective hung")
    results = [torch.load(out / f"rank{r}.pt", weights_only=False) if (out / f"rank{r}.pt").exists() else {}
               for r in range(world)]  # fmt: skip
    if not all(r.get("complete") for r in results):
        finished = [[name for name in r if name != "complete"][-1:] for r in results]
        codes = [p.exitcode for p in ctx.processes]
        pytest.fail(f"the ranks stopped early: exit codes {codes}, last case finished per rank {finished}")
    codes = [p.exitcode for p in ctx.processes]
    if any(codes):  # every result is in; only process teardown (torch.distributed's) went wrong
        warnings.warn(f"ranks exited with codes {codes} after finishing every case", stacklevel=1)
    return world, results


def _expected(case: dict, world: int):
    logits, target, weight, upstream, kw = _make(case, world)
    kw.pop("bad", None)
    x = logits.double().requires_grad_()
    loss = reference.cross_entropy(
        x,
        target,
        weight,
        kw.get("ignore_index", -100),
        kw.get("reduction", "mean"),
        kw.get("label_smoothing", 0.0),
        kw.get("z_loss", 0.0),
        kw.get("softcap"),
    )
    if loss.numel() > 0:
        loss.backward(upstream if upstream is not None else torch.ones_like(loss))
    return loss.detach(), x.grad


@pytest.mark.parametrize("name", [c["name"] for c in _ok_cases(3)])
def test_loss_and_gradient_match_whole_vocabulary(world_results, name):
    world, results = world_results
    case = next(c for c in _ok_cases(world) if c["name"] == name)
    outcomes = [r[case["name"]] for r in results]
    for rank, outcome in enumerate(outcomes):
        assert outcome[0] == "ok", f"rank {rank}: {outcome[1]}: {outcome[2]}\n{outcome[3]}"
    losses = [o[1] for o in outcomes]
    for loss in losses[1:]:  # bitwise: every rank combines the same statistics in the same order
        assert torch.equal(loss, losses[0]) or (loss.isnan() == losses[0].isnan()).all()
    expected_loss, expected_grad = _expected(case, world)
    dtype = case["dtype"]
    atol, rtol = TOLERANCES[dtype]
    assert losses[0].dtype == dtype
    torch.testing.assert_close(losses[0].double(), expected_loss, atol=atol * 10, rtol=rtol, equal_nan=True)
    if expected_grad is None:
        return
    starts = _slices(case)
    full = torch.empty_like(expected_grad)
    for rank, outcome in enumerate(outcomes):
        grad = outcome[2]
        assert grad.dtype == dtype
        full[:, starts[rank] : starts[rank] + grad.shape[1]] = grad.double()
    torch.testing.assert_close(full, expected_grad, atol=atol, rtol=rtol, equal_nan=True)


BAD = {
    "bad: target out of range": ["IndexError"] * 3,
    "bad: float logits on rank 1 only": ["RuntimeError", "TypeError", "RuntimeError"],
    "bad: wrong target shape on rank 1": ["RuntimeError", "ValueError", "RuntimeError"],
    "bad: targets differ": ["ValueError"] * 3,
    "bad: slices overlap": ["ValueError"] * 3,
    "bad: options differ": ["ValueError"] * 3,
}


def test_unchecked_bad_target_gives_nan_at_its_position(world_results):
    world, results = world_results
    outcomes = [r["unchecked bad target"] for r in results]
    assert [o[0] for o in outcomes] == ["ok"] * world, outcomes
    for _, loss, grad in outcomes:
        assert loss.isnan().nonzero().flatten().tolist() == [2]
        assert grad.isnan().any(1).nonzero().flatten().tolist() == [2] and grad[2].isnan().all()


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises_on_every_rank(world_results, name):
    world, results = world_results
    outcomes = [r[name] for r in results]
    assert [o[0] for o in outcomes] == ["error"] * world, outcomes
    assert [o[1] for o in outcomes] == BAD[name][:world], [o[2] for o in outcomes]
    messages = " | ".join(o[2] for o in outcomes)
    assert "alchemy_ops" in messages
    if name == "bad: target out of range":
        assert "position (2,)" in outcomes[0][2]
    if "rank 1" in name:
        assert "rank(s) [1]" in outcomes[0][2]


def test_needs_an_initialized_process_group():
    import alchemy_ops as ao

    with pytest.raises(RuntimeError, match="init_process_group"):
        ao.distributed.vocab_parallel_cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]))
