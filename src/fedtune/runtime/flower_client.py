"""The fedtune ClientApp, light enough to run per message: it imports Flower, not torch.

A deployed SuperNode runs every message as a task in a process of its own
(flwr 1.4x). Importing torch, transformers and the model for each would cost
seconds to minutes per round, so this module only moves the message:

- on a node started by ``fedtune supernode`` (node config ``fedtune-worker``:
  the folder of its worker's socket and key), the task process is a fork of
  the node's worker (:mod:`fedtune.runtime.node_tasks`), and this forwards the
  message over that local socket to the worker, which keeps the model, the
  tokenised data and the experiment across rounds and messages
  (:mod:`fedtune.runtime.supernode`);
- otherwise (a Ray actor of the simulation engine, which lives for the whole
  run, or a plain ``flower-supernode``) it answers in this process with
  :func:`fedtune.runtime.flower_node.answer`, importing it on first use.

The client's persistent tensors stay in the node's ``Context.state`` either
way, so the worker holds no state that a restarted worker would lose.
"""

from __future__ import annotations

from multiprocessing.connection import Client
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

STATE_KEY = "fedtune.state"
WORKER_KEY = "fedtune-worker"
"""Node config key: the folder holding the worker's socket (``worker.sock``) and its key (``authkey``)."""

clientapp = ClientApp()
"""The fedtune ClientApp: one node per client (see :func:`fedtune.runtime.flower.node_client`)."""


class WorkerError(RuntimeError):
    """The node's worker raised while answering; the message is its traceback."""


def worker_call(folder: str, request: tuple[Any, ...]) -> Any:
    """Send ``request`` to the worker listening in ``folder``; its reply, or :class:`WorkerError`."""
    where = Path(folder)
    try:
        with Client(str(where / "worker.sock"), family="AF_UNIX", authkey=(where / "authkey").read_bytes()) as conn:
            conn.send(request)
            status, value = conn.recv()
    except (OSError, EOFError) as e:
        raise WorkerError(f"cannot reach this node's fedtune worker at {where} ({e}); restart the node with "
                          "fedtune supernode") from e
    if status != "ok":
        raise WorkerError(value)
    return value


def _answer(msg: Message, context: Context) -> Message:
    state = context.state[STATE_KEY] if STATE_KEY in context.state else None
    node_config = dict(context.node_config)
    folder = node_config.get(WORKER_KEY)
    if folder is not None:
        content, new_state = worker_call(str(folder), (msg.metadata.message_type, msg.content, node_config, state))
    else:
        from fedtune.runtime.flower_node import answer

        content, new_state = answer(msg.metadata.message_type, msg.content, node_config, state)
    if new_state is not None:
        context.state[STATE_KEY] = new_state
    return Message(content, reply_to=msg)


@clientapp.train()
def _train(msg: Message, context: Context) -> Message:
    return _answer(msg, context)


@clientapp.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    return _answer(msg, context)


@clientapp.query()
def _query(msg: Message, context: Context) -> Message:
    return _answer(msg, context)
