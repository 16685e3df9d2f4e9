"""Is the Hugging Face Hub reachable? Asked once, answered within seconds.

Offline (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` set, or no HTTP answer
within ``HUB_TIMEOUT_S``), code that would fetch from the Hub fails at once with
one line instead of hanging on retries. An HTTP probe, not a TCP connect:
sandboxes may accept TCP connections to any address.
"""

from __future__ import annotations

import os
import threading
import urllib.error
import urllib.request

HUB_TIMEOUT_S = 2.0


def hub_unavailable() -> str | None:
    """Why the Hub cannot be used right now, or None when it answers."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return f"offline: {var} is set"
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    failure = _probe(endpoint, HUB_TIMEOUT_S)
    return None if failure is None else f"offline: {endpoint} {failure}"


def _probe(url: str, timeout: float) -> str | None:
    """None if ``url`` gives any HTTP response within ``timeout``, else why not.

    The request runs in a daemon thread, so a slow DNS lookup cannot outlast the timeout either.
    """
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            outcome.append(None)
        except urllib.error.HTTPError:
            outcome.append(None)
        except urllib.error.URLError as e:
            outcome.append(f"is unreachable ({getattr(e.reason, 'strerror', None) or e.reason})")
        except (OSError, ValueError) as e:
            outcome.append(f"is unreachable ({e})")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else f"did not answer within {timeout:g} s"
