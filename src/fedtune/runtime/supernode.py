"""``fedtune supernode`` and ``fedtune superlink``: Flower's deployment commands, run from fedtune's environment.

Both take exactly the options of ``flower-supernode`` / ``flower-superlink``
(flwr's own flags, passed through) and fix what the plain commands get wrong:

- **no activated venv needed**: the SuperLink starts ``flower-superexec`` and the
  SuperNode ``flwr-clientapp`` by name from ``PATH``; these commands put this
  interpreter's ``bin/`` first on it, so ``.venv/bin/fedtune supernode ...``
  works without ``source .venv/bin/activate`` (the plain ``.venv/bin/flower-superlink``
  fails on its first run with ``FileNotFoundError: flower-superexec``);
- **the model stays loaded** (``supernode``): this process is the node's worker.
  It listens on a private local socket (a fresh 0700 folder with the socket and
  a random key, passed to the ClientApp as node config ``fedtune-worker``) and
  answers every message the node's short-lived ClientApp processes forward
  (:mod:`fedtune.runtime.flower_client`) with the same
  :func:`~fedtune.runtime.flower_node.answer` a simulation node runs, on an
  experiment it builds once per run: the model, the tokenised data and the
  training code stay in memory from round to round. Flower still starts one
  ``flwr-clientapp`` task process per message (through ``PATH``): the one
  found first is this worker's shim (:data:`SHIM`), and the task process is
  forked from the worker, so no message pays for starting Python and
  importing Flower;
- **node-local data is checked before joining**: a ``data-path`` in
  ``--node-config`` must exist; it is made absolute (relative to the directory
  the command runs in) so every process of the node reads the same file;
- **a node whose SuperLink is gone exits**: unless ``--max-wait-time`` is given,
  the SuperNode stops retrying after :data:`LINK_WAIT_S` seconds without its
  SuperLink (flwr's default is to retry forever). flwr 1.42's SuperNode then
  logs that it gives up but its process lingers, so this process also watches
  the SuperLink's address itself (a TCP connect every few seconds): unreachable
  for ``--max-wait-time`` plus a grace of :data:`EXIT_GRACE_S`, the SuperNode's
  process group is stopped and this command exits with status 1.
"""

from __future__ import annotations

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
from fedtune.runtime.processes import flower_tool, option_at, supervise

log = logging.getLogger("fedtune.supernode")

LINK_WAIT_S = 300
"""Seconds a ``fedtune supernode`` keeps trying to reach its SuperLink before it exits (``--max-wait-time``)."""
EXIT_GRACE_S = 10
"""Seconds after ``--max-wait-time`` that the SuperNode gets to exit by itself before it is stopped."""


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


def prepare_node_args(args: list[str], worker_folder: str | None) -> list[str]:
    """The ``flower-supernode`` arguments for ``args``: ``data-path`` checked and made absolute, the worker's
    folder added, and ``--max-wait-time`` :data:`LINK_WAIT_S` unless given."""
    _, value = option_at(args, "--node-config")
    config = parse_node_config(value or "")
    if WORKER_KEY in config:
        raise FedtuneError(f"--node-config key '{WORKER_KEY}' is set by fedtune supernode itself; remove it")
    extra: dict[str, str] = {}
    if "data-path" in config:
        path = Path(str(config["data-path"])).expanduser().resolve()
        if not path.is_file() and not path.is_dir():
            raise FedtuneError(f"data-path '{config['data-path']}' does not exist (resolved: {path}); give this "
                               "node's own data file")
        extra["data-path"] = str(path)
    if worker_folder is not None:
        extra[WORKER_KEY] = worker_folder
    out = _with_node_config(args, extra) if value or extra else list(args)
    if option_at(out, "--max-wait-time")[1] is None:
        out += ["--max-wait-time", str(LINK_WAIT_S)]
    return out


SHIM = """#!{python} -I
# fedtune supernode's flwr-clientapp: the SuperExec starts one per task; this asks the node's worker to fork
# one from its warm process (Flower and fedtune already imported) and exits with that child's status.
import os, signal, sys
from multiprocessing.connection import Client

folder = {folder!r}
try:
    conn = Client(os.path.join(folder, "worker.sock"), family="AF_UNIX",
                  authkey=open(os.path.join(folder, "authkey"), "rb").read())
except OSError as e:
    print(f"fedtune supernode: worker unreachable ({{e}}); starting Flower's own flwr-clientapp", file=sys.stderr)
    os.execv({real!r}, [{real!r}, *sys.argv[1:]])
conn.send(("fork", sys.argv, dict(os.environ), os.getcwd()))
_, pid = conn.recv()

def stop(signum, frame):
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass

signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
_, code = conn.recv()
sys.exit(code)
"""
"""The ``flwr-clientapp`` that ``fedtune supernode`` puts first on the SuperExec's ``PATH`` (a fork client)."""


class NodeWorker:
    """The node's long-lived worker, listening on a private socket for two requests:

    - ``("fork", argv, env, cwd)`` from the ``flwr-clientapp`` shim (:data:`SHIM`): fork a child of this warm
      process that runs Flower's ClientApp main with that argv (a task process without the 2–8 s of starting
      Python and importing Flower), reply its pid, then its exit status;
    - a message forwarded by the ClientApp (:mod:`fedtune.runtime.flower_client`): answer it with
      :func:`fedtune.runtime.flower_node.answer`, one at a time, on the experiment kept between messages.
    """

    def __init__(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="fedtune-node-")  # 0700: only this user reaches the socket
        key = os.urandom(32)
        key_file = Path(self.folder) / "authkey"
        key_file.touch(mode=0o600)
        key_file.write_bytes(key)
        self.listener = Listener(str(Path(self.folder) / "worker.sock"), family="AF_UNIX", authkey=key)
        self.bin = Path(self.folder) / "bin"
        self.bin.mkdir()
        shim = self.bin / "flwr-clientapp"
        shim.write_text(SHIM.format(python=sys.executable, folder=self.folder,
                                    real=str(Path(sys.executable).parent / "flwr-clientapp")))
        shim.chmod(0o700)
        self.answering = threading.Lock()
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="fedtune-node-worker", daemon=True)

    def start(self) -> "NodeWorker":
        self.thread.start()
        return self

    def _serve(self) -> None:
        import importlib

        # torch, transformers and Flower's ClientApp main: imported once, before the first message and fork
        for module in ("fedtune.runtime.flower_node", "flwr.supernode.cli.flwr_clientapp"):
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
            except (EOFError, OSError):
                return
            if request[0] == "fork":
                self._fork(conn, *request[1:])
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

    def _fork(self, conn, argv: list[str], env: dict[str, str], cwd: str) -> None:
        pid = os.fork()
        if pid == 0:  # the task process: Flower's ClientApp main, then exit without this process's cleanup
            code = 1
            try:
                self.listener.close()
                os.chdir(cwd)
                os.environ.clear()
                os.environ.update(env)
                sys.argv = list(argv)
                from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

                flwr_clientapp()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        t0 = time.perf_counter()
        try:
            conn.send(("pid", pid))
        except (OSError, EOFError):
            pass
        _, status = os.waitpid(pid, 0)
        log.info("task process %d (forked) ended with status %d after %.2fs", pid, os.waitstatus_to_exitcode(status),
                 time.perf_counter() - t0)
        try:
            conn.send(("exit", os.waitstatus_to_exitcode(status)))
        except (OSError, EOFError):
            pass

    def close(self) -> None:
        self.closed.set()
        self.listener.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def run_supernode(args: list[str]) -> int:
    """Run ``flower-supernode`` with ``args`` (see the module docstring), serving as its worker; its exit status."""
    worker = NodeWorker()
    try:
        command = [flower_tool("flower-supernode"), *prepare_node_args(args, worker.folder)]
    except BaseException:
        worker.close()
        raise
    host, port = superlink_address(command)
    wait_s = float(option_at(command, "--max-wait-time")[1])
    print(f"fedtune supernode: {shlex.join(command)}", flush=True)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("fedtune supernode: %(message)s"))
    logging.getLogger("fedtune").addHandler(handler)
    logging.getLogger("fedtune").setLevel(logging.INFO)
    worker.start()
    return supervise(command, on_exit=worker.close, link=(host, port, wait_s + EXIT_GRACE_S), first_on_path=worker.bin)


def superlink_address(args: list[str]) -> tuple[str, int]:
    """(host, port) of ``--superlink`` in flower-supernode's ``args`` (default: flwr's)."""
    from flwr.supercore.constant import SUPERLINK_DEFAULT_CLIENT_ADDRESS

    address = option_at(args, "--superlink")[1] or SUPERLINK_DEFAULT_CLIENT_ADDRESS
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise FedtuneError(f"--superlink {address!r} is not HOST:PORT; give the SuperLink's address, e.g. link.example.org:9093")
    return host.strip("[]"), int(port)


