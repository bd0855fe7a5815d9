"""Transceiver metrics and readiness: gauges and counters read at scrape time, histograms
observed on call events (secure, closed, the agent's reply), drain state; and the turn timer's
state machine as a property."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from tests.transceiver.test_server import Caller, connected, new_server, run
from voicerelay import metrics
from voicerelay.transceiver.config import TransceiverConfig
from voicerelay.transceiver.server import Draining, SessionLimit, TurnTimedFeed


def scrape(server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.render(server.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_a_call_is_counted_from_offer_to_close():
    async def body():
        server = new_server()
        caller = connected(server)
        caller.talk(5)
        during = scrape(server)
        server.delete_session(caller.call_id)
        return during, scrape(server)

    during, after = run(body)
    assert during["voicerelay_transceiver_sessions", (("state", "secure"),)] == 1
    assert during["voicerelay_transceiver_sessions_created_total", ()] == 1
    assert during["voicerelay_transceiver_setup_seconds_count", ()] == 1
    assert 0 < during["voicerelay_transceiver_setup_seconds_sum", ()] < 5
    assert during["voicerelay_transceiver_jitter_seconds_count", ()] == 0  # only closed calls
    assert during["voicerelay_transceiver_draining", ()] == 0
    assert ("voicerelay_transceiver_sessions", (("state", "secure"),)) not in after
    assert after["voicerelay_transceiver_sessions_closed_total", (("reason", "deleted"),)] == 1
    assert after["voicerelay_transceiver_jitter_seconds_count", ()] == 1
    assert after["voicerelay_transceiver_rtp_lost_total", ()] == 0


def test_a_call_that_never_connected_reports_no_jitter():
    async def body():
        server = new_server()
        caller = connected(server)
        server.delete_session(caller.call_id)  # secure, but no RTP ever received
        return scrape(server)

    got = run(body)
    assert got["voicerelay_transceiver_jitter_seconds_count", ()] == 0
    assert got["voicerelay_transceiver_rtt_seconds_count", ()] == 0


def test_draining_refuses_new_sessions_and_signals_the_last_call_end():
    async def body():
        server = new_server()
        caller = connected(server)
        drained = server.drain()
        assert server.not_ready() == "draining"
        assert scrape(server)["voicerelay_transceiver_draining", ()] == 1
        with pytest.raises(Draining):
            connected(server, 50001)
        assert not drained.is_set()  # the call in progress goes on
        caller.talk(3)
        assert len(caller.echoes) == 3
        server.delete_session(caller.call_id)
        return drained.is_set()

    assert run(body)


def test_draining_closes_sessions_not_yet_secure():
    async def body():
        server = new_server()
        secure = connected(server)
        pending = Caller(server, 50001)  # answered, but no check or handshake yet
        drained = server.drain()
        gone = pending.call_id not in server.calls
        server.delete_session(secure.call_id)
        return gone, drained.is_set(), scrape(server)

    gone, drained, got = run(body)
    assert gone and drained
    assert got["voicerelay_transceiver_sessions_closed_total", (("reason", "draining"),)] == 1
    assert got["voicerelay_transceiver_sessions_closed_total", (("reason", "deleted"),)] == 1


def test_an_idle_server_is_drained_at_once_and_a_full_one_is_not_ready():
    async def body():
        from voicerelay.transceiver.certificate import Certificate
        from voicerelay.transceiver.server import TransceiverServer
        from voicerelay.wire.token import TokenKeys

        full = TransceiverServer(
            TransceiverConfig(max_sessions=1), TokenKeys({0: bytes(32)}, 0), Certificate.generate()
        )
        full.connection_made(new_server().transport)
        assert full.not_ready() is None
        connected(full)
        assert full.not_ready() == "full"
        with pytest.raises(SessionLimit):
            connected(full, 50001)
        return new_server().drain().is_set()

    assert run(body)


# The turn timer ---------------------------------------------------------------------------
events = st.lists(
    st.tuples(
        st.sampled_from(["user.turn_ended", "agent.speaking", "agent.done", "user.transcript"]),
        st.floats(0, 5),
    ),
    max_size=30,
)


@given(events)
def test_each_turn_is_timed_once_to_the_agents_first_reply(steps):
    observed: list[float] = []
    feed = TurnTimedFeed(0.0, observed.append)
    now, expected, turn_end = 0.0, [], None
    for kind, dt in steps:
        now += dt
        feed.publish(kind, now)
        if kind == "user.turn_ended":
            turn_end = now
        elif kind == "agent.speaking" and turn_end is not None:
            expected.append(now - turn_end)
            turn_end = None
    assert observed == pytest.approx(expected)
    assert all(v >= 0 for v in observed)


@given(
    st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
    st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
)
def test_only_measured_jitter_and_rtt_are_observed(jitter, rtt):
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    histograms = metrics.CallHistograms(registry)
    histograms.call_closed(jitter, rtt)

    def count(name: str) -> float:
        return registry.get_sample_value(f"voicerelay_transceiver_{name}_seconds_count")

    def measured(v: float | None) -> bool:
        return v is not None and v >= 0 and v != float("inf") and v == v

    assert count("jitter") == measured(jitter)
    assert count("rtt") == measured(rtt)
