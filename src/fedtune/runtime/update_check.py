"""The server's check of every update before anything aggregates it.

A client's update is its own word. Each one is checked, on every runtime,
against what the algorithm expects of that client
(:meth:`~fedtune.algorithms.Algorithm.expected_update`):

- exactly the expected names, each with its shape, a real floating-point dtype
  (an integer one where declared, e.g. expert ids, then with the declared
  value), and only finite values;
- ``num_examples`` an integer in 1..n_i, where n_i is the client's shard size
  as the server knows it (in a deployment: the node's own report at the run's
  start).

Then the **update guard**: a valid update whose change from what the client
started with, ‖θ_i − θ_i⁰‖₂ over its model tensors (float64), exceeds
``ratio`` × a reference change is rejected too (``federation.max_update_ratio``;
0 turns it off). The reference is the lower median (a lone outlier never sets
it) of the changes accepted in the previous round (logged in its row as
``update_norms``, so a resumed run decides as an uninterrupted one), so each
update is judged as it arrives, in any order (:func:`over_reference`); when
the previous round accepted fewer than :data:`GUARD_MIN_NORMS` changes (the
first round), the round's valid updates are held and judged together against
the median of theirs and the previous round's (:func:`oversized`). A boosted
or 1e30-scaled update is finite and well-formed, and would otherwise carry
the average wherever it points.

A rejected update is named with its reason; the round aggregates the others.
"""

from __future__ import annotations

import math

import torch

from fedtune.algorithms import ClientUpdate, Expected

GUARD_MIN_NORMS = 3
"""Fewest changes (this round's and the previous round's accepted ones) the update guard compares."""


def check_update(update: ClientUpdate, expected: dict[str, Expected], max_examples: int) -> str | None:
    """Why ``update`` is malformed (one line, naming the tensor), or None where it is what was expected."""
    n = update.num_examples
    if type(n) is not int or isinstance(n, bool):
        return f"num_examples {n!r} is not an integer"
    if not 1 <= n <= max_examples:
        return f"num_examples {n} is outside 1..{max_examples} (the client's training rows)"
    names, want = set(update.tensors), set(expected)
    if names - want:
        return f"unexpected tensor{'s' * (len(names - want) > 1)} {_few(names - want)}"
    if want - names:
        return f"missing tensor{'s' * (len(want - names) > 1)} {_few(want - names)}"
    for name in sorted(want):
        t, e = update.tensors[name], expected[name]
        if not isinstance(t, torch.Tensor):
            return f"tensor {name!r} is not a tensor"
        if tuple(t.shape) != e.shape:
            return f"tensor {name!r} has shape {tuple(t.shape)}, expected {e.shape}"
        if e.integer:
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                return f"tensor {name!r} has dtype {t.dtype}, expected an integer dtype"
            if e.equals is not None and not torch.equal(t.long(), e.equals.long()):
                return f"tensor {name!r} does not hold the values the server sent"
            continue
        if not t.is_floating_point():
            return f"tensor {name!r} has dtype {t.dtype}, expected a real floating-point dtype"
        if not bool(torch.isfinite(t).all()):
            return f"tensor {name!r} has non-finite values"
    return None


def change(update: ClientUpdate, expected: dict[str, Expected]) -> dict[str, torch.Tensor]:
    """θ − θ⁰ per model tensor of a valid update, in float64 (side channels left out)."""
    return {name: update.tensors[name].double() - e.start.double() for name, e in expected.items() if e.is_model}


def change_norm(update: ClientUpdate, expected: dict[str, Expected]) -> float:
    """‖θ − θ⁰‖₂ over the update's model tensors, in float64 (a valid update: every name is there)."""
    return math.sqrt(sum(float(d.pow(2).sum()) for d in change(update, expected).values()))


def reference_change(norms: list[float]) -> float | None:
    """The lower median of ``norms`` (a lone outlier never sets it); None with fewer than :data:`GUARD_MIN_NORMS`."""
    if len(norms) < GUARD_MIN_NORMS:
        return None
    return float(torch.tensor(norms, dtype=torch.float64).median())  # torch: the lower middle of an even count


def over_reference(norm: float, reference: float | None, ratio: float) -> str | None:
    """Why a change of ``norm`` is rejected against ``reference`` (None: it passes, or the guard is off)."""
    if ratio <= 0 or reference is None or not reference > 0 or norm <= ratio * reference:
        return None
    return (f"its change ‖Δ‖ = {norm:.3g} exceeds federation.max_update_ratio = {ratio:g} × the reference change "
            f"{reference:.3g}")


def oversized(norms: dict[int, float], ratio: float, previous: list[float] = ()) -> dict[int, str]:
    """The clients whose change norm exceeds ``ratio`` × the reference (client → reason): the lower median of
    ``norms`` and the ``previous`` round's accepted norms. None when ``ratio`` is 0, with fewer than
    :data:`GUARD_MIN_NORMS` norms in all, or a reference of 0."""
    reference = reference_change([*norms.values(), *previous])
    out = {cid: over_reference(norm, reference, ratio) for cid, norm in sorted(norms.items())}
    return {cid: why for cid, why in out.items() if why}


def _few(names: set[str]) -> str:
    shown = ", ".join(repr(n) for n in sorted(names)[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")
