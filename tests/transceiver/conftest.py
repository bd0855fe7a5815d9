"""A client-role Session wired back-to-back to a server-role Session, on a fake clock."""

from __future__ import annotations

import pytest

from voicerelay.transceiver.apps import EchoApp
from voicerelay.transceiver.certificate import Certificate
from voicerelay.transceiver.session import Session, SessionConfig

SERVER = ("192.0.2.1", 3478)
CLIENT = ("198.51.100.2", 50000)


class Pair:
    """Moves datagrams between the two sessions; `drop` filters what is lost on the way."""

    def __init__(
        self,
        config: SessionConfig | None = None,
        *,
        server_dtls: str = "server",
        lie_about_fingerprint: bool = False,
    ) -> None:
        self.client_cert, self.server_cert = Certificate.generate(), Certificate.generate()
        self.now = 0.0
        cfg = config or SessionConfig()
        advertised = (
            Certificate.generate().fingerprint
            if lie_about_fingerprint
            else self.client_cert.fingerprint
        )
        self.server = Session(
            ice_role="lite",
            local_ufrag="SRVR",
            local_pwd="s" * 22,
            remote_ufrag="CLNT",
            remote_pwd="c" * 22,
            dtls_role=server_dtls,
            certificate=self.server_cert,
            remote_fingerprint=advertised,
            now=0.0,
            app=EchoApp(4242),
            config=cfg,
            ssrc=4242,
        )
        self.client = Session(
            ice_role="controlling",
            local_ufrag="CLNT",
            local_pwd="c" * 22,
            remote_ufrag="SRVR",
            remote_pwd="s" * 22,
            dtls_role="client" if server_dtls == "server" else "server",
            certificate=self.client_cert,
            remote_fingerprint=self.server_cert.fingerprint,
            now=0.0,
            config=cfg,
            remote_addr=SERVER,
            ssrc=1111,
        )
        self.drop = lambda data, to_server: False
        self.client_events: list = []
        self.server_events: list = []
        self.sizes: list[int] = []

    def step(self, dt: float = 0.01) -> None:
        self.now += dt
        for data, addr in self.client.datagrams_to_send():
            assert addr == SERVER
            self.sizes.append(len(data))
            if not self.drop(data, True):
                self.server.receive(data, CLIENT, self.now)
        for data, addr in self.server.datagrams_to_send():
            assert addr == CLIENT
            self.sizes.append(len(data))
            if not self.drop(data, False):
                self.client.receive(data, SERVER, self.now)
        for session in (self.client, self.server):
            when = session.next_timer()
            if when is not None and when <= self.now:
                session.handle_timer(self.now)
        self.client_events += self.client.events()
        self.server_events += self.server.events()

    def run_until(self, predicate, seconds: float = 5.0, dt: float = 0.01) -> None:
        end = self.now + seconds
        while not predicate():
            assert self.now < end, "condition not reached on the fake clock"
            self.step(dt)


@pytest.fixture
def pair():
    return Pair()
