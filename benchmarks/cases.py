"""Benchmark cases: what each op is compared against, with the bytes that must move."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F

import alchemy_ops as ao
from alchemy_ops.linear_cross_entropy import default_chunk_size


@dataclass
class Case:
    op: str
    mode: str  # "forward" or "forward+backward"
    dtype: torch.dtype
    shape: tuple[int, ...]
    # provider name -> fn(x) returning (output, grad or None, ...): what is compared across providers
    providers: dict[str, Callable[[torch.Tensor], tuple[torch.Tensor | None, ...]]] = field(default_factory=dict)
    passes: float = 2  # input-sized tensors that must be read or written
    input_shape: tuple[int, ...] | None = None  # the x given to the providers, when it is not `shape`
    flops: float = 0.0  # arithmetic of a compute-bound case (matmuls); 0: memory-bound, judged by its roofline
    memory_unit_shape: tuple[int, ...] | None = None  # the memory column counts tensors of this size (default: x)

    @property
    def x_shape(self) -> tuple[int, ...]:
        return self.input_shape or self.shape

    @property
    def name(self) -> str:
        return f"{self.op} {self.mode} {str(self.dtype).removeprefix('torch.')} {'x'.join(map(str, self.shape))}"


def _runner(fn: Callable[[torch.Tensor], torch.Tensor], backward: bool, grad: torch.Tensor | None):
    def run(x: torch.Tensor):
        if not backward:
            return fn(x), None
        xr = x.detach().requires_grad_()
        y = fn(xr)
        y.backward(grad)
        return y, xr.grad

    return run


def _on_backend(name: str, run):
    def on_backend(x: torch.Tensor):
        with ao.backend(name):
            return run(x)

    return on_backend


def _triton_provider(device: str) -> bool:
    """alchemy_ops' Triton kernels are timed on a GPU; the CPU interpreter is no benchmark."""
    return device == "cuda" and "triton" in ao.available_backends()


def softmax_cases(shapes, dtypes, device: str, compile_baseline: bool, dim: int = -1) -> list[Case]:
    """``log_softmax`` and ``softmax`` along ``dim`` (-1: rows; 1: the class dim of ``[N, C, d...]``).
    Bytes that must move: forward reads x and writes y; backward reads dy and y and writes dx."""
    cases = []
    for op, ours, theirs in [
        ("log_softmax", ao.log_softmax, lambda t: F.log_softmax(t, dim)),
        ("softmax", ao.softmax, lambda t: F.softmax(t, dim)),
    ]:
        for shape in shapes:
            for dtype in dtypes:
                for backward in (False, True):
                    grad = torch.randn(shape, device=device, dtype=dtype) if backward else None
                    case = Case(
                        op, "forward+backward" if backward else "forward", dtype, shape, passes=5 if backward else 2
                    )
                    case.providers["alchemy_ops"] = _runner(lambda t, f=ours: f(t, dim), backward, grad)
                    if _triton_provider(device):
                        case.providers["ao triton"] = _on_backend("triton", case.providers["alchemy_ops"])
                    case.providers["torch eager"] = _runner(theirs, backward, grad)
                    if compile_baseline:
                        case.providers["torch.compile"] = _runner(torch.compile(theirs, dynamic=False), backward, grad)
                    cases.append(case)
    return cases


def _inplace_runner(fn: Callable[[torch.Tensor], torch.Tensor]):
    """Forward+backward with the gradient written into the logits. The first call works on a copy of
    the given logits (so its result can be checked); later calls reuse that buffer, whose values are
    then the last gradient, so no copy is timed. The logits stay a leaf and the gradient is taken with
    autograd.grad, as a network's non-leaf logits would pass it on, without a .grad copy."""
    state: dict[str, torch.Tensor] = {}

    def run(x: torch.Tensor):
        buf = state.get("buf")
        if buf is None or buf.shape != x.shape:
            buf = state["buf"] = x.detach().clone()
        logits = buf.requires_grad_()
        y = fn(logits)
        (grad,) = torch.autograd.grad(y, logits)
        return y, grad

    return run


def _liger_cross_entropy():
    """Liger-Kernel's fused cross-entropy (Triton, GPU only), when it is installed."""
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except ImportError:
        return None
    return LigerCrossEntropyLoss()


def cross_entropy_cases(shapes, dtypes, device: str, compile_baseline: bool, kdim_dtypes=None) -> list[Case]:
    """``F.cross_entropy`` with class-index targets; (N, C, d...) shapes have the class dim at 1 and
    run in ``kdim_dtypes`` (default: all of ``dtypes``). Bytes that must move: forward reads the
    logits once; backward reads them and writes the gradient."""
    cases = []
    liger = _liger_cross_entropy() if device == "cuda" else None
    for shape in shapes:
        positions = shape[:1] + shape[2:]
        target = torch.randint(0, shape[1], positions, device=device, generator=torch.Generator().manual_seed(0))

        def theirs(t, target=target):
            return F.cross_entropy(t, target)

        def ours(t, target=target, **kw):
            return ao.cross_entropy(t, target, **kw)

        for dtype in dtypes if len(shape) == 2 or kdim_dtypes is None else kdim_dtypes:
            for backward in (False, True):
                case = Case(
                    "cross_entropy", "forward+backward" if backward else "forward", dtype, shape,
                    passes=3 if backward else 1,
                )  # fmt: skip
                case.providers["alchemy_ops"] = _runner(ours, backward, None)
                if _triton_provider(device):
                    case.providers["ao triton"] = _on_backend("triton", case.providers["alchemy_ops"])
                if backward:
                    case.providers["ao inplace_bw"] = _inplace_runner(lambda t, f=ours: f(t, inplace_backward=True))
                case.providers["torch eager"] = _runner(theirs, backward, None)
                if compile_baseline:
                    case.providers["torch.compile"] = _runner(torch.compile(theirs, dynamic=False), backward, None)
                if liger is not None and len(shape) == 2:  # Liger takes (N, C) logits only
                    case.providers["liger"] = _runner(lambda t, target=target: liger(t, target), backward, None)
                cases.append(case)
    return cases


def gumbel_softmax_cases(shapes, dtypes, device: str, compile_baseline: bool) -> list[Case]:
    """``F.gumbel_softmax`` forward+backward, soft and hard. The samples are random, so a provider
    returns what every correct sampler agrees on: each row's sum (1) and, for the gradient of a
    random upstream gradient, each row's sum of the input gradient (0 for a softmax Jacobian).
    Bytes that must move: read x, write y (+ the saved soft sample for hard), read dy and the
    sample, write dx."""

    def runner(fn, grad):
        def run(x):
            xr = x.detach().requires_grad_()
            y = fn(xr)
            (dx,) = torch.autograd.grad(y, xr, grad)
            return y.float().sum(-1), dx.float().sum(-1)

        return run

    cases = []
    for shape in shapes:
        for dtype in dtypes:
            grad = torch.randn(shape, device=device, dtype=dtype, generator=torch.Generator(device).manual_seed(1))
            for hard in (False, True):

                def ours(t, hard=hard):
                    return ao.gumbel_softmax(t, 1.0, hard)

                def theirs(t, hard=hard):
                    return F.gumbel_softmax(t, 1.0, hard)

                mode = "forward+backward hard" if hard else "forward+backward"
                case = Case("gumbel_softmax", mode, dtype, shape, passes=6 if hard else 5)
                case.providers["alchemy_ops"] = runner(ours, grad)
                case.providers["torch eager"] = runner(theirs, grad)
                if compile_baseline:
                    case.providers["torch.compile"] = runner(torch.compile(theirs, dynamic=False), grad)
                cases.append(case)
    return cases


def _topk_runner(fn, backward: bool, grad: torch.Tensor | None):
    """fn returns (weights, indices); the weights (and the gradient) are what is compared."""
    return _runner(lambda t: fn(t)[0], backward, grad)


def topk_softmax_cases(shapes_k, dtypes, device: str, compile_baseline: bool) -> list[Case]:
    """Top-k softmax with renormalisation (MoE routing, top-k sampling) against eager
    ``softmax -> topk -> renormalise`` and its torch.compile. Bytes that must move: forward reads the
    logits once; backward writes their gradient (the renormalised gradient needs no second read)."""

    def theirs(t, k):
        w, i = torch.topk(torch.softmax(t, -1), k, -1)
        return w / w.sum(-1, keepdim=True), i

    cases = []
    for shape, k in shapes_k:
        for dtype in dtypes:
            for backward in (False, True):
                grad = torch.randn(*shape[:-1], k, device=device) if backward else None
                case = Case("topk_softmax", "forward+backward" if backward else "forward", dtype, shape)
                case.passes = 2 if backward else 1
                case.providers["alchemy_ops"] = _topk_runner(lambda t, k=k: ao.topk_softmax(t, k), backward, grad)
                case.providers["torch eager"] = _topk_runner(lambda t, k=k: theirs(t, k), backward, grad)
                if compile_baseline:
                    compiled = torch.compile(theirs, dynamic=False)
                    case.providers["torch.compile"] = _topk_runner(lambda t, k=k, f=compiled: f(t, k), backward, grad)
                cases.append(case)
    return cases


def linear_cross_entropy_cases(shapes, dtypes, device: str, compile_baseline: bool) -> list[Case]:
    """The LM head and its loss, ``cross_entropy(linear(x, W), target)`` forward+backward with the
    gradients of x and W, for (tokens, hidden, vocabulary) shapes; x is the hidden states, W and the
    targets are fixed per case. Against the unfused eager composition, PyTorch's own
    ``F.linear_cross_entropy`` (options=None: the same composition; and its chunked path with as many
    rows per chunk as ours, so both hold the same logits) and torch.compile of the unfused composition.
    (``LinearCrossEntropyOptions()``'s automatic choice is tuned for CUDA: 16-row chunks for the
    quick shape on CPU, 4x slower than eager there.)

    Compute-bound: 3 matmuls of 2 N H V flops each (``flops``). The bytes that must move are only x
    and W read, their gradients written: ``passes = 2 (1 + V / N)`` input-sized tensors, so the copy
    roofline is no bound here; the memory column is the point (the unfused path holds [N, V] logits,
    their log-softmax and their gradient)."""
    lce_options = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    has_torch_lce = hasattr(F, "linear_cross_entropy")
    cases = []
    for tokens, hidden, vocab in shapes:
        gen = torch.Generator(device=device).manual_seed(1)
        target = torch.randint(0, vocab, (tokens,), device=device, generator=gen)
        w32 = torch.randn(vocab, hidden, device=device, generator=gen) / hidden**0.5  # logits ~ x's scale

        def unfused(x, w, target=target):
            return F.cross_entropy(F.linear(x, w), target)

        def ours(x, w, target=target):
            return ao.linear_cross_entropy(x, w, target)

        def theirs(x, w, target=target, options=None):
            return F.linear_cross_entropy(x, w, target, options=options)

        for dtype in dtypes:
            weight = w32.to(dtype)
            case = Case(
                "linear_cross_entropy", "forward+backward", dtype, (tokens, hidden, vocab),
                passes=2 * (1 + vocab / tokens), input_shape=(tokens, hidden), flops=3 * 2 * tokens * hidden * vocab,
                memory_unit_shape=(tokens, vocab),  # in logits: what the unfused path holds 3 of
            )  # fmt: skip
            case.providers["alchemy_ops"] = _lm_head_runner(ours, weight)
            case.providers["torch eager"] = _lm_head_runner(unfused, weight)
            if has_torch_lce:
                case.providers["F.lce"] = _lm_head_runner(theirs, weight)
            if lce_options is not None:
                options = lce_options(batch_chunk_size=default_chunk_size(tokens, hidden, vocab))
                case.providers["F.lce chunked"] = _lm_head_runner(partial(theirs, options=options), weight)
            if compile_baseline:
                case.providers["torch.compile"] = _lm_head_runner(torch.compile(unfused, dynamic=False), weight)
            cases.append(case)
    return cases


def _lm_head_runner(fn, weight: torch.Tensor):
    """fn(x, W) -> loss; returns the loss and the gradients of x and W (no .grad accumulation)."""

    def run(x: torch.Tensor):
        xr, wr = x.detach().requires_grad_(), weight.detach().requires_grad_()
        loss = fn(xr, wr)
        dx, dw = torch.autograd.grad(loss, (xr, wr))
        return loss, dx, dw

    return run
