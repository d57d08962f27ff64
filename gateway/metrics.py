"""Prometheus collectors, all in one registry that /metrics renders.

Engine-specific collectors live beside their engine but register in :data:`REGISTRY` too.
Gauges that describe engines (sessions, queue length, upstream health) are read at scrape time
from the engines themselves, so they can never drift from the truth.

One vocabulary for those figures: an engine's ``stats()`` keys are names from
:data:`ENGINE_STATS`, and a figure two engines share has one name there (and so one metric,
``gateway_engine_<name>``), whichever engine reports it.

Every series /metrics renders carries a ``replica`` label (``cluster.replica_name()``, set once at
start-up), so that one Prometheus can scrape several replicas behind a load balancer and still
tell them apart. The label is added at render time by :class:`ReplicaLabels`, never by the
collectors themselves: in-process readers of :data:`REGISTRY` (tests, ``get_sample_value``) see
the collectors' own labels.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = [
    "ACTIVE_STREAMS",
    "AUDIO_SECONDS",
    "CAPACITY",
    "CLUSTER_QUEUE_LENGTH",
    "CLUSTER_SESSIONS",
    "ENGINE_STATS",
    "HEALTHY",
    "QUEUE_LENGTH",
    "REGISTRY",
    "REPLICA_LABEL",
    "SESSIONS",
    "SESSION_DURATION",
    "STREAM_OUTCOMES",
    "TIME_TO_FIRST_EVENT",
    "EngineStatsCollector",
    "ReplicaLabels",
    "render",
]

REGISTRY = CollectorRegistry(auto_describe=True)

ACTIVE_STREAMS = Gauge(
    "gateway_active_streams",
    "Transcription streams in flight (queued or running).",
    ["engine"],
    registry=REGISTRY,
)
STREAM_OUTCOMES = Counter(
    "gateway_stream_outcomes",
    "Finished transcription requests by outcome code (OK, CACHED, DISCONNECTED or an error code).",
    ["engine", "code"],
    registry=REGISTRY,
)
TIME_TO_FIRST_EVENT = Histogram(
    "gateway_time_to_first_event_seconds",
    "From upload complete to the first transcription (or done) event.",
    ["engine"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)
SESSION_DURATION = Histogram(
    "gateway_session_duration_seconds",
    "Wall-clock duration of engine sessions.",
    ["engine"],
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600),
    registry=REGISTRY,
)
AUDIO_SECONDS = Counter(
    "gateway_audio_seconds",
    "Seconds of audio transcribed to completion.",
    ["engine"],
    registry=REGISTRY,
)


# The figures engines report from ``stats()``, each under one name: name -> what it counts. A
# figure may be one number, or a number per upstream where the engine has several.
SESSIONS = "sessions"
CAPACITY = "capacity"
QUEUE_LENGTH = "queue_length"
HEALTHY = "healthy"
CLUSTER_SESSIONS = "cluster_sessions"
CLUSTER_QUEUE_LENGTH = "cluster_queue_length"
ENGINE_STATS: dict[str, str] = {
    SESSIONS: "Engine sessions running (per upstream for a pool).",
    CAPACITY: "Sessions the engine runs at once; more wait in its queue.",
    QUEUE_LENGTH: "Sessions waiting in the engine's queue for a place.",
    HEALTHY: "1 while an upstream takes new sessions, 0 while it backs off after failures.",
    "opened": "Engine sessions opened since start-up.",
    "closed": "Engine sessions closed since start-up.",
    "reconnects": "Upstream connection attempts that failed and were retried after a backoff.",
    "replayed_bytes": "Audio bytes sent again to a new upstream session after a reconnect.",
    "dropped_chunks": "Audio chunks dropped because the buffer before the upstream was full.",
    "dropped_bytes": "Audio bytes dropped because the buffer before the upstream was full.",
    "unreplayable_bytes": "Audio bytes that could no longer be replayed (past the replay cap).",
    CLUSTER_SESSIONS: "Engine sessions running on every replica, at this replica's last check.",
    CLUSTER_QUEUE_LENGTH: "Sessions queued on every replica, at this replica's last check.",
}


class EngineStatsCollector(Collector):
    """Exports each engine's ``stats()`` numbers as ``gateway_engine_<stat>{engine,upstream}``."""

    def __init__(self, engines: Callable[[], Iterable[Any]]) -> None:
        self._engines = engines

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families: dict[str, GaugeMetricFamily] = {}
        for engine in self._engines():
            for stat, value in engine.stats().items():
                family = families.get(stat)
                if family is None:
                    family = families[stat] = GaugeMetricFamily(
                        f"gateway_engine_{stat}",
                        ENGINE_STATS.get(
                            stat, f"Engine figure {stat!r}, per upstream where it has several."
                        ),
                        labels=["engine", "upstream"],
                    )
                if isinstance(value, dict):
                    for upstream, v in value.items():
                        family.add_metric([engine.name, str(upstream)], float(v))
                else:
                    family.add_metric([engine.name, ""], float(value))
        yield from families.values()


REPLICA_LABEL = "replica"


class ReplicaLabels(Collector):
    """``source``'s families with ``replica="<name>"`` added to each sample.

    The families are copied, never changed in place: a collector may hand out the same objects
    at each scrape. A collector must not use the ``replica`` label itself (this one would win).
    """

    def __init__(self, source: Collector, replica: str) -> None:
        self._source = source
        self._replica = replica

    def collect(self) -> Iterator[Metric]:
        for family in self._source.collect():
            labelled = copy.copy(family)
            labelled.samples = [
                sample._replace(labels={**sample.labels, REPLICA_LABEL: self._replica})
                for sample in family.samples
            ]
            yield labelled


def render(replica: str) -> bytes:
    """The exposition text of :data:`REGISTRY`, each series labelled with ``replica``."""
    return generate_latest(ReplicaLabels(REGISTRY, replica))
