"""What local training costs: tokens per second and peak memory, per client and per round.

A client measures its own local training (:class:`Usage`): the real (unpadded) tokens its forward passes
read, the seconds the training took, and the peak memory while it ran: on a CUDA device the most torch
allocated there (``torch.cuda.max_memory_allocated``), on the CPU the peak resident set size of the client's
process (Linux's VmHWM, reset before training by writing 5 to ``/proc/self/clear_refs``; where it cannot be
reset, the process's peak since it started). The client sends them with its update's metrics, and the round's
row of the run log holds (:func:`round_usage`)::

    train_tokens       = Σ_i tokens_i
    tokens_per_s       = Σ_i tokens_i / Σ_i seconds_i       the clients' training throughput, per device
    peak_memory_bytes  = max_i peak_i
"""

from __future__ import annotations

import re
import resource
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where a client measures, not where a run log is read (fedtune show)
    import torch

TOKENS, SECONDS, PEAK = "tokens", "train_seconds", "peak_memory_bytes"
"""The metric names a client reports its usage under."""
MEASURED = ("tokens_per_s", PEAK)
"""Keys of a round's row that are measurements of the machine, not results: they differ between identical runs."""


def _reset_cpu_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux, or not allowed: VmHWM (or ru_maxrss) stays the peak since the process started


def _cpu_peak() -> int:
    """Peak resident set size of this process, in bytes."""
    try:
        found = re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
        if found:
            return int(found.group(1)) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


class Usage:
    """Measures the block it guards on ``device``: wall seconds, peak memory, and the tokens of the batches that
    :meth:`count` passed on."""

    def __init__(self, device: torch.device):
        self.device = device
        self.tokens = 0
        self.seconds = 0.0
        self.peak = 0

    def __enter__(self) -> "Usage":
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _reset_cpu_peak()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self.peak = _cpu_peak()
        self.seconds = time.perf_counter() - self._t0

    def count(self, batches: Iterator[dict[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
        """``batches`` as they come, counting each one's real (unpadded) tokens."""
        for batch in batches:
            self.tokens += int(batch["attention_mask"].sum())
            yield batch

    def metrics(self) -> dict[str, float]:
        return {TOKENS: self.tokens, SECONDS: self.seconds, PEAK: self.peak}


def round_usage(client_metrics: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The round's usage (module docstring) from its clients' metrics; empty when no client reported any."""
    reports = [m for m in client_metrics if TOKENS in m]
    if not reports:
        return {}
    tokens = sum(int(m[TOKENS]) for m in reports)
    seconds = sum(float(m[SECONDS]) for m in reports)
    return {"train_tokens": tokens, "tokens_per_s": tokens / seconds if seconds > 0 else None,
            PEAK: max(int(m[PEAK]) for m in reports)}
