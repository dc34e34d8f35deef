"""The /metrics text (`nanogemma/metrics.py`), read back by Prometheus' own client library's parser."""

from __future__ import annotations

import math

from helpers import tiny_model
from prometheus_client.parser import text_string_to_metric_families

from nanogemma.engine import Engine
from nanogemma.metrics import TTFT_BUCKETS, Metrics, prometheus_text


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict, name: str, **labels) -> float:
    """The value of the sample `name` with exactly these labels (a counter's sample keeps its _total)."""
    return next(s.value for f in fams.values() for s in f.samples if s.name == name and s.labels == labels)


def test_metrics_parse_with_the_engine_counts_and_a_cumulative_ttft_histogram():
    engine = Engine(tiny_model(), slots=2, max_len=64)
    engine.generate([[1, 2, 3], [4, 5]], 4)
    m = Metrics()
    waits = [0.03, 0.07, 0.3, 0.3, 1.5, 45.0]
    for w in waits:
        m.observe_ttft(w)
    m.http[200] = 5
    m.http[429] = 1
    m.rejected = 1
    fams = families(prometheus_text(m, engine))

    assert value(fams, "nanogemma_ready") == 1
    assert value(fams, "nanogemma_requests_total") == 2
    assert fams["nanogemma_requests"].type == "counter"  # the family is named without _total
    assert value(fams, "nanogemma_generation_tokens_total") == engine.stats.generated_tokens == 8
    assert value(fams, "nanogemma_prompt_tokens_total") == 5
    assert value(fams, "nanogemma_active_slots") == 0 and value(fams, "nanogemma_slots") == 2
    assert value(fams, "nanogemma_http_responses_total", code="429") == 1
    assert value(fams, "nanogemma_requests_finished_total", reason="length") == 2

    hist = fams["nanogemma_time_to_first_token_seconds"]
    assert hist.type == "histogram"
    buckets = {float(s.labels["le"]): s.value for s in hist.samples if s.name.endswith("_bucket")}
    assert sorted(buckets) == [*TTFT_BUCKETS, math.inf]
    for bound, count in buckets.items():  # each counts every wait up to its bound: cumulative, as Prometheus wants
        assert count == sum(w <= bound for w in waits), bound
    total = {s.name: s.value for s in hist.samples}
    assert total["nanogemma_time_to_first_token_seconds_count"] == len(waits)
    assert math.isclose(total["nanogemma_time_to_first_token_seconds_sum"], sum(waits))


def test_metrics_while_loading_say_not_ready_and_still_parse():
    fams = families(prometheus_text(Metrics(), None))
    assert value(fams, "nanogemma_ready") == 0
    assert "nanogemma_queue_depth" not in fams  # no engine yet: no engine gauges, rather than zeros
    assert value(fams, "nanogemma_time_to_first_token_seconds_count") == 0


def test_tokens_per_second_counts_only_the_last_window():
    m = Metrics()
    for t in (0.0, 1.0, 5.0, 9.5, 10.5):
        m.token(t)
    assert m.tokens_per_second(10.5) == 4 / m.WINDOW  # the token at 0.0 left the 10 s window
    assert m.tokens_per_second(100.0) == 0
