"""FedKDLoRA against FedLoRA (= FedIT), full-parameter FedAvg and centralized LoRA, on CoLA and SST-2.

The seed's setting: 4 clients, 10 rounds, 20% of the training split held by the server (its first rows,
no client holds them; every method here leaves them out of the clients' data alike). Student: MiniLM-L6
(22.7M parameters). Teacher: SmolLM2-135M-Instruct with a classification head (six times the student),
LoRA r = 16 (full fine-tuning of it costs twice the time per step on CPU), pre-trained on the server's
rows (5 epochs for CoLA, 3 for SST-2, the reference code's) once per dataset and invocation: the first
FedKDLoRA run pre-trains and saves it, the later ones reuse it by path. Each round: the teacher trains one
epoch on the server's rows, then one epoch of mutual distillation (``kd_loss: standard``, T = 2); each row
records ``kd_student_shift_per_round``, how far distillation moved the student off the FedIT average.

Methods per dataset: FedAvg (full), FedLoRA r = 8 / 16 / 32, FedKDLoRA r = 8 / 16 / 32 (α = 2r: scale 2 at
every rank), centralized LoRA (r = 8; the clients' pooled shards, the same steps per round as the four
clients together); on request (``--methods``), FedLoRA and FedKDLoRA at r = 16 and 32 with α = 16, as the
reference code builds its students (kd-server.py, ``lora_alpha=16``: scale 1 and 0.5). A run of some methods
keeps the recorded rows of the others (same sizes).

Scale (a 2-core CPU machine, the whole benchmark within 90 minutes): each dataset's training split is a
seeded subset of ``--train`` rows (default 800: the server holds 160, each client 160), dev accuracy and
MCC on ``--eval`` dev rows every 5 rounds, clients train one epoch per round. The two datasets run in
parallel processes of one thread each.

    python benchmarks/fedkd.py                       # both datasets, writes benchmarks/results/fedkd.json
    python benchmarks/fedkd.py --datasets cola --train 400 --rounds 2   # a quick look
    python benchmarks/fedkd.py --datasets sst2 --methods "fedlora r=32" "fedkdlora r=32" "fedlora r=16 α=16" \
        "fedlora r=32 α=16" "fedkdlora r=16 α=16" "fedkdlora r=32 α=16"    # the rerun and α = 16 rows recorded

Writes, per dataset and method: accuracy, MCC, MB up/down, wall seconds; the teacher's accuracy and MCC
after pre-training and at the end; the sizes used; a matmul probe before and after each dataset's runs.
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
PRETRAIN_EPOCHS = {"cola": 5, "sst2": 3}
RANKS = (8, 16, 32)
DEFAULT_METHODS = ["fedavg (full)", *(f"fedlora r={r}" for r in RANKS), *(f"fedkdlora r={r}" for r in RANKS),
                   "centralized lora r=8"]
"""What a plain invocation runs; the α = 16 rows run when named in ``--methods``."""


def methods() -> dict[str, list[str]]:
    """Every method's overrides (a FedKDLoRA run's teacher is pre-trained by the first of them a worker runs and
    reused by the others: :func:`run_dataset`)."""
    kd = ["algorithm.name=fedkd", "algorithm.options.teacher=smollm2-135m",
          "algorithm.options.teacher_finetune=lora", "algorithm.options.teacher_lora_r=16",
          "algorithm.options.teacher_lr=1e-3"]
    out = {"fedavg (full)": ["algorithm.name=fedit", "model.finetune=full", "train.lr=1e-4"]}
    out.update({f"fedlora r={r}": ["algorithm.name=fedit", f"lora.r={r}", f"lora.alpha={2 * r}"] for r in RANKS})
    out.update({f"fedkdlora r={r}": [*kd, f"lora.r={r}", f"lora.alpha={2 * r}"] for r in RANKS})
    # α = 16 at every rank, as the reference code builds its students (kd-server.py: lora_alpha=16): the scale
    # α / r is 2, 1, 0.5 at r = 8, 16, 32 (r = 8 is the row above)
    out.update({f"fedlora r={r} α=16": ["algorithm.name=fedit", f"lora.r={r}", "lora.alpha=16"] for r in RANKS[1:]})
    out.update({f"fedkdlora r={r} α=16": [*kd, f"lora.r={r}", "lora.alpha=16"] for r in RANKS[1:]})
    out["centralized lora r=8"] = ["algorithm.name=centralized"]
    return out


def run_name(method: str) -> str:
    return method.replace(" (full)", "-full").replace(" r=", "-r").replace(" α=", "-alpha").replace(" ", "-")


def run_dataset(dataset: str, args) -> dict:
    runs = Path(args.runs) / dataset
    teacher_dir = None  # the first FedKDLoRA run pre-trains the teacher; the later ones reuse it
    base = [f"output_dir={runs}", f"data.name={dataset}", f"data.max_train_examples={args.train}",
            f"data.max_eval_examples={args.eval}", "partition.method=iid", "partition.num_clients=4",
            "partition.server_fraction=0.2", "model.name=minilm", "model.max_length=64", "lora.r=8",
            "lora.alpha=16", "train.local_epochs=1", "train.batch_size=16", "train.lr=2e-3",
            "train.lr_schedule=cosine", f"federation.rounds={args.rounds}", "eval.every=5", "eval.batch_size=64",
            "threads=1", "seed=0"]
    probe_before = matmul_gflops()
    rows = {}
    for method, overrides in methods().items():
        if method not in (args.methods or DEFAULT_METHODS):
            continue
        name = run_name(method)
        if method.startswith("fedkdlora") and teacher_dir is None:
            overrides = [*overrides, f"algorithm.options.teacher_pretrain_epochs={PRETRAIN_EPOCHS[dataset]}"]
            teacher_dir = runs / name / "teacher"
        elif method.startswith("fedkdlora"):  # the saved teacher knows its base model and LoRA rank
            overrides = [o for o in overrides if o.split("=")[0] not in ("algorithm.options.teacher",
                                                                         "algorithm.options.teacher_lora_r")]
            overrides += [f"algorithm.options.teacher={teacher_dir}", "algorithm.options.teacher_pretrain_epochs=0"]
        cfg = load_config(None, [*base, f"name={name}", *overrides])
        t0 = time.perf_counter()
        res = execute(cfg, overwrite=True)
        wall = time.perf_counter() - t0
        summary = json.loads((res.run_dir / "summary.json").read_text())
        metrics = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
        row = {"accuracy": res.final.get("eval/accuracy"), "mcc": res.final.get("eval/mcc"),
               "mb_up": summary["cum_bytes_up"] / 1e6, "mb_down": summary["cum_bytes_down"] / 1e6,
               "wall_s": wall, "config": overrides,
               "per_round": {r["round"]: {"accuracy": r.get("eval/accuracy"), "mcc": r.get("eval/mcc")}
                             for r in metrics if "eval/accuracy" in r}}
        shift = {r["round"]: r["agg/kd_student_shift"] for r in metrics if "agg/kd_student_shift" in r}
        if shift:
            row["kd_student_shift_per_round"] = shift
        if any("eval/teacher/accuracy" in r for r in metrics):
            teacher = [r for r in metrics if "eval/teacher/accuracy" in r]
            row["teacher"] = {"start": {"accuracy": teacher[0]["eval/teacher/accuracy"],
                                        "mcc": teacher[0]["eval/teacher/mcc"]},
                              "end": {"accuracy": teacher[-1]["eval/teacher/accuracy"],
                                      "mcc": teacher[-1]["eval/teacher/mcc"]}}
        row["matmul_gflops"] = {"before": probe_before, "after": matmul_gflops()}  # of this row's invocation
        rows[method] = row
        print(json.dumps({"dataset": dataset, "method": method, **{k: v for k, v in row.items()
                                                                  if k not in ("per_round", "config")}}), flush=True)
    return {"methods": rows, "matmul_gflops": {"before": probe_before, "after": matmul_gflops()},
            "sizes": {"train_rows": args.train, "server_rows": round(0.2 * args.train), "clients": 4,
                      "eval_rows": args.eval, "rounds": args.rounds, "local_epochs": 1, "batch_size": 16,
                      "teacher_pretrain_epochs": PRETRAIN_EPOCHS[dataset]}}


def table(results: dict) -> Table:
    t = Table(title="FedKDLoRA benchmark (dev accuracy / MCC after the last round)")
    for col in ("dataset", "method", "accuracy", "MCC", "MB up", "MB down", "wall s", "teacher acc / MCC"):
        t.add_column(col)
    for dataset, res in results["datasets"].items():
        for method, r in res["methods"].items():
            teacher = r.get("teacher", {}).get("end")
            t.add_row(dataset, method, f"{r['accuracy']:.4f}", f"{r['mcc']:.4f}", f"{r['mb_up']:.1f}",
                      f"{r['mb_down']:.1f}", f"{r['wall_s']:.0f}",
                      f"{teacher['accuracy']:.4f} / {teacher['mcc']:.4f}" if teacher else "")
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["cola", "sst2"])
    parser.add_argument("--train", type=int, default=800, help="training rows per dataset (seeded subset)")
    parser.add_argument("--eval", type=int, default=500, help="dev rows scored")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--methods", nargs="*", help="only these methods (names as in the table)")
    parser.add_argument("--runs", default="runs/bench_fedkd", help="where the run directories go")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a worker: run one dataset, print its JSON
    parser.add_argument("-o", "--output", default=str(RESULTS / "fedkd.json"))
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_dataset(args.one, args)), flush=True)
        return
    t0 = time.perf_counter()
    flags = ["--train", str(args.train), "--eval", str(args.eval), "--rounds", str(args.rounds), "--runs", args.runs]
    if args.methods:
        flags += ["--methods", *args.methods]
    workers = {d: subprocess.Popen([sys.executable, __file__, "--one", d, *flags], stdout=subprocess.PIPE, text=True)
               for d in args.datasets}
    datasets = {}
    for d, proc in workers.items():
        for line in proc.stdout:
            if line.startswith("RESULT "):
                datasets[d] = json.loads(line[len("RESULT "):])
            else:
                print(line, end="", flush=True)
        if proc.wait() != 0:
            raise SystemExit(f"the {d} worker failed (exit {proc.returncode})")
    out = Path(args.output)
    results = json.loads(out.read_text()) if out.is_file() else {"datasets": {}}
    for d, res in datasets.items():  # rows of methods not run now are kept where the sizes match
        held = results["datasets"].get(d)
        if held and held["sizes"] == res["sizes"]:
            held["methods"].update(res["methods"])
        else:
            results["datasets"][d] = res
    results["wall_s"] = {**(results.get("wall_s") if isinstance(results.get("wall_s"), dict) else
                            {"first invocation": results.get("wall_s")}), " ".join(sys.argv[1:]) or "all":
                         time.perf_counter() - t0}
    results["note"] = ("student MiniLM-L6; teacher SmolLM2-135M + class head, LoRA r=16; see the script's "
                       "docstring; each row's matmul_gflops is its invocation's probe (the dataset's is the first's)")
    out.write_text(json.dumps(results, indent=2) + "\n")
    Console().print(table(results))
    print(f"wrote {args.output} ({(time.perf_counter() - t0) / 60:.1f} min)")


if __name__ == "__main__":
    main()
