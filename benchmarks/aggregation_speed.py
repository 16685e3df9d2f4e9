"""Aggregation speed: FLoRIST on stacked LoRA factors vs a dense SVD of ΔW (FlexLoRA-style).

LLaMA-7B shapes: d = 4096, 32 layers, LoRA on q and v → 64 modules of d × d;
8 clients with ranks 64, 32, 16, 16, 8, 8, 4, 4 (R = 152), random float32
factors, weights from random client sizes.

(a) FLoRIST: ``stack_factors`` + ``florist`` (thin SVDs of d × R and R × d, an
    R × R core), timed on every module;
(b) dense: ΔW = Σ p_i B_i A_i (d × d), its full SVD, truncation to FLoRIST's k.
    A d × d SVD takes tens of seconds here, so (b) is timed on ``--dense-modules``
    modules and scaled to all of them (the table says so).

On module 0 both give rank-k factors; the relative Frobenius error between
their ΔW shows the two compute the same thing. Targets: (a) ≥ 20× faster than
(b), and (a) under 10 s for all modules.

Precision: FLoRIST runs as the library does, in float64 (float32 thin SVDs
would be faster, but float64 keeps the kept-rank decision free of float32
rounding). The dense SVD runs in float32, faster than float64 on a d × d
matrix, so the baseline is as fast as it can fairly be and the ratio is a lower
bound; the error check (``rel_err_vs_dense_module0``) shows float32 is accurate
enough for it.

    python benchmarks/aggregation_speed.py [--tau 0.9 --dense-modules 2]
    python benchmarks/aggregation_speed.py --quick      # d = 1024, 4 layers: seconds

Prints a table and writes ``benchmarks/results/aggregation_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from fedtune.aggregation import florist, lora_product, stack_factors, weighted_product_sum

RANKS = [64, 32, 16, 16, 8, 8, 4, 4]


def random_module(g: torch.Generator, d: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per client A_i ~ N(0, 1/d) (r_i × d) and B_i ~ N(0, 0.01²) (d × r_i), float32."""
    As = [torch.randn(r, d, generator=g) / d**0.5 for r in RANKS]
    Bs = [torch.randn(d, r, generator=g) * 0.01 for r in RANKS]
    return As, Bs


def dense_svd_baseline(As, Bs, weights, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FlexLoRA-style: ΔW = Σ p_i B_i A_i, full SVD in float32, B = U[:, :k] diag(S[:k]), A = Vᵀ[:k]."""
    U, S, Vh = torch.linalg.svd(weighted_product_sum(As, Bs, weights), full_matrices=False)
    return Vh[:k], U[:, :k] * S[:k]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--tau", type=float, default=0.9)
    ap.add_argument("--dense-modules", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="d = 1024, 4 layers")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/aggregation_speed.json")
    args = ap.parse_args()
    d, layers = (1024, 4) if args.quick else (args.d, args.layers)
    n_modules = 2 * layers  # q and v per layer
    n_dense = min(args.dense_modules, n_modules)

    g = torch.Generator().manual_seed(args.seed)
    sizes = torch.randint(50, 1000, (len(RANKS),), generator=g).tolist()
    modules = [random_module(g, d) for _ in range(n_modules)]

    t0 = time.perf_counter()
    out = [florist(*stack_factors(As, Bs, sizes), args.tau) for As, Bs in modules]
    florist_s = time.perf_counter() - t0
    ks = [A_g.shape[0] for A_g, _, _ in out]
    kept = [float((s[:k].double() ** 2).sum() / (s.double() ** 2).sum()) for (_, _, s), k in zip(out, ks)]

    dense_times, dense_factors = [], []
    for (As, Bs), k in zip(modules[:n_dense], ks):
        t0 = time.perf_counter()
        dense_factors.append(dense_svd_baseline(As, Bs, sizes, k))
        dense_times.append(time.perf_counter() - t0)
    dense_per_module = sum(dense_times) / n_dense
    dense_s = dense_per_module * n_modules

    A_g, B_g, _ = out[0]
    ref = lora_product(*dense_factors[0]).double()
    rel_err = float(torch.linalg.norm(lora_product(A_g, B_g).double() - ref) / torch.linalg.norm(ref))

    ratio = dense_s / florist_s
    result = {
        "d": d, "layers": layers, "modules": n_modules, "ranks": RANKS, "client_sizes": sizes, "tau": args.tau,
        "florist_s": florist_s, "florist_per_module_s": florist_s / n_modules,
        "dense_modules_timed": n_dense, "dense_times_s": dense_times, "dense_per_module_s": dense_per_module,
        "dense_scaled_s": dense_s, "ratio": ratio, "kept_rank_min": min(ks), "kept_rank_max": max(ks),
        "kept_energy_min": min(kept), "rel_err_vs_dense_module0": rel_err,
        "target_ratio_met": ratio >= 20, "target_florist_under_10s_met": florist_s < 10,
        "torch_threads": torch.get_num_threads(),
    }
    table = Table(title=f"{n_modules} LoRA modules {d}×{d}, ranks {RANKS}, τ = {args.tau}")
    for col in ("method", "seconds", "s/module", "note"):
        table.add_column(col, justify="left" if col in ("method", "note") else "right")
    table.add_row("(a) FLoRIST", f"{florist_s:.2f}", f"{florist_s / n_modules:.3f}",
                  f"all {n_modules} modules; < 10 s: {'met' if florist_s < 10 else 'NOT met'}")
    table.add_row("(b) dense SVD, scaled", f"{dense_s:.1f}", f"{dense_per_module:.2f}",
                  f"{n_dense} of {n_modules} modules timed, ×{n_modules / n_dense:g}")
    table.add_row("ratio (b)/(a)", f"{ratio:.0f}×", "", f"≥ 20×: {'met' if ratio >= 20 else 'NOT met'}")
    k_range = f"{min(ks)}" if min(ks) == max(ks) else f"{min(ks)}–{max(ks)}"
    table.add_row("kept rank k", k_range, "", f"of {sum(RANKS)}; energy kept ≥ {min(kept):.4f}")
    table.add_row("ΔW rel. err (a)–(b)", f"{rel_err:.1e}", "", "module 0, same k")
    Console().print(table)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
