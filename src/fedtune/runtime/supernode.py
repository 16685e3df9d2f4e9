"""``fedtune supernode``: a data owner's Flower SuperNode, run from fedtune's environment, closed to others.

It takes the options of ``flower-supernode`` (flwr's own flags, passed
through) and adds what a data owner needs (threat model: ``docs/security.md``):

- **only fedtune's own code runs here** (:mod:`fedtune.runtime.node_tasks`): the
  SuperNode runs with ``--isolation process``; this process acquires the node's
  tasks with a secret only it holds and runs each in a fork of itself, refusing
  a submitted app whose ClientApp is not fedtune's before any of it is read as
  code, and running fedtune's installed ClientApp, never code from an app
  bundle. Another local account cannot take the node's tasks (Flower's task API
  requires the secret to acquire a task, and the task token travels in memory,
  not on a command line). ``--isolation``, ``--superexec-auth-secret-file``,
  ``--allow-runtime-dependency-installation``, ``--trusted-entities``, a
  non-loopback ``--host`` and the task API's own ``--ssl-*`` flags are therefore
  fedtune's to set, and refused;
- **the model stays loaded**: this process is the node's worker. It listens on a
  private local socket (a fresh 0700 folder with the socket and a random key,
  passed to the ClientApp as node config ``fedtune-worker``) and answers every
  message the task processes forward (:mod:`fedtune.runtime.flower_client`) with
  :func:`~fedtune.runtime.flower_node.answer` on an experiment it builds once
  per run: the model, the tokenised data and the training code stay in memory
  from round to round;
- **the node alone decides what it reads**: a ``data-path`` in ``--node-config``
  is checked before the node joins (it is read and parsed as a table; with
  ``config=<the run's config file>`` also against the run's columns and labels, as
  a local run checks them) and made absolute; the node reads no path the
  server names (:mod:`fedtune.runtime.flower_node`);
- **a node whose SuperLink is gone exits**: unless ``--max-wait-time`` is given,
  the SuperNode stops retrying after :data:`LINK_WAIT_S` seconds without its
  SuperLink (flwr's default is to retry forever). flwr 1.42's SuperNode then
  logs that it gives up but its process lingers, so this process also watches
  the SuperLink's address itself (a TCP connect every few seconds): unreachable
  for ``--max-wait-time`` plus a grace of :data:`EXIT_GRACE_S`, the SuperNode's
  process group is stopped and this command exits with status 1.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import shlex
import shutil
import sys
import tempfile
import threading
import time
import traceback
from multiprocessing.connection import Listener
from pathlib import Path

from fedtune.errors import FedtuneError
from fedtune.runtime.flower_client import WORKER_KEY
from fedtune.runtime.node_tasks import TaskLoop
from fedtune.runtime.processes import flower_tool, option_at, supervise

log = logging.getLogger("fedtune.supernode")

LINK_WAIT_S = 300
"""Seconds a ``fedtune supernode`` keeps trying to reach its SuperLink before it exits (``--max-wait-time``)."""
EXIT_GRACE_S = 10
"""Seconds after ``--max-wait-time`` that the SuperNode gets to exit by itself before it is stopped."""
TASK_API_PORT = 9094
"""flwr's default port of a SuperNode's local task API (``--port``)."""
FEDTUNES_FLAGS = ("--isolation", "--superexec-auth-secret-file", "--allow-runtime-dependency-installation",
                  "--ssl-certfile", "--ssl-keyfile", "--ssl-ca-certfile", "--trusted-entities")
"""flower-supernode flags that ``fedtune supernode`` sets itself (or that would undo what it closes)."""
RESIDUAL = ("the node's secrets (its task secret, its worker's key, the task tokens) are readable by root and by "
            "this account; run the node on a host no one else logs into, or in its own container "
            "(docs/security.md)")
"""What ``fedtune supernode`` cannot close from outside Flower, said at start."""


_PAIR = re.compile(r"""(\S+?)=('[^']*'|"[^"]*"|\S+)""")


def parse_node_config(text: str) -> dict[str, object]:
    """``key=value`` pairs as Flower reads them, but text may also be unquoted (``data-path=/srv/a.tsv``):
    quoted → text; true/false → bool; integers and decimals → numbers; anything else → text."""
    out: dict[str, object] = {}
    rest = _PAIR.sub("", text).strip()
    if rest:
        raise FedtuneError(f"cannot read --node-config near {rest!r}; write space-separated key=value pairs, "
                           "e.g. 'client-id=0 data-path=notes.tsv'")
    for key, raw in _PAIR.findall(text):
        if raw[:1] in "'\"" and raw[-1:] == raw[:1] and len(raw) >= 2:
            out[key] = raw[1:-1]
        elif raw in ("true", "false"):
            out[key] = raw == "true"
        else:
            try:
                out[key] = int(raw)
            except ValueError:
                try:
                    out[key] = float(raw)
                except ValueError:
                    out[key] = raw
    return out


def _with_node_config(args: list[str], extra: dict[str, str]) -> list[str]:
    """``args`` with ``--node-config`` rewritten as Flower parses it (text quoted) and ``extra``'s keys set."""
    at, value = option_at(args, "--node-config")
    config = {k: v for k, v in parse_node_config(value or "").items() if k not in extra}
    items = [f"{k}={_quoted(v)}" for k, v in config.items()] + [f"{k}={_quoted(v)}" for k, v in extra.items()]
    joined = " ".join(items)
    if at is None:
        return [*args, "--node-config", joined]
    out = list(args)
    out[at] = joined if out[at - 1] == "--node-config" else f"--node-config={joined}"
    return out


def _quoted(value) -> str:
    if isinstance(value, str):
        if '"' in value:
            raise FedtuneError(f"node config value {value!r} contains a double quote, which Flower cannot pass")
        return f'"{value}"'
    return str(value).lower() if isinstance(value, bool) else str(value)


def prepare_node_args(args: list[str], worker_folder: str | None, secret_file: str | None = None) -> list[str]:
    """The ``flower-supernode`` arguments for ``args``: flags fedtune sets refused, ``data-path`` checked
    (:func:`check_node_data`) and made absolute, the worker's folder added, ``--isolation process`` with the
    task secret, and ``--max-wait-time`` :data:`LINK_WAIT_S` unless given."""
    for flag in FEDTUNES_FLAGS:
        if option_at(args, flag)[0] is not None or flag in args:
            raise FedtuneError(f"{flag} is set by fedtune supernode itself (it runs only fedtune's ClientApp and "
                               "takes its own tasks with a private secret); remove it")
    host = option_at(args, "--host")[1]
    if host is not None and not _loopback(host):
        raise FedtuneError(f"--host {host}: the node's task API must stay on this machine (127.0.0.1 or ::1); "
                           "nothing outside the node has reason to reach it")
    _, value = option_at(args, "--node-config")
    config = parse_node_config(value or "")
    if WORKER_KEY in config:
        raise FedtuneError(f"--node-config key '{WORKER_KEY}' is set by fedtune supernode itself; remove it")
    extra: dict[str, str] = {}
    if "device" in config:  # a GPU this machine lacks: one line before joining
        from fedtune.device import resolve_device

        resolve_device(str(config["device"]))
    for key in ("data-root", "model-root"):
        if key in config:
            folder = Path(str(config[key])).expanduser().resolve()
            if not folder.is_dir():
                raise FedtuneError(f"{key} '{config[key]}' is not a folder (resolved: {folder})")
            extra[key] = str(folder)
    if "config" in config and "data-path" not in config:
        raise FedtuneError("node config 'config' checks this node's data-path against a run's config; give data-path")
    if "data-path" in config:
        path = Path(str(config["data-path"])).expanduser().resolve()
        check_node_data(path, config.get("config"))
        extra["data-path"] = str(path)
    if worker_folder is not None:
        extra[WORKER_KEY] = worker_folder
    out = _with_node_config(args, extra) if value or extra else list(args)
    if option_at(out, "--max-wait-time")[1] is None:
        out += ["--max-wait-time", str(LINK_WAIT_S)]
    if secret_file is not None:
        out += ["--isolation", "process", "--superexec-auth-secret-file", secret_file]
    return out


def check_node_data(path: Path, config: object = None) -> None:
    """This node's data file, read and checked before the node joins: it must exist and parse as a table
    (a CSV/TSV/JSON/JSONL file, or a folder of them); with ``config`` (the path of the run's config file, which
    the node operator agreed to) it is loaded exactly as a run loads a client's file, so wrong columns, labels
    outside ``data.labels`` or malformed rows are found now, in one line, not at the run's start."""
    if not path.exists():
        raise FedtuneError(f"data-path '{path}' does not exist; give this node's own data file")
    if config is not None:
        from fedtune.config import load_config
        from fedtune.experiment import load_client_file

        load_client_file(load_config(str(config)), str(path))
        return
    from fedtune.data.readers import SUFFIXES, read_table

    files = [path] if path.is_file() else [f for f in sorted(path.iterdir()) if f.suffix in SUFFIXES]
    if not files:
        raise FedtuneError(f"data-path '{path}' holds no data file ({', '.join(SUFFIXES)})")
    for f in files:
        if not len(read_table(f)):
            raise FedtuneError(f"data-path file '{f}' holds no rows")


def _loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class NodeWorker:
    """The node's long-lived worker: it takes the node's tasks (:class:`~fedtune.runtime.node_tasks.TaskLoop`,
    each run in a fork of this warm process) and, on a private socket, answers the messages those task
    processes forward (:mod:`fedtune.runtime.flower_client`) with :func:`fedtune.runtime.flower_node.answer`,
    one at a time, on the experiment kept between messages."""

    def __init__(self, runtime_address: str = f"127.0.0.1:{TASK_API_PORT}") -> None:
        self.folder = tempfile.mkdtemp(prefix="fedtune-node-")  # 0700: only this user reaches the socket
        key = os.urandom(32)
        key_file = Path(self.folder) / "authkey"
        key_file.touch(mode=0o600)
        key_file.write_bytes(key)
        self.listener = Listener(str(Path(self.folder) / "worker.sock"), family="AF_UNIX", authkey=key)
        self.tasks = TaskLoop(self.folder, runtime_address, in_child=self.listener.close)
        self.answering = threading.Lock()
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="fedtune-node-worker", daemon=True)

    def start(self, take_tasks: bool = True) -> "NodeWorker":
        """Serve the socket; with ``take_tasks``, also take the node's tasks."""
        self.thread.start()
        if take_tasks:
            self.tasks.start()
        return self

    def _serve(self) -> None:
        import importlib

        # torch, transformers and Flower's ClientApp main: imported once, before the first message and fork
        for module in ("fedtune.runtime.flower_node", "flwr.supernode.runtime.run_clientapp"):
            importlib.import_module(module)

        while not self.closed.is_set():
            try:
                conn = self.listener.accept()
            except Exception as e:  # one bad connection (reset, wrong key, hung up) must not stop the node
                if self.closed.is_set():
                    return
                log.warning("refused a connection to the worker: %s: %s", type(e).__name__, e)
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn) -> None:
        with conn:
            try:
                request = conn.recv()
                if not (isinstance(request, tuple) and len(request) == 4):
                    raise ValueError("not a forwarded message")
            except Exception:
                return
            reply = self._answer(request)
            try:
                conn.send(reply)
            except (OSError, EOFError):
                pass

    def _answer(self, request: tuple) -> tuple[str, object]:
        """Answer one forwarded message as a deployed node (:func:`~fedtune.runtime.flower_node.answer` with
        ``deployed=True``). An error is logged here in full and answered with
        :func:`~fedtune.runtime.flower_node.public_reason` only: the server learns who failed, doing what,
        and the kind of problem, never text that could quote this node's rows."""
        from fedtune.runtime.flower_node import answer, public_reason

        with self.answering:
            t0 = time.perf_counter()
            try:
                reply = ("ok", answer(*request, deployed=True))
                log.info("answered a %s message in %.2fs", request[0], time.perf_counter() - t0)
                return reply
            except Exception as e:
                detail = f"FedtuneError: {e}" if isinstance(e, FedtuneError) else "".join(
                    traceback.format_exception(e)).rstrip()
                log.error("a %s message failed (only the line below the detail goes to the server):\n%s",
                          request[0], detail)
                reason = public_reason(e, request[0], request[2])
                log.error("sent to the server: %s", reason)
                return "error", reason

    def close(self) -> None:
        self.closed.set()
        self.tasks.close()
        self.listener.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def run_supernode(args: list[str]) -> int:
    """Run ``flower-supernode`` with ``args`` (see the module docstring), serving as its worker; its exit status."""
    port = option_at(args, "--port")[1] or TASK_API_PORT
    host = option_at(args, "--host")[1] or "127.0.0.1"
    worker = NodeWorker(f"{host}:{port}")
    try:
        command = [flower_tool("flower-supernode"),
                   *prepare_node_args(args, worker.folder, str(worker.tasks.secret_file))]
    except BaseException:
        worker.close()
        raise
    link_host, link_port = superlink_address(command)
    wait_s = float(option_at(command, "--max-wait-time")[1])
    print(f"fedtune supernode: {shlex.join(command)}", flush=True)
    print(f"fedtune supernode: only fedtune's own ClientApp runs here, and only this process takes the node's "
          f"tasks; residual exposure: {RESIDUAL}", flush=True)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("fedtune supernode: %(message)s"))
    logging.getLogger("fedtune").addHandler(handler)
    logging.getLogger("fedtune").setLevel(logging.INFO)
    worker.start()
    return supervise(command, on_exit=worker.close, link=(link_host, link_port, wait_s + EXIT_GRACE_S))


def superlink_address(args: list[str]) -> tuple[str, int]:
    """(host, port) of ``--superlink`` in flower-supernode's ``args`` (default: flwr's)."""
    from flwr.supercore.constant import SUPERLINK_DEFAULT_CLIENT_ADDRESS

    address = option_at(args, "--superlink")[1] or SUPERLINK_DEFAULT_CLIENT_ADDRESS
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise FedtuneError(f"--superlink {address!r} is not HOST:PORT; give the SuperLink's address, e.g. link.example.org:9092")
    return host.strip("[]"), int(port)


