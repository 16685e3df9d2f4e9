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


def watch_link(child: subprocess.Popen, stopped: threading.Event, host: str, port: int, limit_s: float) -> None:
    """Stop ``child``'s process group once (host, port) has been unreachable for ``limit_s`` in a row
    (and it has been reachable once: before that, flwr's own first-connection timeout applies)."""
    seen, down_since = False, None
    while child.poll() is None:
        if link_reachable(host, port):
            seen, down_since = True, None
        elif seen:
            down_since = down_since or time.monotonic()
            if time.monotonic() - down_since > limit_s:
                print(f"fedtune supernode: the SuperLink at {host}:{port} has been unreachable for {limit_s:.0f}s; "
                      "stopping this node", flush=True)
                stopped.set()
                stop_group(child)
                return
        time.sleep(LINK_POLL_S)


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


def supervise(command: list[str], on_exit, link: tuple[str, int, float] | None = None) -> int:
    """Run ``command`` as a child in its own process group; SIGTERM/SIGINT are passed on to it; ``link``
    (host, port, seconds): stop it once its SuperLink has been unreachable that long. ``on_exit()`` once it
    has ended; the exit status is the child's (1 if stopped for its link)."""
    env = tools_env()
    child = subprocess.Popen(command, env=env, start_new_session=True)
    stopped = threading.Event()
    if link is not None:
        threading.Thread(target=watch_link, args=(child, stopped, *link), name="fedtune-link-watch",
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
