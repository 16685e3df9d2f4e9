"""Adapter kinds as one registry (fedtune.models.kinds): a kind written in one module and added to the registry
with one line is picked up by the config, the build, training, saving, loading back, predicting and the card."""

import json
import subprocess
import sys
import textwrap

import pytest

from fedtune.errors import FedtuneError

BITFIT = '''
"""BitFit (Ben Zaken et al., 2022) as a kind in one module: only the bias terms (and the head) train."""

import json

from fedtune.models.kinds.base import AdapterKind
from fedtune.sections import Section

WEIGHTS = "bitfit.safetensors"


class BitfitConfig(Section):
    """BitFit: the bias terms of the base train."""

    train_head: bool = True
    """Also train the classification head."""


class BitFit(AdapterKind):
    name = "bitfit"
    Options = BitfitConfig
    section_title, owner, trains = "the bias terms", "BitFit's", "bias terms"
    library, tag, config_file = "fedtune", "bitfit", "bitfit_config.json"

    def build(self, model, task, rank=None):
        for n, p in model.named_parameters():
            head = n.startswith("classifier.")
            p.requires_grad_(self.options.train_head if head else n.endswith(".bias"))
        return model

    def describe(self, ranks=None):
        return "BitFit"

    def save(self, model, tokenizer, folder, base_name, classification):
        from safetensors.torch import save_file

        from fedtune.models.lora import trainable_state

        folder.mkdir(parents=True, exist_ok=True)
        save_file(trainable_state(model), str(folder / WEIGHTS))
        (folder / self.config_file).write_text(json.dumps({"base_model_name_or_path": base_name,
                                                          "train_head": self.options.train_head}))
        tokenizer.save_pretrained(folder)

    @classmethod
    def load(cls, model, folder, task):
        from safetensors.torch import load_file

        from fedtune.models.lora import load_trainable

        model = cls(BitfitConfig(train_head=cls.saved_config(folder)["train_head"])).build(model, task)
        load_trainable(model, load_file(str(folder / WEIGHTS)))
        return model

    @classmethod
    def card_title(cls, base):
        return f"BitFit biases for {base}"

    @classmethod
    def card_row(cls, saved, cfg):
        return ("BitFit", "bias terms" + (" and head" if saved["train_head"] else ""))
'''

SCRIPT = '''
import json, sys

import fedtune.models.kinds as kinds
from bitfit import BitFit

kinds.KINDS[BitFit.name] = BitFit  # the one line that registers a kind

import torch

from fedtune.config import load_config
from fedtune.errors import FedtuneError
from fedtune.experiment import build_experiment
from fedtune.run import execute
from fedtune.runtime.checkpoint import load_checkpoint
from fedtune.saved_model import classify, load_run_model

model, data, out = sys.argv[1:4]
base = [f"output_dir={out}", f"model.name={model}", f"data.name={data}", "data.text_column=sentence",
        "data.label_column=label", "partition.num_clients=2", "federation.rounds=2", "train.local_steps=2",
        "train.batch_size=8", "train.lr=0.05", "threads=1"]
report = {}
try:
    load_config(None, base + ["bitfit.train_head=false"])
except FedtuneError as e:
    report["other_kind_setting"] = str(e)
try:
    build_experiment(load_config(None, base + ["name=flora", "model.finetune=bitfit", "algorithm.name=flora"]))
except FedtuneError as e:
    report["factor_algorithm"] = str(e)
cfg = load_config(None, base + ["name=bitfit", "model.finetune=bitfit"])
report["section"] = cfg.to_dict()["bitfit"]
res = execute(cfg)
exp = build_experiment(cfg)
report["trained"] = sorted(exp.initial)
rows = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
report["bytes_up"] = rows[1]["bytes_up"]
report["state_bytes"] = sum(t.numel() * t.element_size() for t in exp.initial.values())
final = load_checkpoint(res.run_dir).state.global_tensors
rm = load_run_model(res.run_dir)
params = dict(rm.model.named_parameters())
report["loaded_back"] = all(torch.equal(params[n], t) for n, t in final.items())
report["moved"] = any(not torch.equal(exp.initial[n], t) for n, t in final.items())
exp.load(final)
exp.model.eval()
enc = rm.tokenizer(["a good film", "a bad film"], return_tensors="pt", padding=True)
with torch.no_grad():
    own = exp.model(**enc).logits.softmax(-1)
report["predict"] = [p["probabilities"][rm.label_names[0]] for p in classify(rm, ["a good film", "a bad film"])]
report["own"] = own[:, 0].tolist()
report["card"] = (res.run_dir / "adapter" / "README.md").read_text()
report["final"] = res.final
print("REPORT" + json.dumps(report))
'''


@pytest.fixture(scope="module")
def bitfit_report(tmp_path_factory, tiny_model_dir, tiny_tsv_dataset):
    where = tmp_path_factory.mktemp("bitfit")
    (where / "bitfit.py").write_text(textwrap.dedent(BITFIT))
    (where / "script.py").write_text(textwrap.dedent(SCRIPT))
    done = subprocess.run([sys.executable, str(where / "script.py"), str(tiny_model_dir), str(tiny_tsv_dataset),
                           str(where / "runs")], cwd=where, capture_output=True, text=True, timeout=600)
    line = next((x for x in done.stdout.splitlines() if x.startswith("REPORT")), None)
    assert line is not None, done.stderr[-3000:]
    return json.loads(line[len("REPORT"):])


def test_a_kind_in_one_module_is_configured_by_its_own_section(bitfit_report):
    assert bitfit_report["section"] == {"train_head": True}
    assert bitfit_report["other_kind_setting"] == (
        "invalid config: bitfit.train_head is a setting of the bias terms (model.finetune: bitfit), but this run "
        "fine-tunes lora; LoRA's own are under lora.*; remove it")


def test_a_kind_is_built_trained_and_federated_by_its_capabilities(bitfit_report):
    trained = bitfit_report["trained"]
    assert "classifier.weight" in trained and all(n.endswith(".bias") for n in trained if n != "classifier.weight")
    assert bitfit_report["bytes_up"] == 2 * bitfit_report["state_bytes"]  # two clients send the biases
    assert bitfit_report["moved"] and "eval/accuracy" in bitfit_report["final"]
    assert "federates model.finetune=lora, not bitfit" in bitfit_report["factor_algorithm"]


def test_a_kind_saves_loads_back_predicts_and_is_described_by_its_card(bitfit_report):
    assert bitfit_report["loaded_back"]
    assert bitfit_report["predict"] == pytest.approx(bitfit_report["own"], abs=1e-6)
    card = bitfit_report["card"]
    assert "BitFit biases for" in card and "| BitFit | bias terms and head |" in card
    assert "library_name: fedtune" in card and "- bitfit" in card
    assert "`model.finetune: bitfit` has no transformers or peft format" in card


def test_the_registry_names_its_kinds_and_refuses_an_unknown_one():
    from fedtune.config import load_config
    from fedtune.models.kinds import KINDS, kind_named, kinds_with

    assert list(KINDS)[:3] == ["lora", "full", "mole"]
    assert kinds_with("factorised") == ("lora",) and "mole" not in kinds_with("averaged")
    with pytest.raises(FedtuneError, match="unknown kind of fine-tuning 'lorra'; did you mean 'lora'"):
        kind_named("lorra")
    with pytest.raises(FedtuneError, match="model.finetune"):
        load_config(None, ["model.finetune=lorra"])


def test_a_saved_folder_is_recognised_by_the_kind_that_saved_it(tmp_path):
    from fedtune.models.kinds import KINDS, saved_kind

    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "config.json").write_text("{}")
    (tmp_path / "mole").mkdir()
    (tmp_path / "mole" / "mole_config.json").write_text("{}")
    for name in ("lora", "full", "mole"):
        assert saved_kind(tmp_path / name) is KINDS[name]
    assert saved_kind(tmp_path) is None
