"""Where differential-privacy randomness comes from: a secret key of the party that draws it.

Noise that someone can regenerate protects nothing against them: they subtract it. A sample that someone can
recompute gives no amplification against them: they know who, or which rows, took part. A run's seed is written
in ``config.yaml`` and chosen by whoever starts the run, so neither is drawn from it. Each party draws a 256-bit
key from the operating system's CSPRNG (:func:`secrets.token_bytes`) and keeps it in its own state:

- the server (the ``dp`` wrapper's central noise and its client sampling) in the server state's ``extra``, from
  the initial state on: its checkpoints hold it, no payload carries it;
- a client (the ``dp`` wrapper's distributed shares; DP-SGD's noise and row samples) in its secrets
  (:attr:`~fedtune.algorithms.ClientContext.secrets`), which the runtime keeps beside the client's state under
  ``secret/`` and never hands on: a Flower node's state reply and a run's saved client states drop them
  (:func:`public`); in-process they are made before round 1, so every checkpoint holds them.

Every draw comes from :class:`SecretStream`: SHAKE-256 of (key, what it is for, round, draw number), a
cryptographically secure stream, so neither the noise nor the sample can be predicted without the key. A round
redone after a resume, with the keys restored from the checkpoint, draws what it drew before: redoing a round
releases nothing new. A client draws each round once: a server asking it to train a round again (to difference
two updates carrying one noise) is refused (:func:`round_key`).

``privacy.reproducible_noise: true`` derives the keys from the run's seed instead, so that runs can be compared
bit for bit (tests, benchmarks); no ε then holds against anyone who knows the seed, every report of the run's
privacy says so, and a deployed node refuses it. The Gaussian draws are Box–Muller in float64: not hardened
against attacks on the low-order bits of noised floating-point values (Mironov, CCS 2012).
"""

from __future__ import annotations

import hashlib
import math
import secrets

import numpy as np
import torch

from fedtune.aggregation import Tensors
from fedtune.errors import FedtuneError

SECRET = "secret/"
"""Prefix of the tensors of a party's state that never leave it."""
NOISE_KEY = SECRET + "dp_noise_key"
"""Where a party keeps its key (uint8, 32 bytes)."""
LAST_ROUND = SECRET + "last_noised_round"
"""A client's last round that drew from its key."""


def noise_key(store: Tensors, reproducible_seed: int | None, *party: object) -> torch.Tensor:
    """``store``'s key, drawn and put there if it has none: secret, or (``reproducible_seed`` set: under
    ``privacy.reproducible_noise``) derived from that seed and ``party`` (e.g. ``"client", 3``)."""
    if NOISE_KEY not in store:
        raw = (secrets.token_bytes(32) if reproducible_seed is None else
               hashlib.sha256(repr(("fedtune dp noise", reproducible_seed, *party)).encode()).digest())
        store[NOISE_KEY] = torch.tensor(list(raw), dtype=torch.uint8)
    return store[NOISE_KEY]


def round_key(store: Tensors, reproducible_seed: int | None, client_id: int, rnd: int) -> torch.Tensor:
    """Client ``client_id``'s key for round ``rnd``, which it may draw from once: a round at or before the last
    one it drew is refused."""
    last = int(store[LAST_ROUND]) if LAST_ROUND in store else -1
    if rnd <= last:
        raise FedtuneError(f"client {client_id} was asked to train round {rnd} after round {last}: a round's DP noise "
                           "is drawn once, since two updates carrying the same noise would cancel it in their "
                           "difference; refused")
    store[LAST_ROUND] = torch.tensor(rnd)
    return noise_key(store, reproducible_seed, "client", client_id)


class SecretStream:
    """The draws of ``purpose`` in round ``rnd`` from ``key``: draw i's bytes are SHAKE-256(key, purpose, round,
    i), consumed in order."""

    def __init__(self, key: torch.Tensor, purpose: str, rnd: int):
        self._prefix = bytes(key.tolist()) + f"|{purpose}|{rnd}|".encode()
        self._draws = 0

    def _words(self, n: int) -> np.ndarray:
        data = hashlib.shake_256(self._prefix + self._draws.to_bytes(8, "little")).digest(8 * n)
        self._draws += 1
        return np.frombuffer(data, dtype="<u8")

    def random(self, n: int) -> np.ndarray:
        """``n`` uniforms in [0, 1), 53 random bits each."""
        return (self._words(n) >> np.uint64(11)).astype(np.float64) * 2.0**-53

    def normal(self, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        """Standard normal float64 of ``shape`` (Box–Muller: √(−2 ln u₁)·(cos 2πu₂, sin 2πu₂), u₁ ∈ (0, 1])."""
        n = math.prod(shape)
        half = (n + 1) // 2
        u = self.random(2 * half)
        radius = np.sqrt(-2.0 * np.log1p(-u[:half]))
        angle = 2.0 * np.pi * u[half:]
        z = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]
        return torch.from_numpy(z).reshape(tuple(shape))


def public(state: Tensors) -> Tensors:
    """``state`` without its secrets: what a party may hand to anyone else, and what its algorithm keeps."""
    return {n: t for n, t in state.items() if not n.startswith(SECRET)}


def secret_part(state: Tensors) -> Tensors:
    """``state``'s secrets (:data:`SECRET`-prefixed)."""
    return {n: t for n, t in state.items() if n.startswith(SECRET)}
