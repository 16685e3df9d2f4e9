"""Running Flower's deployment commands as supervised children of a fedtune command.

``fedtune superlink`` and ``fedtune supernode`` start Flower's own commands
(``flower-superlink``, ``flower-supernode``) as children in their own process
group, pass SIGTERM/SIGINT on, and stop the whole group (the SuperExec, the
ServerApp or ClientApp processes it started) when they end; Flower starts
some of its processes by name from ``PATH``, so this environment's ``bin/``
goes first on it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from fedtune.errors import FedtuneError

LINK_POLL_S = 2.0
"""Seconds between two checks that a node's SuperLink is still reachable."""
CHECK_POLL_S = 1.0
"""Seconds between two calls of a supervised command's other reason to stop (``supervise(stop_if=...)``)."""


def tools_env() -> dict[str, str]:
    """This environment with this interpreter's ``bin/`` first on ``PATH`` (where Flower's commands live)."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}


def flower_tool(name: str) -> str:
    """The path of Flower's command ``name`` in this environment."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.is_file() else shutil.which(name)
    if found is None:
        raise FedtuneError(f"'{name}' is not installed in this environment; install fedtune's dependencies "
                           "(scripts/setup.sh, or pip install -c constraints.txt -e .)")
    return found


def option_at(args: list[str], name: str) -> tuple[int | None, str | None]:
    """Where the value of option ``name`` is in ``args`` (``--name value`` or ``--name=value``; None: not given)
    and that value."""
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return i + 1, args[i + 1]
        if a.startswith(name + "="):
            return i, a.split("=", 1)[1]
    return None, None


def link_reachable(host: str, port: int, timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to (host, port) opens."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def link_lost(host: str, port: int, limit_s: float):
    """A reason for :func:`stop_when`: (host, port) has been unreachable for ``limit_s`` in a row (and it has
    been reachable once: before that, flwr's own first-connection timeout applies); None while it is not."""
    seen, down_since = False, None

    def reason() -> str | None:
        nonlocal seen, down_since
        if link_reachable(host, port):
            seen, down_since = True, None
        elif seen:
            down_since = down_since or time.monotonic()
            if time.monotonic() - down_since > limit_s:
                return (f"fedtune supernode: the SuperLink at {host}:{port} has been unreachable for {limit_s:.0f}s; "
                        "stopping this node")
        return None

    return reason


def stop_when(child: subprocess.Popen, stopped: threading.Event, reason, poll_s: float) -> None:
    """Stop ``child``'s process group (and set ``stopped``) as soon as ``reason()`` returns a line, which is
    printed; checked every ``poll_s`` while the child runs."""
    while child.poll() is None:
        why = reason()
        if why is not None:
            print(why, flush=True)
            stopped.set()
            stop_group(child)
            return
        time.sleep(poll_s)


def stop_group(child: subprocess.Popen) -> None:
    """SIGTERM ``child``'s process group (it and its SuperExec and ClientApps), SIGKILL what is left after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        try:
            child.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def supervise(command: list[str], on_exit, link: tuple[str, int, float] | None = None,
              env: dict[str, str] | None = None, umask: int = -1, stop_if=None) -> int:
    """Run ``command`` as a child in its own process group, with ``env`` (default :func:`tools_env`) and
    ``umask`` (-1: this process's); SIGTERM/SIGINT are passed on to it. It is stopped once its SuperLink has
    been unreachable for a while (``link``: host, port, seconds; :func:`link_lost`) or once ``stop_if()``
    gives a reason (checked every :data:`CHECK_POLL_S`). ``on_exit()`` once it has ended; the exit status is
    the child's (1 if stopped for a reason)."""
    child = subprocess.Popen(command, env=tools_env() if env is None else env, start_new_session=True, umask=umask)
    stopped = threading.Event()
    for reason, poll_s in ((link_lost(*link) if link else None, LINK_POLL_S), (stop_if, CHECK_POLL_S)):
        if reason is not None:
            threading.Thread(target=stop_when, args=(child, stopped, reason, poll_s), name="fedtune-stop-when",
                             daemon=True).start()

    def forward(signum, frame):
        if child.poll() is None:
            try:
                os.killpg(child.pid, signum)
            except ProcessLookupError:
                pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        rc = child.wait()
        return 1 if stopped.is_set() else rc
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if child.poll() is None:
            stop_group(child)
        else:
            try:
                os.killpg(child.pid, signal.SIGKILL)  # a SuperExec or ClientApp left behind
            except (ProcessLookupError, PermissionError):
                pass
        on_exit()
