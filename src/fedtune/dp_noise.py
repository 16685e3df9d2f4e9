"""Where differential-privacy noise comes from: a secret key of the party that adds it.

Noise that someone can regenerate protects nothing against them: they subtract it. A run's seed is written in
``config.yaml`` and chosen by whoever starts the run, so DP noise is never drawn from it. Each party that adds
noise draws a 256-bit key from the operating system's CSPRNG (:func:`secrets.token_bytes`) the first time it
needs one, and keeps the key in its own private state:

- the server (the ``dp`` wrapper's central noise) in the server state's ``extra``, which the server's checkpoint
  holds and no payload carries;
- a client (the ``dp`` wrapper's distributed shares, DP-SGD) in its persistent tensors
  (:attr:`~fedtune.algorithms.ClientContext.state`): on a Flower node they stay in the node's own
  ``Context.state`` and are dropped from every state the node returns (:func:`public`).

Each draw's generator is seeded from the key and what the draw is for:
``seed = first 8 bytes of HMAC-SHA256(key, purpose ‖ round)``. A round redone after a resume, with the key
restored from the checkpoint, therefore adds the noise it added before: redoing a round releases nothing new.

``privacy.reproducible_noise: true`` derives the keys from the run's seed instead, so that runs can be compared
bit for bit (tests, benchmarks); no ε then holds against anyone who knows the seed, and every report of the
run's privacy says so. The Gaussian draws come from torch's generator; its floating-point sampling is not
hardened against attacks on the low bits of noised values (Mironov, CCS 2012), as Opacus's ``secure_mode`` is.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

import torch

from fedtune.aggregation import Tensors

SECRET = "secret/"
"""Prefix of the tensors of a party's state that never leave it."""
NOISE_KEY = SECRET + "dp_noise_key"
"""Where a party keeps its noise key (uint8, 32 bytes)."""


def noise_key(store: Tensors, reproducible_seed: int | None, *party: object) -> torch.Tensor:
    """``store``'s noise key, drawn and put there if it has none: secret, or (``reproducible_seed`` set: under
    ``privacy.reproducible_noise``) derived from that seed and ``party`` (e.g. ``"client", 3``)."""
    if NOISE_KEY not in store:
        raw = (secrets.token_bytes(32) if reproducible_seed is None else
               hashlib.sha256(repr(("fedtune dp noise", reproducible_seed, *party)).encode()).digest())
        store[NOISE_KEY] = torch.tensor(list(raw), dtype=torch.uint8)
    return store[NOISE_KEY]


def noise_generator(key: torch.Tensor, purpose: str, rnd: int) -> torch.Generator:
    """The generator of ``purpose``'s noise in round ``rnd`` (CPU), seeded from ``key``."""
    digest = hmac.new(bytes(key.tolist()), f"{purpose}|{rnd}".encode(), hashlib.sha256).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def public(state: Tensors) -> Tensors:
    """``state`` without its secrets: what a party may hand to anyone else."""
    return {n: t for n, t in state.items() if not n.startswith(SECRET)}
