"""A run's saved model travels: the adapter folder (base name, tokenizer, label names, model card) reloads with
plain transformers + peft, and ``fedtune predict`` runs it on new inputs.

One tiny classification run, one tiny sft run and one personalised run are shared by every test; the
processes (``fedtune predict`` on both runs, and a plain reload that never imports fedtune) start together.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from fedtune.cli import app, main
from fedtune.config import load_config
from fedtune.errors import FedtuneError
from fedtune.models.base import public_model_name
from fedtune.run import execute
from fedtune.saved_model import classify, load_run_model, split_inputs

TEXTS = ["a really good film", "awful plot and dull acting", "the story was superb", "boring", "quite fine"]
INSTRUCTIONS = ["Name the colour in the text.\tthe sky is blue", "Name a colour."]
SYSTEM = "Answer with one word."
NEW_TOKENS = 6

PLAIN_RELOAD = r"""
import json, sys
import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

args = json.loads(sys.argv[1])
out = {}

folder = args["cls"]
base_name = json.load(open(f"{folder}/adapter_config.json"))["base_model_name_or_path"]
config = AutoConfig.from_pretrained(f"{folder}/classifier_config.json")
base = AutoModelForSequenceClassification.from_pretrained(base_name, config=config)
model = PeftModel.from_pretrained(base, folder).eval()
tokenizer = AutoTokenizer.from_pretrained(folder)
with torch.no_grad():
    probs = model(**tokenizer(args["texts"], padding=True, return_tensors="pt")).logits.softmax(-1)
out["id2label"] = {str(k): v for k, v in model.config.id2label.items()}
out["labels"] = [model.config.id2label[int(i)] for i in probs.argmax(-1)]
out["probs"] = probs.max(-1).values.tolist()

folder = args["sft"]
base_name = json.load(open(f"{folder}/adapter_config.json"))["base_model_name_or_path"]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_name), folder).eval()
tokenizer = AutoTokenizer.from_pretrained(folder)
out["generations"] = []
for text in args["instructions"]:
    instruction, _, input = text.partition("\t")
    message = f"{instruction}\n\n{input}" if input else instruction
    messages = [{"role": "system", "content": args["system"]}, {"role": "user", "content": message}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    gen = model.generate(input_ids=ids, max_new_tokens=args["new_tokens"], do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
    if tokenizer.eos_token_id in gen:
        gen = gen[: gen.index(tokenizer.eos_token_id)]
    out["generations"].append(tokenizer.decode(gen, skip_special_tokens=True).strip())

out["fedtune_imported"] = any(m == "fedtune" or m.startswith("fedtune.") for m in sys.modules)
print(json.dumps(out))
"""


def _named_labels(src: Path, out: Path, pair: bool = False) -> Path:
    """``tiny_tsv_dataset`` with its labels 0/1 written as negative/positive, so label names are not indices;
    ``pair``: with a second text column ``other`` (the sentence's words reversed)."""
    out.mkdir()
    for split in ("train", "dev"):
        rows = [line.rsplit("\t", 1) for line in (src / f"{split}.tsv").read_text().splitlines()[1:]]
        other = ["\t" + " ".join(t.split()[::-1]) if pair else "" for t, _ in rows]
        (out / f"{split}.tsv").write_text("sentence" + ("\tother" if pair else "") + "\tlabel\n" + "".join(
            f"{t}{o}\t{['negative', 'positive'][int(y)]}\n" for (t, y), o in zip(rows, other)))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, tiny_tsv_dataset, tiny_llama_dir, tiny_alpaca_dataset):
    root = tmp_path_factory.mktemp("predict")
    data = _named_labels(tiny_tsv_dataset, root / "labelled")
    common = [f"output_dir={root / 'runs'}", "federation.rounds=1", "train.local_steps=2", "train.batch_size=8",
              "train.lr=5e-3", "lora.r=4", "partition.num_clients=2"]
    classify_args = [f"model.name={tiny_model_dir}", f"data.name={data}", "data.text_column=sentence",
                     "data.label_column=label"]
    cls = execute(load_config(None, [*common, *classify_args, "name=cls"])).run_dir
    local = execute(load_config(None, [*common, *classify_args, "name=local", "algorithm.name=local",
                                       "partition.client_test_fraction=0.2"])).run_dir
    clustered = execute(load_config(None, [*common, *classify_args, "name=clustered", "partition.num_clients=3",
                                           "algorithm.name=clustered", "algorithm.options={n_clusters: 2}",
                                           "federation.rounds=2"])).run_dir
    pairs = _named_labels(tiny_tsv_dataset, root / "pairs", pair=True)
    pair = execute(load_config(None, [*common, f"model.name={tiny_model_dir}", f"data.name={pairs}", "name=pair",
                                      "data.text_column=sentence", "data.text_pair_column=other",
                                      "data.label_column=label"])).run_dir
    sft = execute(load_config(None, [*common, "name=sft", f"model.name={tiny_llama_dir}", "model.task=sft",
                                     "model.max_length=96", f"data.name={tiny_alpaca_dataset}", "sft.template=chat",
                                     f"sft.system_prompt={SYSTEM}"])).run_dir
    return SimpleNamespace(root=root, cls=cls, local=local, clustered=clustered, pair=pair, sft=sft,
                           model_dir=tiny_model_dir)


@pytest.fixture(scope="module")
def processes(runs):
    """``fedtune predict`` on both runs (inputs from --text and --file) and the plain reload, run at once."""
    inputs = runs.root / "inputs.txt"
    inputs.write_text("\n".join(TEXTS[1:]) + "\n\n")
    cli = [sys.executable, "-m", "fedtune.cli", "predict"]
    plain_args = {"cls": str(runs.cls / "adapter"), "sft": str(runs.sft / "adapter"), "texts": TEXTS,
                  "instructions": INSTRUCTIONS, "system": SYSTEM, "new_tokens": NEW_TOKENS}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    plain_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}  # fedtune is not even importable from src/
    commands = {
        "cls": ([*cli, str(runs.cls), "--text", TEXTS[0], "--file", str(inputs), "--json"], env),
        "sft": ([*cli, str(runs.sft), *(a for t in INSTRUCTIONS for a in ("-t", t)),
                 "--max-new-tokens", str(NEW_TOKENS), "--json"], env),
        "plain": ([sys.executable, "-c", PLAIN_RELOAD, json.dumps(plain_args)], plain_env),
    }
    procs = {name: subprocess.Popen(cmd, cwd=runs.root, env=e, text=True, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE) for name, (cmd, e) in commands.items()}
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name}: {stderr[-3000:]}"
        out[name] = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    return out


def test_the_adapter_folder_names_its_base_and_carries_tokenizer_labels_and_card(runs):
    folder = runs.cls / "adapter"
    adapter = json.loads((folder / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(Path(runs.model_dir).resolve())
    files = {p.name for p in folder.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "adapter_model.safetensors"} <= files
    assert not (folder / "config.json").exists()  # transformers would take the folder for a complete model
    config = json.loads((folder / "classifier_config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert config["label2id"] == {"negative": 0, "positive": 1}
    assert config["model_type"] == "bert" and config["pad_token_id"] == 0

    card = (folder / "README.md").read_text()
    summary = json.loads((runs.cls / "summary.json").read_text())
    assert "library_name: peft" in card and "More Information Needed" not in card
    assert "`fedit`" in card and "2 clients" in card and "| rounds | 1," in card
    assert f"| eval/accuracy | {summary['final']['eval/accuracy']:.4f} |" in card
    assert "`eval/` is the held-out split" in card
    assert "`negative`, `positive`" in card and " up, " in card
    assert f'from_pretrained("{adapter["base_model_name_or_path"]}", config=config)' in card
    assert f"fedtune predict {runs.cls}" in card

    sft = runs.sft / "adapter"
    assert (sft / "tokenizer_config.json").is_file() and not (sft / "classifier_config.json").exists()
    sft_card = (sft / "README.md").read_text()
    assert "pipeline_tag: text-generation" in sft_card and "apply_chat_template" in sft_card and SYSTEM in sft_card


def test_a_plain_reload_without_fedtune_predicts_what_fedtune_predicts(processes):
    plain, predicted = processes["plain"][0], processes["cls"]
    assert plain["fedtune_imported"] is False
    assert plain["id2label"] == {"0": "negative", "1": "positive"}
    assert [p["text"] for p in predicted] == TEXTS
    assert plain["labels"] == [p["label"] for p in predicted]
    assert plain["probs"] == pytest.approx([p["probability"] for p in predicted], abs=1e-5)
    assert all(set(p["probabilities"]) == {"negative", "positive"} for p in predicted)


def test_fedtune_predict_generates_with_the_runs_template(processes):
    plain, predicted = processes["plain"][0], processes["sft"]
    assert [p["text"] for p in predicted] == INSTRUCTIONS
    assert [p["generation"] for p in predicted] == plain["generations"]
    assert any(p["generation"] for p in predicted)


def test_predict_uses_the_packaged_model_offline_though_the_adapter_names_its_hub_id(tmp_path, tiny_tsv_dataset,
                                                                                    monkeypatch):
    assert public_model_name("minilm") == "sentence-transformers/all-MiniLM-L6-v2"
    assert public_model_name("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert public_model_name("org/model") == "org/model"
    res = execute(load_config(None, [
        f"output_dir={tmp_path}", "name=minilm", "model.name=minilm", "model.max_length=32",
        f"data.name={tiny_tsv_dataset}", "data.text_column=sentence", "data.label_column=label",
        "data.max_eval_examples=8", "partition.num_clients=1", "federation.rounds=1", "train.local_steps=1",
        "train.batch_size=4",
    ]))
    adapter = json.loads((res.run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in (res.run_dir / "adapter" / "README.md").read_text()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    predicted = classify(load_run_model(res.run_dir), ["good", "bad"])
    assert [p["label"] for p in predicted] and all(p["label"] in ("0", "1") for p in predicted)


def test_a_personalised_run_predicts_with_the_chosen_clients_model(runs):
    result = CliRunner().invoke(app, ["predict", str(runs.local), "--client", "1", "-t", "good", "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.output)
    assert row["label"] in ("negative", "positive")
    folder = runs.local / "adapters" / "client_1"
    assert "client 1's own model" in (folder / "README.md").read_text()
    assert (folder / "classifier_config.json").is_file() and (folder / "tokenizer.json").is_file()


def test_a_clustered_run_predicts_with_the_model_of_the_clients_cluster(runs):
    assignment = json.loads((runs.clustered / "models.json").read_text())["assignment"]
    for client, name in assignment.items():
        assert load_run_model(runs.clustered, int(client)).folder == runs.clustered / "adapters" / name
        card = (runs.clustered / "adapters" / name / "README.md").read_text()
        assert f"model `{name}`, used by clients" in card and "classifier_config.json" in card
    assert load_run_model(runs.clustered, model_name="global").folder == runs.clustered / "adapter"
    assert load_run_model(runs.clustered, model_name="cluster_1").folder == runs.clustered / "adapters" / "cluster_1"
    with pytest.raises(FedtuneError, match="has no client 3; its clients are 0..2"):
        load_run_model(runs.clustered, 3)


def test_predict_on_a_run_of_several_models_without_client_refuses_naming_them(runs, monkeypatch, capsys):
    code, err = _main(monkeypatch, capsys, str(runs.clustered), "-t", "good")
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: run {runs.clustered} ended with several models: cluster_0 (clients ")
    assert ("cluster_1 (clients " in err and err.endswith(
        "global (adapter/, used by no client); choose the one a client uses with --client N, or one by name with "
        "--model NAME\n"))
    code, err = _main(monkeypatch, capsys, str(runs.clustered), "--model", "cluster_9", "-t", "good")
    assert err == f"error: run {runs.clustered} has no model 'cluster_9'; its models are global, cluster_0, cluster_1\n"
    code, err = _main(monkeypatch, capsys, str(runs.clustered), "--model", "global", "--client", "0", "-t", "good")
    assert "give --client (the model that client uses) or --model (a model by name), not both" in err
    result = CliRunner().invoke(app, ["predict", str(runs.clustered), "--model", "cluster_0", "-t", "good", "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["label"] in ("negative", "positive")


def _main(monkeypatch, capsys, *args: str):
    monkeypatch.setattr(sys, "argv", ["fedtune", "predict", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err


def test_predict_errors_are_one_line(runs, tmp_path, monkeypatch, capsys):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "metrics.jsonl").write_text((runs.cls / "metrics.jsonl").read_text())
    cases = [
        ((str(tmp_path), "-t", "x"), "is not a run directory"),
        ((str(unfinished), "-t", "x"), "has no saved adapter"),
        ((str(runs.cls), "--client", "0", "-t", "x"), "saved one model for all clients; leave out --client"),
        ((str(runs.local), "-t", "x"), "saved one adapter per client (0..1); choose one with --client"),
        ((str(runs.local), "--client", "7", "-t", "x"), "has no adapter for client 7; its clients are 0..1"),
        ((str(runs.cls),), "no inputs"),
        ((str(runs.cls), "--file", str(tmp_path / "missing.txt")), "input file not found"),
    ]
    for args, expected in cases:
        code, err = _main(monkeypatch, capsys, *args)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and expected in err, (args, err)


def test_a_pair_classifier_reads_two_texts_split_at_a_tab(runs):
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    rm = load_run_model(runs.pair)
    assert rm.text_columns == ["sentence", "other"]
    firsts, seconds = ["a good film", "dull"], ["film good a", "plot dull"]
    predicted = classify(rm, [f"{a}\t{b}" for a, b in zip(firsts, seconds)])
    folder = runs.pair / "adapter"
    base = AutoModelForSequenceClassification.from_pretrained(
        str(runs.model_dir), config=AutoConfig.from_pretrained(folder / "classifier_config.json"))
    model = PeftModel.from_pretrained(base, folder).eval()
    with torch.no_grad():
        probs = model(**AutoTokenizer.from_pretrained(folder)(firsts, seconds, padding=True, return_tensors="pt"))
    assert [p["probability"] for p in predicted] == pytest.approx(probs.logits.softmax(-1).max(-1).values.tolist(),
                                                                  abs=1e-5)
    assert "`sentence` + `other`" in (folder / "README.md").read_text()
    with pytest.raises(FedtuneError, match="separate the two texts of each input with a tab"):
        classify(rm, ["no tab here"])
    assert split_inputs(["a\tb", "c"], pair=False) == [["a", "b"], ["c", ""]]
