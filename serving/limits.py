"""Production mode's per-client feedback limits: a token bucket per client (posts per minute, with a burst)
and a cap on the new items one client may add to one label within a window.

Kept in this replica's memory and bounded (the least recently seen clients are forgotten first); with N
replicas a client may reach N times the limits, which still bounds how far one client can move a label.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from serving.errors import LabelCapReached, TooManyRequests

MAX_CLIENTS = 10_000


@dataclass
class _Client:
    tokens: float
    refilled_at: float
    added: dict[str, deque[float]] = field(default_factory=dict)


class FeedbackLimiter:
    """Thread-safe: :meth:`admit` for every post, :meth:`check_cap` before storing an item, :meth:`added`
    after a new one was stored."""

    def __init__(
        self,
        *,
        rate_per_minute: float,
        burst: int,
        label_cap: int,
        cap_window_s: float,
        clock: Callable[[], float] = time.monotonic,
        max_clients: int = MAX_CLIENTS,
    ) -> None:
        self.rate_per_s = rate_per_minute / 60.0
        self.burst = burst
        self.label_cap = label_cap
        self.cap_window_s = cap_window_s
        self.clock = clock
        self.max_clients = max_clients
        self._clients: OrderedDict[str, _Client] = OrderedDict()
        self._lock = threading.Lock()

    def _client(self, key: str, now: float) -> _Client:
        client = self._clients.pop(key, None)
        if client is None:
            client = _Client(tokens=float(self.burst), refilled_at=now)
        self._clients[key] = client
        while len(self._clients) > self.max_clients:
            self._clients.popitem(last=False)
        return client

    def admit(self, client_key: str) -> None:
        """Spend one post of ``client_key``'s rate, or raise TooManyRequests."""
        with self._lock:
            now = self.clock()
            client = self._client(client_key, now)
            client.tokens = min(self.burst, client.tokens + (now - client.refilled_at) * self.rate_per_s)
            client.refilled_at = now
            if client.tokens < 1.0:
                wait = (1.0 - client.tokens) / self.rate_per_s
                raise TooManyRequests(
                    f"too many feedback posts from this client: at most {self.rate_per_s * 60:g} per minute "
                    f"(bursts of {self.burst}); retry in {math.ceil(wait)} s",
                    retry_after_s=wait,
                )
            client.tokens -= 1.0

    def check_cap(self, client_key: str, label: str) -> None:
        """Raise LabelCapReached when ``client_key`` added ``label_cap`` items to ``label`` in the window."""
        with self._lock:
            now = self.clock()
            times = self._client(client_key, now).added.get(label)
            if times is None:
                return
            while times and now - times[0] > self.cap_window_s:
                times.popleft()
            if len(times) >= self.label_cap:
                wait = self.cap_window_s - (now - times[0])
                raise LabelCapReached(
                    f"this client already added {len(times)} items to label {label!r} in the last "
                    f"{self.cap_window_s:g} s, the most one client may (TFLOOP_SERVE_FEEDBACK_LABEL_CAP); "
                    f"retry in {math.ceil(wait)} s",
                    retry_after_s=wait,
                )

    def added(self, client_key: str, label: str) -> None:
        """Count a new item ``client_key`` added to ``label`` (duplicates are not counted)."""
        with self._lock:
            client = self._client(client_key, self.clock())
            client.added.setdefault(label, deque()).append(self.clock())
