"""The serving engine: jitted prefill and decode over a preallocated KV cache, with continuous batching.

  engine = Engine.from_pretrained("smollm2-135m-instruct", max_slots=8)
  # or with a draft model (speculative decoding): ..., draft="out/distill-smollm2/hf", draft_tokens=4)
  # or drafting by lookups in each request's own context: ..., draft="ngram")
  outputs = engine.generate(["Hello", [{"role": "user", "content": "Hi"}]], SamplingParams(max_new_tokens=32))
  for delta in engine.stream("Once upon a time", SamplingParams(temperature=0.8, seed=1)):
      print(delta, end="")

Cache layout: one `KVCache` (compress/models/attention.py) of `max_slots` rows and
`max_seq_len` slots per row, k/v [L, slots, S, K, H], allocated once, sharded over the mesh
like the activations (rows over data x fsdp, KV heads over tensor) and donated to every
step so it is updated in place. A request owns one row from its prefill to its end.

Shapes are bucketed so a new prompt never recompiles:
  - prefill takes the waiting requests of one length bucket together, prompts left-padded
    to a power of two >= 16 and the group padded to a power of two rows;
  - decode runs the rows [0, Bb) and the slots [0, Sb) in use, Bb a row bucket and Sb a
    power of two, so short sequences do not pay for the longest possible context. Freed rows
    are reused lowest first, which keeps Bb small.

Scheduling (continuous batching): a background thread loops; each turn it prefills waiting
requests into free rows, then runs one decode step for all active rows. A finished row is
freed at once and a waiting request is prefilled into it on the next turn, so one long
request never holds a batch of short ones hostage. Requests with different sampling
settings share a step (serve/sampling.py samples row by row). A step computes every row up
to the highest decoding one (padded to a row bucket; a row being filled in chunks is computed
only as its chunk), so when rows end below busy ones, the busy ones move down (their keys and values copied once) as soon as that lets the step compute a
smaller bucket (`compact_rows`).

Chunked prefill: while rows are decoding, a short prompt that arrives alone (the usual case
for a server) is not prefilled by a call of its own, which would stall every decoding row
and read all the weights again for a few tokens; it is written up to CHUNK tokens a step into
its row by the decode step itself (compress/models/decode_step.py), and starts decoding the
step after its last chunk. A chunk is padded to the smallest of CHUNK_SIZES that holds it: on
a CPU a step's matmuls cost about what its rows do, and the rest of a chat prompt after its
cached prefix is often a few tokens. At most MAX_FILLING rows are filled at once; a short prompt
beyond them may wait a few steps for its turn (`chunk_wait_steps`, off by default); the others,
and long prompts, get a batched prefill.

Prefix caching (serve/prefix_cache.py): the KV of every prompt's 16-token blocks is kept in
a pool of prefix_cache_blocks blocks on the device (least recently used evicted), and a
prompt that starts with cached blocks (a chat template's system prompt, a RAG instruction)
prefills only the rest. The prefill program itself gathers the cached blocks and writes the
new ones, so reuse costs one gather and storing costs nothing outside the program.

Speculative decoding (serve/speculative.py): with a draft model of the same vocabulary (a
distilled student, or the target quantized), each step has the draft propose `draft_tokens`
(K) tokens for every row and the target check them all in one pass, so a row gains 1 to K + 1
tokens a step; greedy output is the target's own, sampled output has the target's
distribution. The draft's cache has the target's rows and slots: a prefill fills both (the
draft the whole prompt, where the target may reuse a cached prefix), a step writes K + 1 slots
past each row's index and cuts both caches back to the kept tokens. A step in which some row
lacks those K + 1 slots (within K tokens of the context's end) is a plain decode step that
the draft's cache follows. With a draft, prompts are never filled in chunks and adapters are
refused. engine.stats counts drafted_tokens and accepted_tokens (`acceptance_rate`).
draft="ngram" needs no model: each row proposes the tokens that followed its last 2-3 tokens
earlier in its own prompt and output (prompt lookup), which pays where answers quote their
context (retrieval, summaries, code); a step in which no row finds a proposal, or one that
writes a prompt chunk, is a plain one, so prompts are still filled in chunks beside it.
Steps speculate only while at most `draft_max_rows` rows are busy (a check of K + 1 tokens a
row is compute-bound on a CPU beyond a few rows): by default LOOKUP_CPU_ROWS for a lookup draft
on a CPU, no limit otherwise.

Careless and hostile input: prompts are checked before they cost anything (text that is not
valid Unicode, a text too long for the context judged from its head before the rest is
tokenized); request threads encode, and the scheduler decodes with its own copy of the
tokenizer, so encoding a long prompt never stalls generation; `max_queued` bounds the
requests waiting for a row (EngineBusy beyond it); a cancelled request frees its row at the
next step.

Compiled programs persist across processes in JAX's compilation cache (under the press
cache directory unless the user has configured one), so a second start does not compile.
"""

from __future__ import annotations

import collections
import copy
import itertools
import os
import threading
import time
import uuid
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from compress.errors import InputError, check_unicode
from compress import pretrained
from compress import sharding as shd
from compress.formats.tokenizer import cache_root
from compress.models import decode_step, decoder
from compress.quant import matmul, schemes
from compress.models.attention import KVCache
from serve import prefix_cache as pc
from serve import speculative
from serve.prefix_cache import BLOCK, PrefixCache, block_keys, reusable_blocks
from serve.requests import EngineBusy, Prompt, Request, RequestOutput
from serve.scheduler import FairQueue
from serve.sampling import SamplingParams, sample

MIN_PREFILL_BUCKET = 16
MIN_SEQ_BUCKET = 64
# A prompt longer than max_seq_len * this many characters is first tokenized by its head only: if
# the head alone overflows the context the prompt is refused without tokenizing the rest.
HEAD_CHARS_PER_TOKEN = 8
MAX_CHARS_PER_TOKEN = 64  # beyond max_seq_len * this, a prompt is refused before any tokenizing


# Prefix-cache blocks of 16 tokens kept (LRU), 4,096 tokens: SmolLM2-135M fp32 0.7 MB a block (189 MB),
# a Llama-8B in bf16 2 MB (512 MB). On by default: it cut the 32-client benchmark's p50 by a fifth and a
# RAG-style load's by nearly two thirds (BENCHMARKS.md); 0 switches it off.
DEFAULT_PREFIX_BLOCKS = 256
MAX_STORED_BLOCKS = 64  # blocks of one prompt stored for reuse (its first 1,024 tokens)
CHUNK = BLOCK  # prompt tokens a decode step writes into a row being filled (chunked prefill)
# What a chunk is padded to, the smaller that holds it. On a CPU a step's matmuls cost about what
# its rows do once compute-bound, and a chat prompt's rest after its cached prefix is often a few
# tokens; each size is one more decode program per row and slot bucket. Chunks were up to 32 tokens
# (sizes 8 and 32) until a short completion's 9 tokens, padded to 32, were found to make up a good
# part of what hanging-up clients cost (benchmarks/hostile_clients.py). fp32 SmolLM2, 8 decoding rows:
# on 2 Zen 4 cores 29.5 ms alone, +15.6 with an 8-token chunk, +24.6 with 16, +43.6 with 32; on 2
# Zen 2 cores 76 ms alone, +30, +64 and +159 (benchmarks/step_buckets.py): a 16-token chunk costs
# no more a token than a 32-token one, so prompts of 17-32 tokens take two steps for what one
# took, and those of 9-16 half what they did.
CHUNK_SIZES = (BLOCK // 2, CHUNK)
CHUNKED_MAX_TOKENS = 128  # longer prompts (after their cached prefix) get a batched prefill
# Rows filled in chunks at once (one chunk a step, the oldest first); more arrivals at once get a
# batched prefill, which stalls every row. 4 helped the 32-client chat load (p95 13-16% lower in
# two alternated pairs of runs) but once sent the hostile benchmark's ratio to 1.94x (1.25-1.76x
# with 2): rows waiting for their chunk were computed as decoding rows in every step. They no
# longer are (a step's rows end at the highest decoding one, `_step`); with that, on 2 Zen 2 cores,
# 4 against 2 answered the 32-client load's 213 requests against 191 (p95 13.0 s against 14.7) and
# beside the hostile clients the batched prefills fell from 63 a minute (8.6 s) to 23 (3.3 s), p95
# ratio 2.09x against 2.14x (one run each; BENCHMARKS.md, "Hostile clients").
MAX_FILLING = 4
# A lookup draft's steps speculate on a CPU only while at most this many rows are busy: on 2 Zen 2
# cores (SmolLM2 fp32, K=2, benchmarks/speculative.py --batch) grounded answers decoded 1.42x faster
# with lookups at 1 row, 1.35x at 2 and 1.24x at 4, but chat answers 0.86x at 4 rows (a check of 12
# tokens costs 1.5 plain 4-row steps: benchmarks/check_cost.py).
LOOKUP_CPU_ROWS = 2
# Tokens a draft proposes a step unless told (draft_tokens=None): DRAFT_TOKENS, but LOOKUP_CPU_TOKENS for a
# lookup draft on a CPU, where a batch-1 check of K + 1 tokens costs 1.3 / 1.5 / 1.6 plain steps at
# K = 2 / 3 / 4 (benchmarks/check_cost.py, 2 Zen 2 cores) and grounded answers decoded 1.42x / 1.46x /
# 1.47x faster; with more rows busy a larger K costs more (4 rows: 1.5 / 2.0 / 2.6 steps).
DRAFT_TOKENS = 4
LOOKUP_CPU_TOKENS = 3
# With chunk_wait_steps = N > 0, a short prompt that arrives while MAX_FILLING rows are being
# filled waits up to N decode steps for a chunk turn before a batched prefill (which stalls every
# row) takes it, and a client that leaves meanwhile costs nothing. Beside the hostile clients
# (N = 4) batched prefills took 3.9 s of a minute instead of 7.6-12.3 s and the well-behaved p95
# ratio was 2.03-2.06x against 2.25x; but the saturated 32-client load, whose rows free up several
# at a time, answered 152 requests a minute against 185 without it (one run each; BENCHMARKS.md,
# "Hostile clients"). So 0 (off) is the default.
CHUNK_WAIT_STEPS = 0
# Weights (float, int8, int4) are stored in the CPU kernels' tiled layout (compress/quant/matmul.py `tile`) when no
# decode step carries more rows than this (max_slots x (1 + draft tokens), no chunks beside rows): the
# engine's fp32 step took 0.64-0.91x the time tiled at 1-5 rows but 1.04-1.09x at 8-24
# (compress/kernels/cpu.cc kTileRows). w4a8's and w8a8-gN's integer kernels read only layouts of their
# own, which every engine stores (native_float's own_layouts).
TILED_ROWS = 5
# A tied float32 table becomes the head's kernel (compress/quant/matmul.py native_float) in engines of
# at most this many rows, tiled or not: SmolLM2 fp32's plain step of 2 rows took 44.8 ms against 62.2
# with XLA's dot, of 4 rows 59.4 against 68.3, of 8 rows 66.7 against 82.0 but its lookup check of 24
# rows 171.7 against 160.5 (benchmarks/check_cost.py, 2 Zen 2 cores); and at 16 the server's hostile
# benchmark lost p95 with it (native_float).
FLOAT_TABLE_SLOTS = 4


def power_of_two_at_least(n: int, minimum: int = 1) -> int:
    size = minimum
    while size < n:
        size *= 2
    return size


def row_buckets(largest: int) -> list[int]:
    """The row counts a step is compiled for, up to `largest` (capped at it): powers of two and,
    from 8, halfway between them too (1, 2, 4, 8, 12, 16, 24, 32, 48, ...). A step's matmuls cost
    about what its rows do once they are compute-bound, so 9 busy rows padded to 16 cost 1.5x
    what 12 do (fp32 SmolLM2 on 2 cores: 43.5 ms against 29.5); below 8 rows a step streams its
    weights and rows are nearly free."""
    out, p = [], 1
    while not out or out[-1] < largest:
        out += [p] + ([p + p // 2] if p >= 8 else [])
        p *= 2
    out = [n for n in out if n < largest]
    return out + [largest]


def row_bucket(n: int, largest: int) -> int:
    """The smallest of `row_buckets(largest)` that holds n rows."""
    return next(size for size in row_buckets(largest) if size >= n)


def _buckets(smallest: int, largest: int) -> list[int]:
    """Powers of two from `smallest` up to the first that reaches `largest`, capped at it."""
    out = [smallest]
    while out[-1] < largest:
        out.append(min(out[-1] * 2, largest))
    return out


def held_back(text: str, stop: str) -> int:
    """The length of the longest end of `text` that `stop` starts with, short of all of `stop`: what a
    stream holds back while the text may be starting a stop string. Only the places where `stop`
    has the text's last character are tried (the former loop tried every length)."""
    k = min(len(stop) - 1, len(text))
    while text and (k := stop.rfind(text[-1], 0, k) + 1) > 0:  # stop[k - 1] is the text's last character
        if text.endswith(stop[:k]):
            return k
        k -= 1
    return 0


def enable_compilation_cache(directory: str | None = None) -> str | None:
    """Point JAX's persistent compilation cache at `directory` unless the user already set one."""
    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    directory = directory or os.path.join(cache_root(), "jax-compilation")
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


def _empty_like(cache: KVCache, config: decoder.DecoderConfig, rows: int, slots: int) -> KVCache:
    """An empty cache of `rows` x `slots` for a prefill into `cache`: its dtype, int8 or not, and
    whether the native attention kernel may read it."""
    return decoder.init_cache(config, rows, slots, cache.k.dtype, quantized=cache.quantized).replace(
        native=cache.native)


def _insert_rows(cache: KVCache, new: KVCache, slots: jnp.ndarray) -> KVCache:
    """`cache` with rows `slots` [n] replaced by the rows of `new` (n rows of W <= S slots; a slot
    out of range, max_slots, drops its row)."""
    n, w = new.valid.shape
    row_valid = jnp.zeros((n, cache.max_len), bool).at[:, :w].set(new.valid)
    return KVCache(
        k=cache.k.at[:, slots, :w].set(new.k, mode="drop"),
        v=cache.v.at[:, slots, :w].set(new.v, mode="drop"),
        valid=cache.valid.at[slots].set(row_valid, mode="drop"),
        index=cache.index.at[slots].set(w, mode="drop"),
        lengths=cache.lengths.at[slots].set(new.lengths, mode="drop"),
        k_scale=None if new.k_scale is None else cache.k_scale.at[:, slots, :w].set(new.k_scale, mode="drop"),
        v_scale=None if new.v_scale is None else cache.v_scale.at[:, slots, :w].set(new.v_scale, mode="drop"),
        native=cache.native,
    )


def _move_rows(cache: KVCache, src: jnp.ndarray, dst: jnp.ndarray) -> KVCache:
    """`cache` with rows src [n] copied into rows dst [n] (a dst out of range, max_slots, copies nothing)."""
    def move(array, axis):
        if array is None:
            return None
        rows = jnp.take(array, src, axis=axis, mode="clip")
        return array.at[(slice(None),) * axis + (dst,)].set(rows, mode="drop")

    return cache.replace(k=move(cache.k, 1), v=move(cache.v, 1), k_scale=move(cache.k_scale, 1),
                         v_scale=move(cache.v_scale, 1), valid=move(cache.valid, 0), index=move(cache.index, 0),
                         lengths=move(cache.lengths, 0))


class Engine:
    """Continuous-batching generation for one decoder. Thread-safe: submit from any thread."""

    def __init__(
        self,
        params: Any,
        config: decoder.DecoderConfig,
        tokenizer,
        *,
        mesh: jax.sharding.Mesh | None = None,
        max_slots: int = 8,
        max_seq_len: int | None = None,
        name: str = "model",
        compilation_cache: bool = True,
        kv_cache: str | None = None,
        max_queued: int | None = None,
        prefix_cache_blocks: int = DEFAULT_PREFIX_BLOCKS,
        preempt: bool = True,
        share_cap: bool = False,
        prefill_delay: float = 0.0,
        adapters: Mapping[str, str | dict] | None = None,
        chunked_prefill: bool = True,
        draft: Any = None,
        draft_tokens: int | None = None,
        draft_max_rows: int | None = None,
        compact_rows: bool = True,
        chunk_wait_steps: int = CHUNK_WAIT_STEPS,
    ):
        if max_slots < 1:
            raise InputError(f"max_slots must be at least 1, got {max_slots}")
        # On one CPU device a float model's decode steps stream its weights through the native
        # kernels (compress/quant/matmul.py FloatSpec); a mesh keeps XLA's sharded matmuls. Where
        # no step carries more than TILED_ROWS rows, the weights are stored tiled for them.
        single = mesh is None or mesh.size == 1
        cpu = (mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()) == "cpu"
        lookup = isinstance(draft, str) and draft == speculative.LOOKUP
        if draft_tokens is None:
            draft_tokens = LOOKUP_CPU_TOKENS if lookup and cpu else DRAFT_TOKENS
        proposed = draft_tokens if draft is not None and isinstance(draft_tokens, int) else 0  # checked below
        step_rows = max_slots * (1 + max(proposed, 0))
        tiled = step_rows <= TILED_ROWS and (max_slots == 1 or not chunked_prefill)
        projections = decoder.PROJECTIONS if tiled else None
        self.params = matmul.native_float(params, projections, own_layouts=decoder.PROJECTIONS,
                                          float_table=tiled or max_slots <= FLOAT_TABLE_SLOTS) if single else params
        self.config, self.tokenizer, self.name = config, tokenizer, name
        self.max_slots = max_slots
        self.max_seq_len = min(max_seq_len or 2048, config.max_position_embeddings)
        # Speculative decoding (serve/speculative.py): a draft of the same vocabulary proposes
        # draft_tokens tokens a step for the target to check in one pass.
        # draft="ngram" is no model: each row looks its proposal up in its own context (a lookup).
        self.lookup = lookup
        model_draft = None if self.lookup else draft
        self.draft_params, self.draft_config, self.draft_name = self._read_draft(model_draft)
        if self.lookup:
            self.draft_name = speculative.LOOKUP
        if model_draft is not None and single:
            self.draft_params = matmul.native_float(self.draft_params, decoder.PROJECTIONS if max_slots == 1 else None,
                                                     own_layouts=decoder.PROJECTIONS)
        if draft is not None:
            if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or \
                    not 1 <= draft_tokens <= speculative.MAX_DRAFT_TOKENS:
                raise InputError(f"draft_tokens must be an integer in [1, {speculative.MAX_DRAFT_TOKENS}], "
                                 f"got {draft_tokens!r}")
            if adapters:
                raise InputError(f"adapters ({', '.join(adapters)}) cannot be served with a draft model "
                                 f"({self.draft_name}): serve them without --draft, or the draft without adapters")
            if model_draft is not None:
                self.max_seq_len = min(self.max_seq_len, self.draft_config.max_position_embeddings)
        self.draft_tokens = draft_tokens if draft is not None else 0
        # Steps speculate only while at most this many rows are busy (a plain step above): a check of
        # K + 1 tokens a row is compute-bound on a CPU beyond a few rows. Default: LOOKUP_CPU_ROWS for a
        # lookup draft on a CPU, no limit otherwise.
        if draft_max_rows is not None and (isinstance(draft_max_rows, bool) or not isinstance(draft_max_rows, int)
                                           or draft_max_rows < 1):
            raise InputError(f"draft_max_rows must be a positive integer (or None for the default), got "
                             f"{draft_max_rows!r}")
        if draft_max_rows is None:
            draft_max_rows = LOOKUP_CPU_ROWS if self.lookup and cpu else max_slots
        self.draft_max_rows = draft_max_rows
        self.eos_ids = frozenset(int(e) for e in config.eos_token_ids)
        self.mesh = mesh
        if kv_cache not in (None, "int8"):
            raise InputError(f"kv_cache={kv_cache!r}; choose None (the compute dtype) or 'int8'")
        self.kv_cache = kv_cache
        if max_queued is not None and max_queued < 0:
            raise InputError(f"max_queued must be >= 0 (or None for no limit), got {max_queued}")
        self.max_queued = max_queued  # submissions that would leave more waiting for a row raise EngineBusy
        self.preempt = preempt  # a submission above its fair share of rows gives one up to one below it
        self.share_cap = share_cap  # ... and gets no row beyond it while others hold or want rows
        self.compact_rows = compact_rows  # busy rows moved down when they then fit a smaller row bucket (_compact)
        self.chunk_wait_steps = chunk_wait_steps  # steps a short prompt may wait for a chunk turn (0: none)
        if not 0 <= prefill_delay <= 100:
            raise InputError(f"prefill_delay must be between 0 and 100, got {prefill_delay}")
        # While rows are decoding, new prompts wait prefill_delay x the last admission's seconds after
        # it, so arrivals are prefilled together (one call) instead of stalling every step for one each.
        self.prefill_delay = prefill_delay
        self._last_admission = (0.0, 0.0)  # (when it ended, its seconds)
        self._step_seconds = 0.0  # the last plain decode step's
        if compilation_cache:
            enable_compilation_cache()
        self._cache = self._new_cache(config)
        self._draft_cache = self._new_cache(self.draft_config) if model_draft is not None else None
        # KV of prompt prefixes kept between requests (serve/prefix_cache.py); 0 blocks switches it off.
        if prefix_cache_blocks < 0:
            raise InputError(f"prefix_cache_blocks must be >= 0, got {prefix_cache_blocks}")
        self.prefix_cache = PrefixCache(prefix_cache_blocks)
        self._pool = self._new_pool(prefix_cache_blocks) if prefix_cache_blocks else None
        # LoRA adapters served beside the base (multi-LoRA): name -> a PEFT directory or press adapter.
        # Each row of a batch runs its request's adapter; the base weights are read once per step.
        self.adapters = tuple(adapters or ())
        self._bank = self._make_bank(adapters) if adapters else None
        self._adapter_rows = np.zeros(max_slots, np.int32)  # the adapter (1-based; 0 none) of each row
        self._prefill_insert = jax.jit(self._prefill_insert_fn, donate_argnums=(1, 2))
        self._prefix_prefill_insert = jax.jit(self._prefix_prefill_insert_fn, donate_argnums=(1, 2))
        self._decode = jax.jit(self._decode_fn, donate_argnums=(1, 2), static_argnums=(9, 10))
        self._load_prefix = jax.jit(self._load_prefix_fn, donate_argnums=0)
        self._move_rows = jax.jit(_move_rows, donate_argnums=0)
        self._draft_prefill = jax.jit(self._draft_prefill_fn, donate_argnums=1)
        self._draft_feed = jax.jit(self._draft_feed_fn, donate_argnums=1, static_argnums=(4, 5))
        self._speculate = jax.jit(self._speculate_fn, donate_argnums=(2, 3), static_argnums=(11, 12))
        self._check = jax.jit(self._check_fn, donate_argnums=1, static_argnums=(9, 10))
        # Short prompts arriving while rows decode are written a chunk per decode step (module docstring);
        # not with adapters, whose per-row factors are gathered for whole rows of a batch, nor with a
        # draft model, whose cache would need the chunks too (a lookup's steps take none: a step with
        # a chunk to write is a plain one).
        self.chunked_prefill = chunked_prefill and self._bank is None and model_draft is None
        self._filling: collections.deque[int] = collections.deque()  # rows being filled, first served first
        self._slots: list[Request | None] = [None] * max_slots
        self._next_token = np.zeros(max_slots, np.int32)  # the token each row feeds next
        self._prev_token = np.zeros(max_slots, np.int32)  # the one before it (a draft's first pass writes both)
        self._index = np.zeros(max_slots, np.int64)  # mirror of cache.index (next write slot per row)
        self._waiting: FairQueue[Request] = FairQueue()  # guarded by _queue_lock
        self._groups = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._queue_lock = threading.Lock()  # guards _waiting; a submission's requests appear at once
        # Fast tokenizers are not safe to share between threads: request threads encode under a
        # lock, and the scheduler decodes with its own copy, so a long encode never stalls decoding.
        self._tokenizer_lock = threading.Lock()
        self._detokenizer = copy.deepcopy(tokenizer)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._counter = itertools.count()
        self.stats = {"prefills": 0, "decode_steps": 0, "generated_tokens": 0, "cancelled": 0,
                      "prefix_tokens_reused": 0, "preempted": 0, "prefill_seconds": 0.0, "decode_seconds": 0.0,
                      "prefill_chunks": 0, "speculative_steps": 0, "drafted_tokens": 0, "accepted_tokens": 0,
                      # what decode steps computed against what was asked of them: rows (a row bucket)
                      # and rows busy; chunk tokens (padded to a chunk size) and prompt tokens in them
                      "decode_rows": 0, "decode_rows_busy": 0, "chunk_tokens": 0, "chunk_prompt_tokens": 0,
                      "rows_moved": 0}

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        dtype: str = "float32",
        param_dtype: str | None = None,
        mesh: jax.sharding.Mesh | None = None,
        draft: str | None = None,
        **kwargs,
    ) -> Engine:
        """Load a bundled name, Hugging Face directory, GGUF file or `press quantize` directory (see
        `press models`); `draft` names a draft model loaded the same way (speculative decoding)."""
        model = pretrained.load_decoder(name_or_path, mesh=mesh, param_dtype=param_dtype or dtype, dtype=dtype)
        if model.quantization is not None and "kv_cache" not in kwargs:
            # A directory quantized with '+kv-int8' (or 'kv-int8') is served with an int8 cache.
            kwargs["kv_cache"] = "int8" if schemes.get(model.quantization).kv_bits else None
        if draft == speculative.LOOKUP:  # no model to load
            kwargs["draft"] = draft
        elif draft is not None:
            kwargs["draft"] = pretrained.load_decoder(draft, mesh=mesh, param_dtype=param_dtype or dtype, dtype=dtype)
        return cls(model.params, model.config, model.tokenizer, mesh=mesh, name=name_or_path, **kwargs)

    def _read_draft(self, draft) -> tuple[Any, decoder.DecoderConfig | None, str | None]:
        """(params, config, name) of a draft given as (params, config) or a loaded model (with its
        tokenizer, checked token by token); InputError for one whose vocabulary is not the target's."""
        if draft is None:
            return None, None, None
        if isinstance(draft, tuple) and len(draft) == 2:
            (params, config), tokenizer, name = draft, None, "the draft"
        elif hasattr(draft, "params") and hasattr(draft, "config"):  # compress.pretrained.Pretrained
            params, config, tokenizer = draft.params, draft.config, getattr(draft, "tokenizer", None)
            location = getattr(draft, "location", None)
            name = (location.name or location.path) if location is not None else "the draft"
        else:
            raise InputError(f"draft must be (params, config) or a loaded model (compress.pretrained.load_decoder), "
                             f"got {type(draft).__name__}")
        if not isinstance(config, decoder.DecoderConfig):
            raise InputError(f"draft {name!r}: its config is a {type(config).__name__}, not a DecoderConfig")
        speculative.check_vocabulary(self.name, self.config, self.tokenizer, name, config, tokenizer)
        return params, config, name

    def _make_bank(self, adapters: Mapping[str, str | dict]) -> dict:
        from compress.adapters import bank, peft

        loaded = []
        for name, adapter in adapters.items():
            if not isinstance(name, str) or not name or name == self.name:
                raise InputError(f"adapter name {name!r}: give each adapter a name of its own (not the base's)")
            loaded.append(peft.read(adapter, self.config) if isinstance(adapter, str) else adapter)
        stacked = bank.make_bank(loaded, self.config)
        if self.mesh is not None:
            stacked = jax.device_put(stacked, jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()))
        return stacked

    def _with_adapters(self, params, rows):
        """params with the adapter bank and each row's choice (rows [n] int32), when adapters are served."""
        if rows is None:
            return params
        from compress.adapters import bank

        return bank.with_bank(params, self._bank, rows)

    def adapter_index(self, adapter: str | None) -> int:
        """1 + the position of a served adapter's name (0: the base model); ValueError naming the choices."""
        if adapter is None or adapter == self.name:
            return 0
        if adapter not in self.adapters:
            served = ", ".join(self.adapters) or "none"
            raise InputError(f"no adapter named {adapter!r}; this engine serves {self.name!r} and the adapters: {served}")
        return 1 + self.adapters.index(adapter)

    @property
    def queued(self) -> int:
        """Requests waiting for a row."""
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Rows generating now."""
        return sum(r is not None for r in self._slots)

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes of the KV cache's key/value vectors (and their scales, for an int8 cache)."""
        return self._cache.nbytes

    # --- the compiled steps

    def _new_cache(self, config: decoder.DecoderConfig) -> KVCache:
        """An empty cache of `config`'s shape (the target's, or the draft's) with the engine's rows and slots."""
        cache = decoder.init_cache(config, self.max_slots, self.max_seq_len, quantized=self.kv_cache == "int8")
        if self.mesh is None:
            return cache
        cache = cache.replace(native=self.mesh.size == 1)  # a custom call would gather a sharded cache
        scale_axes = ("layers", "batch", "seq", "kv_heads") if cache.quantized else None
        axes = KVCache(
            k=("layers", "batch", "seq", "kv_heads", "head_dim"),
            v=("layers", "batch", "seq", "kv_heads", "head_dim"),
            valid=("batch", "seq"),
            index=("batch",),
            lengths=("batch",),
            k_scale=scale_axes,
            v_scale=scale_axes,
            native=cache.native,
        )
        shardings = shd.tree_shardings(self.mesh, axes, cache)
        return jax.device_put(cache, shardings)

    def _new_pool(self, blocks: int) -> pc.Pool:
        c = self.config
        pool = pc.new_pool(c.num_layers, blocks, c.num_kv_heads, c.head_dim, decoder.DTYPES[c.dtype],
                           quantized=self.kv_cache == "int8")
        if self.mesh is None:
            return pool
        axes = pc.POOL_AXES if pool.k_scale is not None else pc.POOL_AXES._replace(k_scale=None, v_scale=None)
        return jax.device_put(pool, shd.tree_shardings(self.mesh, axes, pool))

    def _prefill_insert_fn(self, params, cache, pool, tokens, mask, slots, seeds, counts, temperature, top_k, top_p,
                           store_ids, store_from, adapter_rows=None):
        """Prefill left-padded prompts [n, T] and write their K/V into rows `slots` of the cache.

        Rows whose slot is out of range (max_slots) are padding: computed, never written. With a
        prefix-cache pool, the prompts' blocks go to pool blocks `store_ids` [n, T / BLOCK] (see
        prefix_cache.scatter; out of range for none), row r's first at slot store_from[r].
        Returns (first tokens [n], the cache, the pool).
        """
        n, t = tokens.shape
        fresh = _empty_like(cache, self.config, n, t)
        params = self._with_adapters(params, adapter_rows)
        return self._prefill_into(params, cache, pool, fresh, tokens, mask, slots, seeds, counts, temperature, top_k,
                                  top_p, store_ids, store_from)

    def _prefix_prefill_insert_fn(self, params, cache, pool, prefix_ids, tokens, mask, slots, seeds, counts,
                                  temperature, top_k, top_p, store_ids, store_from, adapter_rows=None):
        """As _prefill_insert_fn, for prompts whose first P tokens' K/V are in pool blocks
        prefix_ids [n, P / BLOCK]: only the rest [n, T] is computed; the rows get P + T slots."""
        n, t = tokens.shape
        prefix = pc.gather(pool, prefix_ids)  # [L, n, P, ...]
        p = prefix.k.shape[2]
        empty = _empty_like(cache, self.config, n, p + t)
        put = lambda array, known: None if array is None else array.at[:, :, :p].set(known)  # noqa: E731
        fresh = empty.replace(
            k=put(empty.k, prefix.k), v=put(empty.v, prefix.v),
            valid=empty.valid.at[:, :p].set(True),
            index=jnp.full((n,), p, jnp.int32), lengths=jnp.full((n,), p, jnp.int32),
            k_scale=put(empty.k_scale, prefix.k_scale), v_scale=put(empty.v_scale, prefix.v_scale),
        )
        params = self._with_adapters(params, adapter_rows)
        return self._prefill_into(params, cache, pool, fresh, tokens, mask, slots, seeds, counts, temperature, top_k,
                                  top_p, store_ids, store_from)

    def _prefill_into(self, params, cache, pool, fresh, tokens, mask, slots, seeds, counts, temperature, top_k, top_p,
                      store_ids, store_from):
        """Run tokens [n, T] after what `fresh` holds, sample each row's first token, copy the rows'
        caches (W = fresh.max_len slots) into rows `slots` of the engine's cache and their new
        prefix blocks into the pool."""
        out = decoder.forward(params, tokens, self.config, attention_mask=mask, cache=fresh, last_logits_only=True)
        first = sample(out.logits[:, -1], seeds, counts, temperature, top_k, top_p, cache.native)
        cache = _insert_rows(cache, out.cache, slots)
        if pool is not None:
            pool = pc.scatter(pool, out.cache, store_ids, store_from)
        return first, cache, pool

    def _draft_prefill_fn(self, draft_params, draft_cache, tokens, mask, slots):
        """The draft's prefill of the same rows: tokens [n, T] laid out as the target's slots (a
        cached prefix the target reused, then the left-padded rest), written into rows `slots`."""
        n, t = tokens.shape
        fresh = _empty_like(draft_cache, self.draft_config, n, t)
        out = decoder.forward(draft_params, tokens, self.draft_config, attention_mask=mask, cache=fresh,
                              last_logits_only=True)
        return _insert_rows(draft_cache, out.cache, slots)

    def _draft_feed_fn(self, draft_params, draft_cache, prev, cur, rows: int, width: int):
        """Write [prev, cur] of rows [0, rows) into the draft's cache (a plain decode step's tokens,
        so the draft keeps up while a step cannot speculate)."""
        return speculative.feed(draft_params, self.draft_config, draft_cache, prev[:rows], cur[:rows], width)[1]

    def _speculate_fn(self, params, draft_params, cache, draft_cache, prev, cur, seeds, counts, temperature, top_k,
                      top_p, rows: int, width: int):
        """A speculative step for rows [0, rows) (serve/speculative.py `step`), attending over
        slots [0, width). Returns (tokens [rows, K + 1], kept [rows], the cache, the draft's cache)."""
        return speculative.step(params, self.config, draft_params, self.draft_config, cache, draft_cache, prev[:rows],
                                cur[:rows], seeds[:rows], counts[:rows], temperature[:rows], top_k[:rows],
                                top_p[:rows], k=self.draft_tokens, width=width)

    def _check_fn(self, params, cache, cur, drafts, seeds, counts, temperature, top_k, top_p, rows: int, width: int):
        """A lookup's speculative step for rows [0, rows): the target checks drafts [max_slots, K]
        after cur [max_slots] in one pass. Returns (tokens [rows, K + 1], kept [rows], the cache)."""
        return speculative.check(params, self.config, cache, cur[:rows], drafts[:rows], None, seeds[:rows],
                                 counts[:rows], temperature[:rows], top_k[:rows], top_p[:rows], width=width)

    def _decode_fn(self, params, cache, pool, tokens, seeds, counts, temperature, top_k, top_p, rows: int, width: int,
                   adapter_rows=None, chunk=None):
        """One token for rows [0, rows), attending over slots [0, width); with `chunk` (a dict of
        tokens [one of CHUNK_SIZES], row, length, start and store_ids [CHUNK / BLOCK]) also the next tokens of
        the prompt filling that row (any row: it need not be below `rows`), whose full blocks go to
        pool blocks store_ids. Returns (tokens [rows], the cache, the pool); with a chunk, tokens
        [rows + 1], the last sampled after the chunk (its row's first token, when the chunk is the
        prompt's last)."""
        params = self._with_adapters(params, None if adapter_rows is None else adapter_rows[:rows])
        settings = (seeds, counts, temperature, top_k, top_p)
        if chunk is None:
            out = decoder.forward(params, tokens[:rows, None], self.config, cache=cache, attend_len=width)
            logits, cache = out.logits[:, -1], out.cache
            settings = tuple(a[:rows] for a in settings)
        else:
            step = decode_step.forward_step(params, tokens[:rows], cache, self.config, attend_len=width,
                                            chunk=decode_step.Chunk(chunk["tokens"], chunk["row"], chunk["length"]))
            logits, cache = jnp.concatenate([step.logits, step.chunk_logits[None]]), step.cache
            if pool is not None:
                pool = pc.scatter(pool, cache, chunk["store_ids"][None], chunk["start"][None], chunk["row"][None])
            # The chunk's row samples with its own settings, as row `rows` (its decode token, where the
            # row lies below `rows`, is never read).
            settings = tuple(jnp.concatenate([a[:rows], a[chunk["row"]][None]]) for a in settings)
        nxt = sample(logits, *settings, cache.native)  # one device: the native argmax (serve/sampling.py greedy)
        return nxt, cache, pool

    def _load_prefix_fn(self, cache, pool, row, prefix_ids):
        """Empty cache row `row` for a prompt filled in chunks, with its cached prefix (pool blocks
        prefix_ids [nb]) in slots [0, nb * BLOCK); its first chunk starts after them."""
        p = prefix_ids.shape[0] * BLOCK
        cache = cache.replace(valid=cache.valid.at[row].set(jnp.arange(cache.max_len) < p),
                              index=cache.index.at[row].set(p), lengths=cache.lengths.at[row].set(p))
        if not p:
            return cache
        known = pc.gather(pool, prefix_ids[None])  # [L, 1, P, ...]

        def put(array, blocks):
            return None if array is None else jax.lax.dynamic_update_slice(
                array, blocks.astype(array.dtype), (0, row) + (0,) * (array.ndim - 2))

        return cache.replace(k=put(cache.k, known.k), v=put(cache.v, known.v), k_scale=put(cache.k_scale, known.k_scale),
                             v_scale=put(cache.v_scale, known.v_scale))

    # --- requests

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a text prompt, chat messages (the tokenizer's chat template) or ids."""
        with self._tokenizer_lock:
            return self._encode(prompt)

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            ids = self._tokenize(prompt, "the prompt")
        elif isinstance(prompt, Sequence) and prompt and all(isinstance(m, dict) for m in prompt):
            if not getattr(self.tokenizer, "chat_template", None):
                raise InputError(f"{self.name} has no chat template; send a text prompt instead of messages")
            if len(prompt) > self.max_seq_len:  # each message is a token at least: refused before the template,
                raise InputError(  # which took 3.8 s for 200,000 empty ones (a 6.6 MB body)
                    f"the messages are {len(prompt)}, more than the engine's context of {self.max_seq_len} tokens "
                    "could hold")
            for i, m in enumerate(prompt):
                if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                    raise InputError(f"message {i} needs string 'role' and 'content' fields, got {m!r}")
                for field in ("role", "content"):
                    check_unicode(m[field], f"message {i} {field}")
            self.check_length(sum(len(m["content"]) for m in prompt), "the messages")
            text = self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)
            ids = self._tokenize(text, "the messages", add_special_tokens=False)
        elif isinstance(prompt, Sequence) and prompt and all(isinstance(t, (int, np.integer)) for t in prompt):
            ids = [int(t) for t in prompt]
            if max(ids) >= self.config.vocab_size or min(ids) < 0:
                raise InputError(f"token ids must be in [0, {self.config.vocab_size})")
        else:
            raise InputError("a prompt is a non-empty string, a list of chat messages, or a list of token ids")
        if not ids:
            raise InputError("the prompt encodes to no tokens")
        return ids

    def check_length(self, chars: int, what: str) -> None:
        """InputError if a text of `chars` characters could not fit the context whatever its tokens
        (for callers that would spend work on a text before the engine sees it)."""
        if chars > self.max_seq_len * MAX_CHARS_PER_TOKEN:
            raise InputError(f"{what}: {chars} characters, more than the engine's context of {self.max_seq_len} "
                             f"tokens could hold (at most {self.max_seq_len * MAX_CHARS_PER_TOKEN} characters)")

    def _tokenize(self, text: str, what: str, **kwargs) -> list[int]:
        """Token ids of text; a text whose head alone overflows the context is refused untokenized."""
        check_unicode(text, what)
        self.check_length(len(text), what)
        head = self.max_seq_len * HEAD_CHARS_PER_TOKEN
        try:
            if len(text) > head:
                count = len(self.tokenizer(text[:head], **kwargs)["input_ids"])
                if count > self.max_seq_len:
                    raise InputError(f"{what} is {len(text)} characters; its first {head} alone are {count} tokens, "
                                     f"more than the engine's context of {self.max_seq_len}")
            return self.tokenizer(text, **kwargs)["input_ids"]
        except (TypeError, ValueError, OverflowError) as e:
            if isinstance(e, InputError):
                raise
            raise InputError(f"the tokenizer cannot encode {what}: {type(e).__name__}: {e}") from None

    def check_fits(self, prompt_len: int, max_new_tokens: int) -> None:
        if prompt_len + max_new_tokens > self.max_seq_len:
            raise InputError(
                f"prompt of {prompt_len} tokens + max_new_tokens {max_new_tokens} exceeds the engine's "
                f"context of {self.max_seq_len} tokens"
            )

    def submit(self, prompt: Prompt, params: SamplingParams | None = None, *, request_id: str | None = None,
               adapter: str | None = None) -> Request:
        """Queue a request (with one of the served adapters, by name); raises ValueError at once for a
        bad prompt, settings or adapter."""
        request = self._prepare(prompt, params, request_id, adapter)
        self._enqueue([request])
        return request

    def submit_many(self, prompts: Sequence[Prompt], params: Sequence[SamplingParams | None], *,
                    request_id: str | None = None, adapter: str | None = None) -> list[Request]:
        """Queue several requests at once, all or none: every prompt is checked first (ValueError
        for a bad one), and EngineBusy leaves none queued. They are admitted together if rows are free."""
        requests = [self._prepare(prompt, p, request_id and f"{request_id}-{i}", adapter)
                    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True))]
        self._enqueue(requests)
        return requests

    def _prepare(self, prompt: Prompt, params: SamplingParams | None, request_id: str | None = None,
                 adapter: str | None = None) -> Request:
        params = params or SamplingParams()
        params.validate()
        if params.stop_token_ids and max(params.stop_token_ids) >= self.config.vocab_size:
            raise InputError(f"stop_token_ids must be in [0, {self.config.vocab_size}), got {max(params.stop_token_ids)}")
        which = self.adapter_index(adapter)
        ids = self.encode(prompt)
        self.check_fits(len(ids), params.max_new_tokens)
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little")
        request = Request(request_id or f"req-{next(self._counter)}-{uuid.uuid4().hex[:8]}", ids, params, seed)
        request.adapter = which
        if self.prefix_cache.max_blocks > 0:  # an adapter changes the keys and values: its own blocks
            request.block_keys = block_keys(ids[: MAX_STORED_BLOCKS * BLOCK], salt=f"adapter {which}".encode() if which else b"")
        return request

    def _enqueue(self, requests: list[Request]) -> None:
        """Queue requests as one submission: they share one fair share of the rows (serve/scheduler.py)
        and are admitted in one turn if rows are free."""
        self._ensure_running()
        group = next(self._groups)
        for r in requests:
            r.group = group
        with self._queue_lock:
            # Requests beyond the free rows wait; at most max_queued of them.
            waiting = len(self._waiting) + len(requests) - (self.max_slots - self.running)
            if self.max_queued is not None and waiting > self.max_queued:
                raise EngineBusy(f"{len(self._waiting)} requests are waiting for a row (the limit is "
                                 f"{self.max_queued}); retry in a moment")
            self._waiting.put(group, requests)
        self._wake.set()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        on_output: Callable[[RequestOutput], None] | None = None,
        adapter: str | None = None,
    ) -> list[RequestOutput]:
        """Generate for one prompt or a list of them (all queued at once, with `adapter` if given);
        outputs in input order.

        A prompt that cannot be queued (bad settings, too long) gets an output with
        finish_reason 'error' and does not affect the others.
        """
        single = isinstance(prompts, str) or (
            isinstance(prompts, Sequence) and prompts and not isinstance(prompts[0], (str, list, tuple))
        )
        prompts = [prompts] if single else list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise InputError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        pending: list[Request | RequestOutput] = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            try:
                pending.append(self._prepare(prompt, p, adapter=adapter))
            except ValueError as e:
                pending.append(RequestOutput(f"prompt-{i}", [], "", [], "error", str(e)))
        # One batch of prefills instead of a trickle of small ones (fewer calls, fewer shapes).
        self._enqueue([r for r in pending if isinstance(r, Request)])
        outputs = []
        for item in pending:
            out = item.result() if isinstance(item, Request) else item
            if on_output is not None:
                on_output(out)
            outputs.append(out)
        return outputs

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Text deltas of one request as they are generated."""
        return self.submit(prompt, params).deltas()

    def warmup(self, prompt_lengths: Sequence[int] = (16, 32, 64), prefix_lengths: Sequence[int] = (),
               max_len: int | None = None) -> int:
        """Compile every decode shape (row x slot buckets, with and without a chunk of a prompt being
        filled, and with a draft its speculative steps), the prefills of these prompt buckets and,
        for each cached-prefix length in `prefix_lengths`, the prefills after it (see
        `chat_prefix_lengths`); with a draft, its prefills of the same shapes.

        Call it before serving traffic: shapes compiled here never compile mid-request, and with
        the persistent compilation cache a second start only loads them. `max_len`: the most slots
        a row of the traffic will use (a prompt and its new tokens), to compile only the decode
        widths it reaches. Returns the number of programs run.
        """
        if any(self._slots) or len(self._waiting):
            raise RuntimeError("warmup() runs before requests are submitted")
        rows = row_buckets(self.max_slots)
        widths = _buckets(min(MIN_SEQ_BUCKET, self.max_seq_len), self.max_seq_len)  # as _step caps them
        if max_len is not None:  # up to the first width that holds max_len slots
            widths = widths[: next((i + 1 for i, w in enumerate(widths) if w >= max_len), len(widths))]
        # With one row nothing is ever filled in chunks (no row decodes beside a free one).
        chunked = self.chunked_prefill and self.max_slots > 1
        n = 0
        zeros = lambda dtype: np.zeros(self.max_slots, dtype)  # noqa: E731
        adapters = (lambda n: np.zeros(n, np.int32)) if self._bank is not None else (lambda n: None)  # noqa: E731
        # Chunks for row max_slots (out of range) are computed and never written.
        nowhere = [self._chunk(np.zeros(size, np.int32), self.max_slots, 1, 0, []) for size in CHUNK_SIZES]
        for r in rows:
            for w in widths:  # garbage in idle rows; a prefill resets a row before it is read
                for chunk in (None, *nowhere) if chunked else (None,):
                    _, self._cache, self._pool = self._decode(
                        self.params, self._cache, self._pool, zeros(np.int32), zeros(np.uint32), zeros(np.int32),
                        zeros(np.float32), zeros(np.int32), np.ones(self.max_slots, np.float32), r, w,
                        adapters(self.max_slots), chunk)
                    n += 1
                if self.draft_config is not None:
                    settings = (zeros(np.uint32), zeros(np.int32), zeros(np.float32), zeros(np.int32),
                                np.ones(self.max_slots, np.float32))
                    *_, self._cache, self._draft_cache = self._speculate(
                        self.params, self.draft_params, self._cache, self._draft_cache, zeros(np.int32),
                        zeros(np.int32), *settings, r, w)
                    self._draft_cache = self._draft_feed(self.draft_params, self._draft_cache, zeros(np.int32),
                                                         zeros(np.int32), r, w)
                    n += 2
                elif self.lookup:
                    _, _, self._cache = self._check(self.params, self._cache, zeros(np.int32),
                                                    np.zeros((self.max_slots, self.draft_tokens), np.int32),
                                                    zeros(np.uint32), zeros(np.int32), zeros(np.float32),
                                                    zeros(np.int32), np.ones(self.max_slots, np.float32), r, w)
                    n += 1
        for r in _buckets(1, self.max_slots):  # a prefill's rows are a power of two (`_prefill`)
            sampling = (np.full(r, self.max_slots, np.int32),  # all padding rows: nothing written
                        np.zeros(r, np.uint32), np.zeros(r, np.int32), np.zeros(r, np.float32), np.zeros(r, np.int32),
                        np.ones(r, np.float32))
            for prefix in (0, *(prefix_lengths if self._pool is not None else ())):
                for length in prompt_lengths:
                    width = power_of_two_at_least(length, MIN_PREFILL_BUCKET)
                    if prefix + width > self.max_seq_len:
                        continue
                    tokens, mask = np.zeros((r, width), np.int32), np.ones((r, width), np.int32)
                    store = (np.full((r, width // BLOCK), self.prefix_cache.max_blocks, np.int32),  # none stored
                             np.zeros(r, np.int32), adapters(r))
                    if prefix:
                        known = np.zeros((r, prefix // BLOCK), np.int32)
                        _, self._cache, self._pool = self._prefix_prefill_insert(
                            self.params, self._cache, self._pool, known, tokens, mask, *sampling, *store)
                    else:
                        _, self._cache, self._pool = self._prefill_insert(self.params, self._cache, self._pool, tokens,
                                                                          mask, *sampling, *store)
                    n += 1
                    if self.draft_config is not None:  # the whole context, in the target's slots
                        ones = np.ones((r, prefix + width), np.int32)
                        self._draft_cache = self._draft_prefill(self.draft_params, self._draft_cache, ones, ones,
                                                                sampling[0])
                        n += 1
        if self.compact_rows and self.mesh is None and self.max_slots > 1:  # nothing moves: every dst out of range
            nowhere_rows = np.full(self.max_slots, self.max_slots, np.int32)
            self._cache = self._move_rows(self._cache, nowhere_rows, nowhere_rows)
            if self._draft_cache is not None:
                self._draft_cache = self._move_rows(self._draft_cache, nowhere_rows, nowhere_rows)
            n += 1
        if chunked:  # what a row filled in chunks starts from (before any request: garbage is fine)
            for prefix in (0, *(prefix_lengths if self._pool is not None else ())):
                self._cache = self._load_prefix(self._cache, self._pool, np.int32(self.max_slots - 1),
                                                np.zeros(prefix // BLOCK, np.int32))
                n += 1
        jax.block_until_ready((self._cache, self._draft_cache))
        return n

    def chat_prefix_lengths(self) -> tuple[int, ...]:
        """The cached-prefix lengths chat traffic meets: what the chat template puts before every
        conversation (its default system prompt), as the prefix cache would reuse it; () without
        a chat template or a prefix cache."""
        if self.prefix_cache.max_blocks <= 0 or not getattr(self.tokenizer, "chat_template", None):
            return ()
        a, b = ([{"role": "user", "content": text}] for text in ("a", "b"))
        ids_a, ids_b = self.encode(a), self.encode(b)
        shared = next((i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y), min(len(ids_a), len(ids_b)))
        blocks = reusable_blocks(shared // BLOCK, shared + 1)
        return (BLOCK * blocks,) if blocks else ()

    # --- the scheduler

    def _ensure_running(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stopping = False
                self._thread = threading.Thread(target=self._loop, name="press-engine", daemon=True)
                self._thread.start()

    def close(self) -> None:
        """Stop the scheduler thread; queued and running requests end with finish_reason 'error'."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _loop(self) -> None:
        try:
            while not self._stopping:
                ended, seconds = self._last_admission
                due = not any(self._slots) or time.perf_counter() - ended >= self.prefill_delay * seconds
                start = time.perf_counter()
                if self._admit(batch=due):  # between batched prefills, only prompts filled in chunks
                    self._last_admission = (time.perf_counter(), time.perf_counter() - start)
                if not any(self._slots):
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                self._step()
        except BaseException as e:  # noqa: BLE001 - never leave callers waiting forever
            self._fail_all(f"engine error: {type(e).__name__}: {e}")
            raise
        self._fail_all("engine closed")

    def _fail_all(self, message: str) -> None:
        self._filling.clear()
        for i, r in enumerate(self._slots):
            if r is not None:
                r._finish("error", message)
                self._slots[i] = None
        with self._queue_lock:
            waiting = self._waiting.remove_if(lambda r: True)
        for r in waiting:
            r._finish("error", message)

    def _admit(self, batch: bool = True) -> bool:
        """Give waiting requests free rows (lowest first): short ones that arrive alone while rows
        decode are filled in chunks by the next decode steps, the others prefilled here, prompts
        of one length bucket together (with batch=False they wait for a later turn). Whether a
        batched prefill ran.

        Rows go to submissions fairly (serve/scheduler.py): a submission above its share may give
        up a row here, its request going back to the head of its queue to be prefilled again later.
        Requests whose client has gone are dropped before any prefill is spent on them.
        """
        held = collections.Counter(r.group for r in self._slots if r is not None)
        decoding = any(r is not None and i not in self._filling for i, r in enumerate(self._slots))
        chunk_room = MAX_FILLING - len(self._filling) if self.chunked_prefill and decoding else 0
        with self._queue_lock:
            gone = self._waiting.remove_if(lambda r: r.cancelled)
            free = sum(r is None for r in self._slots)
            admitted, victims = self._waiting.schedule(free if batch else min(free, chunk_room), held,
                                                       self.max_slots, self.preempt and batch, self.share_cap)
            for group in victims:
                self._waiting.put_front(group, self._preempt(group))
            # Each admitted request is filled in chunks, prefilled here, or not yet: back to the head of
            # its queue (waiting for a chunk turn, or with batch=False every one not filled in chunks).
            chunked, prefilled, back = [], [], []
            patience = self.chunk_wait_steps * self._step_seconds
            now = time.perf_counter()
            for request in admitted:
                rest = len(request.context_ids) - BLOCK * reusable_blocks(
                    self.prefix_cache.cached_blocks(request.block_keys), len(request.prompt_ids))
                if self.chunked_prefill and decoding and rest <= CHUNKED_MAX_TOKENS:
                    if len(chunked) < chunk_room:
                        chunked.append(request)
                        continue
                    if now - request.submitted < patience:  # waits for a chunk turn (chunk_wait_steps)
                        back.append(request)
                        continue
                (prefilled if batch else back).append(request)
            for request in reversed(back):
                self._waiting.put_front(request.group, request)
        for r in gone:
            self.stats["cancelled"] += 1
            r._finish("cancelled")
        free = [i for i, r in enumerate(self._slots) if r is None]
        now = time.perf_counter()
        for slot, request in zip(free, chunked):
            request.started, request.filled = request.started or now, None
            self._slots[slot] = request
            self._adapter_rows[slot] = 0
            self._filling.append(slot)
        free = free[len(chunked) :]
        groups: dict[tuple[int, int], list[tuple[int, Request]]] = {}
        pinned: set[int] = set()  # pool blocks these prefills read: none is evicted before they run
        for slot, request in zip(free, prefilled):
            prefix = BLOCK * reusable_blocks(self.prefix_cache.cached_blocks(request.block_keys),
                                             len(request.prompt_ids))
            pinned.update(self.prefix_cache.block_ids(request.block_keys[: prefix // BLOCK]))
            groups.setdefault((prefix, self._prefill_width(request, prefix)), []).append((slot, request))
        for (prefix, width), group in sorted(groups.items()):
            try:
                self._prefill(group, width, prefix, pinned)
            except Exception as e:  # noqa: BLE001 - fail these requests, not the engine
                for _, request in group:
                    if request.done:
                        continue
                    slot = next((i for i, r in enumerate(self._slots) if r is request), None)
                    if slot is not None:
                        self._fail_row(slot, e)
                    else:
                        request._finish("error", f"{type(e).__name__}: {e}")
        return bool(groups)

    def _preempt(self, group) -> Request:
        """Free the row of `group` whose context is shortest (the least to prefill again); its request."""
        slot = min((i for i, r in enumerate(self._slots) if r is not None and r.group == group),
                   key=lambda i: len(self._slots[i].prompt_ids) + len(self._slots[i].token_ids))
        self._stop_filling(slot)
        request, self._slots[slot] = self._slots[slot], None
        request.preemptions += 1
        self.stats["preempted"] += 1
        return request

    def _stop_filling(self, slot: int) -> None:
        """`slot` is no longer filled in chunks (done, freed or given up)."""
        if slot in self._filling:
            self._filling.remove(slot)
            request = self._slots[slot]
            if request is not None:
                request.filled = None

    def _fail_row(self, slot: int, error: Exception) -> None:
        """End the request in `slot` with an error and free the row."""
        self._stop_filling(slot)
        request, self._slots[slot] = self._slots[slot], None
        if request is not None and not request.done:
            request._finish("error", f"{type(error).__name__}: {error}")

    def _prefill_width(self, request: Request, prefix: int = 0) -> int:
        """Slots the prompt's tokens after its cached prefix are prefilled in (a bucket)."""
        n = len(request.context_ids) - prefix
        # the widest prefill that fits beside the tokens still to come
        room = self.max_seq_len - prefix - (request.params.max_new_tokens - len(request.token_ids))
        width = power_of_two_at_least(n, MIN_PREFILL_BUCKET)
        if width > room:  # a long prompt near the context limit: the next multiple of 16 that fits, so
            width = -(-n // MIN_PREFILL_BUCKET) * MIN_PREFILL_BUCKET  # clients cannot force a compile per length
            width = width if width <= room else n
        return width

    def _prefill(self, group: list[tuple[int, Request]], width: int, prefix: int = 0,
                 pinned: set[int] = frozenset()) -> None:
        """Prefill a group of prompts into their rows: the tokens after `prefix` (cached) left-padded to
        `width`; their blocks not yet cached go to pool blocks not in `pinned`."""
        rows = min(power_of_two_at_least(len(group)), self.max_slots)  # bucketed; padding rows are dropped
        tokens = np.zeros((rows, width), np.int32)
        mask = np.zeros((rows, width), np.int32)
        slots = np.full(rows, self.max_slots, np.int32)
        seeds = np.zeros(rows, np.uint32)
        temperature = np.zeros(rows, np.float32)
        top_k = np.zeros(rows, np.int32)
        top_p = np.ones(rows, np.float32)
        counts = np.zeros(rows, np.int32)  # tokens generated so far: nonzero for a request prefilled again
        adapter_rows = np.zeros(rows, np.int32)
        # Prefix-cache blocks: those each row reuses, and where its new ones go (none: the pool's size).
        known = np.zeros((rows, prefix // BLOCK), np.int32)
        store_ids = np.full((rows, width // BLOCK), self.prefix_cache.max_blocks, np.int32)
        store_from = np.zeros(rows, np.int32)
        allocated: list[bytes] = []
        now = time.perf_counter()
        for row, (slot, request) in enumerate(group):
            request.started = request.started or now
            rest = request.context_ids[prefix:]
            tokens[row, width - len(rest) :] = rest
            mask[row, width - len(rest) :] = 1
            p = request.params
            slots[row], seeds[row], counts[row] = slot, request.seed, len(request.token_ids)
            adapter_rows[row] = request.adapter
            temperature[row], top_k[row], top_p[row] = p.temperature, p.top_k, p.top_p
            if self._pool is not None:
                known[row] = self.prefix_cache.block_ids(request.block_keys[: prefix // BLOCK])
                # Block j of the prompt (j >= prefix / BLOCK) sits at slot offset + j * BLOCK of the prefill's rows.
                store_from[row] = prefix + width - len(request.context_ids) + prefix
                for j, key in enumerate(request.block_keys[prefix // BLOCK :][: width // BLOCK]):
                    block = self.prefix_cache.allocate(key, pinned)
                    if block is not None:
                        store_ids[row, j] = block
                        allocated.append(key)
        known[len(group) :] = known[0]  # padding rows attend over any valid prefix
        sampling = (slots, seeds, counts, temperature, top_k, top_p, store_ids, store_from,
                    adapter_rows if self._bank is not None else None)
        start = time.perf_counter()
        try:
            if prefix:
                first, self._cache, self._pool = self._prefix_prefill_insert(self.params, self._cache, self._pool,
                                                                             known, tokens, mask, *sampling)
                self.stats["prefix_tokens_reused"] += prefix * len(group)
            else:
                first, self._cache, self._pool = self._prefill_insert(self.params, self._cache, self._pool, tokens,
                                                                      mask, *sampling)
            if self.draft_config is not None:
                self._prefill_draft(group, tokens, mask, slots, prefix)
            first = np.asarray(first)
        except BaseException:
            self.prefix_cache.discard(allocated)  # never written: nobody may reuse them
            raise
        self.stats["prefills"] += 1
        self.stats["prefill_seconds"] += time.perf_counter() - start
        for row, (slot, request) in enumerate(group):
            self._slots[slot] = request
            self._adapter_rows[slot] = request.adapter
            self._index[slot] = prefix + width
            self._next_token[slot] = request.context_ids[-1]  # becomes the token before the first
            self._accept(slot, int(first[row]))

    def _prefill_draft(self, group: list[tuple[int, Request]], tokens: np.ndarray, mask: np.ndarray,
                       slots: np.ndarray, prefix: int) -> None:
        """Prefill the draft's rows of a group the target just prefilled (tokens, mask [rows, width]
        after its cached `prefix`): the whole context, in the target's slots (the prefix first)."""
        if prefix:
            rows, width = tokens.shape
            known = np.zeros((rows, prefix), np.int32)
            for row, (_, request) in enumerate(group):
                known[row] = request.context_ids[:prefix]
            tokens = np.concatenate([known, tokens], axis=1)  # [rows, prefix + width]
            mask = np.concatenate([np.ones((rows, prefix), np.int32), mask], axis=1)
        self._draft_cache = self._draft_prefill(self.draft_params, self._draft_cache, tokens, mask, slots)

    def _chunk(self, tokens: np.ndarray, row: int, length: int, start: int, store: Sequence[int]) -> dict:
        """The `chunk` argument of a decode step (see _decode_fn); store: pool blocks of its full blocks."""
        ids = np.full(CHUNK // BLOCK, self.prefix_cache.max_blocks, np.int32)
        ids[: len(store)] = store
        return {"tokens": tokens, "row": np.int32(row), "length": np.int32(length), "start": np.int32(start),
                "store_ids": ids}

    def _next_chunk(self) -> dict | None:
        """The chunk of the first row being filled (its cached prefix put in its row first), or None."""
        while self._filling and self._slots[self._filling[0]].cancelled:
            self.stats["cancelled"] += 1
            self._release(self._filling[0], "cancelled")
        if not self._filling:
            return None
        row = self._filling[0]
        r = self._slots[row]
        if r.filled is None:
            blocks = 0
            if self._pool is not None:
                blocks = reusable_blocks(self.prefix_cache.cached_blocks(r.block_keys), len(r.context_ids))
            ids = np.asarray(self.prefix_cache.block_ids(r.block_keys[:blocks]), np.int32)
            self._cache = self._load_prefix(self._cache, self._pool, np.int32(row), ids)
            r.filled = self._index[row] = blocks * BLOCK
            self.stats["prefix_tokens_reused"] += blocks * BLOCK
        rest = r.context_ids[r.filled :]
        n = min(CHUNK, len(rest))
        tokens = np.zeros(next(size for size in CHUNK_SIZES if size >= n), np.int32)
        tokens[:n] = rest[:n]
        store = []
        if self._pool is not None:  # the chunk's full blocks of the prompt (chunks start on a block boundary)
            for key in r.block_keys[r.filled // BLOCK :][: n // BLOCK]:
                block = self.prefix_cache.allocate(key)
                store.append(self.prefix_cache.max_blocks if block is None else block)
        return self._chunk(tokens, row, n, r.filled, store)

    def _row_settings(self, active: Sequence[int]) -> tuple[np.ndarray, ...]:
        """(seeds, counts, temperature, top_k, top_p) [max_slots] of the rows in `active` (idle rows greedy)."""
        seeds = np.zeros(self.max_slots, np.uint32)
        counts = np.zeros(self.max_slots, np.int32)
        temperature = np.zeros(self.max_slots, np.float32)
        top_k = np.zeros(self.max_slots, np.int32)
        top_p = np.ones(self.max_slots, np.float32)
        for i in active:
            r = self._slots[i]
            seeds[i], counts[i] = r.seed, len(r.token_ids)
            temperature[i], top_k[i], top_p[i] = r.params.temperature, r.params.top_k, r.params.top_p
        return seeds, counts, temperature, top_k, top_p

    def _compact(self) -> None:
        """Move the highest busy rows into free lower ones when the busy rows would then fit a smaller
        row bucket: a step computes every row up to the highest busy one (its bucket), so rows
        left busy above freed ones cost what busy ones do. Beside the hostile clients of
        benchmarks/hostile_clients.py, steps computed 11.6 rows for 8.1 generating. A move copies a
        row's keys and values once (a row of SmolLM2 at 256 slots: 12 MB in fp32); the step after it
        computes a bucket fewer for as long as the rows stay. Not on a mesh, where rows lie on
        different devices."""
        active = [i for i, r in enumerate(self._slots) if r is not None]
        if not active or self.mesh is not None:
            return
        bucket = row_bucket(len(active), self.max_slots)
        movers = [i for i in reversed(active) if i >= bucket]
        if not movers:
            return
        targets = [i for i in range(bucket) if self._slots[i] is None][: len(movers)]
        src, dst = np.full(self.max_slots, self.max_slots, np.int32), np.full(self.max_slots, self.max_slots, np.int32)
        src[: len(movers)], dst[: len(movers)] = movers, targets
        self._cache = self._move_rows(self._cache, src, dst)
        if self._draft_cache is not None:
            self._draft_cache = self._move_rows(self._draft_cache, src, dst)
        for a, b in zip(movers, targets):
            self._slots[b], self._slots[a] = self._slots[a], None
            for state in (self._index, self._next_token, self._prev_token, self._adapter_rows):
                state[b] = state[a]
            if a in self._filling:
                self._filling[self._filling.index(a)] = b
        self.stats["rows_moved"] += len(movers)

    def _step(self) -> None:
        if self.compact_rows:
            self._compact()
        chunk = self._next_chunk() if self._filling else None
        active = [i for i, r in enumerate(self._slots) if r is not None]
        if not active:
            return
        decoding = [i for i in active if i not in self._filling]
        # Rows being filled lie above the decoding ones (`_admit`): a chunk's row is not computed as a row.
        rows = row_bucket(max(decoding, default=0) + 1, self.max_slots)
        if (self.draft_config is not None or (self.lookup and chunk is None)) and len(active) <= self.draft_max_rows \
                and all(self._index[i] + self.draft_tokens + 1 <= self.max_seq_len for i in active):
            if self.draft_config is not None:
                return self._speculative_step(active, rows)
            proposals = {i: self._lookup_proposal(self._slots[i]) for i in active}
            if any(proposals.values()):  # else a plain step: checking K + 1 tokens a row costs more
                return self._lookup_step(active, rows, proposals)
        # A plain step: no draft; more rows busy than draft_max_rows; some row lacks the K + 1 slots a
        # speculative step writes (a request within K tokens of the context's end; it ends before it
        # could speculate again); or a lookup draft with a chunk to write or no proposal in any row.
        end = max([int(self._index[i]) + 1 for i in decoding] + ([int(chunk["start"] + chunk["length"])] if chunk else []))
        width = min(power_of_two_at_least(end, MIN_SEQ_BUCKET), self.max_seq_len)
        seeds, counts, temperature, top_k, top_p = self._row_settings(active)
        start = time.perf_counter()
        if self.draft_config is not None:  # the draft's cache takes this step's tokens too
            self._draft_cache = self._draft_feed(self.draft_params, self._draft_cache, self._prev_token.copy(),
                                                 self._next_token.copy(), rows, width)
        nxt, self._cache, self._pool = self._decode(
            self.params, self._cache, self._pool, self._next_token, seeds, counts, temperature, top_k, top_p, rows,
            width, self._adapter_rows if self._bank is not None else None, chunk,
        )
        nxt = np.asarray(nxt)
        self._step_seconds = time.perf_counter() - start
        self.stats["decode_steps"] += 1
        self.stats["decode_seconds"] += self._step_seconds
        self.stats["decode_rows"] += rows
        self.stats["decode_rows_busy"] += len(decoding)
        if chunk is not None:
            self.stats["chunk_tokens"] += len(chunk["tokens"])
            self.stats["chunk_prompt_tokens"] += int(chunk["length"])
        for i in decoding:
            self._index[i] += 1
            try:
                self._accept(i, int(nxt[i]))
            except Exception as e:  # noqa: BLE001 - one row's failure (its detokenizing, say) ends that row only
                self._fail_row(i, e)
        if chunk is not None:
            row = int(chunk["row"])
            r = self._slots[row]
            r.filled += int(chunk["length"])
            self._index[row] = r.filled
            self.stats["prefill_chunks"] += 1
            if r.filled == len(r.context_ids):  # the prompt is in: its first token came with the last chunk
                self._stop_filling(row)
                self._next_token[row] = r.context_ids[-1]
                try:
                    self._accept(row, int(nxt[-1]))
                except Exception as e:  # noqa: BLE001
                    self._fail_row(row, e)

    def _speculative_width(self, active: list[int]) -> int:
        """The cache slots a speculative step attends over (a bucket): up to the K + 1 it writes a row."""
        end = max(int(self._index[i]) for i in active) + self.draft_tokens + 1
        return min(power_of_two_at_least(end, MIN_SEQ_BUCKET), self.max_seq_len)

    def _speculative_step(self, active: list[int], rows: int) -> None:
        """One speculative step for every active row (serve/speculative.py): 1 to K + 1 tokens each,
        accepted one by one until one ends the request."""
        width = self._speculative_width(active)
        start = time.perf_counter()
        tokens, kept, self._cache, self._draft_cache = self._speculate(
            self.params, self.draft_params, self._cache, self._draft_cache, self._prev_token, self._next_token,
            *self._row_settings(active), rows, width)
        self._take_checked(active, rows, start, *jax.device_get((tokens, kept)), drafted=set(active))

    def _lookup_proposal(self, r: Request) -> list[int]:
        """A lookup draft's proposal for a request: what followed its last tokens earlier in its context."""
        if r.ngrams is None:
            r.ngrams = speculative.Ngrams()
        return r.ngrams.follow(r.prompt_ids, r.token_ids).propose(self.draft_tokens)

    def _lookup_step(self, active: list[int], rows: int, proposals: dict[int, list[int]]) -> None:
        """One speculative step whose drafts are lookups (`proposals`: row -> up to K tokens, padded
        by repeating them; a row with none proposes its last token again). Only rows that found
        a proposal count in drafted_tokens and accepted_tokens."""
        k = self.draft_tokens
        drafts = np.zeros((self.max_slots, k), np.int32)
        for i in active:
            drafts[i] = np.resize(proposals[i] or [int(self._next_token[i])], k)
        width = self._speculative_width(active)
        start = time.perf_counter()
        tokens, kept, self._cache = self._check(self.params, self._cache, self._next_token, drafts,
                                                *self._row_settings(active), rows, width)
        self._take_checked(active, rows, start, *jax.device_get((tokens, kept)),
                           drafted={i for i in active if proposals[i]})

    def _take_checked(self, active: list[int], rows: int, start: float, tokens: np.ndarray, kept: np.ndarray,
                      drafted: set[int]) -> None:
        """Accept a speculative step's tokens [rows, K + 1] of which kept [rows] were drafted, one by
        one until one ends its request; the rows in `drafted` count in the acceptance rate."""
        k = self.draft_tokens
        self.stats["decode_steps"] += 1
        self.stats["speculative_steps"] += 1
        self.stats["decode_seconds"] += time.perf_counter() - start
        self.stats["decode_rows"] += rows
        self.stats["decode_rows_busy"] += len(active)
        for i in active:
            request, n = self._slots[i], int(kept[i])
            self._index[i] += n + 1
            if i in drafted:
                self.stats["drafted_tokens"] += k
                self.stats["accepted_tokens"] += n
            try:
                for token in tokens[i, : n + 1]:
                    self._accept(i, int(token))
                    if self._slots[i] is not request:  # it ended at this token
                        break
            except Exception as e:  # noqa: BLE001 - one row's failure (its detokenizing, say) ends that row only
                self._fail_row(i, e)

    @property
    def acceptance_rate(self) -> float | None:
        """Draft tokens the target kept over those it was offered (None before any speculative step)."""
        drafted = self.stats["drafted_tokens"]
        return self.stats["accepted_tokens"] / drafted if drafted else None

    def draft_stats(self) -> dict:
        """Speculative decoding so far, for reports: the draft, the tokens it proposes a step, the
        tokens it proposed and those the target kept, and their ratio; {} without a draft."""
        if not self.draft_tokens:
            return {}
        rate = self.acceptance_rate
        return {"draft": self.draft_name, "draft_tokens": self.draft_tokens,
                "drafted_tokens": self.stats["drafted_tokens"], "accepted_tokens": self.stats["accepted_tokens"],
                "acceptance_rate": None if rate is None else round(rate, 4)}

    def _accept(self, slot: int, token: int) -> None:
        """Record a row's new token; finish and free the row if the request is done."""
        r = self._slots[slot]
        if r.first_token is None:
            r.first_token = time.perf_counter()
        if r.cancelled:
            self.stats["cancelled"] += 1
            return self._release(slot, "cancelled")
        p = r.params
        if (token in self.eos_ids and not p.ignore_eos) or token in p.stop_id_set:
            return self._release(slot, "stop")
        r.token_ids.append(token)
        self.stats["generated_tokens"] += 1
        self._prev_token[slot], self._next_token[slot] = self._next_token[slot], token
        text = self._detokenize(r)
        for s in p.stop:
            # Only text that could contain a new match: the tail since the last emission.
            hit = text.find(s, max(0, r._emitted - len(s) + 1))
            if hit >= 0:
                r.text = text[:hit]
                r._prefix_offset = r._read_offset = len(r.token_ids)  # nothing left to decode
                r._emit(r.text[r._emitted :])
                r._emitted = len(r.text)
                return self._release(slot, "stop")
        # Hold back a partial multi-byte character and anything that may start a stop string.
        safe = len(text) - (1 if text.endswith("\ufffd") else 0)
        for s in p.stop:
            safe = min(safe, len(text) - held_back(text, s))
        if safe > r._emitted:
            r._emit(text[r._emitted : safe])
            r._emitted = safe
        if len(r.token_ids) >= p.max_new_tokens:
            return self._release(slot, "length")

    def _detokenize(self, r: Request, final: bool = False) -> str:
        """r.text extended by its new tokens, decoding only a short tail of ids each time.

        The tail starts a few tokens back (prefix_offset) so byte-level merges and spacing
        come out as a full decode would; text waits while it ends in a partial character.
        """
        # Only the scheduler thread decodes, with its own tokenizer: no lock shared with encoding.
        prefix = self._detokenizer.decode(r.token_ids[r._prefix_offset : r._read_offset], skip_special_tokens=True)
        new = self._detokenizer.decode(r.token_ids[r._prefix_offset :], skip_special_tokens=True)
        if len(new) > len(prefix) and (final or not new.endswith("\ufffd")):
            r.text += new[len(prefix) :].removesuffix("\ufffd") if final else new[len(prefix) :]
            r._prefix_offset, r._read_offset = r._read_offset, len(r.token_ids)
        return r.text

    def _release(self, slot: int, reason: str) -> None:
        self._stop_filling(slot)
        r = self._slots[slot]
        self._detokenize(r, final=True)
        r._emit(r.text[r._emitted :])
        r._emitted = len(r.text)
        self._slots[slot] = None
        r._finish(reason)
