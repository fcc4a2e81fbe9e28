"""Hugging Face transformers integration: ``patch(model)`` makes a causal-LM model instance compute
its training loss with alchemy_ops.

``patch(model)`` (``linear_cross_entropy=True``): a forward call with ``labels`` in training mode
takes the hidden states that reach ``lm_head`` and computes the loss with ``ao.linear_cross_entropy``
on them and ``lm_head.weight`` (and bias), so the ``[tokens, vocab]`` logits are never built;
``outputs.logits`` is None then. Without ``labels`` (inference, ``generate``) the model's own forward
runs unchanged; in eval mode (``model.eval()``, where evaluation metrics want the logits) the logits
are built and their loss is computed by ``ao.cross_entropy``, as with ``linear_cross_entropy=False``.

``patch(model, linear_cross_entropy=False)``: only the model's ``loss_function`` is replaced, by the
same causal-LM loss computed with ``ao.cross_entropy`` on the logits, without transformers' fp32
copy of bf16/fp16 logits (the kernels accumulate in fp32 anyway).

Both honour what ``transformers.loss.loss_utils.ForCausalLMLoss`` does: the label shift (tokens
``< n`` predict ``n``, the last position ignored), ``ignore_index`` (-100), a precomputed
``shift_labels``, and ``num_items_in_batch`` (the loss is summed and divided by it, which is how
gradient accumulation gets the mean over all its micro-batches).

Needs ``transformers`` (``pip install 'alchemy_ops[transformers]'``).
"""

from __future__ import annotations

import inspect
import types

import torch

try:
    import transformers
    from transformers.loss.loss_utils import ForCausalLMLoss
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "alchemy_ops.transformers needs Hugging Face transformers: pip install 'alchemy_ops[transformers]' "
        "(or pip install transformers)"
    ) from e

from .cross_entropy import cross_entropy
from .linear_cross_entropy import linear_cross_entropy as _linear_cross_entropy

__all__ = ["patch", "causal_lm_cross_entropy_loss", "SUPPORTED_MODELS"]

# Classes whose forward was read and is tested to be exactly: backbone -> slice_logits_to_keep ->
# lm_head (-> Gemma 2's final-logit softcap) -> self.loss_function, with nothing else done to the
# logits or added to the loss (MoE models add a router loss, Cohere and Granite scale the logits:
# a fused head would silently drop that, so they are refused). A subclass qualifies only if it
# keeps the class's forward.
SUPPORTED_MODELS = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
    "Phi3ForCausalLM",
    "GPT2LMHeadModel",
)


def _shifted_targets(labels: torch.Tensor, ignore_index: int, shift_labels: torch.Tensor | None) -> torch.Tensor:
    """The flat target of every position: ``labels`` shifted left by one (the last position gets
    ``ignore_index``), or ``shift_labels`` as given."""
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return shift_labels.reshape(-1)


def _reduction(num_items_in_batch: torch.Tensor | int | None) -> str:
    return "mean" if num_items_in_batch is None else "sum"


def _per_item(loss: torch.Tensor, num_items_in_batch: torch.Tensor | int | None) -> torch.Tensor:
    """A summed loss divided by ``num_items_in_batch`` (the non-ignored targets of the whole
    accumulated batch); a mean loss as it is."""
    if num_items_in_batch is None:
        return loss
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def causal_lm_cross_entropy_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """``transformers``' ``ForCausalLMLoss`` computed by ``ao.cross_entropy``, on the logits as they
    are (no fp32 copy of bf16/fp16 logits: the kernel accumulates in fp32).

    Args:
        logits: ``(batch, seq, vocab_size)``, any floating dtype.
        labels: int64 ``(batch, seq)``; shifted here unless ``shift_labels`` is given.
        vocab_size: the class count, ``logits.shape[-1]``.
        num_items_in_batch: if given, the loss is summed and divided by it.
        ignore_index: label value that adds no loss.
        shift_labels: int64 ``(batch, seq)`` targets already aligned with the logits.
        kwargs: the model's other forward kwargs, ignored (as ``ForCausalLMLoss`` does).

    Returns:
        The scalar loss, in the logits' dtype.
    """
    target = _shifted_targets(labels, ignore_index, shift_labels).to(logits.device)
    loss = cross_entropy(
        logits.reshape(-1, vocab_size), target, ignore_index=ignore_index, reduction=_reduction(num_items_in_batch)
    )
    return _per_item(loss, num_items_in_batch)


def _linear_causal_lm_loss(
    hidden_states: torch.Tensor,
    lm_head: torch.nn.Linear,
    labels: torch.Tensor,
    softcap: float | None,
    num_items_in_batch: torch.Tensor | int | None,
    ignore_index: int,
    shift_labels: torch.Tensor | None,
) -> torch.Tensor:
    """The loss of ``causal_lm_cross_entropy_loss(lm_head(hidden_states), labels, ...)`` by
    ``ao.linear_cross_entropy``, without the logits. ``hidden_states`` ``(..., hidden)``."""
    target = _shifted_targets(labels, ignore_index, shift_labels).to(hidden_states.device)
    loss = _linear_cross_entropy(
        hidden_states.reshape(-1, hidden_states.shape[-1]),
        lm_head.weight,
        target,
        lm_head.bias,
        ignore_index=ignore_index,
        reduction=_reduction(num_items_in_batch),
        softcap=softcap,
    )
    return _per_item(loss, num_items_in_batch)


def _var_keyword_name(signature: inspect.Signature) -> str:
    return next(p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD)


def _fused_head_forward(self: transformers.PreTrainedModel, *args, **kwargs):
    """The patched ``forward`` of one instance (bound to it): with ``labels`` in training mode, runs
    the class's own forward without them while a pre-hook on ``lm_head`` takes the hidden states and hands the head
    zero positions (so no logits are built), then computes the loss from those hidden states."""
    forward = type(self).forward
    signature = inspect.signature(forward)
    bound = signature.bind(self, *args, **kwargs)
    labels = bound.arguments.get("labels")
    if labels is None or not self.training:
        return forward(self, *args, **kwargs)
    bound.arguments["labels"] = None
    # The loss kwargs (num_items_in_batch, shift_labels, ...) stay in: the class's forward passes them
    # on to the backbone as well.
    extra = bound.arguments.setdefault(_var_keyword_name(signature), {})
    return_dict = extra.pop("return_dict", None)
    if return_dict is None:
        return_dict = self.config.return_dict
    extra["return_dict"] = True

    taken = []

    def take_hidden_states(module: torch.nn.Module, inputs: tuple) -> tuple:
        (hidden_states,) = inputs
        taken.append(hidden_states)
        return (hidden_states.narrow(-2, 0, 0),)

    handle = self.lm_head.register_forward_pre_hook(take_hidden_states)
    try:
        outputs = forward(*bound.args, **bound.kwargs)
    finally:
        handle.remove()
    if len(taken) != 1:
        raise RuntimeError(
            f"alchemy_ops.transformers: {type(self).__name__}.forward called lm_head {len(taken)} times, "
            "expected once; patch it with linear_cross_entropy=False"
        )
    loss = _linear_causal_lm_loss(
        taken[0],
        self.lm_head,
        labels,
        getattr(self.config, "final_logit_softcapping", None),
        extra.get("num_items_in_batch"),
        extra.get("ignore_index", -100),
        extra.get("shift_labels"),
    )
    # Rebuilt, not assigned: a ModelOutput's tuple form and integer indexing follow field order,
    # and loss is the first field.
    fields = {name: value for name, value in outputs.items() if name not in ("loss", "logits")}
    outputs = type(outputs)(loss=loss, logits=None, **fields)
    return outputs if return_dict else outputs.to_tuple()


def _is_patched_forward(forward: object) -> bool:
    return isinstance(forward, types.MethodType) and forward.__func__ is _fused_head_forward


def _check_patchable(model: object) -> None:
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(
            f"alchemy_ops.transformers.patch takes a Hugging Face PreTrainedModel instance, got {type(model).__name__}"
        )
    name = type(model).__name__
    verified = [getattr(transformers, cls, None) for cls in SUPPORTED_MODELS]
    if not any(cls is not None and type(model).forward is cls.forward for cls in verified):
        raise ValueError(
            f"alchemy_ops.transformers.patch cannot patch {name}: its forward is not one whose loss it "
            f"knows how to fuse (supported: {', '.join(SUPPORTED_MODELS)}). For another causal LM, "
            "compute the loss yourself with ao.linear_cross_entropy(hidden_states, lm_head.weight, labels)"
        )
    if not isinstance(getattr(model, "lm_head", None), torch.nn.Linear):
        raise ValueError(f"alchemy_ops.transformers.patch cannot patch {name}: its lm_head is not a torch.nn.Linear")
    own_forward = model.__dict__.get("forward")
    if own_forward is not None and not _is_patched_forward(own_forward):
        raise ValueError(
            f"alchemy_ops.transformers.patch cannot patch this {name}: its forward was already replaced on the "
            f"instance ({own_forward!r}); patch the model before wrapping it"
        )
    if getattr(model, "_loss_function", ForCausalLMLoss) not in (ForCausalLMLoss, causal_lm_cross_entropy_loss):
        raise ValueError(
            f"alchemy_ops.transformers.patch cannot patch {name}: it has a custom loss_function "
            f"({model._loss_function!r}), which the patch would replace"
        )


def patch(model: transformers.PreTrainedModel, *, linear_cross_entropy: bool = True) -> transformers.PreTrainedModel:
    """Makes this model instance compute its causal-LM loss with alchemy_ops (other instances of its
    class are untouched). Patching again replaces the previous patch.

    Args:
        model: a Hugging Face causal LM instance, one of ``SUPPORTED_MODELS`` (Llama, Mistral, Qwen2,
            Qwen3, Gemma, Gemma 2, Phi-3, GPT-2), in any dtype.
        linear_cross_entropy: True: with ``labels`` in training mode, the loss is
            ``ao.linear_cross_entropy`` of the hidden states and ``lm_head`` (Gemma 2's
            ``final_logit_softcapping`` as ``softcap``), and ``outputs.logits`` is None; without
            ``labels`` the model's forward is unchanged (so ``generate`` and ``logits_to_keep`` behave
            as before); in eval mode as False. False: only the cross-entropy of the logits is
            replaced, by ``ao.cross_entropy`` (the logits are built and returned).

    Returns:
        ``model`` itself.

    Raises:
        TypeError: ``model`` is not a ``transformers.PreTrainedModel``, or ``linear_cross_entropy``
            not a bool.
        ValueError: a model whose forward is not a verified causal-LM layout, whose ``lm_head`` is not
            a ``nn.Linear``, or that has a custom ``loss_function``.
    """
    if not isinstance(linear_cross_entropy, bool):
        raise TypeError(
            f"alchemy_ops.transformers.patch: linear_cross_entropy must be a bool, got {linear_cross_entropy!r}"
        )
    _check_patchable(model)
    model.__dict__.pop("forward", None)
    model.loss_function = causal_lm_cross_entropy_loss
    if linear_cross_entropy:
        model.forward = types.MethodType(_fused_head_forward, model)
    return model
