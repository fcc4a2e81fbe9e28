"""End-to-end cases: one training step with ``torch.nn.CrossEntropyLoss`` against the same step with
``alchemy_ops.nn.CrossEntropyLoss``, and the loss's share of the step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import alchemy_ops as ao

from .harness import time_fn


@dataclass
class TrainingCase:
    name: str
    make: Callable[[torch.nn.Module], tuple[Callable[[], torch.Tensor], Callable[[], None]]]


def _digits_mlp(device: str):
    """A small MLP on scikit-learn's bundled digits (no download), batches of 512."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data[:512], dtype=torch.float32, device=device) / 16
    y = torch.tensor(digits.target[:512], device=device)

    def make(criterion):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)).to(device)
        return _step(model, criterion, x, y), _loss_only(model, criterion, x, y)

    return TrainingCase("digits MLP 64-256-10, batch 512", make)


def _lm_head(device: str, tokens: int, hidden: int, vocab: int):
    """A language-model output layer: [tokens, hidden] @ [hidden, vocab] -> cross-entropy."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, hidden, device=device, generator=g)
    y = torch.randint(0, vocab, (tokens,), device=device, generator=g)

    def make(criterion):
        torch.manual_seed(0)
        model = torch.nn.Linear(hidden, vocab).to(device)
        return _step(model, criterion, x, y), _loss_only(model, criterion, x, y)

    return TrainingCase(f"LM head {tokens} tokens x {hidden} -> {vocab} vocab", make)


def _step(model, criterion, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = criterion(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def _loss_only(model, criterion, x, y):
    """The loss's forward+backward alone, on logits the model produced."""
    with torch.no_grad():
        logits = model(x)

    def run():
        z = logits.detach().requires_grad_()
        criterion(z, y).backward()

    return run


def training_cases(preset: str, device: str) -> list[TrainingCase]:
    cases = [_digits_mlp(device)]
    if preset != "tiny":
        cases.append(_lm_head(device, 1024, 512, 32000))
    return cases


def run_training_cases(preset: str, device: str, warmup: int, reps: int) -> list[dict]:
    rows = []
    for case in training_cases(preset, device):
        for provider, criterion in [
            ("alchemy_ops", ao.nn.CrossEntropyLoss()),
            ("torch", torch.nn.CrossEntropyLoss()),
        ]:
            step, loss_only = case.make(criterion)
            t = time_fn(step, device, warmup, reps)
            loss = time_fn(loss_only, device, warmup, reps)
            rows.append({
                "case": case.name, "provider": provider, "step_ms": t.median_s * 1e3,
                "p20_ms": t.p20_s * 1e3, "p80_ms": t.p80_s * 1e3, "loss_ms": loss.median_s * 1e3,
                "loss_share": loss.median_s / t.median_s,
            })  # fmt: skip
    return rows


def print_training_table(rows: list[dict]) -> None:
    if not rows:
        return
    print(f"\n{'training step':<50} {'loss module':<14} {'step ms':>9} {'p20-p80 ms':>15} {'loss ms':>8} {'share':>6}")
    for r in rows:
        print(
            f"{r['case']:<50} {r['provider']:<14} {r['step_ms']:>9.1f} {r['p20_ms']:>7.1f}-{r['p80_ms']:<7.1f} "
            f"{r['loss_ms']:>8.1f} {r['loss_share']:>6.0%}"
        )
