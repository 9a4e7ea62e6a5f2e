"""Scheduler logic on its own: plain Python, no model (the 'model' here just marks tokens computed)."""
from disagg.engine.block_pool import BlockPool
from disagg.engine.scheduler import Scheduler
from disagg.engine.sequence import Sequence
from disagg.protocol import SamplingParams


def _seq(rid, n, bs=4):
    return Sequence(rid, list(range(1, n + 1)), SamplingParams(max_tokens=4), bs)


def _run_step(sched):
    batch = sched.schedule()
    sched.on_step_done(batch)
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(7)  # a "sampled" token
    return batch


def test_token_budget_chunks_long_prompts():
    sched = Scheduler(BlockPool(64), 4, max_num_seqs=8, max_num_batched_tokens=10)
    sched.add(_seq("long", 25))
    sched.add(_seq("short", 3))
    b1 = _run_step(sched)
    assert b1.total_tokens <= 10 and b1.num_new_tokens == [10]
    b2 = _run_step(sched)
    assert b2.num_new_tokens == [10]
    b3 = _run_step(sched)  # last 5 of long + all 3 of short
    assert [s.request_id for s in b3.seqs] == ["long", "short"] and b3.num_new_tokens == [5, 3]
    b4 = _run_step(sched)  # both decode
    assert b4.num_new_tokens == [1, 1]


def test_max_num_seqs_caps_running():
    sched = Scheduler(BlockPool(64), 4, max_num_seqs=2, max_num_batched_tokens=100)
    for i in range(4):
        sched.add(_seq(f"r{i}", 5))
    batch = _run_step(sched)
    assert len(batch.seqs) == 2 and len(sched.waiting) == 2


def test_preemption_frees_blocks_and_requeues_at_the_front():
    pool = BlockPool(6)
    sched = Scheduler(pool, 4, max_num_seqs=8, max_num_batched_tokens=100)
    sched.add(_seq("a", 8))  # 2 blocks, 3rd needed at token 9
    sched.add(_seq("b", 8))
    sched.add(_seq("c", 8))
    _run_step(sched)  # all three prefill: 6 blocks used
    assert pool.num_free_blocks == 0
    batch = _run_step(sched)  # each needs a 3rd block: the newest is preempted
    assert [s.request_id for s in batch.preempted] == ["c"]
    assert sched.waiting[0].request_id == "c" and sched.waiting[0].num_computed_tokens == 0
    assert sched.stats.num_preemptions == 1


def test_prefix_hit_skips_cached_blocks_but_leaves_one_token():
    pool = BlockPool(16)
    sched = Scheduler(pool, 4, max_num_seqs=8, max_num_batched_tokens=100)
    a = _seq("a", 8)
    sched.add(a)
    _run_step(sched)
    sched.finish(a, "stop")
    b = _seq("b", 8)  # identical prompt: both blocks cached, but the last token must be recomputed
    sched.add(b)
    batch = _run_step(sched)
    assert b.num_cached_tokens == 4 and batch.num_new_tokens == [4]
    c = _seq("c", 9)
    sched.add(c)
    batch = _run_step(sched)
    assert c.num_cached_tokens == 8 and batch.num_new_tokens[-1] == 1


def test_waiting_sequences_holding_loaded_blocks_cannot_starve_the_head():
    """KV that arrived by a load leaves its sequence queued with blocks held; if the head of the queue cannot
    get blocks and nothing runs to free any, the queued holders give theirs back (no deadlock)."""
    pool = BlockPool(10)
    sched = Scheduler(pool, 4, max_num_seqs=8, max_num_batched_tokens=100)
    head, holder = _seq("head", 24), _seq("holder", 20)  # head needs 6 blocks
    holder.block_ids = pool.allocate(5)  # as a finished load leaves it: blocks held, computed, waiting
    holder.num_computed_tokens = 20
    sched.add(head)
    sched.add(holder)
    batch = _run_step(sched)
    assert [s.request_id for s in batch.seqs] == ["head"] and batch.num_new_tokens == [24]
    assert holder.block_ids == [] and holder.num_computed_tokens == 0  # recomputes (or re-hits) later
    while sched.has_unfinished():
        for seq in list(sched.running):
            if len(seq.output_token_ids) >= 2:
                sched.finish(seq, "length")
        _run_step(sched)
    assert pool.num_free_blocks == 10


def test_queued_holders_give_up_blocks_before_a_running_sequence_is_preempted():
    pool = BlockPool(8)
    sched = Scheduler(pool, 4, max_num_seqs=8, max_num_batched_tokens=100)
    runner = _seq("runner", 16)  # 4 blocks
    sched.add(runner)
    _run_step(sched)  # running, 4 blocks, its first sampled token needs a 5th block next step
    holder = _seq("holder", 16)
    holder.block_ids, holder.num_computed_tokens = pool.allocate(4), 16  # a finished load, queued
    sched.waiting.append(holder)
    assert pool.num_free_blocks == 0
    batch = _run_step(sched)
    assert batch.seqs[0] is runner and batch.num_new_tokens[0] == 1 and not batch.preempted
    assert sched.stats.num_preemptions == 0
    # the holder gave its blocks back; it re-admits behind the runner, its prefix found in the prefix cache
    # (the same tokens as the runner's prompt: 3 of its 4 blocks hit, the last token is computed)
    assert batch.seqs[1:] == [holder] and batch.num_new_tokens[1] == 4


def test_higher_priority_joins_the_queue_ahead_of_lower_ones():
    sched = Scheduler(BlockPool(64), 4, max_num_seqs=1, max_num_batched_tokens=100)
    for rid, prio in [("a", 0), ("b", 0), ("urgent", 5), ("c", -1), ("urgent2", 5)]:
        seq = _seq(rid, 4)
        seq.priority = prio
        sched.add(seq)
    assert [s.request_id for s in sched.waiting] == ["urgent", "urgent2", "a", "b", "c"]


def test_running_high_priority_prefill_takes_the_step_budget_first():
    sched = Scheduler(BlockPool(64), 4, max_num_seqs=8, max_num_batched_tokens=24)
    background = _seq("background", 40)
    sched.add(background)
    _run_step(sched)  # 24 of background's 40 prompt tokens
    urgent = Sequence("urgent", list(range(100, 116)), SamplingParams(max_tokens=4), 4)  # nothing in common
    urgent.priority = 5
    sched.add(urgent)
    batch = _run_step(sched)  # background finishes its prompt (16), urgent gets the 8 tokens left
    assert [s.request_id for s in batch.seqs] == ["background", "urgent"] and batch.num_new_tokens == [16, 8]
    batch = _run_step(sched)  # now urgent's prefill comes first, background's decode after it
    assert [s.request_id for s in batch.seqs] == ["urgent", "background"] and batch.num_new_tokens == [8, 1]
