"""FedAMoLE against the other ways of personalising: FedIT, FedPrompt, FedPTuning, FDLoRA (and their -FT forms),
local-only, and at equal bytes; the per-client test metric, 10 clients.

Scenarios (the reference code's, scaled to a 2-core CPU machine):

- ``a-0.1``, ``a-1``, ``a-100``: MiniLM-L6 on SNLI as 3-way classification, Dirichlet(α) over the labels
  (accuracy);
- ``b``: SmolLM2-135M on SNLI as instructions, α = 0.1 (choice-scoring accuracy);
- ``c``: SmolLM2-135M on the Natural Instructions "meta" split, one task per client (the first 10 of the 20
  tasks by name, ``--rows`` / 10 rows of each, as node-local files), ROUGE-L of greedy generations (128 new
  tokens; ``--new-tokens``).

Dirichlet(0.1) over SNLI's 3 labels leaves some of the 10 clients a handful of rows (5 at the default 2,000
rows, seed 0), so every Dirichlet scenario accepts clients of 5 rows or more. Every client's shard: 20% test,
10% auxiliary (FedAMoLE's routing embeddings; the other methods train on it too, so each trains on what it can
use), the rest training. Methods: FedAMoLE (``model.finetune: mole``, the reference code's defaults: 30
experts r = 8 per module, top-2, expert_choices 2, 2 to 8 experts per client); FedIT with the global model
scored on each client's test shard; FedIT-FT, the same run scored right after each client's local training
(``eval.after_local_training``); local-only; FedPrompt and FedPTuning, FedIT on prompt tuning
(20 virtual tokens) and P-tuning (20 virtual tokens, an MLP encoder of width 1024, the reference code's), with
their -FT rows from the same runs; FDLoRA (``algorithm.name: fdlora``, the reference code's defaults: sync every
5 rounds, NGOpt budget 5; it reads the auxiliary split like FedAMoLE) and FDLoRA-FT (its shared LoRA right after
local training). At equal bytes: ``fedit-r60``, FedIT at rank 60 (α = 120), whose adapters weigh what FedAMoLE's
defaults move, and ``fedamole-r1``, FedAMoLE with rank-1 experts, which moves about what FedIT's rank 8 does.
``--methods`` runs some of them; a scenario's other rows stay as recorded (under ``earlier``: their probe and
sizes). Against the reference code's 200 local steps of batch 1 per
round, each round here trains ``--steps`` steps of batch ``--batch`` (default 20 × 8), at the reference
code's learning-rate decay lr · 0.99^(r − 1) (``--schedule exponential``; ``cosine`` for the earlier rows).

Each method's figures: ``bmta``, the reference code's headline, the clients' unweighted mean at the best
evaluated round (round 0, the initial model, included, as its scripts' ``test_init`` has it) and that round;
``last_unweighted``, the last round's unweighted mean; ``value``, the last round's mean over the clients'
pooled test rows; ``best_pooled``. Every round is evaluated (``--eval-every 1``).

The recorded results (README, "Personalised mixtures of LoRA experts"): scenarios a-0.1, a-1 and a-100 from

    python benchmarks/fedamole.py --scenarios a-0.1 a-1 a-100 --rounds 6 --steps 8 --batch 8 --workers 1

(exponential schedule, every round evaluated); the rows of FedPrompt, FedPTuning, FDLoRA and the equal-bytes
settings, in a-0.1, a-1 and a-100, from one invocation per scenario

    python benchmarks/fedamole.py --scenarios a-1 --rounds 6 --steps 8 --batch 8 --workers 1 \
        --methods fedprompt fedptuning fdlora fedit-r60 fedamole-r1

b and c, every method, from two invocations side by side::

    python benchmarks/fedamole.py --scenarios b --rounds 4 --steps 5 --batch 4 --workers 1 --methods fedprompt \
        fedptuning fdlora fedit-r60 fedamole-r1 fedamole fedit local
    python benchmarks/fedamole.py --scenarios c --rows 500 --rounds 2 --steps 3 --batch 4 --new-tokens 64 \
        --workers 1 --methods fedprompt fedptuning fdlora fedit-r60 fedamole-r1 fedamole fedit local

Writes ``benchmarks/results/fedamole.json``: per scenario and method the figures above and the metric's
name, MB up/down, wall seconds and the mean experts per client (FedAMoLE), with the sizes used and a matmul
probe per worker; scenarios not run keep their earlier entries.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from mmlu_speed import matmul_gflops  # noqa: E402

from fedtune.config import load_config  # noqa: E402
from fedtune.run import execute  # noqa: E402

RESULTS = Path(__file__).parent / "results"
NI_TASKS = 10


def scenario(name: str, args) -> tuple[list[str], str]:
    """(the scenario's config overrides, the per-client metric it reports)."""
    if name.startswith("a-"):
        return (["data.name=snli", f"data.max_train_examples={args.rows}", "partition.method=dirichlet",
                 f"partition.alpha={name[2:]}", "partition.min_client_size=5", "model.name=minilm",
                 "model.max_length=64", "train.lr=2e-3"], "accuracy")
    if name == "b":
        return (["data.name=snli", f"data.max_train_examples={args.rows}", "partition.method=dirichlet",
                 "partition.alpha=0.1", "partition.min_client_size=5", "model.name=smollm2-135m",
                 "model.task=sft", "model.max_length=128", "train.lr=5e-4", "eval.metrics=[choice]"], "accuracy")
    if name == "c":
        files = ni_task_files(Path(args.runs) / "ni_meta", args.rows // 10)
        return (["data.name=natural_instructions", "data.eval_fraction=0", "partition.method=files", f"partition.files={json.dumps(files)}",
                 "model.name=smollm2-135m", "model.task=sft", "model.max_length=256", "train.lr=5e-4",
                 "eval.metrics=[rouge]", f"eval.max_new_tokens={args.new_tokens}"], "rougeL")
    raise SystemExit(f"unknown scenario {name}; choose from a-0.1, a-1, a-100, b, c")


def ni_task_files(folder: Path, rows: int) -> list[str]:
    """The meta split: the first 10 Natural Instructions tasks (sorted by name), a seeded ``rows`` of each, one
    JSON-lines file per task: client i holds task i's file."""
    import numpy as np

    from fedtune.config import DataConfig
    from fedtune.data.instructions import load_instruction_data

    data = load_instruction_data(DataConfig(name="natural_instructions", eval_fraction=0), seed=0).train
    folder.mkdir(parents=True, exist_ok=True)
    tasks = sorted(set(data["task"]))[:NI_TASKS]
    files = []
    for i, task in enumerate(tasks):
        idx = [j for j, t in enumerate(data["task"]) if t == task]
        keep = np.random.default_rng(i).permutation(idx)[:rows]
        path = folder / f"{task}.jsonl"
        path.write_text("".join(json.dumps({k: data[int(j)][k] for k in ("instruction", "input", "output")}) + "\n"
                                for j in sorted(keep)))
        files.append(str(path))
    return files


FT = ["eval.per_client=true", "eval.after_local_training=true"]
"""A FedAvg-family run scored on each client's test shard with its global model, and (its -FT form) right after
each client's local training: one run gives both rows."""
METHODS = {
    "fedamole": ["algorithm.name=fedamole", "model.finetune=mole"],
    "fedit": ["algorithm.name=fedit", *FT],
    "local": ["algorithm.name=local"],
    "fedprompt": ["algorithm.name=fedit", "model.finetune=prompt", *FT],
    "fedptuning": ["algorithm.name=fedit", "model.finetune=ptuning", *FT],
    "fdlora": ["algorithm.name=fdlora", "eval.after_local_training=true"],
    # equal bytes: FedIT at the rank whose adapters weigh what FedAMoLE's defaults move (7.4× r = 8: r = 60, the
    # scale alpha / r kept), and FedAMoLE with rank-1 experts, which move about what FedIT's r = 8 adapters do
    "fedit-r60": ["algorithm.name=fedit", "lora.r=60", "lora.alpha=120", *FT],
    "fedamole-r1": ["algorithm.name=fedamole", "model.finetune=mole", "mole.r=1", "mole.alpha=2"],
}
FT_ROWS = {"fedit": "fedit-ft", "fedprompt": "fedprompt-ft", "fedptuning": "fedptuning-ft", "fdlora": "fdlora-ft",
           "fedit-r60": "fedit-r60-ft"}
"""The methods whose runs also give an -FT row (``client_ft``: each client scored right after local training)."""
AUX = ("fedamole", "fedamole-r1", "fdlora")
"""The methods that read each client's auxiliary split (routing embeddings, FDLoRA's fusion)."""


def run_scenario(name: str, args, emit=lambda result: None) -> dict:
    """Scenario ``name``'s rows for ``args.methods``; ``emit`` gets the result so far after each method (so that
    an invocation stopped part way keeps the methods it finished)."""
    overrides, metric = scenario(name, args)
    clients = [] if name == "c" else ["partition.num_clients=10"]  # c: one client per task file
    schedule = (["train.lr_schedule=exponential", "train.lr_decay=0.99"] if args.schedule == "exponential" else
                ["train.lr_schedule=cosine"])
    base = [f"output_dir={args.runs}", *clients, "partition.client_test_fraction=0.2",
            f"federation.rounds={args.rounds}", f"train.local_steps={args.steps}", f"train.batch_size={args.batch}",
            *schedule, f"eval.every={args.eval_every}", "threads=1", "seed=0",
            "data.max_eval_examples=200",  # FedIT's global model is also scored on the dev split: kept small
            *overrides]
    probe = matmul_gflops()
    rows = {}
    for method in args.methods:
        extra = METHODS[method]
        lora = [] if any(o.startswith(("lora.", "model.finetune=")) for o in extra) else ["lora.r=8", "lora.alpha=16"]
        aux = ["partition.client_aux_fraction=0.1"] if method in AUX else []
        cfg = load_config(None, [*base, f"name={name}-{method}", *lora, *extra, *aux])
        t0 = time.perf_counter()
        res = execute(cfg, overwrite=True)
        wall = time.perf_counter() - t0
        summary = json.loads((res.run_dir / "summary.json").read_text())
        metrics = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
        entry = {"metric": metric, "mb_up": summary["cum_bytes_up"] / 1e6, "mb_down": summary["cum_bytes_down"] / 1e6,
                 "wall_s": wall}
        final, best = res.final, summary["best"]
        if method in FT_ROWS:
            rows[FT_ROWS[method]] = {**entry, **figures("client_ft", metric, final, best)}
        entry.update(figures("client_eval", metric, final, best))
        experts = [r["agg/mean_experts_per_client"] for r in metrics if "agg/mean_experts_per_client" in r]
        if experts:
            entry["mean_experts_per_client"] = sum(experts) / len(experts)
        rows[method] = entry
        print(json.dumps({"scenario": name, "method": method, "value": entry["value"], "wall_s": wall}), flush=True)
        result = {"methods": dict(rows), "matmul_gflops": {"before": probe, "after": matmul_gflops()},
                  "methods_run": [m for m in args.methods if m in rows], "invocation": args.invocation,
                  "sizes": {"rows": args.rows, "rounds": args.rounds, "steps": args.steps, "batch": args.batch,
                            "new_tokens": args.new_tokens, "eval_every": args.eval_every,
                            "lr_schedule": args.schedule, "clients": 10, "test_fraction": 0.2, "aux_fraction": 0.1}}
        emit(result)
    return result


def figures(prefix: str, metric: str, final: dict, best: dict) -> dict:
    """A method's per-client figures: ``value``, the last round's mean over the clients' pooled test rows;
    ``last_unweighted``, the last round's plain mean over clients; ``bmta`` (and its round), the reference code's
    headline, the best round's plain mean over clients; ``best_pooled`` (and its round)."""
    plain = f"{prefix}_unweighted/{metric}"
    return {"value": final[f"{prefix}/{metric}"], "last_unweighted": final.get(plain),
            "bmta": best.get(plain, {}).get("value"), "bmta_round": best.get(plain, {}).get("round"),
            "best_pooled": best[f"{prefix}/{metric}"]["value"], "best_pooled_round": best[f"{prefix}/{metric}"]["round"]}


def table(results: dict) -> Table:
    t = Table(title="FedAMoLE benchmark: per-client test metric, bmta (best round's unweighted client mean, round) "
                    "/ last round unweighted / last round over pooled rows")
    for col in ("scenario", "method", "metric", "bmta (round) / last unweighted / last pooled", "MB up / down",
                "wall s", "experts / client"):
        t.add_column(col)

    def cell(r: dict) -> str:
        if r.get("bmta") is None:  # recorded before per-round, unweighted figures
            return f"- / - / {r['value']:.4f}"
        return f"{r['bmta']:.4f} ({r['bmta_round']}) / {r['last_unweighted']:.4f} / {r['value']:.4f}"

    for name, res in results.items():
        for method, r in res["methods"].items():
            experts = r.get("mean_experts_per_client")
            t.add_row(name, method, r["metric"], cell(r), f"{r['mb_up']:.1f} / {r['mb_down']:.1f}",
                      f"{r['wall_s']:.0f}", f"{experts:.2f}" if experts else "")
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", nargs="+", default=["a-0.1", "a-1", "a-100", "b", "c"])
    parser.add_argument("--rows", type=int, default=2000, help="training rows drawn for each scenario")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--eval-every", type=int, default=1, help="rounds between per-client evaluations (0: last)")
    parser.add_argument("--schedule", choices=["exponential", "cosine"], default="exponential",
                        help="the clients' lr across rounds: the reference code's lr · 0.99^(r−1), or cosine")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                        help="the methods to run; a scenario's other methods keep their recorded rows")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--runs", default="runs/bench_fedamole")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--invocation", default=time.strftime("%Y-%m-%dT%H:%M:%S"), help=argparse.SUPPRESS)
    parser.add_argument("-o", "--output", default=str(RESULTS / "fedamole.json"))
    args = parser.parse_args()
    if args.one:
        run_scenario(args.one, args, lambda result: print("RESULT " + json.dumps({args.one: result}), flush=True))
        return
    flags = ["--rows", str(args.rows), "--rounds", str(args.rounds), "--steps", str(args.steps), "--batch",
             str(args.batch), "--new-tokens", str(args.new_tokens), "--eval-every", str(args.eval_every),
             "--schedule", args.schedule, "--runs", args.runs, "--invocation", args.invocation,
             "--methods", *args.methods]
    out = Path(args.output)
    results = json.loads(out.read_text()) if out.is_file() else {}
    pending, running, failed = list(args.scenarios), [], []
    t0 = time.perf_counter()
    while pending or running:
        while pending and len(running) < args.workers:
            name = pending.pop(0)
            running.append((name, subprocess.Popen([sys.executable, __file__, "--one", name, *flags],
                                                   stdout=subprocess.PIPE, text=True)))
        name, proc = running.pop(0)
        for line in proc.stdout:
            if line.startswith("RESULT "):  # merged into the file as it is now: another invocation may share it
                recorded = json.loads(out.read_text()) if out.is_file() else {}
                results = merged(recorded, json.loads(line[len("RESULT "):]))
                out.write_text(json.dumps(results, indent=2) + "\n")
            else:
                print(line, end="", flush=True)
        if proc.wait() != 0:
            failed.append(name)  # the other scenarios go on; their results are kept
    if failed:
        raise SystemExit(f"scenarios {failed} failed (see their errors above); the others are in {out}")
    Console().print(table({k: results[k] for k in args.scenarios if k in results}))
    print(f"wrote {out} ({(time.perf_counter() - t0) / 60:.1f} min)")


def merged(recorded: dict, new: dict) -> dict:
    """``recorded`` with ``new``'s scenarios: a scenario's methods that were not rerun keep their rows (and the
    probe and sizes of their run, under ``earlier``)."""
    out = dict(recorded)
    for name, res in new.items():
        old = recorded.get(name)
        if old is not None and old.get("invocation") == res["invocation"]:  # this invocation's result, grown
            earlier = old.get("earlier", {})
            kept = {k: v for k, v in old["methods"].items()
                    if k in earlier.get("methods", []) and k not in res["methods"]}
            out[name] = {**res, "methods": {**kept, **res["methods"]},
                         **({"earlier": {**earlier, "methods": sorted(kept)}} if kept else {})}
            continue
        if old is None or set(res["methods_run"]) >= set(METHODS):
            out[name] = res
            continue
        kept = {k: v for k, v in old["methods"].items() if k not in res["methods"]}
        earlier = {k: old[k] for k in ("matmul_gflops", "sizes", "methods_run") if k in old}
        out[name] = {**res, "methods": {**kept, **res["methods"]}, "earlier": {**old.get("earlier", {}), **earlier,
                                                                          "methods": sorted(kept)}}
    return out


if __name__ == "__main__":
    main()
