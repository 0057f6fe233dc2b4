"""Prometheus metrics of a server (`GET /metrics`), on one registry per server.

  press_requests_total{route, status}         HTTP requests answered, by route and status code
  press_prompt_tokens_total                   prompt tokens of finished generations
  press_generated_tokens_total                tokens generated
  press_cancelled_requests_total              generations cancelled (the client went away)
  press_rejected_requests_total{reason}       refused before generating: queue_full, draining
  press_queue_depth                           requests waiting for a row in the engine
  press_slots_in_use                          engine rows generating now
  press_requests_in_flight                    HTTP requests being handled
  press_prefix_cache_reused_tokens            prompt tokens whose KV came from the prefix cache
  press_prefix_cache_blocks                   prefix-cache blocks held
  press_engine_seconds_total{phase}           engine time in prefill and decode programs (since start)
  press_engine_calls_total{phase}             prefill calls (each a batch of prompts) and decode steps
  press_preempted_requests_total              rows given up to a submission below its fair share
  press_prefill_chunks_total                  prompt chunks written by decode steps (chunked prefill)
  press_decode_rows_total{kind}               rows decode steps computed (kind="computed": padded to a
                                              row bucket) and rows generating in them (kind="busy")
  press_prefill_chunk_tokens_total{kind}      tokens of those chunks: computed (padded to a chunk size)
                                              and prompt tokens
  press_rows_moved_total                      busy rows moved down to freed ones for a smaller row bucket
  press_draft_tokens_total                    tokens a draft model proposed (speculative decoding only)
  press_draft_accepted_tokens_total           of those, tokens the model kept
  press_draft_acceptance_rate                 kept over proposed, since start
  press_time_to_first_token_seconds           histogram, from submission to the first token
  press_request_latency_seconds               histogram, from submission to the end
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class ServerMetrics:
    """The metrics of one server over `engine`; `render()` gives the text exposition format."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("press_requests", "HTTP requests answered", ["route", "status"], registry=registry)
        self.prompt_tokens = Counter("press_prompt_tokens", "prompt tokens of finished generations", registry=registry)
        self.generated_tokens = Counter("press_generated_tokens", "tokens generated", registry=registry)
        self.cancelled = Counter("press_cancelled_requests", "generations cancelled because the client went away",
                                 registry=registry)
        self.rejected = Counter("press_rejected_requests", "requests refused before generating", ["reason"],
                                registry=registry)
        Gauge("press_queue_depth", "requests waiting for an engine row", registry=registry).set_function(
            lambda: engine.queued)
        Gauge("press_slots_in_use", "engine rows generating now", registry=registry).set_function(
            lambda: engine.running)
        Gauge("press_prefix_cache_reused_tokens", "prompt tokens whose KV came from the prefix cache (since start)",
              registry=registry).set_function(lambda: engine.stats["prefix_tokens_reused"])
        Gauge("press_prefix_cache_blocks", "prefix-cache blocks held", registry=registry).set_function(
            lambda: len(engine.prefix_cache))
        seconds = Gauge("press_engine_seconds_total", "engine time in prefill and decode programs", ["phase"],
                        registry=registry)
        calls = Gauge("press_engine_calls_total", "prefill calls and decode steps", ["phase"], registry=registry)
        for phase, stat in (("prefill", "prefills"), ("decode", "decode_steps")):
            seconds.labels(phase).set_function(lambda s=f"{phase}_seconds": engine.stats[s])
            calls.labels(phase).set_function(lambda s=stat: engine.stats[s])
        Gauge("press_preempted_requests_total", "rows given up to a submission below its fair share",
              registry=registry).set_function(lambda: engine.stats["preempted"])
        Gauge("press_prefill_chunks_total", "prompt chunks written by decode steps (chunked prefill)",
              registry=registry).set_function(lambda: engine.stats["prefill_chunks"])
        Gauge("press_rows_moved_total", "busy rows moved down to freed ones for a smaller row bucket",
              registry=registry).set_function(lambda: engine.stats["rows_moved"])
        rows = Gauge("press_decode_rows_total", "rows decode steps computed (padded) and rows generating in them",
                     ["kind"], registry=registry)
        chunk_tokens = Gauge("press_prefill_chunk_tokens_total", "tokens of prompt chunks computed (padded) and "
                             "prompt tokens in them", ["kind"], registry=registry)
        for gauge, kind, stat in ((rows, "computed", "decode_rows"), (rows, "busy", "decode_rows_busy"),
                                  (chunk_tokens, "computed", "chunk_tokens"),
                                  (chunk_tokens, "prompt", "chunk_prompt_tokens")):
            gauge.labels(kind).set_function(lambda s=stat: engine.stats[s])
        if getattr(engine, "draft_tokens", 0):  # speculative decoding
            Gauge("press_draft_tokens_total", "tokens the draft model proposed", registry=registry).set_function(
                lambda: engine.stats["drafted_tokens"])
            Gauge("press_draft_accepted_tokens_total", "draft tokens the model kept", registry=registry).set_function(
                lambda: engine.stats["accepted_tokens"])
            Gauge("press_draft_acceptance_rate", "draft tokens kept over those proposed (since start)",
                  registry=registry).set_function(lambda: engine.acceptance_rate or 0.0)
        self.in_flight = Gauge("press_requests_in_flight", "HTTP requests being handled", registry=registry)
        self.time_to_first_token = Histogram("press_time_to_first_token_seconds", "submission to first token",
                                             buckets=LATENCY_BUCKETS, registry=registry)
        self.latency = Histogram("press_request_latency_seconds", "submission to the end of a generation",
                                 buckets=LATENCY_BUCKETS, registry=registry)

    def observe(self, output) -> None:
        """Count one finished generation (a serve.engine.RequestOutput)."""
        if output.finish_reason == "cancelled":
            self.cancelled.inc()
        self.prompt_tokens.inc(len(output.prompt_token_ids))
        self.generated_tokens.inc(len(output.token_ids))
        if output.token_ids:
            self.time_to_first_token.observe(output.time_to_first_token)
        self.latency.observe(output.total_seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
