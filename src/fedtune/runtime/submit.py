"""``fedtune submit``: submit a run to a deployed SuperLink, follow it, and exit with how it ended.

``flwr run --stream`` returns 0 whether the run completed or failed (flwr
1.42 streams the logs and stops). This submits with ``flwr run``, streams the
run's log with ``flwr log``, then reads the run's final status with ``flwr
ls``: exit status 0 for ``finished:completed``; otherwise one line with the
run's status and Flower's details, and status 1. Run it on the link host
(``fedtune superlink`` serves the Control API on loopback only), from a
checkout of fedtune (``flwr run`` builds the app from the project folder).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from fedtune.errors import FedtuneError
from fedtune.runtime.processes import flower_tool, tools_env

FINISHED = "finished"
COMPLETED = "finished:completed"


def project_folder() -> Path:
    """The fedtune project folder ``flwr run`` builds the app from (the checkout fedtune is installed from)."""
    root = Path(__file__).resolve().parents[3]
    if not (root / "pyproject.toml").is_file():
        raise FedtuneError("fedtune submit needs a checkout of fedtune (flwr run builds the app from its "
                           "pyproject.toml); install fedtune with scripts/setup.sh from the repository")
    return root


def _flwr(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([flower_tool("flwr"), *args], env=tools_env(), text=True, **kwargs)


def _json(out: str) -> dict:
    """The JSON object ``flwr ... --format json`` printed (after any log lines)."""
    start = out.find("{")
    try:
        return json.loads(out[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        return {}


def run_status(run_id: int, connection: list[str]) -> tuple[str, str]:
    """(status, details) of run ``run_id`` as ``flwr ls`` reports them."""
    res = _flwr(["ls", *connection, "--run-id", str(run_id), "--format", "json"], capture_output=True, timeout=60)
    runs = _json(res.stdout).get("runs", [])
    if not runs:
        raise FedtuneError(f"flwr ls did not report run {run_id}: {' '.join((res.stdout + res.stderr).split())[-300:]}")
    return str(runs[0].get("status", "")), str(runs[0].get("status-details", ""))


def submit(config: Path, overrides: list[str], connection: str | None, overwrite: bool, resume: bool,
           poll_s: float = 2.0) -> int:
    """Submit ``config`` (its path as the ServerApp sees it: absolute), stream its log, return 0 if it completed
    and 1 otherwise (printing one line with the status and Flower's details)."""
    path = Path(config).resolve()
    if not path.is_file():
        raise FedtuneError(f"config file not found: {config}")
    if any("'" in text for text in [str(path), *overrides]):
        raise FedtuneError("fedtune submit passes the config path and overrides to flwr in single quotes; "
                           "remove the single quotes from them")
    run_config = f"config='{path}'"
    if overrides:
        run_config += f" overrides='{' '.join(overrides)}'"
    run_config += f" overwrite={str(overwrite).lower()} resume={str(resume).lower()}"
    where = [connection] if connection else []
    res = _flwr(["run", str(project_folder()), *where, "--format", "json", "--run-config", run_config],
                capture_output=True, timeout=300)
    started = _json(res.stdout)
    if res.returncode != 0 or not started.get("success") or "run-id" not in started:
        raise FedtuneError("flwr run did not start the run: " + " ".join((res.stdout + res.stderr).split())[-500:])
    run_id = int(started["run-id"])
    print(f"fedtune submit: run {run_id} started; streaming its log", flush=True)
    _flwr(["log", str(run_id), *where, "--stream"])
    status, details = run_status(run_id, where)
    while not status.startswith(FINISHED):  # the log ends as the run ends; its status may trail it briefly
        time.sleep(poll_s)
        status, details = run_status(run_id, where)
    if status == COMPLETED:
        print(f"fedtune submit: run {run_id} completed", flush=True)
        return 0
    print(f"fedtune submit: run {run_id} ended {status}: {' '.join(details.split()) or 'no details'}", flush=True)
    return 1
