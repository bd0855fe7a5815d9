"""Turn timing from played and received signals: synthetic speech with known segments."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from voicerelay.cli.turns import (
    MERGE_GAP_S,
    MIN_SEGMENT_S,
    RATE,
    Segment,
    analyse_turns,
    dbfs,
    find_segments,
    pair_turns,
    window_dbfs,
)

TOLERANCE_S = 0.030


def _render(
    segments: list[tuple[float, float]],
    length_s: float,
    seed: int,
    level_dbfs: float = -18.0,
    noise_dbfs: float = -75.0,
) -> np.ndarray:
    """A signal of `length_s` seconds: a low noise floor, and speech-like sound (a wobbling
    tone plus noise, at about `level_dbfs`) over each (start, end) in seconds."""
    rng = np.random.default_rng(seed)
    n = round(length_s * RATE)
    signal = rng.normal(0, 32768 * 10 ** (noise_dbfs / 20), n)
    amplitude = 32768 * 10 ** (level_dbfs / 20)
    for start, end in segments:
        a, b = round(start * RATE), round(end * RATE)
        t = np.arange(b - a) / RATE
        freq = rng.uniform(120, 400)
        voiced = np.sin(2 * np.pi * freq * t + 3 * np.sin(2 * np.pi * 4 * t))
        signal[a:b] += amplitude * (0.9 * voiced + 0.3 * rng.normal(0, 1, b - a))
    return np.clip(np.round(signal), -32768, 32767).astype(np.int16)


# Segments far enough apart not to merge and long enough not to be blips.
layouts = st.lists(
    st.tuples(st.floats(0.35, 1.5), st.floats(0.13, 1.2)), min_size=1, max_size=4
).map(
    lambda pairs: [
        (sum(g + d for g, d in pairs[:i]) + pairs[i][0], sum(g + d for g, d in pairs[: i + 1]))
        for i in range(len(pairs))
    ]
)


@settings(max_examples=40, deadline=None)
@given(layouts, st.integers(0, 2**32 - 1), st.floats(-32, -6))
def test_known_segments_are_found_within_30_ms(layout, seed, level):
    signal = _render(layout, layout[-1][1] + 0.4, seed, level)
    found = find_segments(signal)
    assert len(found) == len(layout), (found, layout)
    for seg, (start, end) in zip(found, layout, strict=True):
        assert abs(seg.start_s - start) <= TOLERANCE_S, (seg, start)
        assert abs(seg.end_s - end) <= TOLERANCE_S, (seg, end)


@settings(max_examples=30, deadline=None)
@given(st.floats(0.2, 1.0), st.floats(0.02, 0.27), st.floats(0.2, 1.0), st.integers(0, 2**32 - 1))
def test_gaps_under_300_ms_are_merged(first, gap, second, seed):
    layout = [(0.3, 0.3 + first), (0.3 + first + gap, 0.3 + first + gap + second)]
    found = find_segments(_render(layout, layout[-1][1] + 0.3, seed))
    assert len(found) == 1, found
    assert abs(found[0].start_s - layout[0][0]) <= TOLERANCE_S
    assert abs(found[0].end_s - layout[1][1]) <= TOLERANCE_S


@pytest.mark.parametrize(("gap", "segments"), [(0.27, 1), (0.28, 1), (0.32, 2), (0.34, 2)])
def test_the_merge_boundary_is_300_ms(gap, segments):
    layout = [(0.3, 0.8), (0.8 + gap, 1.4 + gap)]
    assert len(find_segments(_render(layout, 2.0, 11))) == segments


@settings(max_examples=30, deadline=None)
@given(st.floats(0.005, 0.07), st.floats(0.4, 1.0), st.integers(0, 2**32 - 1))
def test_isolated_blips_under_100_ms_are_ignored(blip, speech, seed):
    layout = [(0.2, 0.2 + blip), (0.2 + blip + 0.6, 0.2 + blip + 0.6 + speech)]
    found = find_segments(_render(layout, layout[-1][1] + 0.3, seed))
    assert len(found) == 1 and abs(found[0].start_s - layout[1][0]) <= TOLERANCE_S, found


def test_silence_and_quiet_noise_have_no_segments():
    assert find_segments(np.zeros(RATE, np.int16)) == []
    assert find_segments(_render([], 2.0, 1, noise_dbfs=-60)) == []
    assert find_segments(np.zeros(0, np.int16)) == []


def test_hysteresis_keeps_a_fading_tail_and_ignores_a_murmur():
    """A word that fades to between the thresholds stays one segment to its end; sound that
    never reaches the start threshold is no speech at all."""
    t = np.arange(RATE) / RATE
    loud = 32768 * 10 ** (-20 / 20) * np.sin(2 * np.pi * 200 * t[: RATE // 2])
    fading = 32768 * 10 ** (-45 / 20) * np.sin(2 * np.pi * 200 * t[: RATE // 2]) * np.sqrt(2)
    signal = np.concatenate([loud, fading, np.zeros(RATE // 2)]).astype(np.int16)
    [seg] = find_segments(signal)
    assert seg.start_s == 0.0 and abs(seg.end_s - 1.0) <= 0.011
    assert find_segments(fading.astype(np.int16)) == []


@settings(max_examples=200, deadline=None)
@given(
    hnp.arrays(np.int16, st.integers(0, 6000)),
    st.sampled_from([1, 100, 8000, 16000, 48000]),
)
def test_arbitrary_int16_never_raises_and_segments_are_well_formed(signal, rate):
    found = find_segments(signal, rate)
    length = signal.size / rate
    for seg in found:
        assert 0 <= seg.start_s < seg.end_s <= length + 1e-9
        assert seg.duration_s >= MIN_SEGMENT_S
    for a, b in zip(found, found[1:], strict=False):
        assert b.start_s - a.end_s >= MERGE_GAP_S
    analysis = analyse_turns(signal, signal[::-1].copy(), rate)
    assert len(analysis.turns) == len(analysis.spoken)


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(np.float64, st.integers(0, 3000), elements=st.floats(allow_nan=True)))
def test_arbitrary_floats_never_raise(signal):
    for seg in find_segments(signal, 8000):
        assert seg.start_s < seg.end_s
    assert np.all(window_dbfs(signal, 8000) <= 0.01)
    assert dbfs(signal) <= 0.01


def _sorted_segments(draw_from: st.DataObject, count: int) -> list[Segment]:
    edges = sorted(set(draw_from.draw(st.lists(st.integers(0, 10_000), min_size=2 * count))))
    edges = edges[: len(edges) // 2 * 2]
    return [Segment(a / 1000, b / 1000) for a, b in zip(edges[::2], edges[1::2], strict=True)]


@settings(max_examples=300, deadline=None)
@given(st.data(), st.integers(0, 6), st.integers(0, 6))
def test_each_spoken_segment_gets_its_first_reply(data, n_spoken, n_replies):
    spoken = _sorted_segments(data, n_spoken)
    replies = _sorted_segments(data, n_replies)
    turns = pair_turns(spoken, replies)
    assert [(t.spoke_from_s, t.spoke_to_s) for t in turns] == [(s.start_s, s.end_s) for s in spoken]
    for i, turn in enumerate(turns):
        until = spoken[i + 1].start_s if i + 1 < len(spoken) else float("inf")
        candidates = [r for r in replies if turn.spoke_from_s <= r.start_s < until]
        waited = [r for r in candidates if r.start_s >= turn.spoke_to_s]
        if turn.reply_from_s is None:
            assert candidates == [] and turn.response_ms is None
            continue
        assert turn.spoke_from_s <= turn.reply_from_s < until
        assert turn.response_ms == (turn.reply_from_s - turn.spoke_to_s) * 1000
        assert turn.overlap == (turn.reply_from_s < turn.spoke_to_s)
        if waited:  # a reply after the person stopped wins over one that overlapped
            assert turn.reply_from_s == waited[0].start_s and not turn.overlap
        else:
            assert turn.reply_from_s == candidates[0].start_s and turn.overlap


def test_an_agent_that_waits_then_answers():
    played = _render([(0.5, 1.5), (4.0, 4.8)], 7.0, 3)
    received = _render([(2.34, 3.5), (5.5, 6.2)], 7.0, 4, level_dbfs=-24)
    analysis = analyse_turns(played, received)
    assert [round(t.response_ms / 10) * 10 for t in analysis.turns] == [840, 700]
    assert not any(t.overlap for t in analysis.turns) and analysis.overlaps == ()
    assert abs(analysis.median_response_ms - 770) <= 30


def test_an_echo_overlaps_and_a_barge_in_is_listed():
    played = _render([(0.5, 1.5)], 3.0, 5)
    echo = _render([(0.56, 1.56)], 3.0, 6)
    [turn] = analyse_turns(played, echo).turns
    assert turn.overlap and abs(turn.reply_from_s - 0.56) <= TOLERANCE_S
    assert abs(turn.response_ms + 940) <= 2 * TOLERANCE_S * 1000
    assert analyse_turns(played, echo).median_response_ms is None
    # The far end talks over the person, then answers properly: the answer is the reply.
    both = _render([(1.0, 1.3), (2.0, 2.8)], 3.0, 7)
    analysis = analyse_turns(played, both)
    [turn] = analysis.turns
    assert not turn.overlap and abs(turn.response_ms - 500) <= 30
    assert [round(s.start_s, 1) for s in analysis.overlaps] == [1.0]


def test_a_reply_before_the_person_speaks_is_no_ones_turn():
    played = _render([(2.0, 3.0)], 4.0, 8)
    greeting = _render([(0.2, 1.2)], 4.0, 9)
    analysis = analyse_turns(played, greeting)
    assert len(analysis.replies) == 1
    assert analysis.turns[0].reply_from_s is None
