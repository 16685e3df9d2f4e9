"""The ``fedtune`` command line: run, report, predict, config, data, algorithms, models, eval.

Every command imports the heavy parts of the package (torch, transformers,
datasets) only when it runs, so ``fedtune --help`` and a bad config fail fast.
A user's mistake ends as one line ``error: ...`` on stderr with exit status 2
(:func:`main`); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import click
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from fedtune.errors import FedtuneError
from fedtune.runtime.superlink import DEFAULT_FLEET_ADDRESS

app = typer.Typer(
    help="Federated fine-tuning of language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
data_app = typer.Typer(help="Inspect datasets: the registered ones, or your own files.", no_args_is_help=True)
app.add_typer(data_app, name="data")
eval_app = typer.Typer(help="Evaluate a base model, or a run's adapter, on a benchmark.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")
config_app = typer.Typer(help="Write a starting config, or show a config with every default.", no_args_is_help=True)
app.add_typer(config_app, name="config")


class Task(str, Enum):
    """What a starting config trains."""

    classification = "classification"
    sft = "sft"


OVERRIDE_HELP = r"Set a config key, e.g. -o lora.r=16, -o lora.target_modules=\[query,value] (repeatable)."


class Runtime(str, Enum):
    """Where the clients of a run execute."""

    inprocess = "inprocess"
    flower = "flower"


@app.command()
def run(
    config: Annotated[Path, typer.Argument(show_default=False)],
    override: Annotated[
        list[str] | None,
        typer.Option("--override", "-o", metavar="KEY=VALUE", help=OVERRIDE_HELP),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing run directory of the same name.")
    ] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue a stopped run after its last checkpointed round. The config must "
                           "match the run's, except threads and the output paths (name, output_dir). A finished "
                           "run is left as it is, with exit status 0.")
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print only the final line, not the partition and progress.")
    ] = False,
    runtime: Annotated[Runtime, typer.Option(help="Where the clients run.")] = Runtime.inprocess,
) -> None:
    """Run one federated fine-tuning experiment from CONFIG, a .yaml or .toml file (e.g. configs/quickstart.yaml)."""
    from fedtune.config import load_config

    if resume and overwrite:
        raise FedtuneError("--resume continues a run and --overwrite deletes it; pass only one of them")
    cfg = load_config(config, override)
    from fedtune.run import execute
    from fedtune.units import human_seconds

    result = execute(cfg, overwrite=overwrite, console=Console(quiet=quiet), runtime=runtime.value, resume=resume)
    if result.already_finished:
        rounds = cfg.federation.rounds
        print(f"run {result.run_dir} is finished ({rounds} round{'s' * (rounds != 1)}); nothing to resume")
        return
    from fedtune.runlog import GROUP_SEP

    # per-group accuracies (eval/…@<group>) are left to fedtune report, as in the round lines
    metrics = [f"{k} {v:.4f}" for k, v in result.final.items() if not k.endswith("/n") and GROUP_SEP not in k]
    line = " · ".join([f"run dir {result.run_dir}", *metrics, human_seconds(result.seconds)])
    Console().print(line, markup=False, highlight=False, soft_wrap=True)


@app.command()
def report(
    run_dirs: Annotated[list[Path], typer.Argument(metavar="RUN_DIR...")],
    metric: Annotated[
        str | None, typer.Option(help="Metric to compare, e.g. eval/accuracy (default: accuracy, else loss).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Folder for the plots (default: the run's folder; for several, runs/report/<a>+<b>).")
    ] = None,
) -> None:
    """Compare runs (folders written by 'fedtune run'): a table of final and best values, plots vs rounds and bytes,
    and every client left out of a round (failed, dropped or rejected)."""
    from fedtune.report import build_report, left_out_lines, run_lines

    result = build_report(run_dirs, metric, out)
    console = Console()
    if result.note:
        console.print(f"note: {result.note}", style="yellow", markup=False, highlight=False, soft_wrap=True)
    whole = console.measure(result.table, options=console.options.update_width(10_000)).maximum
    if whole <= console.width:
        console.print(result.table)
    elif console.is_terminal:  # too narrow for the table: a line per run, which wraps between words
        for line in run_lines(result):
            console.print(line, markup=False, highlight=False)
    else:  # a file or a pipe has no width to fit: the table whole
        console.width = whole
        console.print(result.table)
    for table in result.clients:
        console.print(table)
    for r in result.rows:
        for name, clients in r["models"].items():
            console.print(f"{r['name']}: {name} ← clients {clients} (adapters/{name}/)", markup=False,
                          highlight=False, soft_wrap=True)
    for line in left_out_lines(result.rows):
        console.print(line, markup=False, highlight=False, soft_wrap=True, style="yellow")
    for path in result.plots:
        console.print(f"wrote {path}", markup=False, highlight=False, soft_wrap=True)


@app.command()
def predict(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", show_default=False)],
    text: Annotated[
        list[str] | None,
        typer.Option("--text", "-t", help="An input (repeatable). A tab separates a sentence pair's second text, "
                                          "or an instruction's input."),
    ] = None,
    file: Annotated[
        Path | None,
        typer.Option("--file", "-f", help="A plain text file of inputs, one per line (blank lines skipped)."),
    ] = None,
    client: Annotated[
        int | None, typer.Option(help="Runs with a model per client or per cluster: the model this client uses.")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Runs with several models: one by name (e.g. cluster_1, or global for "
                                      "adapter/); without it or --client such a run names its models.")
    ] = None,
    max_new_tokens: Annotated[
        int | None,
        typer.Option(min=1, help="sft runs: most tokens to generate (default: the run's eval.max_new_tokens)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per input and line.")] = False,
) -> None:
    """Run the model a run saved (RUN_DIR, written by 'fedtune run') on new inputs: a classifier prints each input's
    label and probability, an sft model its greedy response to the input as instruction."""
    import json

    from fedtune.saved_model import classify, generate, load_run_model

    inputs = list(text or [])
    if file is not None:
        if not file.is_file():
            raise FedtuneError(f"input file not found: {file}")
        inputs += [line for line in file.read_text().splitlines() if line.strip()]
    if not inputs:
        raise FedtuneError("no inputs; give them with --text \"...\" (repeatable) or --file FILE (one per line)")
    rm = load_run_model(run_dir, client, model)
    if rm.cfg.model.task == "sft":
        outputs = generate(rm, inputs, max_new_tokens or rm.cfg.eval.max_new_tokens, rm.cfg.eval.batch_size)
        rows = [{"text": t, "generation": g} for t, g in zip(inputs, outputs)]
    else:
        rows = [{"text": t, **p} for t, p in zip(inputs, classify(rm, inputs, rm.cfg.eval.batch_size))]
    if as_json:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
        return
    which = f" · client {client}" if client is not None else f" · model {model}" if model is not None else ""
    table = Table()
    columns = ("input", "generation") if rm.cfg.model.task == "sft" else ("input", "label", "probability")
    for column in columns:
        table.add_column(column, overflow="fold", justify="right" if column == "probability" else "left")
    for row in rows:
        table.add_row(row["text"], *([row["generation"]] if "generation" in row else
                                     [row["label"], f"{row['probability']:.4f}"]))
    console = Console()
    console.print(f"{run_dir}{which}", markup=False, highlight=False)  # above the table: a path wraps at its width
    console.print(table)


@app.command()
def show(run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR")]) -> None:
    """Show one run (a folder written by 'fedtune run', also while it runs) round by round: loss, metrics, bytes."""
    from fedtune.runlog import load_run
    from fedtune.show import fitted_tables, privacy_line, round_table

    run = load_run(run_dir)
    console = Console()
    if console.is_terminal:
        tables = fitted_tables(run, console)
    else:  # a file or a pipe has no width to fit: the table whole
        tables = [round_table(run)]
        whole = console.measure(tables[0], options=console.options.update_width(10_000)).maximum
        console.width = max(console.width, whole)
    for table in tables:
        console.print(table)
    line = privacy_line(run)
    if line:
        console.print(line, markup=False, highlight=False, soft_wrap=True)


@config_app.command("init")
def config_init(
    task: Annotated[
        Task, typer.Option(help="classification (SST-2, MiniLM) or sft (Alpaca, SmolLM2).")
    ] = Task.classification,
) -> None:
    """Print a commented starting config that runs as it is: fedtune config init > my.yaml; fedtune run my.yaml."""
    from fedtune.config_doc import starter

    sys.stdout.write(starter(task.value))


@config_app.command("show")
def config_show(
    config: Annotated[Path, typer.Argument(show_default=False)],
    override: Annotated[
        list[str] | None, typer.Option("--override", "-o", metavar="KEY=VALUE", help=OVERRIDE_HELP)
    ] = None,
) -> None:
    """Print CONFIG resolved: every field with its value or default (algorithm options too) and what it means."""
    from fedtune.algorithms import build_algorithm
    from fedtune.config import load_config
    from fedtune.config_doc import commented_yaml

    cfg = load_config(config, override)
    options = build_algorithm(cfg.algorithm.name, cfg.algorithm.options).options
    sys.stdout.write(commented_yaml(cfg, options=options, header=f"{config} resolved"
                                    + (" with " + " ".join(f"-o {o}" for o in override) if override else "")))


@data_app.command("list")
def data_list() -> None:
    """List the registered datasets."""
    from fedtune.data import list_datasets

    table = Table(title="registered datasets (use the name as data.name)", title_justify="left")
    table.add_column("name", no_wrap=True)  # a name is typed as data.name: never broken across lines
    for column in ("kind", "hub id", "description"):
        table.add_column(column, overflow="fold")
    for name, kind, hub_id, description in list_datasets():
        table.add_row(name, kind, hub_id or "-", description)
    Console().print(table)


@data_app.command("show")
def data_show(
    name: Annotated[str, typer.Argument(metavar="NAME_OR_PATH")],
    text_column: Annotated[str | None, typer.Option(help="Input text column of your own file.")] = None,
    label_column: Annotated[str | None, typer.Option(help="Label column of your own file.")] = None,
    quoting: Annotated[str | None, typer.Option(help="standard or none, as data.quoting.")] = None,
    encoding: Annotated[str, typer.Option(help="The files' text encoding, as data.encoding.")] = "utf-8",
) -> None:
    """Show a registered dataset or a CSV/TSV/JSON/JSONL file or folder: split sizes, columns, labels, a few rows."""
    from fedtune.config import DataConfig, explain
    from fedtune.data import describe, describe_table

    try:
        cfg = DataConfig(name=name, text_column=text_column, label_column=label_column, quoting=quoting,
                         encoding=encoding)
    except ValidationError as e:
        raise FedtuneError(explain(e, DataConfig, "data")) from None
    info = describe(cfg)
    Console().print(describe_table(info))


@app.command()
def algorithms() -> None:
    """List the federated algorithms (what each requires, and its options), the wrappers and the reducers."""
    from fedtune.algorithms import ALGORITHMS

    lines = ["algorithms (set algorithm.name; options go under algorithm.options, e.g. -o algorithm.options.tau=0.8)"]
    for name, cls in ALGORITHMS.items():
        requires = cls.create().requirements()
        lines += ["", f"{name}: {cls.summary}", f"  requires: {requires or 'nothing beyond the defaults'}"]
        lines += _options_lines(cls.Options)
    from fedtune.algorithms import WRAPPERS
    from fedtune.reducers import REDUCERS

    lines += ["", "wrappers (algorithm.wrappers, innermost first, e.g. -o 'algorithm.wrappers=[{name: clip}]')"]
    for name, cls in WRAPPERS.items():
        lines += ["", f"{name}: {cls.summary}", f"  wraps: {cls.wraps}"] + _options_lines(cls.Options)
    lines += ["", "reducers (algorithm.reducer: where an algorithm takes a mean of its clients' tensors, the rule; "
              "e.g. -o algorithm.reducer.name=median)"]
    for name, cls in REDUCERS.items():
        lines += ["", f"{name}: {cls.summary}"] + _options_lines(cls.Options)
    print("\n".join(lines))


def _options_lines(options) -> list[str]:
    import textwrap

    from fedtune.config import yaml_flow
    from fedtune.config_doc import allowed, meaning

    fields = options.model_fields
    lines = ["  options:" if fields else "  options: none"]
    for key, field in fields.items():
        kind, text = allowed(field), meaning(field)
        line = f"{key}={yaml_flow(field.get_default(call_default_factory=True))}" + (f" [{kind}]" if kind else "")
        line += f": {text}" if text else ""
        lines += textwrap.wrap(line, 100, initial_indent="    ", subsequent_indent="      ", break_on_hyphens=False)
    return lines


@app.command()
def models(
    name: Annotated[str | None, typer.Argument(metavar="[MODEL]", help="Also a local model folder or Hub id.")] = None,
) -> None:
    """List the packaged base models (usable offline as model.name) and the memory their weights take at each
    precision: fp32, bf16 (model.dtype or train.precision), and quantised (model.quantization) int8 and nf4."""
    from importlib.util import find_spec

    from fedtune.models.base import PACKAGED, base_config
    from fedtune.models.quantization import weight_count

    precisions = ("fp32", "bf16", "int8", "nf4")
    table = Table(title="packaged models (any local folder or Hugging Face id works too)", title_justify="left")
    for column in ("name", "kind", "parameters", "weights", "installed", "memory fp32 / bf16 / int8 / nf4"):
        table.add_column(column, overflow="fold")
    rows = [(n, pkg.kind, f"{pkg.parameters / 1e6:.1f}M", pkg.weights, find_spec(pkg.package) is not None,
             pkg.install) for n, pkg in PACKAGED.items()]
    if name is not None and name not in PACKAGED:
        rows.append((name, "", "", "", True, ""))
    for model, kind, parameters, weights, installed, install in rows:
        memory = "-"
        if installed:
            count = weight_count(base_config(model))
            memory = " / ".join(f"{count.bytes(p) / 1e6:,.0f}" for p in precisions) + " MB"
            parameters = parameters or f"{(sum(w for w, _ in count.layers) + count.rest) / 1e6:.1f}M"
        table.add_row(model, kind, parameters, weights, "yes" if installed else f"no: {install}", memory)
    Console().print(table)
    Console().print("quantised: every linear layer but the output head in 8 or 4 bits (nf4 with double "
                    "quantisation), the rest fp32; training adds the activations, LoRA and its optimiser state",
                    markup=False, highlight=False, soft_wrap=True)


@eval_app.command("mmlu")
def eval_mmlu(
    model: Annotated[str, typer.Option(help="Causal LM: packaged name, local folder or Hub id.")] = "smollm2-135m",
    adapter: Annotated[
        Path | None, typer.Option(help="A run directory (its adapter/) or a peft adapter folder to load on the model.")
    ] = None,
    shots: Annotated[int, typer.Option(min=0, max=5, help="Solved dev examples before each question (0-5).")] = 0,
    subset: Annotated[bool, typer.Option(help="A seeded 10% of each subject (1,435 questions) instead of all.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the subset.")] = 0,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    output: Annotated[Path | None, typer.Option(help="Also write the results (per subject) to this JSON file.")] = None,
) -> None:
    """MMLU accuracy of a causal LM: per category and macro-averaged over the 57 subjects."""
    import json
    import time

    from fedtune.config import ModelConfig
    from fedtune.mmlu import CATEGORIES, evaluate_mmlu
    from fedtune.models.base import load_causal_lm
    from fedtune.models.lora import load_adapter

    t0 = time.perf_counter()
    lm, tok = load_causal_lm(ModelConfig(name=model))
    if adapter is not None:
        lm = load_adapter(lm, adapter).merge_and_unload()  # W + s·BA once: the same model at the base model's cost
    with Progress(TextColumn("MMLU questions"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("left"), TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task("mmlu", total=None)
        result = evaluate_mmlu(lm, tok, shots=shots, subset=subset, seed=seed, batch_size=batch_size,
                               progress=lambda done, total: bar.update(task, completed=done, total=total))
    seconds = time.perf_counter() - t0
    table = Table(title=f"MMLU {shots}-shot · {model}" + (f" + {adapter}" if adapter else "")
                  + f" · {result.questions:,} questions", title_justify="left")
    table.add_column("category")
    table.add_column("subjects", justify="right")
    table.add_column("accuracy", justify="right")
    for category, acc in result.categories.items():
        n = sum(1 for s in result.subjects if CATEGORIES.get(s, "other") == category)
        table.add_row(category, str(n), f"{acc:.4f}")
    table.add_row("macro (over subjects)", str(len(result.subjects)), f"{result.macro:.4f}", style="bold")
    Console().print(table)
    Console().print(f"{seconds:.0f} s for {result.prompt_tokens:,} prompt tokens")
    if output is not None:
        output.write_text(json.dumps({**result.to_dict(), "model": model, "adapter": str(adapter) if adapter else None,
                                      "seconds": seconds}, indent=2))


_PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


@app.command(context_settings=_PASSTHROUGH)
def supernode(ctx: typer.Context) -> None:
    """Run a Flower SuperNode that keeps fedtune's model and data loaded between messages.

    Takes flower-supernode's options (flower-supernode --help), e.g. --superlink HOST:PORT --root-certificates
    ca.crt --node-config "client-id=0 data-path=notes.tsv". Checks the data-path, needs no activated venv, and
    exits when the SuperLink stays unreachable for --max-wait-time (default 300 s). See docs/flower.md.
    """
    from fedtune.runtime.supernode import run_supernode

    raise typer.Exit(run_supernode(list(ctx.args)))


@app.command(context_settings=_PASSTHROUGH)
def superlink(
    ctx: typer.Context,
    fleet_address: str = typer.Option(
        DEFAULT_FLEET_ADDRESS, "--fleet-address", metavar="HOST:PORT",
        help="Where SuperNodes connect: a TLS proxy that passes the Fleet API only (e.g. 0.0.0.0:9092)."),
    expose_control_api: bool = typer.Option(
        False, "--expose-control-api",
        help="Allow a non-loopback --host: lets anyone who can reach that address submit runs (code that runs on "
             "this machine) and register or remove node keys."),
    allow_unregistered_nodes: bool = typer.Option(
        False, "--allow-unregistered-nodes",
        help="Turn SuperNode authentication off: any node that reaches the Fleet address can join."),
) -> None:
    """Run a Flower SuperLink that exposes only the Fleet API to the network (no activated venv needed).

    The SuperLink itself (Control API: runs, node keys; ServerApp API) listens on --host/--port, loopback
    only; SuperNodes connect to --fleet-address and must have a key registered with `flwr supernode register`
    (from this machine). Takes flower-superlink's options (flower-superlink --help), e.g. --ssl-ca-certfile
    certs/ca.crt --ssl-certfile certs/server.pem --ssl-keyfile certs/server.key --port 9093 --database state.db.
    See docs/flower.md.
    """
    from fedtune.runtime.superlink import run_superlink

    raise typer.Exit(run_superlink(list(ctx.args), fleet_address, expose_control_api, allow_unregistered_nodes))


@app.command()
def submit(
    config: Annotated[Path, typer.Argument(show_default=False, help="The run's config file, as on this machine.")],
    override: Annotated[
        list[str] | None,
        typer.Option("--override", "-o", metavar="KEY=VALUE", help=OVERRIDE_HELP),
    ] = None,
    connection: Annotated[
        str | None, typer.Option(help="A connection of $FLWR_HOME/config.toml (default: its default).")
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run directory.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run after its last checkpoint.")] = False,
) -> None:
    """Submit a run to a deployed SuperLink (flwr run), stream its log, and exit 0 only if it completed.

    Run it on the link host: fedtune superlink serves Flower's Control API there only. A run that fails (e.g.
    nodes whose data fail the run's checks) ends with one line naming why, and exit status 1. See docs/flower.md.
    """
    from fedtune.runtime.submit import submit as submit_run

    if overwrite and resume:
        raise FedtuneError("--resume continues a run and --overwrite deletes it; pass only one of them")
    raise typer.Exit(submit_run(config, override or [], connection, overwrite, resume))


def _fail(message: str, status: int = 2) -> None:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(status)


def main() -> None:
    """Console-script entry point: user errors as one line with status 2, Ctrl-C as status 130."""
    try:
        status = app(standalone_mode=False)
    except FedtuneError as e:
        _fail(str(e))
    except ValidationError as e:
        _fail("; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()))
    except click.exceptions.NoArgsIsHelpError:
        sys.exit(0)  # typer has printed the help
    except click.ClickException as e:
        ctx = getattr(e, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        _fail(e.format_message() + hint, e.exit_code)
    if status == 130:  # typer turns KeyboardInterrupt into exit status 130
        print(interrupted_line(sys.argv[1:]), file=sys.stderr)
    sys.exit(status)


def interrupted_line(args: list[str]) -> str:
    """What Ctrl-C prints: for ``fedtune run``, the command that continues the run after its last completed round."""
    import shlex

    if not args or args[0] != "run" or any(a in ("-h", "--help") for a in args):
        return "interrupted"
    again = ["fedtune", *(a for a in args if a != "--overwrite")] + ([] if "--resume" in args else ["--resume"])
    return f"interrupted; continue the run after its last completed round with: {shlex.join(again)}"


if __name__ == "__main__":
    main()
