"""``alchemy_ops.nn.CrossEntropyLoss``: a drop-in for ``torch.nn.CrossEntropyLoss``."""

from __future__ import annotations

import torch

from .cross_entropy import CrossEntropyOutput, cross_entropy

__all__ = ["CrossEntropyLoss"]


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
