"""Seeds: every random choice of a run derives from ``cfg.seed`` and the integers that say where it is made."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (run seed, round, client): stable across processes and machines."""
    return int(np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(2, np.uint32).view(np.uint64)[0] >> 1)
