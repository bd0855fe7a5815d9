"""Bind and advertise as pure rules: what `relayctl up` advertises by itself (from fake
interface lists), what it refuses, where `relayctl call` gathers and which step it blames.

Nothing here sends a packet; the one process run (`relayctl up --dry-run`) binds nothing.
"""

from __future__ import annotations

import ipaddress
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support.procs import RELAYCTL
from voicerelay.addresses import (
    Interface,
    advertisable,
    check_advertised,
    host_interfaces,
    ipv4_arrives_on_ipv6_sockets,
    parse_advertise,
    plan_addresses,
)
from voicerelay.cli.call_client import failed_step, failure_line, gather_plan, no_route_line
from voicerelay.config import ConfigError

LAPTOP = [
    Interface("lo", True, ("127.0.0.1", "::1")),
    Interface("wlan0", True, ("192.168.1.23", "fe80::1%wlan0", "2001:db8::23", "fd00::23")),
    Interface("docker0", False, ("172.17.0.1",)),  # down: not advertised
    Interface("eth1", True, ("10.0.0.5", "224.0.0.1", "169.254.3.4", "192.168.1.23")),
]


def no_interfaces() -> list[Interface]:
    raise AssertionError("interfaces are only looked at when no address option is given")


# What `relayctl up` advertises by itself -----------------------------------------------------------
def test_up_interfaces_give_their_unicast_addresses_ipv4_first():
    assert advertisable(LAPTOP) == ["192.168.1.23", "10.0.0.5", "2001:db8::23", "fd00::23"]


def test_no_options_keep_signaling_on_loopback_and_advertise_loopback_and_the_interfaces():
    plan = plan_addresses(
        bind=None, relay_bind=None, advertise=None, interfaces=lambda: LAPTOP, dual_stack=True
    )
    assert (plan.http, plan.internal, plan.relay_bind) == ("127.0.0.1", "127.0.0.1", "::")
    assert plan.advertise == ("127.0.0.1", "192.168.1.23", "10.0.0.5", "2001:db8::23", "fd00::23")
    assert plan.detected


def test_without_dual_stack_the_relay_binds_ipv4_and_only_ipv4_is_advertised():
    plan = plan_addresses(
        bind=None, relay_bind=None, advertise=None, interfaces=lambda: LAPTOP, dual_stack=False
    )
    assert plan.relay_bind == "0.0.0.0"
    assert plan.advertise == ("127.0.0.1", "192.168.1.23", "10.0.0.5")


def test_a_host_with_only_loopback_advertises_loopback():
    plan = plan_addresses(
        bind=None, relay_bind=None, advertise=None, interfaces=lambda: LAPTOP[:1], dual_stack=True
    )
    assert plan.advertise == ("127.0.0.1",)


interfaces = st.lists(
    st.builds(
        Interface,
        st.text(min_size=1, max_size=8),
        st.booleans(),
        st.lists(st.ip_addresses().map(str), max_size=4).map(tuple),
    ),
    max_size=5,
)


@given(interfaces)
def test_only_addresses_others_can_send_to_are_ever_advertised(found):
    chosen = advertisable(found)
    assert len(chosen) == len(set(chosen))
    up_addresses = {str(ipaddress.ip_address(a)) for i in found if i.up for a in i.addresses}
    for text in chosen:
        address = ipaddress.ip_address(text)
        assert text in up_addresses
        assert not (address.is_loopback or address.is_link_local or address.is_multicast)
        assert not address.is_unspecified
    versions = [ipaddress.ip_address(a).version for a in chosen]
    assert versions == sorted(versions)  # IPv4 first
    for text in chosen:  # and every one would pass `up --advertise` with a wildcard relay
        assert check_advertised(text, "::") == text


# What it refuses ----------------------------------------------------------------------------------
def test_explicit_addresses_never_look_at_the_interfaces():
    plan = plan_addresses(
        bind="::1", relay_bind=None, advertise=None, interfaces=no_interfaces, dual_stack=True
    )
    assert (plan.http, plan.internal, plan.relay_bind, plan.advertise) == (
        "::1",
        "::1",
        "::1",
        ("::1",),
    )
    assert not plan.detected


def test_a_wildcard_relay_needs_advertise_and_the_refusal_names_this_hosts_addresses():
    with pytest.raises(ConfigError) as refused:
        plan_addresses(
            bind="0.0.0.0",
            relay_bind=None,
            advertise=None,
            interfaces=lambda: LAPTOP,
            dual_stack=True,
        )
    assert str(refused.value) == (
        "the relay binds the wildcard 0.0.0.0, which answers cannot name: list the addresses "
        "clients reach with --advertise (this host has 192.168.1.23, 10.0.0.5, 2001:db8::23, "
        "fd00::23)"
    )


def test_a_wildcard_bind_with_advertise_keeps_the_internal_sockets_on_loopback():
    plan = plan_addresses(
        bind="::",
        relay_bind=None,
        advertise=("192.0.2.10, 2001:db8::10", "192.0.2.10"),
        interfaces=no_interfaces,
        dual_stack=True,
    )
    assert (plan.http, plan.internal, plan.relay_bind) == ("::", "::1", "::")
    assert plan.advertise == ("192.0.2.10", "2001:db8::10")  # in order, once each


@pytest.mark.parametrize(
    ("host", "relay_bind", "says"),
    [
        ("0.0.0.0", "::", "is a wildcard"),
        ("::", None, "is a wildcard"),
        ("ff02::1", None, "is not a unicast address"),
        ("255.255.255.255", None, "is not a unicast address"),
        ("fe80::1", None, "is link-local"),
        ("fe80::1%eth0", None, "is not an IP address"),
        ("host.example", None, "is not an IP address"),
        ("2001:db8::1", "0.0.0.0", "is IPv6 but the relay binds IPv4 0.0.0.0"),
        ("192.0.2.1", "::1", "is IPv4 but the relay binds IPv6 ::1"),
        ("192.0.2.1", "127.0.0.1", "cannot reach the relay bound to loopback 127.0.0.1"),
        ("127.0.0.2", "127.0.0.1", "cannot reach the relay bound to loopback 127.0.0.1"),
        ("127.0.0.1", "192.0.2.1", "is loopback but the relay binds 192.0.2.1"),
    ],
)
def test_unusable_advertised_addresses_are_one_line_naming_the_option(host, relay_bind, says):
    with pytest.raises(ConfigError) as refused:
        check_advertised(host, relay_bind, "--advertise")
    message = str(refused.value)
    assert message.startswith("--advertise ") and says in message and "\n" not in message


@pytest.mark.parametrize(
    ("host", "relay_bind"),
    [
        ("203.0.113.5", "10.0.0.5"),  # a public address NATed to the relay's
        ("127.0.0.1", "::"),
        ("192.0.2.1", "::"),
        ("2001:db8::1", "::"),
        ("192.0.2.1", "0.0.0.0"),
        ("::1", "::1"),
    ],
)
def test_usable_advertised_addresses_pass(host, relay_bind):
    assert check_advertised(host, relay_bind) == host


@given(st.text(max_size=40))
def test_any_text_is_an_address_or_a_config_error(text):
    try:
        parse_advertise(text, "::")
    except ConfigError as exc:
        assert "\n" not in str(exc)


# Where `relayctl call` gathers ---------------------------------------------------------------------
def routes(table: dict[str, str]):
    return lambda host: table.get(host)


def test_loopback_candidates_gather_loopback_and_others_the_routed_interface():
    table = {"127.0.0.1": "127.0.0.1", "::1": "::1", "198.51.100.7": "192.168.1.23"}
    assert gather_plan(["::1", "127.0.0.1"], routes(table)) == ["::1", "127.0.0.1"]
    assert gather_plan(["198.51.100.7", "127.0.0.1"], routes(table)) == [
        "192.168.1.23",
        "127.0.0.1",
    ]


def test_unroutable_candidates_are_skipped_and_a_forced_address_wins():
    assert gather_plan(["2001:db8::1"], routes({})) == []
    assert gather_plan(["2001:db8::1", "10.0.0.1"], routes({"10.0.0.1": "10.0.0.2"})) == [
        "10.0.0.2"
    ]
    assert gather_plan(["127.0.0.1"], routes({}), local_address="::1") == ["::1"]


def test_the_same_source_for_several_candidates_is_gathered_once():
    table = {"192.0.2.1": "192.0.2.99", "192.0.2.2": "192.0.2.99"}
    assert gather_plan(["192.0.2.1", "192.0.2.2"], routes(table)) == ["192.0.2.99"]


# Which step failed -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("ice", "dtls", "step"),
    [
        ("new", "new", "ICE"),
        ("checking", "new", "ICE"),
        ("failed", "new", "ICE"),
        ("completed", "connecting", "DTLS"),
        ("completed", "failed", "DTLS"),
        ("connected", "new", "DTLS"),
        ("completed", "connected", "media"),
    ],
)
def test_the_first_step_not_through_is_blamed(ice, dtls, step):
    assert failed_step(ice, dtls) == step


@pytest.mark.parametrize(
    ("step", "starts", "fix"),
    [
        (
            "ICE",
            "ICE did not connect within 2 s (ICE checking): nothing answered at ",
            "--advertise",
        ),
        ("DTLS", "DTLS did not complete within 2 s although ICE connected", "transceiver's log"),
        ("media", "media: no audio came back within 2 s of connecting", "--app echo"),
    ],
)
def test_each_failure_is_one_line_with_its_fix(step, starts, fix):
    line = failure_line(
        step,
        2.0,
        candidates=[("::1", 3478), ("127.0.0.1", 3478)],
        local=["::1", "127.0.0.1"],
        ice_state="checking",
        dtls_state="failed",
    )
    assert line.startswith(starts) and fix in line and "\n" not in line
    if step == "ICE":
        assert "at [::1]:3478, 127.0.0.1:3478 from ::1, 127.0.0.1;" in line


def test_no_route_at_all_says_ice_cannot_start():
    line = no_route_line([("2001:db8::1", 3478)])
    assert line.startswith("ICE cannot start: no route from this host to the answer's candidates")
    assert "[2001:db8::1]:3478" in line and "--local-address" in line


# `relayctl up --dry-run`: what it would advertise, and nothing started ------------------------------
def test_up_prints_what_it_would_advertise_by_default_without_starting_anything(tmp_path):
    result = subprocess.run(
        [*RELAYCTL, "up", "--dry-run", "--state-dir", str(tmp_path / "state")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    found = advertisable(host_interfaces())
    if not ipv4_arrives_on_ipv6_sockets():
        found = [a for a in found if ":" not in a]
    where = ", ".join(f"[{a}]:3478" if ":" in a else f"{a}:3478" for a in ["127.0.0.1", *found])
    lines = result.stdout.splitlines()
    assert lines[0] == "signaling and the page: http://127.0.0.1:8080/"
    assert lines[2].startswith(f"answers advertise {where} (127.0.0.1 and this host's interface")
    assert lines[3] == "listening beyond loopback: relay UDP"
    assert not (tmp_path / "state").exists()  # nothing was prepared, let alone started


def test_up_dry_run_with_explicit_loopback_listens_nowhere_else(tmp_path):
    result = subprocess.run(
        [*RELAYCTL, "up", "--dry-run", "--bind", "::1", "--https"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.stdout.splitlines() == [
        "signaling and the page: https://[::1]:8080/",
        "relay UDP: [::1]:3478; internal sockets on ::1",
        "answers advertise [::1]:3478",
        "listening beyond loopback: nothing",
    ]


def test_a_relay_started_on_a_wildcard_says_what_transceivers_must_advertise():
    from voicerelay.cli.relay_cmds import wildcard_note

    assert "--relay-public HOST:PORT[,HOST:PORT...]" in wildcard_note("::")
    assert "--relay-public" in wildcard_note("0.0.0.0")
    assert wildcard_note("127.0.0.1") == wildcard_note("::1") == ""


def test_a_transceiver_lists_every_relay_public_address_and_refuses_a_wildcard(tmp_path):
    from voicerelay.cli.transceiver_cmds import transceiver_config

    def config(relay_public: str):
        return transceiver_config(
            "127.0.0.1:0", "127.0.0.1:0", relay_public, tmp_path, None, 0, 30.0, 10
        )

    assert config("[::1]:3478,127.0.0.1:3479").relay_public == (
        ("::1", 3478),
        ("127.0.0.1", 3479),
    )
    assert config("192.0.2.1").relay_public == (("192.0.2.1", 3478),)
    with pytest.raises(ConfigError, match="--relay-public :: is a wildcard"):
        config("[::]:3478")
    with pytest.raises(ConfigError, match="--relay-public is empty"):
        config(",")
