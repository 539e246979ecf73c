"""Timing of cache calls: a latency histogram always, an OpenTelemetry span when set up.

One :class:`Measurement` per call does both, so a call site does one thing: it starts the
measurement and ends it with the outcome, which a read knows only at its end::

    m = core.measure("region:books", also=("model:Product",))  # a read
    ...
    m.done("hit")

    with core.measure("model:Product", "invalidate"):           # any other operation
        ...

Spans need the ``otel`` extra (``pip install 'sa-redis-cache[otel]'``, the OpenTelemetry
API) and a tracer provider: the global one the application sets with
``opentelemetry.trace.set_tracer_provider``, or one given to :func:`use_tracer_provider`.
Without either, nothing is created: the API's default provider would hand out
non-recording spans, which cost microseconds each on the read path for nothing. The
global provider is looked for at most once a second until one is set, so an application
that sets it after making its cache is traced from then on.

Spans are started as children of the current span (a web request's, say) but are not made
current themselves: a read ends in another stack frame than the one it started in, and
under ``AsyncSession`` in a greenlet, where attaching a context could leak it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

try:
    from opentelemetry import trace as _trace
except ImportError:  # the otel extra is not installed: spans cost nothing
    _trace = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from types import TracebackType

    from opentelemetry.trace import Span, Tracer, TracerProvider

    from .stats import Stats

__all__ = ["READ", "TRACER_NAME", "Measurement", "active_tracer", "use_tracer_provider"]

TRACER_NAME = "sa_redis_cache"
READ = "read"
_LOOK_INTERVAL = 1.0


class _Found:
    """Which tracer spans come from; module state, as OpenTelemetry's own provider is."""

    tracer: Tracer | None = None
    explicit = False
    next_look = 0.0


def use_tracer_provider(provider: TracerProvider | None) -> None:
    """Take spans from ``provider`` instead of the global one; None goes back to the global.

    For tests (an SDK provider with an in-memory exporter) and for applications that keep
    their provider out of the global slot.

    Example::

        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
            InMemorySpanExporter,
        )

        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        use_tracer_provider(provider)
        ...
        use_tracer_provider(None)
    """
    _Found.explicit = provider is not None
    _Found.tracer = None if provider is None else provider.get_tracer(TRACER_NAME)
    _Found.next_look = 0.0


def active_tracer(now: float) -> Tracer | None:
    """The tracer to start spans with, None when nothing would record them.

    ``now`` is a ``time.perf_counter()`` reading the caller has anyway: it paces the look
    for a global provider set after the cache was made.

    Example::

        tracer = active_tracer(time.perf_counter())
    """
    tracer = _Found.tracer
    if tracer is not None or _Found.explicit or _trace is None or now < _Found.next_look:
        return tracer
    _Found.next_look = now + _LOOK_INTERVAL
    provider = _trace.get_tracer_provider()
    # the API's defaults: a proxy until a provider is set, or an explicit no-op one
    if isinstance(provider, _trace.ProxyTracerProvider | _trace.NoOpTracerProvider):
        return None
    # OpenTelemetry sets the global provider once per process: found, it stays
    _Found.tracer = provider.get_tracer(TRACER_NAME)
    return _Found.tracer


class Measurement:
    """One timed cache call: ends in its latency histogram and, when tracing, a span.

    ``operation`` is ``"read"`` (the default), ``"fill"``, ``"invalidate"`` or
    ``"write_behind_enqueue"``; the span is named ``sa_redis_cache.<operation>``. A read is
    recorded in the histogram under its outcome (``hit``, ``miss``, ``error``), as hits and
    misses differ in latency by orders of magnitude; any other operation under its own
    name, its outcome going to the span only. Made by :meth:`CacheContext.measure
    <sa_redis_cache.context.CacheContext.measure>`.

    Example::

        m = core.measure("model:Product")
        ...
        m.done("hit")

        with core.measure("model:Product", "fill") as m:
            stored = ...
            m.done("stored" if stored else "refused")
    """

    __slots__ = ("_also", "_failed_as", "_operation", "_scope", "_span", "_started", "_stats")

    def __init__(
        self,
        stats: Stats,
        scope: str | None,
        operation: str,
        also: tuple[str, ...],
        namespace: str,
    ) -> None:
        self._stats: Stats | None = stats
        self._scope = scope
        self._operation = operation
        self._also = also
        # the outcome a call that raises is recorded under (see failing_as)
        self._failed_as = "error"
        started = time.perf_counter()
        tracer = active_tracer(started)
        self._span: Span | None = None
        if tracer is not None:
            attributes: dict[str, Any] = {
                "db.system": "redis",
                "sa_redis_cache.namespace": namespace,
                "sa_redis_cache.operation": operation,
            }
            if scope is not None:
                attributes["sa_redis_cache.scope"] = scope
            if also:
                attributes["sa_redis_cache.also"] = list(also)
            self._span = tracer.start_span("sa_redis_cache." + operation, attributes=attributes)
        self._started = started

    @property
    def traced(self) -> bool:
        """Whether the call has a span (an OpenTelemetry tracer was active)."""
        return self._span is not None

    def done(self, outcome: str | None = None) -> None:
        """End the call with ``outcome``: record its latency, end its span. Once only.

        Later calls do nothing, so a path may end the call early and leave the ``with``
        block (or fall through to another ``done``) without recording it twice.
        """
        stats = self._stats
        if stats is None:
            return
        elapsed = time.perf_counter() - self._started
        self._stats = None
        operation = self._operation
        if operation == READ and outcome is not None:
            operation = outcome
        stats.observe(self._scope, operation, elapsed, also=self._also)
        span = self._span
        if span is not None:
            if outcome is not None:
                span.set_attribute("sa_redis_cache.outcome", outcome)
            span.end()

    def failing_as(self, outcome: str) -> None:
        """Record the call under ``outcome`` should it raise from now on (default ``error``).

        A read that missed and then fails in the database is a ``miss``, as its counter
        says: the ``error`` histogram is for Redis failures. The exception is still
        recorded on the span, with an error status.

        Example::

            stats.incr(scope, "misses")
            measured.failing_as("miss")
            rows = read_the_database()
        """
        self._failed_as = outcome

    def hit(self) -> None:
        """End a read as a hit: count it in ``hits`` and record its latency, under one lock
        (:meth:`Stats.hit <sa_redis_cache.stats.Stats.hit>`). Once only, as :meth:`done`.

        Example::

            m = core.measure("model:Product")
            ...
            m.hit()
        """
        stats = self._stats
        if stats is None:
            return
        elapsed = time.perf_counter() - self._started
        self._stats = None
        stats.hit(self._scope, elapsed, also=self._also)
        span = self._span
        if span is not None:
            span.set_attribute("sa_redis_cache.outcome", "hit")
            span.end()

    def __enter__(self) -> Measurement:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.done()
            return
        span = self._span
        if span is not None and self._stats is not None:
            span.record_exception(exc)
            span.set_status(_trace.Status(_trace.StatusCode.ERROR, str(exc)))
        # a failed call took its time too (a Redis timeout is the slowest call of all)
        self.done(self._failed_as)
