"""The committed SNLI summary is what ``benchmarks/snli_instruct.py --summarise`` makes of the committed records."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECORDS = "benchmarks/results/snli_instruct"


@pytest.fixture(scope="module")
def snli_instruct():
    spec = importlib.util.spec_from_file_location("snli_instruct", ROOT / "benchmarks" / "snli_instruct.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_summary_is_the_scripts_output(snli_instruct, monkeypatch):
    monkeypatch.chdir(ROOT)
    committed = json.loads((ROOT / "benchmarks/results/snli_instruct.json").read_text())
    assert snli_instruct.summarise(Path(RECORDS)) == committed
    for run in committed["runs"].values():  # each record is an unmodified run of its committed config
        assert run["overrides"] == []


def test_summary_names_overrides_wall_time_and_machine(snli_instruct, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    src = Path(RECORDS)
    config = (src / "fedit_seed0_config.yaml").read_text().replace("seed: 0", "seed: 1")
    (tmp_path / "fedit_seed1_config.yaml").write_text(config)
    shutil.copyfile(src / "fedit_seed0_metrics.jsonl", tmp_path / "fedit_seed1_metrics.jsonl")
    (tmp_path / "fedit_seed1_summary.json").write_text(json.dumps({"seconds": 1800.04}))
    (tmp_path / "fedit_seed1_machine.json").write_text(json.dumps({"cores": 2}))

    run = snli_instruct.summarise(tmp_path)["runs"]["fedit_seed1"]
    assert run["config"] == "configs/snli_instruct_fedit.yaml" and run["overrides"] == ["seed=1"]
    assert run["accuracy"] == {"0": 0.332, "4": 0.422, "8": 0.464}
    assert run["readout"].startswith("accuracy 0.332 (round 0) → 0.464 (round 8) in ")
    assert run["wall_s"] == 1800.0 and run["machine"] == {"cores": 2}
    assert "Q4_1 GGUF" in run["model"]
