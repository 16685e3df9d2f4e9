"""The model card (``README.md``) of each adapter folder a run saves, written from the run directory.

Everything in it comes from the run's ``config.yaml``, ``summary.json``,
``metrics.jsonl``, ``partition.json`` and what the folder says of itself (its adapter kind's config file,
:mod:`fedtune.models.kinds`): how
the adapter was trained (method, data, partition, clients, rounds, local
training, LoRA), the final metrics of the model in that folder and the bytes it
cost, and the lines of plain transformers + peft that load it. In a run of
several models each card gives its own model's metrics: a cluster's model its
``eval/<name>/`` metrics and the mean over the clients that use it, a client's
own model that client's, and the global ``adapter/`` its last evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedtune.config import RunConfig, load_config
from fedtune.data.templates import Template
from fedtune.files import atomic_write_text
from fedtune.models.base import PACKAGED
from fedtune.models.lora import MERGED_FILE
from fedtune.report import human_bytes, human_seconds
from fedtune.runlog import CONFIG, GROUP_SEP, SUMMARY, load_run, model_assignment
from fedtune.models.kinds import CLASSIFIER_CONFIG, AdapterKind, saved_kind
from fedtune.saved_model import PARTITION, adapter_folders, personal_clients

CARD = "README.md"


def write_model_cards(run_dir: Path) -> list[Path]:
    """Write ``README.md`` into every adapter folder of the finished run at ``run_dir``; return the paths."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / CONFIG)
    summary = json.loads((run_dir / SUMMARY).read_text())
    partition = json.loads((run_dir / PARTITION).read_text()) if (run_dir / PARTITION).is_file() else {}
    folders = adapter_folders(run_dir)
    personal, assignment = personal_clients(folders), model_assignment(run_dir)
    rows = load_run(run_dir).rows
    written = []
    for name, folder in folders.items():
        kind = saved_kind(folder)
        if personal:
            client = int(name[len("client_"):])
            who, personalized, users = f"client {client}'s own model", True, [client]
        else:
            users = sorted(c for c, m in assignment.items() if m == name)
            client, personalized = (users[0] if users and name else None), False
            who = f"model `{name}`, used by clients {users}" if name else ("the global model" if assignment else "")
        results = folder_results(rows, summary, name, users) if personal or assignment else None
        atomic_write_text(folder / CARD, model_card(cfg, summary, partition, kind, folder, who, client,
                                                    personalized, results))
        written.append(folder / CARD)
    return written


def model_card(cfg: RunConfig, summary: dict[str, Any], partition: dict[str, Any], kind: type[AdapterKind],
               folder: Path, who: str = "", client: int | None = None, personalized: bool = False,
               results: list[str] | None = None) -> str:
    """The card of the model ``kind`` saved in ``folder``, as Markdown. ``who``:
    which of the run's models it is (e.g. client 3's own); ``client``: a client that uses it (``fedtune predict
    --client``); ``results``: the lines of its results section (default: the run's final metrics)."""
    from fedtune.algorithms import ALGORITHMS
    from fedtune.models.base import public_model_name

    saved = kind.saved_config(folder)
    base = public_model_name(cfg.model.name) if kind.complete else saved["base_model_name_or_path"]
    classification = cfg.model.task == "classification"
    on_hub = not Path(base).is_absolute()
    front = ["---", f"library_name: {kind.library}"] + ([f"base_model: {base}"] if on_hub else []) + [
        f"pipeline_tag: {'text-classification' if classification else 'text-generation'}",
        "tags:", "- fedtune", f"- {kind.tag}", "- federated-learning",
        f"- {cfg.algorithm.name}", "---", ""]
    algo = ALGORITHMS.get(cfg.algorithm.name)
    lines = [f"# {cfg.name}: {kind.card_title(base)}" + (f" ({who})" if who else ""), "",
             f"Trained by fedtune with `{cfg.algorithm.name}`" + (f": {algo.summary}." if algo else "."), ""]
    if summary.get("attack"):
        lines += [f"**This run was attacked**, on purpose, to measure a defence: {_attack(summary['attack'])} "
                  "(`federation.attack`).", ""]
    lines += _privacy(cfg, summary)
    lines += ["## Training", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in _training_rows(cfg, summary, partition, kind.card_row(saved, cfg), base)]
    lines += ["", "## Results after the last round", ""]
    lines += results if results is not None else _results(summary, personalized)
    lines += ["", "## Using it", ""]
    lines += (_fedtune_usage(folder, client, kind) if kind.library == "fedtune" else
              _usage(cfg, partition, folder, base, client, kind.complete))
    if (folder / MERGED_FILE).is_file():
        lines += ["", f"`{cfg.algorithm.name}` merges part of the update into the base weights: add "
                  f"`{MERGED_FILE}` (ΔW by parameter name) to them after loading, or the model is incomplete:", "",
                  "```python", "from safetensors.torch import load_file", "",
                  "params = dict(model.named_parameters())",
                  f'for key, delta in load_file(f"{{folder}}/{MERGED_FILE}").items():',
                  '    params[key.removeprefix("merged/")].data += delta', "```"]
    if cfg.model.name in PACKAGED and PACKAGED[cfg.model.name].gguf:
        pkg = PACKAGED[cfg.model.name]
        lines += ["", f"fedtune trained on the packaged `{pkg.gguf}`, dequantised to float32; the full-precision "
                  f"weights of `{base}` on the Hub differ slightly from it. `fedtune predict` loads the same "
                  "weights as training did."]
    return "\n".join(front + lines) + "\n"


def _training_rows(cfg: RunConfig, summary: dict, partition: dict, kind_row: tuple[str, str],
                   base: str) -> list[tuple[str, str]]:
    options = ", ".join(f"{k}={v}" for k, v in cfg.algorithm.options.items())
    p, fed, train = cfg.partition, cfg.federation, cfg.train
    skew = {"dirichlet": f" (α = {p.alpha:g} over `{p.by}`)",
            "pathological": f" ({p.classes_per_client} classes each)",
            "natural": f" (by `{p.by}`)", "quantity": f" (size skew {p.quantity_skew:g})"}.get(p.method, "")
    sizes = partition.get("sizes")
    per_round = (f"{fed.clients_per_round} clients" if fed.clients_per_round else
                 f"a fraction {fed.fraction:g} of the clients" if fed.fraction else "all clients")
    if fed.sampling == "poisson":
        per_round = f"each client with probability {fed.fraction or (fed.clients_per_round or p.num_clients) / p.num_clients:.4g}"
    steps = f"{train.local_steps} steps" if train.local_steps else f"{train.local_epochs:g} epochs"
    data = f"`{cfg.data.name}`"
    if partition.get("num_examples"):
        trained, tested = sum(partition.get("train_sizes") or [0]), sum(partition.get("test_sizes") or [0])
        data += (f", {trained:,} training examples and {tested:,} client test rows" if tested else
                 f", {partition['num_examples']:,} training examples")
        if partition.get("server_examples"):
            data += f" (and {partition['server_examples']:,} held by the server only)"
    return [
        ("method", f"`{cfg.algorithm.name}`" + (f" ({options})" if options else "")),
        ("base model", f"`{base}`" + (f" (fedtune: `{cfg.model.name}`)" if cfg.model.name != base else "")),
        ("task", _task(cfg, partition)),
        ("data", data),
        ("partition", f"{p.method}{skew}, {p.num_clients} clients"
         + (f" of {min(sizes):,}–{max(sizes):,} examples" if sizes else "")
         + (f", {p.client_test_fraction:g} of each held out" if p.client_test_fraction else "")),
        ("rounds", f"{summary.get('rounds', fed.rounds)}, {per_round} per round"
         + (" (Poisson sampling)" if fed.sampling == "poisson" else "")),
        ("local training", f"{steps} of batch {train.batch_size}, {train.optimizer} lr {train.lr:g}"
         + (f" ({train.lr_schedule})" if train.lr_schedule != "constant" else "") + _precision(cfg)),
        kind_row,
        ("communication", f"{human_bytes(summary['cum_bytes_up'])} up, {human_bytes(summary['cum_bytes_down'])} down"),
        ("time", f"{human_seconds(summary['seconds'])} ({summary.get('runtime', 'inprocess')} runtime)"),
    ]


def _privacy(cfg: RunConfig, summary: dict) -> list[str]:
    """The card's privacy paragraph: the run's (ε, δ) guarantee, or that FedAMoLE's embedding noise has none."""
    from fedtune.privacy import guarantee

    lines = []
    if summary.get("privacy"):
        lines += ["## Privacy", "", f"{guarantee(summary['privacy'])}.", ""]
    if cfg.algorithm.name == "fedamole" and cfg.algorithm.options.get("embedding_noise"):
        lines += ["## Privacy", "", f"The uploaded routing embeddings carry noise of ε = "
                  f"{cfg.algorithm.options['embedding_noise']:g} per embedding (metric differential privacy, "
                  "`embedding_noise`). It is not accounted: no (ε, δ) is claimed for this run, and the adapters "
                  "clients send are not noised.", ""]
    return lines


def _attack(attack: dict) -> str:
    """What the attackers of a run did, from ``summary.json``'s ``attack``."""
    who = f"client{'s' * (len(attack['clients']) > 1)} {', '.join(map(str, attack['clients']))}"
    kind = attack["kind"]
    if kind == "noise":
        return f"{who} added Gaussian noise (σ = {attack['std']:g}) to the tensors they sent"
    if kind == "label_flip":
        return f"{who} trained on flipped labels (C − 1 − y)"
    factors = ", ".join(f"{k:.4g}" for k in dict.fromkeys(attack["factors"].values()))
    return f"{who} sent θ⁰ + k·Δ, their change Δ multiplied by k = {factors} (`{kind}`)"


def _precision(cfg: RunConfig) -> str:
    """How the base was held and computed with, when not plain fp32."""
    parts = [f"{cfg.train.precision} autocast"] if cfg.train.precision != "fp32" else []
    if cfg.model.quantization != "none":
        parts.append(f"base quantised to {cfg.model.quantization} (QLoRA; the adapter loads on the unquantised base "
                     "too)")
    return "; " + ", ".join(parts) if parts else ""


def _task(cfg: RunConfig, partition: dict) -> str:
    if cfg.model.task == "sft":
        return f"instruction tuning, `{cfg.sft.template}` prompt template"
    names = partition.get("label_names", [])
    text = " + ".join(f"`{c}`" for c in partition.get("text_columns", []))
    return f"classification of {text} into {len(names)} classes: " + ", ".join(f"`{n}`" for n in names)


def _results(summary: dict, personalized: bool) -> list[str]:
    final = summary.get("final") or {}
    if not final:
        return ["The run recorded no metrics for its final model: it had no held-out split or client test shards "
                "(partition.client_test_fraction), or evaluation was off."]
    out = ["| metric | value |", "|---|---|"] + [f"| {k} | {v:.4f} |" for k, v in final.items()]
    notes = []
    if any(k.startswith("eval/") for k in final):
        several = any(k.count("/") > 1 for k in final if k.startswith("eval/"))
        notes.append("`eval/` is the held-out split" + (" (`eval/<model>/`: each of the run's models)" if several else ""))
    if any(k.startswith("client_eval/") for k in final):
        notes.append("`client_eval/` the example-weighted mean over the clients' own test shards"
                     + (", each client scored with its own model" if personalized else ""))
    return out + ["", "; ".join(notes) + "."]


def folder_results(rows: list[dict[str, Any]], summary: dict, name: str, users: list[int]) -> list[str]:
    """The results section of one of several models: ``name``'s own ``eval/<name>/`` metrics (the global model,
    ``""``: its ``eval/`` metrics of the last round that scored it) and the example-weighted mean of the own
    test-shard metrics of the clients in ``users``, who are scored with it."""
    final = summary.get("final") or {}
    if name:
        own = {f"eval/{k[len(f'eval/{name}/'):]}": v for k, v in final.items() if k.startswith(f"eval/{name}/")}
        when = ""
    else:
        row = next((r for r in reversed(rows) if any(_global_eval(k) for k in r)), {})
        own = {k: v for k, v in row.items() if _global_eval(k)}
        last = rows[-1]["round"] if rows else 0
        when = (f"The run's clients use its other models (`adapters/`); this global model was last evaluated in "
                f"round {row['round']}" + (" (the untrained model)" if row.get("round") == 0 else "") + "."
                if own and row.get("round") != last else "")
    clients = next((r["client_metrics"] for r in reversed(rows) if r.get("client_metrics")), {})
    mine = {c: clients[str(c)] for c in users if str(c) in clients and clients[str(c)].get("n")}
    if mine:
        n = sum(m["n"] for m in mine.values())
        keys = [k for k in next(iter(mine.values())) if k != "n" and all(k in m for m in mine.values())]
        own.update({f"client_eval/{k}": sum(m[k] * m["n"] for m in mine.values()) / n for k in keys})
    if not own:
        return ["This model has no metrics of its own: the run evaluated it on no held-out split "
                "(data.eval_fraction, data.eval_split) and none of its clients on a test shard of its own "
                "(eval.per_client, partition.client_test_fraction)."]
    out = ["| metric | value |", "|---|---|"] + [f"| {k} | {v:.4f} |" for k, v in own.items()]
    notes = []
    if any(k.startswith("eval/") for k in own):
        notes.append("`eval/` is this model on the held-out split")
    if mine:
        notes.append(f"`client_eval/` the example-weighted mean over the test shards of the clients that use it "
                     f"({', '.join(map(str, sorted(mine)))})")
    return out + ["", "; ".join(notes) + "." + (f" {when}" if when else "")]


def _global_eval(key: str) -> bool:
    """``eval/<metric>``: the global model's, not one of several models' (``eval/<model>/<metric>``)."""
    return key.startswith("eval/") and key.count("/") == 1 and GROUP_SEP not in key


def _fedtune_usage(folder: Path, client: int | None, kind: type[AdapterKind]) -> list[str]:
    run = folder.parent.parent if folder.parent.name == "adapters" else folder.parent
    flag = f" --client {client}" if client is not None else ""
    return [f"`model.finetune: {kind.name}` has no transformers or peft format; fedtune loads it on the base model "
            f"(`fedtune.models.kinds.KINDS[{kind.name!r}].load(base, folder, task)`), or from the run directory:", "",
            "```bash", f'fedtune predict {run}{flag} --text "..."', "```"]


def _usage(cfg: RunConfig, partition: dict, folder: Path, base: str, client: int | None,
           full: bool = False) -> list[str]:
    where = f"folder = {json.dumps(str(folder))}  # this folder"
    run = f"{folder.parent.parent if folder.parent.name == 'adapters' else folder.parent}"
    flag = f" --client {client}" if client is not None else ""
    if cfg.model.task == "classification":
        pair = len(partition.get("text_columns", [])) > 1
        inputs = '["the first text"], ["the second text"]' if pair else '["a text to classify"]'
        code = [
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer", "", where,
            "model = AutoModelForSequenceClassification.from_pretrained(folder).eval()",
        ] if full else [
            "from peft import PeftModel",
            "from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer", "", where,
            f'config = AutoConfig.from_pretrained(f"{{folder}}/{CLASSIFIER_CONFIG}")  # with the label names',
            f"base = AutoModelForSequenceClassification.from_pretrained({json.dumps(base)}, config=config)",
            "model = PeftModel.from_pretrained(base, folder).eval()",
        ]
        code += [
            "tokenizer = AutoTokenizer.from_pretrained(folder)", "",
            f"probs = model(**tokenizer({inputs}, return_tensors=\"pt\")).logits.softmax(-1)[0]",
            "print(model.config.id2label[int(probs.argmax())], float(probs.max()))",
        ]
        cli = f"fedtune predict {run}{flag} --text " + ("$'the first text\\tthe second text'" if pair else
                                                        '"a text to classify"')
    else:
        template = Template(cfg.sft.template) if cfg.sft.template != "chat" else None
        if template is not None:
            prompt = [f"prompt = {template.prompt('{instruction}')!r}.format(instruction=\"Name three colours.\")",
                      'ids = tokenizer(prompt, return_tensors="pt").input_ids']
        else:
            system = (f'{{"role": "system", "content": {json.dumps(cfg.sft.system_prompt)}}}, '
                      if cfg.sft.system_prompt is not None else "")
            prompt = [f'messages = [{system}{{"role": "user", "content": "Name three colours."}}]',
                      "prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)",
                      'ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids']
        load = (["from transformers import AutoModelForCausalLM, AutoTokenizer", "", where,
                 "model = AutoModelForCausalLM.from_pretrained(folder).eval()"] if full else
                ["from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "", where,
                 f"base = AutoModelForCausalLM.from_pretrained({json.dumps(base)})",
                 "model = PeftModel.from_pretrained(base, folder).eval()"])
        code = [
            *load,
            "tokenizer = AutoTokenizer.from_pretrained(folder)", "", *prompt,
            f"out = model.generate(input_ids=ids, max_new_tokens={cfg.eval.max_new_tokens}, do_sample=False)",
            "print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))",
        ]
        cli = f'fedtune predict {run}{flag} --text "Name three colours."'
    head = (["", "transformers reports the classifier head as missing from the base model: the adapter holds it."]
            if cfg.model.task == "classification" and not full else [])
    return [f"With transformers{'' if full else ' and peft'} alone:", "", "```python", *code, "```", *head, "",
            "Or with fedtune (offline, from the run directory):", "", "```bash", cli, "```"]
