"""Heterogeneous-rank LoRA at small scale: which aggregation serves clients of mixed ranks best?

8 clients with LoRA ranks 64, 32, 16, 16, 8, 8, 4, 4 (scale alpha / r = 2 at
every rank), Dirichlet(0.5) label skew, every client in every round. Methods:
FedIT with zero-padding, FLoRA (stacking), FLoRIST (merge mode at τ = 0.9 and
0.99, truncate mode at τ = 0.9), FlexLoRA, FFA-LoRA (A frozen, B averaged), and,
for reference, homogeneous-rank FedIT (every client r = 8). FlexLoRA's accuracy is
each client's own model (the global factors cut to its rank) scored and
weighted by the clients' data, as the reference code scores it; the row also
keeps each rank's score (``accuracy_by_model_per_round``; ``rank_64`` is the
server's model, what rows recorded before per-client scoring measured).

- ``minilm``: MiniLM-L6 classifier on SST-2 (dev accuracy).
- ``smollm2``: SmolLM2-135M-Instruct on SNLI as instructions (choice-scoring accuracy).

For each model: a table of accuracy at every evaluated round, the size of each
round's step of the dense LoRA change ΔW = merged + s·B·A (root-sum-square of
the Frobenius norms over modules), total bytes up and down, wall seconds per
method (the run alone: no timing probe), and the per-layer ranks FLoRIST kept
in the last round. The JSON also holds, per round, ‖ΔW‖, the norm of the clients'
weighted mean s Σ p_i B_i A_i, the head's step and each client's ‖s B_i A_i‖.
The report's plots (accuracy vs round and vs cumulative bytes) go to
``benchmarks/results/hetero_lora_<label>_<model>/`` and everything to
``benchmarks/results/hetero_lora.json``, under ``<label>/<model>``, so runs at
several scales sit side by side:

    python benchmarks/hetero_lora.py --label tiny --models minilm --rounds 2 --steps 20 \\
        -o train.lr=5e-3 -o train.lr_schedule=constant
    python benchmarks/hetero_lora.py --label learn --models minilm --rounds 8 --steps 20 \\
        -o train.lr=1e-3 -o train.lr_schedule=constant

The sizes (rounds, local steps, evaluation examples) are flags because a
2-core machine cannot run the SmolLM2 half at any real scale in minutes; the
JSON records the sizes used with the numbers. ``--methods`` runs a subset (or
a variant: one change against a method, to tell causes apart) at the sizes
already recorded under the label; a run at those sizes keeps the rows of the
methods it did not run, a run at other sizes replaces the label's entry.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from fedtune.aggregation import Tensors, normalized_weights
from fedtune.config import load_config
from fedtune.models.lora import MERGED, base_weight_name, lora_modules
from fedtune.report import build_report
from fedtune.run import execute_with
from fedtune.runlog import load_run
from fedtune.runtime.inprocess import InProcessPool

RANKS = [64, 32, 16, 16, 8, 8, 4, 4]

METHODS: dict[str, list[str]] = {
    "fedit r=8 (homogeneous)": ["algorithm.name=fedit"],
    "fedit zero-pad": ["algorithm.name=fedit", f"lora.client_ranks={RANKS}"],
    "flora": ["algorithm.name=flora", f"lora.client_ranks={RANKS}"],
    "florist-merge τ=0.9": ["algorithm.name=florist", "algorithm.options.tau=0.9", "algorithm.options.mode=merge",
                            f"lora.client_ranks={RANKS}"],
    "florist-merge τ=0.99": ["algorithm.name=florist", "algorithm.options.tau=0.99", "algorithm.options.mode=merge",
                             f"lora.client_ranks={RANKS}"],
    "florist-truncate τ=0.9": ["algorithm.name=florist", "algorithm.options.tau=0.9",
                               "algorithm.options.mode=truncate", f"lora.client_ranks={RANKS}"],
    "flexlora": ["algorithm.name=flexlora", f"lora.client_ranks={RANKS}"],
    "ffa": ["algorithm.name=ffa", f"lora.client_ranks={RANKS}"],
}

VARIANTS: dict[str, list[str]] = {
    "flora r=8 (homogeneous)": ["algorithm.name=flora"],
    "flora ranks reversed": ["algorithm.name=flora", f"lora.client_ranks={RANKS[::-1]}"],
    "flora lr=5e-4": ["algorithm.name=flora", f"lora.client_ranks={RANKS}", "train.lr=5e-4"],
}
"""One change at a time against a method above, to tell causes apart; run only when named in ``--methods``."""

MODELS = {
    "minilm": ("configs/quickstart.yaml", "eval/accuracy", []),
    "smollm2": ("configs/snli_instruct_fedit.yaml", "eval/accuracy", ["eval.metrics=[choice]"]),
}


def _effective(tensors: Tensors, scale: float) -> dict[str, torch.Tensor]:
    """Per adapted module, the dense change of its base weight: merged/<W> (if any) + s·B·A."""
    out = {}
    for module, (a, b) in lora_modules(tensors).items():
        delta = scale * (tensors[b].double() @ tensors[a].double())
        merged = tensors.get(MERGED + base_weight_name(module))
        out[module] = delta if merged is None else delta + merged.double()
    return out


def _with_frozen_a(update: Tensors, global_tensors: Tensors) -> Tensors:
    """An update that holds B alone (FFA-LoRA) with the frozen A₀ it multiplies, cut to B's rank."""
    out = dict(update)
    for name, b in update.items():
        a_name = name.replace("lora_B", "lora_A")
        if "lora_B" in name and a_name not in update:
            out[a_name] = global_tensors[a_name][: b.shape[1]]
    return out


def _norm(mats) -> float:
    """Frobenius norm over a set of matrices, √Σ‖M‖²."""
    return float(sum(float(m.pow(2).sum()) for m in mats) ** 0.5)


class UpdateRecorder:
    """Wraps a run's ``aggregate`` to record, per round, the norms of the model's dense LoRA change ΔW
    (root-sum-square over modules): ‖ΔW_t‖, the round's step ‖ΔW_t − ΔW_{t−1}‖, the step the clients' own
    adapters average to, ‖s Σ p_i B_i A_i‖, the head's step, and each client's ‖s B_i A_i‖."""

    def __init__(self):
        self.rows: dict[int, dict] = {}

    def driver(self, exp, hooks, body):
        algo, inner = exp.algorithm, exp.algorithm.aggregate
        scale = algo.lora.scale

        def aggregate(rnd, updates, state):
            new = inner(rnd, updates, state)
            before, after = _effective(state.global_tensors, scale), _effective(new.global_tensors, scale)
            p = normalized_weights([u.num_examples for u in updates])
            clients = [_effective(_with_frozen_a(u.tensors, state.global_tensors), scale) for u in updates]
            mean = {m: sum(pi * c[m] for pi, c in zip(p, clients)) for m in after}
            head = [new.global_tensors[k].double() - state.global_tensors[k].double()
                    for k in new.global_tensors if k in state.global_tensors and "lora_" not in k
                    and not k.startswith(MERGED)]
            self.rows[rnd] = {
                "delta_norm": _norm(after.values()),
                "step_norm": _norm(after[m] - before.get(m, 0) for m in after),
                "client_mean_norm": _norm(mean.values()),
                "head_step_norm": _norm(head),
                "client_norms": {u.client_id: _norm(c.values()) for u, c in zip(updates, clients)},
            }
            return new

        algo.aggregate = aggregate
        return body(InProcessPool(exp, on_step=hooks.on_step))


def run_model(model: str, args, out_root: Path) -> list[dict]:
    config, metric, extra = MODELS[model]
    sizes = [
        "partition.num_clients=8", "partition.method=dirichlet", "partition.alpha=0.5",
        "federation.clients_per_round=8", f"federation.rounds={args.rounds}", f"train.local_steps={args.steps}",
        f"eval.every={args.eval_every}", "lora.r=8", "lora.alpha=16",
    ] + ([f"threads={args.threads}"] if args.threads else []) + list(args.override)
    if args.eval_examples:
        sizes.append(f"data.max_eval_examples={args.eval_examples}")
    if args.train_examples:
        sizes.append(f"data.max_train_examples={args.train_examples}")
    methods = {k: v for k, v in {**METHODS, **VARIANTS}.items() if k in (args.methods or METHODS)}
    results, run_dirs = [], []
    for label, method in methods.items():
        name = label.replace(" ", "_").replace("=", "").replace("(", "").replace(")", "").replace("τ", "tau")
        cfg = load_config(config, [f"output_dir={out_root / model}", f"name={name}", *sizes, *extra, *method])
        recorder = UpdateRecorder()
        res = execute_with(cfg, recorder.driver, "inprocess", overwrite=True)
        run = load_run(res.run_dir)
        last = run.rows[-1]
        florist = label.startswith("florist")
        results.append({
            "model": model, "method": label, "final_accuracy": last.get(metric),
            "initial_accuracy": run.rows[0].get(metric),
            "accuracy_per_round": {r["round"]: r[metric] for r in run.rows if metric in r},
            "accuracy_by_model_per_round": by_model(run.rows, metric),
            "train_loss_per_round": {r["round"]: r["train_loss"] for r in run.rows if r.get("train_loss") is not None},
            "bytes_up": last["cum_bytes_up"], "bytes_down": last["cum_bytes_down"], "seconds": res.seconds,
            "kept_rank_mean_per_round": ({r["round"]: r["agg/kept_rank_mean"] for r in run.rows
                                          if "agg/kept_rank_mean" in r} if florist else None),
            "kept_ranks_last_round": last.get("agg/kept_ranks") if florist else None,
            "update_norms_per_round": recorder.rows,
        })
        run_dirs.append(res.run_dir)
        Console().print(f"{args.label} · {model} · {label}: {metric} {last.get(metric):.4f} ({res.seconds:.0f} s)")
    for r, path in zip(results, run_dirs):
        r["run_dir"] = str(path)
    return results


def by_model(rows: list[dict], metric: str) -> dict[str, dict[int, float]] | None:
    """``eval/<model>/<m>`` per round for every model scored beside ``metric`` (FlexLoRA's ranks); None if none."""
    prefix, _, name = metric.partition("/")
    out: dict[str, dict[int, float]] = {}
    for r in rows:
        for k, v in r.items():
            parts = k.split("/")
            if len(parts) == 3 and parts[0] == prefix and parts[2] == name:
                out.setdefault(parts[1], {})[r["round"]] = v
    return out or None


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f}"


def _plot(args, model: str, rows: list[dict]) -> list[str]:
    """The report's plots over every recorded run of the label whose directory is still here."""
    run_dirs = [r["run_dir"] for r in rows if Path(r["run_dir"], "metrics.jsonl").is_file()]
    report = build_report(run_dirs, metric=MODELS[model][1],
                          out_dir=Path(args.results) / f"hetero_lora_{args.label}_{model}")
    return [str(p) for p in report.plots]


def _recorded(out: Path, args, sizes: dict) -> dict:
    """The results file's contents; a subset rerun (``--methods``) must match the sizes recorded under its label."""
    previous = json.loads(out.read_text()) if out.is_file() else {}
    for model in args.models:
        held = previous.get(args.label, {}).get(model)
        if args.methods and held and held["sizes"] != sizes:
            raise SystemExit(f"{out} holds {args.label}/{model} at other sizes {held['sizes']}; "
                             "rerun every method (drop --methods) or pick another --label")
    return previous


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", default="tiny",
                    help="name of this scale; the JSON keeps one entry per label and model (e.g. tiny, learn)")
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--methods", nargs="+", choices=[*METHODS, *VARIANTS], default=None,
                    help="a subset of the methods, or variants (default: every method, no variant)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10, help="local steps per client per round")
    ap.add_argument("--eval-every", type=int, default=1)
    ap.add_argument("--eval-examples", type=int, default=None, help="cap the held-out examples (default: all)")
    ap.add_argument("--train-examples", type=int, default=None, help="cap the training examples (default: all)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--override", "-o", action="append", default=[], metavar="KEY=VALUE",
                    help="further config overrides for every run, e.g. -o train.lr=5e-3")
    ap.add_argument("--runs", default="/tmp/fedtune-bench/hetero", help="where the run directories go")
    ap.add_argument("--results", default="benchmarks/results")
    ap.add_argument("--replot", action="store_true",
                    help="run nothing: redraw the label's plots from its recorded run directories")
    args = ap.parse_args()
    if args.replot:
        return replot(args)

    out = Path(args.results) / "hetero_lora.json"
    sizes = {"rounds": args.rounds, "local_steps": args.steps, "eval_every": args.eval_every,
             "eval_examples": args.eval_examples, "train_examples": args.train_examples, "clients": 8,
             "clients_per_round": 8, "dirichlet_alpha": 0.5, "overrides": args.override, "ranks": RANKS}
    _recorded(out, args, sizes)  # fail before the runs, not after

    results = []
    for model in args.models:
        results += run_model(model, args, Path(args.runs))

    table = Table(title=f"heterogeneous-rank LoRA · {args.label} · 8 clients, ranks {RANKS}, Dirichlet 0.5 · "
                        f"{args.rounds} rounds × {args.steps} local steps {' '.join(args.override)}")
    for col in ("model", "method", "accuracy per evaluated round", "‖ΔW_t − ΔW_t−1‖ per round", "MB up", "MB down",
                "s", "FLoRIST kept ranks (last round)"):
        table.add_column(col, justify="left" if col in ("model", "method") else "right", overflow="fold")
    for r in results:
        kept = r["kept_ranks_last_round"]
        ranks = f"mean {np.mean(kept):.1f}, min {min(kept)}, max {max(kept)}: {kept}" if kept else "-"
        accs = " ".join(f"{a:.3f}" for a in r["accuracy_per_round"].values())
        steps = " ".join(f"{n['step_norm']:.2f}" for n in r["update_norms_per_round"].values())
        table.add_row(r["model"], r["method"], accs, steps, _mb(r["bytes_up"]), _mb(r["bytes_down"]),
                      f"{r['seconds']:.0f}", ranks)
    Console().print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = _recorded(out, args, sizes)  # read again: another run may have written meanwhile
    scale = previous.setdefault(args.label, {})
    for model in args.models:
        same = model in scale and scale[model]["sizes"] == sizes  # keep the rows of the methods not rerun
        kept = {r["method"]: r for r in scale[model]["results"]} if same else {}
        kept.update({r["method"]: r for r in results if r["model"] == model})
        rows = [kept[m] for m in [*METHODS, *VARIANTS] if m in kept]
        gone = [r["method"] for r in rows if not Path(r["run_dir"], "metrics.jsonl").is_file()]
        if gone and same:  # the plots would lose those runs' lines: keep the recorded ones
            print(f"{args.label}/{model}: plots not redrawn, the run directories of {gone} are gone")
            plots = scale[model].get("plots", [])
        else:
            plots = _plot(args, model, rows)
        scale[model] = {"sizes": sizes, "results": rows, "plots": plots}
    out.write_text(json.dumps(previous, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {out}")


def replot(args) -> None:
    out = Path(args.results) / "hetero_lora.json"
    previous = json.loads(out.read_text()) if out.is_file() else {}
    if args.label not in previous:
        raise SystemExit(f"{out} holds no runs labelled '{args.label}' to replot")
    for model in args.models:
        entry = previous[args.label].get(model)
        if entry is None or not any(Path(r["run_dir"], "metrics.jsonl").is_file() for r in entry["results"]):
            print(f"{args.label}/{model}: no recorded run directory is here; plots left as they are")
            continue
        for r in entry["results"]:
            r.pop("plots", None)  # the plots belong to the entry, not to one row
        entry["plots"] = _plot(args, model, entry["results"])
        print(f"{args.label}/{model}: {entry['plots']}")
    out.write_text(json.dumps(previous, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
