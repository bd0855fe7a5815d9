"""The jitter buffer: each rule by example, then properties over arbitrary packet streams."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voicerelay.voice.jitter import JitterBuffer, JitterFrame

FS = 960


def pkt(seq: int) -> bytes:
    return b"p%d" % seq


def seqs(frames: list[JitterFrame]) -> list[int]:
    return [f.seq for f in frames]


def push(jb: JitterBuffer, seq: int, now: float, ts: int | None = None) -> None:
    jb.push(seq % 65536, (seq * FS if ts is None else ts) % 2**32, pkt(seq % 65536), now)


# Examples ------------------------------------------------------------------------------------
def test_in_order_packets_go_out_at_once() -> None:
    jb = JitterBuffer()
    for i in range(5):
        push(jb, 100 + i, i * 0.02)
        [frame] = jb.pop(i * 0.02)
        assert frame == JitterFrame(100 + i, (100 + i) * FS, pkt(100 + i), None)
        assert jb.deadline() is None
    assert len(jb) == 0
    assert jb.counters["received"] == 5


def test_reordered_packets_come_out_in_order() -> None:
    jb = JitterBuffer()
    push(jb, 1, 0.0)
    assert seqs(jb.pop(0.0)) == [1]
    push(jb, 3, 0.01)
    assert jb.pop(0.01) == []
    assert jb.deadline() == pytest.approx(0.05)
    push(jb, 2, 0.02)
    assert seqs(jb.pop(0.02)) == [2, 3]
    assert jb.counters["lost"] == 0


def test_gap_released_as_lost_after_the_wait_with_fec_source() -> None:
    jb = JitterBuffer(wait=0.04)
    push(jb, 1, 0.0)
    jb.pop(0.0)
    push(jb, 3, 0.1)
    assert jb.pop(0.1399) == []
    frames = jb.pop(0.14)
    assert frames == [JitterFrame(2, 2 * FS, None, pkt(3)), JitterFrame(3, 3 * FS, pkt(3), None)]
    assert jb.counters["lost"] == 1
    assert jb.deadline() is None


def test_wait_counts_from_the_earliest_arrival_beyond_the_gap() -> None:
    jb = JitterBuffer(wait=0.04)
    push(jb, 1, 0.0)
    jb.pop(0.0)
    push(jb, 4, 0.0)
    push(jb, 3, 0.03)
    assert jb.deadline() == pytest.approx(0.04)
    frames = jb.pop(0.04)
    assert [(f.seq, f.payload, f.following) for f in frames] == [
        (2, None, pkt(3)),
        (3, pkt(3), None),
        (4, pkt(4), None),
    ]


def test_long_gap_conceals_only_its_last_frames() -> None:
    jb = JitterBuffer(max_conceal=10)
    push(jb, 1, 0.0)
    jb.pop(0.0)
    push(jb, 30, 0.5)  # 28 missing: 18 skipped, 10 concealed
    frames = jb.pop(0.6)
    assert seqs(frames) == list(range(20, 31))
    assert all(f.payload is None for f in frames[:-1])
    assert [f.following for f in frames[:-1]] == [None] * 9 + [pkt(30)]
    assert [f.timestamp for f in frames[:-1]] == [s * FS for s in range(20, 30)]
    assert jb.counters["skipped"] == 18
    assert jb.counters["lost"] == 10


def test_late_and_duplicate_packets_are_dropped_and_counted() -> None:
    jb = JitterBuffer()
    push(jb, 10, 0.0)
    push(jb, 12, 0.0)
    push(jb, 12, 0.001)
    assert jb.counters["duplicates"] == 1
    assert seqs(jb.pop(0.0)) == [10]
    push(jb, 9, 0.002)
    assert jb.counters["late"] == 1
    assert seqs(jb.pop(1.0)) == [11, 12]
    push(jb, 11, 1.0)  # came after its slot was concealed
    assert jb.counters["late"] == 2
    assert len(jb) == 0


def test_wraparound_keeps_extending() -> None:
    jb = JitterBuffer()
    out = []
    for i, seq in enumerate([65533, 65535, 65534, 0, 2, 1]):
        jb.push(seq, 0, pkt(seq), i * 0.01)
        out += jb.pop(i * 0.01)
    assert seqs(out) == [65533, 65534, 65535, 65536, 65537, 65538]
    assert [f.payload for f in out][-3:] == [pkt(0), pkt(1), pkt(2)]


def test_far_ahead_packet_resyncs_and_flushes() -> None:
    jb = JitterBuffer(max_packets=50)
    push(jb, 1, 0.0)
    jb.pop(0.0)
    push(jb, 3, 0.0)  # waits on the gap at 2
    push(jb, 52, 0.01)  # 51 ahead of the expected 2: resync
    assert jb.counters["resyncs"] == 1
    assert jb.counters["flushed"] == 1
    assert seqs(jb.pop(0.01)) == [52]
    push(jb, 53, 0.02)
    assert seqs(jb.pop(0.02)) == [53]


def test_numbering_restarted_lower_resyncs_on_two_consecutive_packets() -> None:
    jb = JitterBuffer()
    push(jb, 5000, 0.0)
    jb.pop(0.0)
    push(jb, 100, 0.02)  # one stray old packet: only late
    assert jb.counters["late"] == 1 and jb.counters["resyncs"] == 0
    push(jb, 101, 0.04)  # the next one confirms: the sender restarted
    assert jb.counters["resyncs"] == 1
    push(jb, 102, 0.06)
    frames = jb.pop(0.06)
    assert [f.payload for f in frames] == [pkt(101), pkt(102)]
    assert frames[0].seq > 5000  # extended numbers keep increasing
    assert frames[1].seq == frames[0].seq + 1


def test_never_more_than_max_packets_buffered() -> None:
    for first_missing in (False, True):
        jb = JitterBuffer(max_packets=8)
        push(jb, 0, 0.0)
        if first_missing:
            jb.pop(0.0)  # 0 goes out; 1 never comes
        for seq in range(2, 200):  # never popped
            push(jb, seq, 0.0)
            assert len(jb) <= 8
        assert jb.counters["resyncs"] > 0


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        JitterBuffer().push(65536, 0, b"x", 0.0)
    with pytest.raises(ValueError):
        JitterBuffer(max_packets=0)


# Properties ----------------------------------------------------------------------------------
@dataclass
class Log:
    """What the test saw; checked as it goes and at the end."""

    pending: dict[bytes, float] = field(default_factory=dict)  # accepted, not yet released
    released: list[JitterFrame] = field(default_factory=list)
    lost_checks: list[tuple[int, float, dict[bytes, float]]] = field(default_factory=list)
    flushed_arrivals: list[float] = field(default_factory=list)
    seq_of: dict[bytes, int] = field(default_factory=dict)


def offsets_strategy() -> st.SearchStrategy[list[int]]:
    """Sequence offsets: mostly in order, with reorders, duplicates, losses and jumps."""
    step = st.sampled_from([1] * 12 + [0, 2, 3, -1, -2, -3, 15, -60, 70, 400, 30000])
    return st.lists(step, min_size=1, max_size=120)


operations = st.lists(
    st.tuples(
        st.sampled_from(["push", "push", "push", "pop"]),
        st.floats(0.0, 0.05),  # time advance
        st.floats(-0.05, 0.05),  # arrival time skew (arbitrary arrival times)
    ),
    min_size=1,
    max_size=150,
)


@settings(max_examples=500, deadline=None)
@given(
    start=st.sampled_from([0, 100, 65500, 65530, 65535]),
    steps=offsets_strategy(),
    ops=operations,
    wait=st.sampled_from([0.0, 0.02, 0.04, 0.1]),
    max_packets=st.sampled_from([4, 16, 50]),
    max_conceal=st.sampled_from([0, 1, 3, 10]),
)
def test_any_stream_comes_out_ordered_gapless_and_once(
    start: int,
    steps: list[int],
    ops: list[tuple[str, float, float]],
    wait: float,
    max_packets: int,
    max_conceal: int,
) -> None:
    jb = JitterBuffer(wait=wait, max_packets=max_packets, max_conceal=max_conceal, frame_samples=FS)
    log = Log()
    clock, offset, n = 0.0, 0, 0
    resynced_since_release = False
    queue = list(steps)
    for op, advance, skew in ops:
        clock += advance
        if op == "push" and queue:
            offset += queue.pop(0)
            seq = (start + offset) % 65536
            payload = b"%d:%d" % (seq, n)  # unique per push: duplicates are told apart
            n += 1
            arrival = clock + skew
            before = dict(jb.counters)
            buffered_before = len(jb)
            jb.push(seq, (start + offset) * FS % 2**32, payload, arrival)
            delta = {k: jb.counters[k] - before[k] for k in before}
            assert delta["received"] == 1
            if delta["resyncs"]:
                assert delta["flushed"] == buffered_before == len(log.pending)
                log.flushed_arrivals += log.pending.values()
                log.pending = {payload: arrival}
                resynced_since_release = True
            elif delta["late"] or delta["duplicates"]:
                assert delta["late"] + delta["duplicates"] == 1
            else:
                log.pending[payload] = arrival
        else:
            resynced_since_release = _pop_and_check(
                jb, clock, log, max_conceal, resynced_since_release
            )
        assert len(jb) == len(log.pending) <= max_packets
    _pop_and_check(jb, clock + 1e6, log, max_conceal, resynced_since_release)
    assert not log.pending and len(jb) == 0 and jb.deadline() is None
    _check_released_when_ready(log, wait)
    total = jb.counters
    assert total["received"] == (
        sum(f.payload is not None for f in log.released)
        + total["late"]
        + total["duplicates"]
        + total["flushed"]
    )
    assert total["lost"] == sum(f.payload is None for f in log.released)


def _pop_and_check(
    jb: JitterBuffer, now: float, log: Log, max_conceal: int, resynced: bool
) -> bool:
    """pop(now) and check what came out; returns whether a resync still awaits its frame."""
    deadline = jb.deadline()
    pending_before = dict(log.pending)
    skipped_before = jb.counters["skipped"]
    frames = jb.pop(now)
    if deadline is None or deadline > now:
        assert all(f.payload is not None for f in frames)  # nothing lost released early
    jumped = 0
    for i, frame in enumerate(frames):
        prev = log.released[-1] if log.released else None
        continuous = prev is not None and not (resynced and i == 0)
        if prev is not None:
            assert frame.seq > prev.seq
        if continuous and frame.seq - prev.seq > 1:  # a skip, then exactly max_conceal lost
            jumped += frame.seq - prev.seq - 1
            run = next(j for j in range(i, len(frames)) if frames[j].payload is not None) - i
            assert run == max_conceal
        if frame.payload is None:
            nxt = frames[i + 1]  # a gap always ends with its packet in the same pop
            assert nxt.seq == frame.seq + 1
            assert frame.following == nxt.payload
            if continuous:
                expected_ts = (prev.timestamp + (frame.seq - prev.seq) * FS) % 2**32
                assert frame.timestamp == expected_ts
            log.lost_checks.append((frame.seq, now, pending_before))
        else:
            assert frame.following is None
            assert log.pending.pop(frame.payload, None) is not None  # released exactly once
            log.seq_of[frame.payload] = frame.seq
        log.released.append(frame)
    _check_gap_runs(frames, max_conceal)
    assert jumped == jb.counters["skipped"] - skipped_before
    after = jb.deadline()
    assert (after is None) == (len(jb) == 0)
    assert after is None or after > now
    return resynced and not frames


def _check_gap_runs(frames: list[JitterFrame], max_conceal: int) -> None:
    run = 0
    for frame in frames:
        run = run + 1 if frame.payload is None else 0
        assert run <= max_conceal


def _check_released_when_ready(log: Log, wait: float) -> None:
    """A lost frame went out only once a packet beyond it had waited `wait`."""
    for seq, now, pending in log.lost_checks:
        beyond = [a for p, a in pending.items() if log.seq_of.get(p, seq + 1) > seq]
        assert beyond and min(beyond) + wait <= now + 1e-9
