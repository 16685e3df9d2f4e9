"""MMLU 0-shot scoring speed on the seeded 10% subset (1,435 questions), with the machine's speed beside it.

Times :func:`fedtune.mmlu.evaluate_mmlu` (what ``fedtune eval mmlu --subset``
runs after loading the model) with the linear layers on packed weights (the
default, :mod:`fedtune.models.packed`) and, with ``--compare``, on their
plain forward. The two modes alternate over four interleaved chunks of the
subjects, so a change in the machine's speed during the run hits both alike.
A 2048² fp32 matmul probe before and after says how fast the machine was:
on a shared machine it varies with the load, so compare seconds only at a
similar probe. Target: under 600 s for the whole subset.

    python benchmarks/mmlu_speed.py [--compare] [--subjects-every 1]

Prints a table and writes ``benchmarks/results/mmlu_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import fedtune.evaluation as evaluation
from fedtune.config import ModelConfig
from fedtune.mmlu import CATEGORIES, evaluate_mmlu
from fedtune.models.base import load_causal_lm


def matmul_gflops(seconds: float = 5.0, n: int = 2048) -> float:
    """fp32 GFLOP/s of back-to-back n × n matmuls for about ``seconds``."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - t0) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--compare", action="store_true", help="also time the plain (unpacked) linear layers")
    ap.add_argument("--subjects-every", type=int, default=1, help="every k-th subject only (2: half of them)")
    ap.add_argument("--out", default="benchmarks/results/mmlu_speed.json")
    args = ap.parse_args()

    torch.manual_seed(0)
    lm, tok = load_causal_lm(ModelConfig(name=args.model))
    lm.eval()
    subjects = sorted(CATEGORIES)[:: args.subjects_every]
    chunks = [subjects[i::4] for i in range(4)]
    modes = ["packed", "plain"] if args.compare else ["packed"]
    packed_linears = evaluation.packed_linears
    totals = {m: {"seconds": 0.0, "questions": 0, "prompt_tokens": 0, "correct": 0.0} for m in modes}
    before = matmul_gflops()
    for c, chunk in enumerate(chunks):
        for mode in modes if c % 2 == 0 else modes[::-1]:
            evaluation.packed_linears = packed_linears if mode == "packed" else (lambda model: nullcontext())
            t0 = time.perf_counter()
            r = evaluate_mmlu(lm, tok, subset=True, subjects=chunk)
            totals[mode]["seconds"] += time.perf_counter() - t0
            totals[mode]["questions"] += r.questions
            totals[mode]["prompt_tokens"] += r.prompt_tokens
            totals[mode]["correct"] += sum(r.subjects[s] * r.counts[s] for s in r.subjects)
    evaluation.packed_linears = packed_linears
    after = matmul_gflops()

    table = Table(title=f"MMLU 0-shot subset · {args.model} · {len(subjects)} subjects · matmul probe "
                        f"{before:.0f} → {after:.0f} GFLOP/s", title_justify="left")
    for col in ("linear layers", "questions", "prompt tokens", "seconds", "tokens/s", "accuracy (questions)"):
        table.add_column(col, justify="right" if col != "linear layers" else "left")
    for mode, t in totals.items():
        table.add_row(mode, f"{t['questions']:,}", f"{t['prompt_tokens']:,}", f"{t['seconds']:.0f}",
                      f"{t['prompt_tokens'] / t['seconds']:.0f}", f"{t['correct'] / t['questions']:.4f}")
    Console().print(table)
    result = {"model": args.model, "subjects": len(subjects), "matmul_gflops_before": before,
              "matmul_gflops_after": after, "modes": totals}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
