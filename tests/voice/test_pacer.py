"""The pacer: one frame per 20 ms on the media clock, by example and over arbitrary schedules."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voicerelay.voice.pacer import OutFrame, Pacer

RATE, FS = 48000, 960
FD = FS / RATE  # 20 ms
T0 = 5000.0


def audio(n: int, start: int = 0) -> np.ndarray:
    return ((np.arange(start, start + n) % 20000) + 1).astype(np.int16)


def drain(p: Pacer, now: float, late: float = 0.0) -> tuple[list[OutFrame], float]:
    """Pop every queued frame, each at its due time plus `late`."""
    out = []
    while (due := p.next_due()) is not None:
        now = max(now, due + late)
        frame = p.pop_due(now)
        assert frame is not None
        out.append(frame)
    return out, now


# Examples ------------------------------------------------------------------------------------
def test_frames_go_out_one_per_slot_with_continuous_timestamps() -> None:
    p = Pacer()
    p.enqueue(audio(FS * 3), "a", T0)
    assert p.next_due() == T0
    assert p.queued_ms == 60
    first = p.pop_due(T0)
    assert first is not None and first.marker and first.timestamp == 0 and first.item_id == "a"
    assert np.array_equal(first.pcm, audio(FS))
    assert p.pop_due(T0 + 0.019) is None  # not due yet
    second = p.pop_due(T0 + 0.0205)
    assert second is not None and not second.marker and second.timestamp == FS
    assert p.next_due() == pytest.approx(T0 + 0.04)  # timer jitter absorbed
    assert np.array_equal(second.pcm, audio(FS, FS))
    assert p.sent_ms("a") == 40 and p.counters["frames_sent"] == 2


def test_partial_frame_waits_for_more_audio_then_finish_pads_it() -> None:
    p = Pacer()
    p.enqueue(audio(500), "a", T0)
    assert p.next_due() is None and p.queued_ms == 10
    p.enqueue(audio(700, 500), "a", T0 + 0.001)
    frames, now = drain(p, T0)
    assert len(frames) == 1 and np.array_equal(frames[0].pcm, audio(FS))
    p.finish("a")
    [last], _ = drain(p, now)
    assert np.array_equal(last.pcm[:240], audio(240, FS)) and not last.pcm[240:].any()
    assert p.done_items() == [("a", 40)]
    assert p.done_items() == []


def test_a_late_timer_reanchors_instead_of_bursting() -> None:
    p = Pacer()
    p.enqueue(audio(FS * 5), "a", T0)
    p.pop_due(T0)
    late = p.pop_due(T0 + 0.1)  # due at T0+0.02, popped 80 ms late
    assert late is not None and late.timestamp == round(0.1 * RATE)
    assert p.counters["late_slots"] == 1
    assert p.next_due() == pytest.approx(T0 + 0.12)
    assert p.pop_due(T0 + 0.11) is None


def test_pause_advances_the_timestamp_and_sets_the_marker() -> None:
    p = Pacer()
    p.enqueue(audio(FS), "a", T0)
    p.finish("a")
    p.pop_due(T0)
    p.enqueue(audio(FS), "b", T0 + 1.0)
    assert p.next_due() == T0 + 1.0
    frame = p.pop_due(T0 + 1.0)
    assert frame is not None and frame.marker and frame.timestamp == RATE
    assert p.counters["underruns"] == 0  # "a" was finished: that was a pause, not an underrun


def test_audio_just_in_time_continues_the_talkspurt() -> None:
    p = Pacer()
    p.enqueue(audio(FS), "a", T0)
    p.pop_due(T0)
    p.enqueue(audio(FS), "a", T0 + 0.015)  # before the next slot
    assert p.next_due() == pytest.approx(T0 + FD)
    frame = p.pop_due(T0 + FD)
    assert frame is not None and not frame.marker and frame.timestamp == FS
    assert p.counters["underruns"] == 0


def test_slow_backend_counts_an_underrun() -> None:
    p = Pacer()
    p.enqueue(audio(FS), "a", T0)
    p.pop_due(T0)
    p.enqueue(audio(FS), "a", T0 + 0.05)  # the slot at T0+0.02 went by without audio
    frame = p.pop_due(T0 + 0.05)
    assert frame is not None and frame.marker and frame.timestamp == round(0.05 * RATE)
    assert p.counters["underruns"] == 1


def test_clear_drops_everything_and_reports_what_went_out() -> None:
    p = Pacer()
    assert p.clear() == (None, 0)
    p.enqueue(audio(FS * 10 + 5), "a", T0)
    p.pop_due(T0)
    p.pop_due(T0 + FD)
    assert p.clear() == ("a", 40)
    assert p.next_due() is None and p.queued_ms == 0
    assert p.pop_due(T0 + 1) is None
    assert p.clear() == (None, 0)  # nothing went out since
    p.enqueue(audio(FS), "b", T0 + 0.041)  # barge-in over: the next reply starts a talkspurt
    frame = p.pop_due(T0 + 0.041)
    assert frame is not None and frame.marker and frame.timestamp == round(0.041 * RATE)


def test_another_items_audio_pads_the_held_partial() -> None:
    p = Pacer()
    p.enqueue(audio(100), "a", T0)
    p.enqueue(audio(FS), "b", T0)
    frames, _ = drain(p, T0)
    assert [f.item_id for f in frames] == ["a", "b"]
    assert not frames[0].pcm[100:].any()


def test_finishing_an_item_with_nothing_queued_is_done_at_once() -> None:
    p = Pacer()
    p.finish(None)
    assert p.done_items() == [(None, 0)]


def test_queue_is_bounded() -> None:
    p = Pacer(max_queued_s=0.1)  # 5 frames
    p.enqueue(audio(FS * 8), "a", T0)
    assert p.queued_ms == 100 and p.counters["dropped_frames"] == 3


def test_caller_may_reuse_its_array() -> None:
    p = Pacer()
    pcm = audio(FS)
    p.enqueue(pcm, "a", T0)
    pcm[:] = 0
    frame = p.pop_due(T0)
    assert frame is not None and frame.pcm.any()


def test_bad_audio_is_a_value_error() -> None:
    p = Pacer()
    with pytest.raises(ValueError):
        p.enqueue(np.zeros(FS, np.float32), "a", T0)
    with pytest.raises(ValueError):
        p.enqueue(np.zeros((FS, 2), np.int16), "a", T0)


def test_timestamps_wrap_modulo_2_32() -> None:
    p = Pacer()
    p.enqueue(audio(FS), "a", T0)
    p.pop_due(T0)
    p.enqueue(audio(FS), "a", T0 + 90000.0)  # 25 hours later: 4.32e9 samples of clock
    frame = p.pop_due(T0 + 90000.0)
    assert frame is not None and frame.timestamp == (90000 * RATE) % 2**32


# Properties ----------------------------------------------------------------------------------
@dataclass
class Model:
    """Just enough bookkeeping to know what the pacer must hold and report."""

    max_frames: int
    queued: int = 0
    held: int = 0
    held_item: str | None = None
    queued_of: dict[str | None, int] = field(default_factory=dict)
    finished: set[str | None] = field(default_factory=set)
    popped_of: dict[str | None, int] = field(default_factory=dict)
    dropped: int = 0

    def add_frame(self, item: str | None) -> None:
        if self.queued >= self.max_frames:
            self.dropped += 1
            return
        self.queued += 1
        self.queued_of[item] = self.queued_of.get(item, 0) + 1

    def enqueue(self, n: int, item: str | None) -> None:
        if self.held and self.held_item != item:
            self.add_frame(self.held_item)
            self.held = 0
        total = self.held + n
        for _ in range(total // FS):
            self.add_frame(item)
        self.held, self.held_item = total % FS, item

    def finish(self, item: str | None) -> list[tuple[str | None, int]]:
        if self.held and self.held_item == item:
            self.add_frame(item)
            self.held = 0
        if self.queued_of.get(item):
            self.finished.add(item)
            return []
        return [(item, self.popped_of.get(item, 0) * 20)]

    def pop(self, item: str | None) -> list[tuple[str | None, int]]:
        self.queued -= 1
        self.queued_of[item] -= 1
        self.popped_of[item] = self.popped_of.get(item, 0) + 1
        if self.queued_of[item] == 0 and item in self.finished:
            self.finished.discard(item)
            return [(item, self.popped_of[item] * 20)]
        return []

    def clear(self) -> None:
        self.queued = self.held = 0
        self.queued_of.clear()
        self.finished.clear()


items = st.sampled_from(["a", "b", "c", None])
operation = st.one_of(
    st.tuples(st.just("enqueue"), st.integers(0, FS * 6), items, st.floats(0, 0.2)),
    st.tuples(st.just("finish"), items),
    st.tuples(st.just("clear"), st.floats(0, 0.05)),
    st.tuples(st.just("pop"), st.floats(0, 0.05), st.booleans()),  # lateness, on time or early
    st.tuples(st.just("pop"), st.floats(0, 0.002), st.just(True)),
)


@settings(max_examples=500, deadline=None)
@given(
    ops=st.lists(operation, min_size=1, max_size=120),
    max_queued_s=st.sampled_from([300.0, 0.1]),
)
def test_any_schedule_is_paced(ops: list[tuple], max_queued_s: float) -> None:
    p = Pacer(rate=RATE, frame_samples=FS, max_queued_s=max_queued_s)
    model = Model(max_frames=p.max_frames)
    clock = T0
    popped: list[tuple[float, OutFrame]] = []
    first_slot: float | None = None
    last_due = -math.inf
    fresh = True  # the next frame starts a talkspurt (first ever or after clear)
    t0: float | None = None  # the media clock's start: the first enqueue
    stamp = 0  # the last frame's timestamp, unwrapped
    done: list[tuple[str | None, int]] = []
    for op in ops:
        kind = op[0]
        if kind == "enqueue":
            clock += op[3]
            t0 = clock if t0 is None else t0
            p.enqueue(audio(op[1]), op[2], clock)
            model.enqueue(op[1], op[2])
        elif kind == "finish":
            p.finish(op[1])
            done += model.finish(op[1])
        elif kind == "clear":
            clock += op[1]
            p.clear()
            model.clear()
            fresh = True
            assert p.next_due() is None and p.queued_ms == 0 and p.pop_due(clock) is None
        else:
            due = p.next_due()
            if due is not None:
                assert due >= last_due  # due times never go backwards
                last_due = due
            if due is not None and op[2]:
                clock = max(clock, due + op[1])
            else:
                clock += op[1]
            frame = p.pop_due(clock)
            if due is None or clock < due:
                assert frame is None
            else:
                assert frame is not None
                if first_slot is None:
                    first_slot = due
                assert frame.marker or not fresh
                fresh = False
                assert t0 is not None
                if popped:  # the timestamp follows the media clock: from its due time to now
                    previous = stamp
                    stamp += (frame.timestamp - popped[-1][1].timestamp) % 2**32
                    assert stamp >= round((due - t0) * RATE)
                    assert stamp <= max(round((clock - t0) * RATE), previous + FS)
                else:
                    stamp = frame.timestamp
                    assert round((due - t0) * RATE) <= stamp <= round((clock - t0) * RATE)
                popped.append((clock, frame))
                done += model.pop(frame.item_id)
                # no burst: the k-th frame cannot go out before k-1 frame durations passed
                assert len(popped) <= math.floor((clock - first_slot) / FD + 1e-6) + 1
        assert p.queued_ms == (model.queued * FS + model.held) * 1000 // RATE
        assert (p.next_due() is None) == (model.queued == 0)
        assert p.counters["dropped_frames"] == model.dropped
        reported = p.done_items()
        assert reported == done
        done = []
    for (_, a), (_, b) in zip(popped, popped[1:], strict=False):
        step = (b.timestamp - a.timestamp) % 2**32
        assert FS <= step < 2**31
    for (t1, _), (t3, _) in zip(popped, popped[2:], strict=False):
        assert t3 - t1 >= FD - 1e-9  # never three frames within one frame duration
    for item, count in model.popped_of.items():
        assert p.sent_ms(item) == count * 20
    assert all(f.pcm.shape == (FS,) and f.pcm.dtype == np.int16 for _, f in popped)
    assert p.counters["frames_sent"] == len(popped)
