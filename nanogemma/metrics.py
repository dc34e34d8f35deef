"""What `nanogemma serve` reports at /metrics: the server's counters and the engine's, as Prometheus text.

The engine counts what it does (`engine.EngineStats`: requests, tokens, steps, prefix hits); the server
counts what only it sees (`Metrics`: HTTP statuses, 429s, time to first token, tokens sent lately), on its
event loop. `prometheus_text` writes both in Prometheus' text exposition format (version 0.0.4), with the
time to first token as a histogram.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .engine import Engine

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


@dataclass
class Metrics:
    """What /metrics reports beyond the engine's own counters (written on the event loop only)."""

    http: dict[int, int] = field(default_factory=dict)
    rejected: int = 0
    ttft: list[int] = field(default_factory=lambda: [0] * (len(TTFT_BUCKETS) + 1))
    ttft_sum: float = 0.0
    ttft_count: int = 0
    recent: deque = field(default_factory=deque)  # times of tokens sent in the last WINDOW seconds
    WINDOW = 10.0

    def observe_ttft(self, seconds: float) -> None:
        i = next((i for i, b in enumerate(TTFT_BUCKETS) if seconds <= b), len(TTFT_BUCKETS))
        self.ttft[i] += 1
        self.ttft_sum += seconds
        self.ttft_count += 1

    def token(self, now: float) -> None:
        self.recent.append(now)

    def tokens_per_second(self, now: float) -> float:
        while self.recent and self.recent[0] < now - self.WINDOW:
            self.recent.popleft()
        return len(self.recent) / self.WINDOW


def prometheus_text(m: Metrics, e: Engine | None) -> str:
    """The /metrics page in Prometheus' text format: the server's own counters `m` and the engine's `e`
    (None while the model loads)."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.extend([f"# HELP nanogemma_{name} {help_}", f"# TYPE nanogemma_{name} {kind}"])
        lines.extend(f"nanogemma_{name}{labels} {value:g}" for labels, value in samples)

    metric("http_responses_total", "counter", "HTTP responses by status code",
           [(f'{{code="{c}"}}', n) for c, n in sorted(m.http.items())])
    metric("requests_rejected_total", "counter", "requests answered 429 (queue full)", [("", m.rejected)])
    metric("ready", "gauge", "1 once the model is loaded", [("", e is not None)])
    if e is not None:
        s = e.stats
        metric("requests_total", "counter", "requests admitted to the queue", [("", s.requests)])
        metric("requests_finished_total", "counter", "requests finished, by reason",
               [(f'{{reason="{r}"}}', n) for r, n in sorted(s.finished.items())])
        metric("queue_depth", "gauge", "requests waiting for a slot", [("", e.queue_depth)])
        metric("slots", "gauge", "slots (requests served at once)", [("", e.slots)])
        metric("active_slots", "gauge", "slots serving a request", [("", e.busy_slots)])
        metric("prompt_tokens_total", "counter", "prompt tokens prefilled", [("", s.prompt_tokens)])
        metric("generation_tokens_total", "counter", "tokens generated", [("", s.generated_tokens)])
        metric("engine_steps_total", "counter", "engine steps", [("", s.steps)])
        metric("prefix_hits_total", "counter", "requests that started from a stored prompt prefix",
               [("", s.prefix_hits)])
        metric("prefix_tokens_total", "counter", "prompt tokens taken from stored prefixes, not prefilled",
               [("", s.prefix_tokens)])
    metric("generation_tokens_per_second", "gauge", f"tokens sent over the last {m.WINDOW:g} s, per second",
           [("", m.tokens_per_second(time.monotonic()))])
    name = "time_to_first_token_seconds"
    lines.extend([f"# HELP nanogemma_{name} from submission to the first token",
                  f"# TYPE nanogemma_{name} histogram"])
    total = 0
    for bound, count in zip((*TTFT_BUCKETS, math.inf), m.ttft, strict=True):
        total += count
        lines.append(f'nanogemma_{name}_bucket{{le="{"+Inf" if bound == math.inf else f"{bound:g}"}"}} {total}')
    lines += [f"nanogemma_{name}_sum {m.ttft_sum:g}", f"nanogemma_{name}_count {m.ttft_count}"]
    return "\n".join(lines) + "\n"
