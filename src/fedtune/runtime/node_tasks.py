"""A deployed node's tasks: only fedtune's own ClientApp runs, and only this node's worker can take a task.

flwr 1.42 runs each message a SuperNode receives as a *task*: a process
acquires it from the SuperNode's local task API (``--port``, on loopback),
pulls the message and the app bundle (FAB) the run was submitted with,
installs the FAB, imports the ClientApp it names and runs it. Out of the box
(``--isolation subprocess``) any local account can acquire a node's tasks
from that API (it has no authentication), and the node imports whatever code
a submitted FAB carries. ``fedtune supernode`` closes both:

- **Only this worker acquires tasks.** The SuperNode runs with ``--isolation
  process`` and a random secret (``--superexec-auth-secret-file``, a 0600 file
  in the worker's private folder): Flower then accepts ``AcquireTask`` only when
  it is signed with that secret (HMAC, single-use nonces). :class:`TaskLoop`,
  in the worker, is the only holder of the secret. The task's token (which every
  other call of the task API requires) is handed to the task process in memory
  (a fork of the worker), never on a command line where ``ps`` would show it.
- **Only fedtune's own ClientApp runs.** The task process (:func:`run_task`)
  opens the FAB as a zip and reads its ``pyproject.toml``: an app whose ClientApp
  is not :data:`FEDTUNE_CLIENTAPP` is refused (one line in the node's log, an
  error reply to the server) before anything of it is extracted or imported.
  A FAB that names fedtune's ClientApp is not installed either: the task runs
  the ClientApp of the fedtune installed on this node, already imported in
  the worker, so code shipped inside any FAB never runs on a node.

The residual exposure (stated by ``fedtune supernode`` at start and in
``docs/security.md``): root, or the node operator's own account, can read the
secret, the worker's socket key and the task tokens in memory; a node's host
should be single-tenant or the node should run in its own container.
"""

from __future__ import annotations

import io
import logging
import os
import secrets
import sys
import threading
import time
import tomllib
import traceback
import zipfile
from collections.abc import Callable
from pathlib import Path

from fedtune.errors import FedtuneError

log = logging.getLogger("fedtune.supernode")

FEDTUNE_CLIENTAPP = "fedtune.runtime.flower_client:clientapp"
"""The one ClientApp a ``fedtune supernode`` runs, as a FAB's ``[tool.flwr.app.components] clientapp`` names it."""
POLL_S = 0.5
"""Seconds between two requests for a task."""
MAX_PYPROJECT_BYTES = 1 << 20
"""A FAB's ``pyproject.toml`` larger than this is refused unread."""


class ForeignApp(FedtuneError):
    """A submitted app that is not fedtune's own: refused before any of it is installed or run."""


def fab_clientapp(fab: bytes) -> str:
    """The ClientApp a FAB names (``[tool.flwr.app.components] clientapp`` of its ``pyproject.toml``), read from
    the zip without extracting or running anything; :class:`ForeignApp` when it names none or is no FAB."""
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as z:
            info = z.getinfo("pyproject.toml")
            if info.file_size > MAX_PYPROJECT_BYTES:
                raise ForeignApp("its pyproject.toml is implausibly large")
            project = tomllib.loads(z.read(info).decode())
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ForeignApp(f"it is not a Flower app bundle with a readable pyproject.toml ({type(e).__name__})") from None
    ref = project.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {}).get("clientapp")
    if not isinstance(ref, str):
        raise ForeignApp("its pyproject.toml names no ClientApp")
    return ref


def check_fab(fab: bytes) -> None:
    """Refuse (:class:`ForeignApp`) a FAB whose ClientApp is not :data:`FEDTUNE_CLIENTAPP`."""
    ref = fab_clientapp(fab)
    if ref != FEDTUNE_CLIENTAPP:
        raise ForeignApp(f"its ClientApp is {ref[:120]!r}, not fedtune's {FEDTUNE_CLIENTAPP!r}")


def run_task(runtime_address: str, token: str, parent_pid: int) -> int:
    """The task process: Flower's ClientApp process main (``run_clientapp``), with the FAB checked
    (:func:`check_fab`) instead of installed and the installed fedtune ClientApp instead of the FAB's; its exit
    status. Runs in a fork of the node's worker."""
    from flwr.supernode.runtime import run_clientapp as task_main

    from fedtune.runtime.flower_client import clientapp

    def check_instead_of_install(fab_content: bytes, *args, **kwargs) -> None:
        try:
            check_fab(fab_content)
        except ForeignApp as e:
            log.error("refused a submitted app before running any of it: %s", e)
            raise

    task_main.install_from_fab = check_instead_of_install
    task_main.get_load_client_app_fn = lambda **kwargs: (lambda fab_id, fab_version, fab_hash: clientapp)
    try:
        task_main.run_clientapp(runtime_address, token, insecure=True, certificates=None, parent_pid=parent_pid,
                                runtime_dependency_install=False)
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)


class TaskLoop:
    """Acquires this node's tasks from its SuperNode's task API with the SuperExec secret, and runs each in a
    fork of this process (:func:`run_task`), the token passed in memory.

    ``folder``: the worker's private (0700) folder, where the secret is written (0600) for the SuperNode to
    read (:attr:`secret_file`). ``in_child``: what a task process does first (e.g. close the worker's listening
    socket, which it must not serve).
    """

    def __init__(self, folder: str, runtime_address: str, in_child: Callable[[], None] = lambda: None):
        self.runtime_address = runtime_address
        self.in_child = in_child
        self.secret = secrets.token_bytes(32)
        self.secret_file = Path(folder) / "superexec.secret"
        self.secret_file.touch(mode=0o600)
        self.secret_file.write_bytes(self.secret)
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="fedtune-node-tasks", daemon=True)

    def start(self) -> "TaskLoop":
        self.thread.start()
        return self

    def close(self) -> None:
        self.closed.set()

    def _client(self):
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        return RuntimeHttpClient.from_server_address(
            server_address=self.runtime_address, insecure=True, root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                          SuperExecAuthHttpInterceptor(master_secret=self.secret,
                                                       protected_methods=frozenset({"/flwr.proto.Runtime/AcquireTask"}))],
            retry_invoker=make_simple_http_retry_invoker())

    def _loop(self) -> None:
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        client = None
        while not self.closed.is_set():
            try:
                client = client or self._client()
                res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
                if res.HasField("task") and res.token:
                    self._launch(res.token, res.task.task_id)
            except Exception as e:  # the SuperNode is not up yet, or restarting: try again
                log.debug("no task acquired: %s: %s", type(e).__name__, e)
            self.closed.wait(POLL_S)

    def _launch(self, token: str, task_id: int) -> None:
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the task process: Flower's ClientApp main, then exit without this process's cleanup
            code = 1
            try:
                self.in_child()
                code = run_task(self.runtime_address, token, parent)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        threading.Thread(target=self._reap, args=(pid, task_id, time.perf_counter()), daemon=True).start()

    @staticmethod
    def _reap(pid: int, task_id: int, t0: float) -> None:
        _, status = os.waitpid(pid, 0)
        log.info("task %d: process %d (forked) ended with status %d after %.2fs", task_id, pid,
                 os.waitstatus_to_exitcode(status), time.perf_counter() - t0)
