"""A Trainer-free training loop of a tiny random ``LlamaForCausalLM`` (vocab 32000, so the LM head
and its loss are most of the step), unpatched against ``alchemy_ops.transformers.patch``-ed, in
fp32 and under bf16 ``torch.autocast``.

    python -m benchmarks.hf_llama [--steps 10] [--batch 2] [--seq 128] [--hidden 128] [--layers 2]

Step time: the variants take turns step by step in one process (so machine noise hits them alike);
the median of ``--steps`` steps after 2 warm-up steps. Loss deviation: each variant trains its own
copy of the same initial model on the same batches; the table gives the first step's |loss - the
unpatched loss| (the loss computation alone) and the largest over all steps (plus training drift).
Peak memory: each variant runs alone in a fresh subprocess (glibc's mmap threshold fixed at 1 MiB,
so freed large blocks go back to the OS); after one step has allocated the gradients and AdamW
state, the kernel's peak-RSS counter is reset (``/proc/self/clear_refs``) and the peak resident set
(``VmHWM``) over 2 more steps is read; the step's own peak is that minus the resident set just
before (model, gradients, optimizer state, libraries).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

VARIANTS = ("unpatched", "cross_entropy", "linear_cross_entropy")
PRECISIONS = ("fp32", "bf16 autocast")


def make_model(hidden: int, layers: int):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def apply_variant(model, variant: str):
    if variant == "unpatched":
        return model
    from alchemy_ops.transformers import patch

    return patch(model, linear_cross_entropy=variant == "linear_cross_entropy")


def batches(batch: int, seq: int, count: int) -> list[dict[str, torch.Tensor]]:
    """Random token batches with a tenth of the labels -100 (as padding or prompt masking gives)."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(count):
        input_ids = torch.randint(0, 32000, (batch, seq), generator=gen)
        labels = input_ids.masked_fill(torch.rand(batch, seq, generator=gen) < 0.1, -100)
        out.append({"input_ids": input_ids, "labels": labels})
    return out


class Trainer:
    """One model copy, its AdamW and the step of the loop."""

    def __init__(self, model, precision: str):
        self.model = model.train()
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        self.autocast = precision == "bf16 autocast"

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.model(**batch).loss
        loss.backward()
        self.optimizer.step()
        return loss.detach().item()


def time_interleaved(args, precision: str) -> dict[str, dict]:
    base = make_model(args.hidden, args.layers)
    data = batches(args.batch, args.seq, args.steps + 2)
    trainers, results = {}, {}
    for variant in VARIANTS:
        trainers[variant] = Trainer(apply_variant(copy.deepcopy(base), variant), precision)
        results[variant] = {"times": [], "losses": [], "error": None}
    for step, batch in enumerate(data):
        print(f"{precision}: step {step + 1} of {len(data)}", file=sys.stderr, flush=True)
        for variant, trainer in trainers.items():
            if results[variant]["error"]:
                continue
            start = time.perf_counter()
            try:
                loss = trainer.step(batch)
            except RuntimeError as e:  # reported in the table: e.g. an op without autocast support
                results[variant]["error"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
                continue
            results[variant]["times"].append(time.perf_counter() - start)
            results[variant]["losses"].append(loss)
    reference = results["unpatched"]["losses"]
    for result in results.values():
        times, losses = result.pop("times")[2:], result["losses"]
        result["step_ms"] = 1e3 * statistics.median(times) if times else None
        deviations = [abs(a - b) for a, b in zip(losses, reference, strict=False)]  # a failed variant has fewer
        result["first_loss_deviation"] = deviations[0] if deviations else None
        result["max_loss_deviation"] = max(deviations) if deviations else None
    return results


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def measure_memory(args, variant: str, precision: str) -> dict:
    """Run in a fresh process: the resident set before a step and the peak during 3 steps, in MiB."""
    trainer = Trainer(apply_variant(make_model(args.hidden, args.layers), variant), precision)
    data = batches(args.batch, args.seq, 3)
    try:
        trainer.step(data[0])
        before = _rss_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets VmHWM to the current RSS
        for batch in data[1:]:
            trainer.step(batch)
    except RuntimeError as e:
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
    peak = _rss_kib("VmHWM")
    return {"rss_before_mib": before / 1024, "peak_rss_mib": peak / 1024, "step_peak_mib": (peak - before) / 1024}


def memory_in_subprocess(args, variant: str, precision: str) -> dict:
    command = [sys.executable, "-m", "benchmarks.hf_llama", "--memory-of", variant, precision]
    command += ["--batch", str(args.batch), "--seq", str(args.seq), "--hidden", str(args.hidden)]
    command += ["--layers", str(args.layers)]
    # A fixed mmap threshold turns off glibc's adaptive one, under which freed logits-sized blocks stay
    # in the heap: RSS then drops back after a step, so the RSS before a step is what is live.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    result = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[dict], args) -> None:
    print(
        f"\nLlamaForCausalLM, random init: hidden {args.hidden}, {args.layers} layers, vocab 32000; "
        f"batch {args.batch} x {args.seq} tokens; AdamW. torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()})\n"
    )
    print("| precision | loss | step ms (median) | speed-up | peak RSS MiB | step peak MiB | loss dev. step 1 | max |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    baseline = {row["precision"]: row for row in rows if row["variant"] == "unpatched"}
    for row in rows:
        if row.get("error"):
            print(f"| {row['precision']} | {row['variant']} | fails: {row['error']} | | | | | |")
            continue
        base = baseline[row["precision"]]["step_ms"]
        speedup = None if row["step_ms"] is None or base is None else base / row["step_ms"]
        print(
            f"| {row['precision']} | {row['variant']} | {_fmt(row['step_ms'], '.0f')} | {_fmt(speedup, '.2f')}x "
            f"| {_fmt(row.get('peak_rss_mib'), '.0f')} | {_fmt(row.get('step_peak_mib'), '.0f')} "
            f"| {_fmt(row['first_loss_deviation'], '.1e')} | {_fmt(row['max_loss_deviation'], '.1e')} |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant (after 2 warm-up steps)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--memory-of", nargs=2, metavar=("VARIANT", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    if args.memory_of:
        print(json.dumps(measure_memory(args, *args.memory_of)))
        return 0
    rows = []
    for precision in PRECISIONS:
        for variant, result in time_interleaved(args, precision).items():
            row = {"precision": precision, "variant": variant, **result}
            if not row["error"]:
                row.update(memory_in_subprocess(args, variant, precision))
            rows.append(row)
    print_table(rows, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
