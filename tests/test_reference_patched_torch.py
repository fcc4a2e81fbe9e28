"""A user who replaces torch.nn.functional's softmax-family functions by alchemy_ops' globally
(``F.cross_entropy = ao.cross_entropy``) still gets the reference backend's results: its
compositions never call back into what was patched (that recursed forever)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import alchemy_ops as ao

TORCH_CROSS_ENTROPY = F.cross_entropy


@pytest.fixture
def patched_functional(monkeypatch):
    monkeypatch.setattr(F, "cross_entropy", ao.cross_entropy)
    monkeypatch.setattr(F, "log_softmax", ao.log_softmax)
    monkeypatch.setattr(F, "softmax", ao.softmax)
    monkeypatch.setattr(F, "gumbel_softmax", ao.gumbel_softmax)
    with ao.backend("reference"):
        yield


def test_cross_entropy_through_patched_functional(patched_functional):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 11, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    target = torch.randint(0, 11, (6, 3), generator=gen)
    target[0, 1] = -100
    weight = torch.rand(11, dtype=torch.float64, generator=gen) + 0.5
    options = dict(weight=weight, label_smoothing=0.1)
    loss = F.cross_entropy(logits, target, **options)
    (grad,) = torch.autograd.grad(loss, logits)
    expected = TORCH_CROSS_ENTROPY(logits, target, **options)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)
    module_loss = torch.nn.CrossEntropyLoss(**options)(logits, target)  # calls the patched F.cross_entropy
    torch.testing.assert_close(module_loss, expected, rtol=1e-12, atol=1e-12)
    probabilities = torch.softmax(torch.randn(6, 11, 3, dtype=torch.float64, generator=gen), 1)
    torch.testing.assert_close(
        F.cross_entropy(logits, probabilities), TORCH_CROSS_ENTROPY(logits, probabilities), rtol=1e-12, atol=1e-12
    )


def test_linear_cross_entropy_through_patched_functional(patched_functional):
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(7, 5, dtype=torch.float64, generator=gen)
    head = torch.randn(13, 5, dtype=torch.float64, generator=gen)
    target = torch.randint(0, 13, (7,), generator=gen)
    loss = ao.linear_cross_entropy(hidden, head, target, softcap=3.0)
    logits = 3.0 * torch.tanh(hidden @ head.T / 3.0)
    torch.testing.assert_close(loss, TORCH_CROSS_ENTROPY(logits, target), rtol=1e-12, atol=1e-12)


def test_softmax_family_through_patched_functional(patched_functional):
    x = torch.randn(4, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(F.log_softmax(x, dim=-1), torch.log_softmax(x, -1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(F.softmax(x, dim=-1), torch.softmax(x, -1), rtol=1e-12, atol=1e-12)
    sample = F.gumbel_softmax(x, tau=0.5, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(sample.sum(-1), torch.ones(4, dtype=torch.float64), rtol=1e-12, atol=1e-12)
