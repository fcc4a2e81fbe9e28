"""``alchemy_ops.nn.CrossEntropyLoss``, a drop-in for ``torch.nn.CrossEntropyLoss``, and
``LinearCrossEntropyLoss``, the module form of ``linear_cross_entropy``."""

from __future__ import annotations

import inspect

import torch

from .cross_entropy import CrossEntropyOutput, cross_entropy
from .linear_cross_entropy import linear_cross_entropy

__all__ = ["CrossEntropyLoss", "LinearCrossEntropyLoss"]


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` computed by :func:`alchemy_ops.cross_entropy`.

    A subclass of torch's module: the same constructor, attributes (``weight`` buffer,
    ``ignore_index``, ``reduction``, ``label_smoothing``), ``state_dict`` and ``repr``; the extras
    ``z_loss``, ``softcap``, ``inplace_backward``, ``check_target`` and the ``return_*`` flags are
    keyword-only and off by default. Shapes and dtypes as :func:`alchemy_ops.cross_entropy`.
    """

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        size_average: bool | None = None,
        ignore_index: int = -100,
        reduce: bool | None = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        softcap: float | None = None,
        inplace_backward: bool = False,
        check_target: bool = True,
        return_z_loss: bool = False,
        return_lse: bool = False,
        return_token_accuracy: bool = False,
    ) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.z_loss = z_loss
        self.softcap = softcap
        self.inplace_backward = inplace_backward
        self.check_target = check_target
        self.return_z_loss = return_z_loss
        self.return_lse = return_lse
        self.return_token_accuracy = return_token_accuracy

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor | CrossEntropyOutput:
        return cross_entropy(
            input, target, weight=self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
            label_smoothing=self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
            inplace_backward=self.inplace_backward, check_target=self.check_target, return_z_loss=self.return_z_loss,
            return_lse=self.return_lse, return_token_accuracy=self.return_token_accuracy,
        )  # fmt: skip

    def extra_repr(self) -> str:
        # Empty with the defaults, so the repr is torch's "CrossEntropyLoss()".
        extras = {"z_loss": (self.z_loss, 0.0), "softcap": (self.softcap, None)}
        extras |= {"inplace_backward": (self.inplace_backward, False), "check_target": (self.check_target, True)}
        extras |= {f"return_{k}": (getattr(self, f"return_{k}"), False) for k in ("z_loss", "lse", "token_accuracy")}
        return ", ".join(f"{k}={v}" for k, (v, default) in extras.items() if v != default)


class LinearCrossEntropyLoss(torch.nn.Module):
    """The module form of :func:`alchemy_ops.linear_cross_entropy`: ``loss(input, weight, target, bias=None)``
    is ``cross_entropy(F.linear(input, weight, bias), target)`` without the ``[N, V]`` logits.

    The constructor takes the keyword options of ``linear_cross_entropy`` (``class_weight`` is a buffer,
    as ``CrossEntropyLoss.weight``, so it follows ``.to()`` and is in the ``state_dict``). The LM-head
    ``weight`` ``(V, H)`` and ``bias`` are arguments of the call, not parameters of this module, so the
    model keeps owning (and tying) them. Shapes: input ``(N, H)`` or ``(H)``, target ``(N)`` / ``()``
    class indices or ``(N, V)`` / ``(V)`` probabilities; dtypes as the function.
    """

    class_weight: torch.Tensor | None

    def __init__(
        self,
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
    ) -> None:
        super().__init__()
        self.register_buffer("class_weight", class_weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.check_target = check_target
        self.chunk_size = chunk_size
        self.accumulate_fp32 = accumulate_fp32
        self.return_z_loss = return_z_loss
        self.return_lse = return_lse
        self.return_token_accuracy = return_token_accuracy

    def _options(self) -> dict:
        return {name: getattr(self, name) for name in _LINEAR_CROSS_ENTROPY_DEFAULTS}

    def forward(
        self, input: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor | CrossEntropyOutput:
        return linear_cross_entropy(input, weight, target, bias, class_weight=self.class_weight, **self._options())

    def extra_repr(self) -> str:
        # Only what differs from linear_cross_entropy's defaults: "LinearCrossEntropyLoss()" with none.
        defaults = _LINEAR_CROSS_ENTROPY_DEFAULTS
        changed = [f"{k}={v!r}" for k, v in self._options().items() if v != defaults[k]]
        if self.class_weight is not None:
            changed.insert(0, f"class_weight=<tensor of shape {tuple(self.class_weight.shape)}>")
        return ", ".join(changed)


# linear_cross_entropy's keyword options but class_weight (a buffer here), with their defaults.
_LINEAR_CROSS_ENTROPY_DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(linear_cross_entropy).parameters.items()
    if p.kind == p.KEYWORD_ONLY and name != "class_weight"
}
