"""The global hop's signaling side: the answer advertises the edge ingress a request names."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web

from voicerelay.cli.transceiver_cmds import parse_ingress
from voicerelay.config import ConfigError
from voicerelay.transceiver import sdp
from voicerelay.transceiver.certificate import Certificate
from voicerelay.transceiver.client import OPUS_PT
from voicerelay.transceiver.config import TransceiverConfig
from voicerelay.transceiver.server import TransceiverServer
from voicerelay.transceiver.signaling import INGRESS_HEADER, make_app
from voicerelay.wire.token import TokenKeys

EDGE = ("192.0.2.7", 3478)


def _config(tmp_path) -> TransceiverConfig:
    return TransceiverConfig(
        internal=("127.0.0.1", 0),
        http=("127.0.0.1", 0),
        state_dir=tmp_path,
        ingresses=(("eu", EDGE),),
    )


def _offer() -> str:
    return sdp.build_offer(
        ice_ufrag="abcd",
        ice_pwd="p" * 22,
        fingerprint=Certificate.generate().fingerprint,
        ssrc=1,
        cname="c",
        opus_pt=OPUS_PT,
    )


def test_a_named_ingress_is_advertised_and_anything_else_gets_the_default(tmp_path):
    config = _config(tmp_path)
    assert config.advertised("eu") == (EDGE,)
    assert config.advertised("us") == config.relay_public == (("127.0.0.1", 3478),)
    assert config.advertised(None) == config.relay_public


def test_ingress_entries_are_checked(tmp_path):
    assert parse_ingress("eu=192.0.2.7:3478") == ("eu", EDGE)
    for bad in ("192.0.2.7:3478", "=192.0.2.7:1", "eu=0.0.0.0:3478", "eu=host:1"):
        with pytest.raises(ConfigError):
            TransceiverConfig(state_dir=tmp_path, ingresses=(parse_ingress(bad),))


async def test_signaling_answers_with_the_ingress_the_header_names(tmp_path):
    server = TransceiverServer(_config(tmp_path), TokenKeys({1: bytes(32)}, 1))
    await server.start()
    runner = web.AppRunner(make_app(server))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1/sessions"  # type: ignore[union-attr]
    try:
        async with aiohttp.ClientSession() as http:
            for header, expected in ((None, ("127.0.0.1", 3478)), ("eu", EDGE)):
                headers = {"Content-Type": "application/sdp"}
                if header:
                    headers[INGRESS_HEADER] = header
                async with http.post(url, data=_offer(), headers=headers) as resp:
                    assert resp.status == 201
                    assert sdp.parse_answer(await resp.text()).candidates == [expected]
    finally:
        server.close()
        await runner.cleanup()
