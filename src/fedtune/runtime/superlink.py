"""``fedtune superlink``: Flower's SuperLink, run from fedtune's environment.

It takes exactly the options of ``flower-superlink`` (passed through) and puts
this interpreter's ``bin/`` first on ``PATH``, so ``.venv/bin/fedtune
superlink`` works without an activated venv (the plain
``.venv/bin/flower-superlink`` fails on its first run with
``FileNotFoundError: flower-superexec``).
"""

from __future__ import annotations

from fedtune.runtime.processes import flower_tool, supervise


def run_superlink(args: list[str]) -> int:
    """Run ``flower-superlink args`` with this environment's tools on ``PATH``; its exit status."""
    return supervise([flower_tool("flower-superlink"), *args], on_exit=lambda: None)
