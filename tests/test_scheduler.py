"""Fair shares of the engine's rows between submissions (serve/scheduler.py), and preemption that
continues a request exactly where it stopped."""

import collections
import time

import pytest

from serve.engine import Engine
from serve.sampling import SamplingParams
from serve.scheduler import FairQueue

from tests.tiny_decoder import tiny_decoder


def _queue(**groups):
    q = FairQueue()
    for name, n in groups.items():
        q.put(name, [f"{name}{i}" for i in range(n)])
    return q


def test_rows_go_to_the_group_holding_fewest_oldest_first():
    q = _queue(fan=6, a=1, b=1)
    admitted, victims = q.schedule(free=4, held=collections.Counter(), rows=4)
    # fan (oldest, 0 held) -> a (0) -> b (0) -> fan again: not fan's six before a and b
    assert admitted == ["fan0", "a0", "b0", "fan1"] and victims == [] and len(q) == 4


def test_without_free_rows_a_group_above_its_share_gives_one_up_to_a_group_below_it():
    q = _queue(single=1)
    admitted, victims = q.schedule(free=0, held=collections.Counter(fan=4), rows=4, preempt=True)
    assert admitted == ["single0"] and victims == ["fan"]  # share of 2 groups over 4 rows: 2


def test_nothing_is_given_up_while_every_group_is_within_its_share():
    q = _queue(c=1)
    # a, b hold 2 rows each of 4; with c waiting the share is 4 // 3 = 1: a and b are above it
    admitted, victims = q.schedule(free=0, held=collections.Counter(a=2, b=2), rows=4, preempt=True)
    assert admitted == ["c0"] and victims == ["a"]
    q = _queue(e=1)
    # eight groups of one row each (a batch job's lines): nobody is above a share of 1
    held = collections.Counter({f"g{i}": 1 for i in range(8)})
    assert q.schedule(free=0, held=held, rows=8, preempt=True) == ([], [])
    assert q.schedule(free=0, held=collections.Counter(fan=8), rows=8, preempt=False) == ([], [])
    assert len(q) == 1


def test_a_waiting_group_at_its_share_does_not_take_more():
    q = _queue(fan=3, b=1)
    # fan holds 2 of 4 rows and b 1, one row free: it goes to b, the group holding fewer
    admitted, victims = q.schedule(free=1, held=collections.Counter(fan=2, b=1), rows=4, preempt=True)
    assert admitted == ["b0"] and victims == []
    # no row free and fan, still waiting, holds its share (4 rows // 2 groups): nobody gives one up
    assert q.schedule(free=0, held=collections.Counter(fan=2, b=2), rows=4, preempt=True) == ([], [])


def test_with_a_cap_a_group_stops_at_its_share_while_others_hold_rows_and_alone_takes_all():
    # 8 single requests hold a row each of 16; a fan-out of 16 prompts waits: 9 groups, share 2
    held = collections.Counter({f"s{i}": 1 for i in range(8)})
    q = _queue(fan=16)
    admitted, _ = q.schedule(free=8, held=held, rows=16, cap=True)
    assert admitted == ["fan0", "fan1"] and len(q) == 14
    uncapped = _queue(fan=16)
    assert len(uncapped.schedule(free=8, held=held, rows=16)[0]) == 8  # without the cap it fills the rows
    alone = _queue(fan=16)
    assert len(alone.schedule(free=16, held=collections.Counter(), rows=16, cap=True)[0]) == 16
    # a newcomer below its share still gets a free row beside a capped group
    q.put("new", ["new0"])
    held = held + collections.Counter(fan=2)
    assert q.schedule(free=6, held=held, rows=16, cap=True)[0] == ["new0"]


def test_removed_items_leave_the_queue_and_put_front_goes_first():
    q = _queue(a=3, b=2)
    assert q.remove_if(lambda item: item in {"a1", "b0", "b1"}) == ["a1", "b0", "b1"]
    assert len(q) == 2 and list(q) == ["a0", "a2"]
    q.put_front("a", "a-1")
    assert q.schedule(free=2, held=collections.Counter(), rows=2)[0] == ["a-1", "a0"]


@pytest.fixture(scope="module")
def engine():
    config, params, tokenizer = tiny_decoder(seed=3)
    with Engine(params, config, tokenizer, max_slots=4, max_seq_len=128, compilation_cache=False) as e:
        yield e


def _outputs(engine, prompts, params):
    return [(o.token_ids, o.text) for o in engine.generate(prompts, params)]


def test_a_lone_request_beside_a_fan_out_gets_a_row_and_the_fan_out_continues_exactly(engine):
    prompts = [f"Story number {i} begins on a ship" for i in range(4)]
    sampled = [SamplingParams(max_new_tokens=48, temperature=0.8, top_k=50, seed=10 + i) for i in range(4)]
    engine.preempt = False
    alone = _outputs(engine, prompts, sampled)  # the fan-out by itself: never preempted
    engine.preempt = True
    before = engine.stats["preempted"]

    fan_out = engine.submit_many(prompts, sampled)
    deadline = time.monotonic() + 60
    while engine.running < 4 and time.monotonic() < deadline:
        time.sleep(0.002)
    single = engine.submit("A short question?", SamplingParams(max_new_tokens=4, temperature=0.0))
    single_out = single.result(timeout=60)
    assert engine.stats["preempted"] > before, "the fan-out held every row: one should have been given up"
    assert not all(r.done for r in fan_out), "the lone request waited for the whole fan-out"
    assert len(single_out.token_ids) == 4
    # Every fan-out prompt, preempted or not, generates exactly what it generates alone.
    assert [(r.result(timeout=120).token_ids, r.output.text) for r in fan_out] == alone
    assert sum(r.preemptions for r in fan_out) >= 1


def test_prefill_delay_gathers_arrivals_during_decoding_into_one_prefill(engine):
    engine.prefill_delay = 100.0
    engine.chunked_prefill = False  # else short arrivals are written by the decode steps (test_chunked_prefill.py)
    try:
        engine.generate("warm the shapes up", SamplingParams(max_new_tokens=2))
        long = engine.submit("a long one", SamplingParams(max_new_tokens=100, ignore_eos=True))
        next(long.deltas())  # decoding: new prompts now wait 100 x the last prefill's time
        prefills = engine.stats["prefills"]
        steps = engine.stats["decode_steps"]
        late = [engine.submit(f"late arrival {i}", SamplingParams(max_new_tokens=2)) for i in range(3)]
        assert all(len(r.result(timeout=120).token_ids) == 2 for r in late)
        assert engine.stats["prefills"] == prefills + 1, "the three arrivals should share one prefill"
        assert engine.stats["decode_steps"] > steps + 2, "the running request kept decoding while they waited"
        assert len(long.result(timeout=120).token_ids) == 100
    finally:
        engine.prefill_delay = 0.0
        engine.chunked_prefill = True
