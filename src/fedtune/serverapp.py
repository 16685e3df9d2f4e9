"""The ServerApp for ``flwr run .`` and for a deployed SuperLink/SuperNodes.

``pyproject.toml`` names it and the ClientApp (:mod:`fedtune.runtime.flower_client`,
kept apart so that a node's per-message ClientApp process does not import torch)::

    [tool.flwr.app.components]
    serverapp = "fedtune.serverapp:serverapp"
    clientapp = "fedtune.runtime.flower_client:clientapp"

The ServerApp reads its run from the run config (``[tool.flwr.app.config]``,
or ``flwr run . --run-config "config='configs/x.yaml' overrides='lora.r=16 seed=1'"``):

    config      path of the fedtune YAML/TOML config, as seen by the ServerApp process
    overrides   space-separated ``key.path=value`` overrides
    overwrite   replace an existing run directory
    resume      continue the run directory after its last checkpoint

It then runs exactly what ``execute(cfg, runtime="flower")`` runs, over the
Grid Flower gives it (simulation or deployment), and loads no client's data.
The ClientApp receives the resolved run config in every message; a SuperNode
needs the model the config names and either its own data
(``--node-config "client-id=<i> data-path=<file>"``, ``partition.method: files``)
or, for a dataset split on purpose, that dataset and
``--node-config "partition-id=<i> num-partitions=<n>"``.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from rich.console import Console

from fedtune.config import load_config
from fedtune.runtime.flower_server import FlowerPool

serverapp = ServerApp()


def _flag(value) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


@serverapp.main()
def main(grid: Grid, context: Context) -> None:
    from fedtune.run import execute_with

    rc = context.run_config
    if "config" not in rc:
        raise ValueError("run config needs 'config' (path of a fedtune config); set [tool.flwr.app.config] config")
    cfg = load_config(str(rc["config"]), str(rc.get("overrides", "")).split())

    def driver(exp, hooks, body):
        return body(FlowerPool(grid, exp, timeout_s=cfg.federation.round_timeout_s))

    result = execute_with(cfg, driver, "flower", overwrite=_flag(rc.get("overwrite", False)), console=Console(),
                          resume=_flag(rc.get("resume", False)))
    if result.already_finished:
        Console().print(f"fedtune: run {result.run_dir} is finished; nothing to resume")
        return
    Console().print(f"fedtune: run written to {result.run_dir} ({result.seconds:.1f}s): {result.final}")
