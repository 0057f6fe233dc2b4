"""Counting what JAX traces and compiles, for tests that promise nothing compiles mid-traffic."""

from __future__ import annotations

import contextlib

import jax

_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/backend_compile_duration")
_counters: list[list[str]] = []  # jax.monitoring listeners cannot be removed: one listener feeds the open counters


def _listen(event: str, *_, **__) -> None:
    if event in _EVENTS:
        for counter in _counters:
            counter.append(event)


jax.monitoring.register_event_duration_secs_listener(_listen)


@contextlib.contextmanager
def counting():
    """`with counting() as events:` collects every trace and backend compile inside the block."""
    events: list[str] = []
    _counters.append(events)
    try:
        yield events
    finally:
        _counters.remove(events)
