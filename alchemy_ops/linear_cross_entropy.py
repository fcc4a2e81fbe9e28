"""``linear_cross_entropy``: ``cross_entropy(F.linear(input, weight, bias), target)`` without the
[N, V] logits.

The tokens are taken a chunk of rows at a time: one matmul makes the chunk's logits, the fused
cross-entropy kernel turns them into losses (and, when a gradient is wanted, into d loss / d logits
in the same buffer), two more matmuls turn that into the chunk's share of the input, weight and bias
gradients. Only one chunk of logits exists at any time.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from . import _checks, reference
from ._backend import resolve
from ._ops import ops
from .cross_entropy import (
    CrossEntropyOutput,
    check_class_targets,
    check_loss_arguments,
    reduce_loss,
    z_loss_class_weight,
)

# The smallest default chunk. Each chunk's d_weight matmul reads and writes all of d_weight with an
# inner dimension of one chunk's rows: at 64 rows the three matmuls ran 1.8x slower than at 256 on
# a 2-core AVX-512 CPU. 256 rows of logits are 256 / H of the fp32 d_weight (a quarter at H = 1024).
MIN_CHUNK_ROWS = 256


def default_chunk_size(tokens: int, hidden: int, vocab: int) -> int:
    """Rows per chunk when ``chunk_size=None``: one chunk of logits about the size of the input
    activations, ``rows = next_pow2(ceil(N / ceil(V / H)))`` (Liger-Kernel's rule), at least
    ``MIN_CHUNK_ROWS`` and at most N."""
    if tokens <= 0:
        return 1
    rows = -(-tokens // -(-vocab // max(hidden, 1)))
    return min(tokens, max(MIN_CHUNK_ROWS, 1 << (rows - 1).bit_length()))


@dataclass(frozen=True)
class _ChunkLoss:
    """The cross-entropy of one chunk of logits rows on one backend, with every option bound.

    cpp and triton call the fused kernels; reference composes ``reference.cross_entropy`` and takes
    its gradient with autograd, the same three operations."""

    backend: str
    class_weight: torch.Tensor | None  # in the accumulation dtype, scaled by z_loss_class_weight
    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: float | None
    # Whether the kernels check the class indices: only under torch.compile, where the Python check
    # up front would be a data-dependent branch (eager mode checks before any matmul).
    check_target: bool

    def _op(self, name: str):
        return getattr(ops, name if self.backend == "cpp" else f"triton_{name}")

    @property
    def _options(self) -> tuple:
        cap = 0.0 if self.softcap is None else self.softcap
        return self.ignore_index, self.label_smoothing, self.z_loss, cap

    def _reference(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        z = logits.to(reference.acc_dtype(logits.dtype))  # the loss per row stays in the accumulation dtype
        opts = (self.ignore_index, "none", self.label_smoothing, self.z_loss, self.softcap)
        return reference.cross_entropy(z, target, self.class_weight, *opts)

    def _reference_lse(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The kernels' lse: of the (softcapped) logits, 0 at ignored positions (never read there)."""
        z = logits.to(reference.acc_dtype(logits.dtype))
        if self.softcap is not None:
            z = self.softcap * torch.tanh(z / self.softcap)
        lse = torch.logsumexp(z, -1)
        return lse if target.is_floating_point() else lse.masked_fill(target == self.ignore_index, 0)

    def _reference_gradient(self, logits, target, grad_loss) -> tuple[torch.Tensor, torch.Tensor]:
        # torch.func.vjp rather than torch.autograd.grad: torch.compile traces it (in any grad mode).
        loss, vjp = torch.func.vjp(lambda z: self._reference(z, target), logits.detach())
        (grad,) = vjp(grad_loss)
        return loss, grad

    def forward(self, logits, target) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss per row (accumulation dtype) and the lse per row (fp64; the accumulation dtype on reference)."""
        if self.backend == "reference":
            return self._reference(logits, target), self._reference_lse(logits, target)
        return self._op("cross_entropy_forward")(logits, target, self.class_weight, *self._options, self.check_target)

    def forward_inplace(self, logits, target, grad_scale) -> tuple[torch.Tensor, torch.Tensor]:
        """As ``forward``; ``logits`` becomes ``grad_scale`` (per row) * d loss / d logits."""
        if self.backend == "reference":
            lse = self._reference_lse(logits, target)
            loss, grad = self._reference_gradient(logits, target, grad_scale)
            logits.copy_(grad)
            return loss, lse
        op = self._op("cross_entropy_forward_inplace")
        return op(logits, target, self.class_weight, grad_scale, *self._options, self.check_target)

    def backward(self, grad_loss, logits, target, lse) -> torch.Tensor:
        """``grad_loss`` (per row) * d loss / d logits, from the lse that forward returned."""
        if self.backend == "reference":
            return self._reference_gradient(logits, target, grad_loss)[1]
        op = self._op("cross_entropy_backward")
        return op(grad_loss, logits, target, self.class_weight, lse, *self._options)


@dataclass(frozen=True)
class _Plan:
    loss: _ChunkLoss
    rows: int  # per chunk
    reduction: str
    accumulate_fp32: bool
    compute_dtype: torch.dtype  # of the matmuls: the autocast dtype under autocast, else the input's
    out_dtype: torch.dtype  # of the loss: fp32 under autocast (as F.cross_entropy's), else the input's
    keep_lse: bool  # return_lse or return_z_loss
    keep_hits: bool  # return_token_accuracy

    def chunks(self, tokens: int):
        return ((s, min(s + self.rows, tokens)) for s in range(0, tokens, self.rows))


def _logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())


def _chunked_forward(x, weight, bias, target, plan: _Plan, keep_lse: bool, grads=None, grad_scale=None):
    """Loss per token (accumulation dtype); the lse per token (fp64) when ``keep_lse``, else None;
    whether each token's argmax is its target when ``plan.keep_hits``, else None. With ``grads``, each
    chunk's ``grad_scale`` * d loss / d logits is made in its logits' buffer and added to ``grads``."""
    tokens = x.shape[0]
    loss = x.new_empty(tokens, dtype=reference.acc_dtype(x.dtype))
    lse = x.new_empty(tokens, dtype=torch.float64) if keep_lse else None
    hits = x.new_empty(tokens, dtype=torch.bool) if plan.keep_hits else None
    for s, e in plan.chunks(tokens):
        x_chunk = x[s:e]
        logits = _logits(x_chunk, weight, bias)
        if hits is not None:  # before forward_inplace turns the logits into their gradient
            hits[s:e] = logits.argmax(-1) == target[s:e]
        if grads is None:
            loss[s:e], lse_c = plan.loss.forward(logits, target[s:e])
        else:
            loss[s:e], lse_c = plan.loss.forward_inplace(logits, target[s:e], grad_scale[: e - s])
            grads.add_chunk(logits, x_chunk, s, e)
        if lse is not None:
            lse[s:e] = lse_c
        del logits
    return loss, lse, hits


class _Gradients:
    """The input, weight and bias gradients, filled a chunk of d loss / d logits at a time:
    d_input[rows] = dlogits @ weight, d_weight += dlogits^T @ x[rows], d_bias += dlogits.sum(0).
    d_weight and d_bias accumulate in fp32 (fp64 for fp64) when ``accumulate_fp32``, else in the
    parameter dtype. ``dtypes`` are the (input, parameter) dtypes of the results; ``weight`` is the
    one the matmuls use (the autocast copy under autocast)."""

    def __init__(self, x, weight, dtypes, needs, accumulate_fp32: bool) -> None:
        self.weight = weight
        input_dtype, self.param_dtype = dtypes
        acc = reference.acc_dtype(self.param_dtype) if accumulate_fp32 else self.param_dtype
        self.input = torch.empty(x.shape, dtype=input_dtype, device=x.device) if needs[0] else None
        self.d_weight = torch.zeros(weight.shape, dtype=acc, device=x.device) if needs[1] else None
        self.d_bias = torch.zeros(weight.shape[:1], dtype=acc, device=x.device) if needs[2] else None

    def add_chunk(self, dlogits: torch.Tensor, x_chunk: torch.Tensor, start: int, end: int) -> None:
        if self.input is not None:
            rows = self.input[start:end]
            if rows.dtype == dlogits.dtype:
                torch.mm(dlogits, self.weight, out=rows)
            else:  # autocast: the matmul in its dtype, as F.linear's backward does, then widened
                rows.copy_(torch.mm(dlogits, self.weight))
        if self.d_weight is not None:
            acc = self.d_weight.dtype
            # CPU has no matmul from bf16/fp16 into fp32: the chunk is widened (exactly) instead.
            self.d_weight.addmm_(dlogits.t().to(acc), x_chunk.to(acc))
        if self.d_bias is not None:
            self.d_bias += dlogits.sum(0, dtype=self.d_bias.dtype)

    def result(self) -> tuple[torch.Tensor | None, ...]:
        """(d_input, d_weight, d_bias) in their dtypes; the accumulators are freed."""
        dw = None if self.d_weight is None else self.d_weight.to(self.param_dtype)
        self.d_weight = None
        db = None if self.d_bias is None else self.d_bias.to(self.param_dtype)
        return self.input, dw, db


def _compute_copies(x, weight, bias, dtype: torch.dtype):
    """The operands of the matmuls in their dtype (the same tensors when no cast is needed)."""
    return x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    """mean/sum: the gradients are made in forward (3 matmuls per chunk, no logits kept) and backward
    only scales them by the upstream scalar. none: the upstream gradient is one value per token and
    unknown in forward, so forward keeps the fp64 lse per token and backward recomputes each chunk's
    logits (4 matmuls per chunk). Outputs: the loss, and the lse and argmax hits per token that
    forward saw (empty when not asked for; no gradient)."""

    @staticmethod
    def forward(ctx, x, weight, bias, target, plan: _Plan):
        ctx.plan = plan
        ctx.scaled = False
        ctx.dtypes = (x.dtype, weight.dtype)
        classes = weight.shape[0]
        cw, ignore_index = plan.loss.class_weight, plan.loss.ignore_index
        xc, wc, bc = _compute_copies(x, weight, bias, plan.compute_dtype)
        if plan.reduction == "none":
            loss, lse, hits = _chunked_forward(xc, wc, bc, target, plan, keep_lse=True)
            ctx.save_for_backward(xc, wc, bc, target, lse)
        else:
            acc = reference.acc_dtype(xc.dtype)
            if plan.reduction == "mean":  # global over all chunks
                scale = 1.0 / reference.cross_entropy_mean_denominator(target, cw, ignore_index, classes, acc)
            else:
                scale = torch.ones((), dtype=acc, device=x.device)
            scale_rows = scale.expand(min(plan.rows, x.shape[0])).contiguous()
            grads = _Gradients(xc, wc, ctx.dtypes, ctx.needs_input_grad[:3], plan.accumulate_fp32)
            loss, lse, hits = _chunked_forward(xc, wc, bc, target, plan, plan.keep_lse, grads, scale_rows)
            ctx.save_for_backward(*grads.result())
        extras = [t if t is not None else x.new_empty(0) for t in (lse, hits)]
        ctx.mark_non_differentiable(*extras)
        return reduce_loss(loss, target, cw, ignore_index, classes, plan.reduction, plan.out_dtype), *extras

    @staticmethod
    def backward(ctx, grad_output, _grad_lse, _grad_hits):
        plan = ctx.plan
        if plan.reduction == "none":
            x, weight, bias, target, lse = ctx.saved_tensors
            grads = _Gradients(x, weight, ctx.dtypes, ctx.needs_input_grad[:3], plan.accumulate_fp32)
            g = grad_output.to(reference.acc_dtype(x.dtype)).contiguous()
            for s, e in plan.chunks(x.shape[0]):
                x_chunk = x[s:e]
                logits = _logits(x_chunk, weight, bias)
                dlogits = plan.loss.backward(g[s:e], logits, target[s:e], lse[s:e])
                del logits
                grads.add_chunk(dlogits, x_chunk, s, e)
                del dlogits
            return (*grads.result(), None, None)
        if torch.compiler.is_compiling():
            # No data-dependent branch in a graph: scale unconditionally (a scalar multiply; the
            # compiler plans the buffers, so out of place costs no memory of ours).
            return (*(None if g is None else g * grad_output for g in ctx.saved_tensors), None, None)
        if ctx.scaled:  # (autograd's version check would raise too, less clearly)
            raise RuntimeError(
                "alchemy_ops: an earlier backward of this linear_cross_entropy scaled its saved gradients in "
                "place by a non-unit upstream gradient; after that, backward through it only once"
            )
        saved = ctx.saved_tensors
        if not bool((grad_output == 1).all()):
            ctx.scaled = True
            for grad in saved:
                if grad is not None:
                    grad.mul_(grad_output)
        return (*saved, None, None)


# The dtypes autocast casts for F.linear; it leaves fp64 alone.
_AUTOCAST_ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)


def autocast_dtype(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.dtype | None:
    """The dtype autocast runs ``F.linear(input, weight, bias)`` in on their device, or None when
    autocast is off there or an operand is not fp16/bf16/fp32 (as autocast, which then casts nothing
    that would matter)."""
    device = input.device.type
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):  # (meta has no autocast state)
        return None
    if any(t is not None and t.dtype not in _AUTOCAST_ELIGIBLE for t in (input, weight, bias)):
        return None
    return torch.get_autocast_dtype(device)


def _check_linear(input, weight, bias):
    """The checks of input, weight and bias, before any work. Returns them and the autocast dtype of
    the matmuls (None without autocast); under autocast the three may differ in dtype, as for F.linear."""
    input = _checks.check_tensor("input", input)
    weight = _checks.check_tensor("weight", weight)
    if not input.is_floating_point():
        raise TypeError(f"alchemy_ops: linear_cross_entropy input must be floating-point, got {input.dtype}")
    if input.dim() not in (1, 2):
        raise ValueError(
            f"alchemy_ops: linear_cross_entropy takes input of shape (N, H) or (H), got {tuple(input.shape)}; "
            "flatten the token dims first: input.flatten(0, -2) and target.flatten() (cross_entropy reads dim 1 "
            "as the classes, so a 3-d input is not the tokens-by-vocabulary logits of F.linear)"
        )
    if weight.dim() != 2:
        raise ValueError(
            f"alchemy_ops: weight is the linear (LM-head) weight of shape (V, H), got {tuple(weight.shape)}; "
            "per-class loss weights go in class_weight="
        )
    hidden = input.shape[-1]
    if weight.shape[1] != hidden:
        raise ValueError(
            f"alchemy_ops: hidden size mismatch: input has {hidden} features (its last dim) but weight has shape "
            f"{tuple(weight.shape)}; expected (V, {hidden})"
        )
    named = [("weight", weight)]
    if bias is not None:
        bias = _checks.check_tensor("bias", bias)
        if bias.shape != weight.shape[:1]:
            raise ValueError(
                f"alchemy_ops: bias must have shape ({weight.shape[0]},) (one per class), got {tuple(bias.shape)}"
            )
        named.append(("bias", bias))
    compute_dtype = autocast_dtype(input, weight, bias)
    for name, t in named:
        if compute_dtype is None and t.dtype != input.dtype:
            raise TypeError(
                f"alchemy_ops: {name} is {t.dtype} but input is {input.dtype}; cast them to one dtype with .to()"
            )
        if t.device != input.device:
            raise ValueError(f"alchemy_ops: {name} is on {t.device} but input is on {input.device}; move it with .to()")
    return input, weight, bias, compute_dtype


def _check_chunk_size(chunk_size) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        raise TypeError(f"alchemy_ops: chunk_size must be an int or None, got {type(chunk_size).__name__}")
    if chunk_size <= 0:
        raise ValueError(f"alchemy_ops: chunk_size must be a positive number of rows (or None), got {chunk_size}")
    return int(chunk_size)


def _extras(loss, lse, hits, target, ignore_index, z_loss, reduction, acc, flags) -> CrossEntropyOutput:
    """The CrossEntropyOutput of the return_* ``flags`` (z_loss, lse, token_accuracy) from the per-token
    lse and argmax hits, in the accumulation dtype ``acc``."""
    return_z_loss, return_lse, return_token_accuracy = flags
    if target.is_floating_point():  # probabilities: every position counts
        valid = torch.ones(target.shape[:-1], dtype=torch.bool, device=target.device)
    else:
        valid = target != ignore_index
    count = valid.sum().to(acc)
    z_out = accuracy = None
    if return_z_loss:
        z_term = (z_loss * lse.to(acc).square()).masked_fill(~valid, 0)
        if reduction != "none":
            z_term = z_term.sum() / count if reduction == "mean" else z_term.sum()
        z_out = z_term.to(loss.dtype)
    if return_token_accuracy:
        correct = (hits & valid).to(torch.float32)
        accuracy = correct if reduction == "none" else correct.sum() / count.float()
    return CrossEntropyOutput(loss, z_out, lse.to(acc) if return_lse else None, accuracy)


def linear_cross_entropy(
    input: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    class_weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    check_target: bool = True,
    chunk_size: int | None = None,
    accumulate_fp32: bool = True,
    return_z_loss: bool = False,
    return_lse: bool = False,
    return_token_accuracy: bool = False,
) -> torch.Tensor | CrossEntropyOutput:
    """``ao.cross_entropy(F.linear(input, weight, bias), target, class_weight, ...)`` without the
    [N, V] logits: the language-model head and its loss in one op.

    Naming: ``weight`` is the linear (LM-head) weight ``[V, H]`` and the per-class loss weights are
    ``class_weight`` ``[V]``. ``torch.nn.functional.linear_cross_entropy`` calls them ``linear_weight``
    and ``weight`` (and the bias ``linear_bias``).

    Args:
        input: hidden states ``(N, H)``, or ``(H)`` for one token; fp32, bf16, fp16 or fp64. Other ranks
            raise: flatten first (``input.flatten(0, -2)``, ``target.flatten()``), because
            cross-entropy's class dim is 1 and a 3-d input would not mean ``F.linear``'s logits.
        weight: ``(V, H)`` in the input's dtype (any fp16/bf16/fp32 mix under autocast) and device.
        target: class indices, int64 ``(N)`` (``()`` for one token), in ``[0, V)`` or ``ignore_index``;
            or class probabilities ``(N, V)`` (``(V)``), which must not require grad.
        bias: optional ``(V)``, the weight's dtype.
        class_weight, ignore_index, reduction, label_smoothing, softcap, check_target: as in
            ``ao.cross_entropy`` (its ``weight`` is ``class_weight`` here). The targets are checked
            once, up front (under ``torch.compile`` by the kernels instead, as each chunk is reached:
            the same IndexError, its position counted within the chunk).
        z_loss: adds ``z_loss * lse**2`` per non-ignored position (PaLM's auxiliary loss), reduced on
            its own terms: ``"mean"`` gives ``sum_r w_{y_r} ce_r / sum_r w_{y_r} + z_loss * sum_r lse_r**2
            / n_valid`` (r over the non-ignored positions, ``n_valid`` their number), so class weights
            do not scale it (Liger-Kernel's definition); ``"sum"`` ``sum_r w_{y_r} ce_r + z_loss *
            sum_r lse_r**2``; ``"none"`` per position. A weighted mean with ``z_loss`` reads two sums
            back to the host (a sync on a GPU).
        chunk_size: tokens per chunk. None: ``next_pow2(ceil(N / ceil(V / H)))`` clamped to
            ``[256, N]``, so one chunk of logits is about the size of ``input`` (fewer than 256 rows
            make slow matmuls).
        accumulate_fp32: accumulate the weight and bias gradients over the chunks in fp32 (fp64 for
            fp64), rounded to the parameter dtype once at the end. False accumulates in the parameter
            dtype: no fp32 ``[V, H]`` buffer, but a bf16/fp16 rounding per chunk.
        return_z_loss, return_lse, return_token_accuracy: keyword-only; when any is set the result is
            ``ao.CrossEntropyOutput(loss, z_loss, lse, token_accuracy)`` with the fields not asked for
            None. ``z_loss``: the z term alone, reduced as in the loss (above), in the loss's dtype.
            ``lse``: the log-sum-exp of each token's (softcapped) logits, fp32 (fp64 for fp64) ``[N]``
            (``()`` for one token), 0 at ignored positions (their logits are not read). ``token_accuracy``:
            fp32, the fraction of non-ignored tokens whose argmax over the vocabulary (ties to the lowest
            index, as ``torch.argmax``) is the target (NaN when every token is ignored), taken from each
            chunk's logits while they exist; per token (1.0 or 0.0, 0.0 where ignored) for
            ``reduction="none"``; class-index targets only. These carry no gradient; each costs one
            ``[N]`` buffer (and token_accuracy one argmax pass over each chunk of logits).

    Memory: beyond the inputs and the gradients themselves, the peak is one chunk of logits (forward
    writes the chunk's gradient into it; for bf16/fp16 with ``accumulate_fp32``, plus its fp32 copy
    for the d_weight matmul), and the fp32 ``[V, H]`` d_weight accumulator of bf16/fp16 parameters.
    Chunking the vocabulary as well is not needed: d_weight ``[V, H]`` must exist anyway (it is a
    result), and a default chunk has about ``N H`` logits (the input's size), or ``256 V`` (256 / H of
    d_weight) when that is more: no more than memory already in use. Splitting the vocabulary would
    shrink only that share, at the cost of a log-sum-exp merged across vocabulary blocks and more,
    smaller matmuls.

    Cost: with a gradient and ``reduction`` mean or sum, 3 matmuls per chunk, all in forward
    (logits, d input, d weight); backward only multiplies the saved gradients by the upstream
    scalar (nothing when it is 1). With ``reduction="none"`` the upstream gradient is one value per
    token and unknown in forward, so forward keeps only the fp64 lse per token and backward
    recomputes each chunk's logits: 4 matmuls per chunk, and two chunks of logits (the recomputed
    logits and their gradient) at the peak of backward. Without a gradient: 1 matmul per chunk.
    A mean/sum loss scales its saved gradients in place for a non-unit upstream gradient: after
    such a backward, another one through the same loss (``retain_graph=True``) raises.

    torch.compile: compiles with ``fullgraph=True``, forward and backward, with every option (the
    compiled backward scales the saved gradients unconditionally).

    Autocast: under ``torch.autocast`` (on the input's device, fp16/bf16/fp32 operands) the matmuls run
    in the autocast dtype, as ``F.linear`` does there (the three operands may then differ in dtype),
    and the loss is fp32, as ``F.cross_entropy`` gives; the gradients come back in each operand's own
    dtype, d_weight and d_bias accumulated over the chunks as ``accumulate_fp32`` says (in fp32 for
    fp32 master weights).

    Returns:
        The loss in the input's dtype (fp32 under autocast; accumulated in fp32, fp64 for fp64): a
        scalar, or per token for ``reduction="none"``. N = 0 gives what PyTorch gives: NaN for mean, 0
        for sum, empty for none. With a ``return_*`` flag, a ``CrossEntropyOutput`` (above).
    """
    input, weight, bias, autocast = _check_linear(input, weight, bias)
    compute_dtype = autocast or input.dtype
    classes = weight.shape[0]
    logits_shape = input.shape[:-1] + weight.shape[:1]
    target, class_weight, ignore_index, label_smoothing, z_loss, softcap = check_loss_arguments(
        logits_shape, compute_dtype, input.device, target, class_weight, ignore_index, reduction,
        label_smoothing, z_loss, softcap, weight_name="class_weight",
    )  # fmt: skip
    chunk_size = _check_chunk_size(chunk_size)
    switches = {"accumulate_fp32": accumulate_fp32, "return_z_loss": return_z_loss, "return_lse": return_lse}
    switches["return_token_accuracy"] = return_token_accuracy
    for name, value in switches.items():
        if not isinstance(value, bool):
            raise TypeError(f"alchemy_ops: {name} must be a bool, got {type(value).__name__}")
    if return_token_accuracy and target.is_floating_point():
        raise ValueError(
            "alchemy_ops: return_token_accuracy needs class-index targets (int64), not class probabilities"
        )
    if target.is_floating_point() and target.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "alchemy_ops: linear_cross_entropy has no gradient for probability targets; pass target.detach(), "
            "or use ao.cross_entropy(F.linear(input, weight, bias), target) for it"
        )
    # Eager mode checks the class indices here, before any matmul; a compiled graph cannot branch on
    # them, so there the kernels raise the same IndexError as they reach a bad one.
    in_kernel_check = check_target and torch.compiler.is_compiling()
    if check_target and not in_kernel_check and not target.is_floating_point():
        check_class_targets(target, classes, ignore_index)

    single = input.dim() == 1
    x, target = (input.unsqueeze(0), target.unsqueeze(0)) if single else (input, target)
    acc = reference.acc_dtype(compute_dtype)
    acc_class_weight = None if class_weight is None else class_weight.to(acc)
    acc_class_weight = z_loss_class_weight(z_loss, target, acc_class_weight, ignore_index, classes, reduction)
    loss_fn = _ChunkLoss(resolve(x), acc_class_weight, ignore_index, label_smoothing, z_loss, softcap, in_kernel_check)
    plan = _Plan(
        loss_fn, chunk_size or default_chunk_size(x.shape[0], x.shape[1], classes), reduction, accumulate_fp32,
        compute_dtype, x.dtype if autocast is None else acc, return_lse or return_z_loss, return_token_accuracy,
    )  # fmt: skip
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        loss, lse, hits = _LinearCrossEntropy.apply(x, weight, bias, target, plan)
    else:
        per_token, lse, hits = _chunked_forward(
            *_compute_copies(x, weight, bias, compute_dtype), target, plan, plan.keep_lse
        )
        loss = reduce_loss(per_token, target, acc_class_weight, ignore_index, classes, reduction, plan.out_dtype)
    if single:  # per-token results of the one token as 0-d tensors
        loss, lse, hits, target = (t if t is None or t.dim() == 0 else t.squeeze(0) for t in (loss, lse, hits, target))
    if not (return_z_loss or return_lse or return_token_accuracy):
        return loss
    flags = (return_z_loss, return_lse, return_token_accuracy)
    return _extras(loss, lse, hits, target, ignore_index, z_loss, reduction, acc, flags)
