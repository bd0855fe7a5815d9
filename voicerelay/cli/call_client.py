"""A command-line WebRTC client (aiortc): place one call, play a tone, check it comes back.

`place_call(url, tone_hz, seconds)` posts an offer to `<url>/v1/sessions`, sends a sine tone,
records what the server sends back, finds its strongest frequency with an FFT (and how much of
the energy is that tone), notes how long the audio kept coming and what RTCP both sides
reported, and hangs up.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np

SAMPLE_RATE = 48000
FRAME_SAMPLES = 960  # 20 ms


def loopback_only_ice() -> None:
    """Make aioice gather only 127.0.0.1 (it skips loopback by default)."""
    import aioice.ice

    aioice.ice.get_host_addresses = lambda use_ipv4=True, use_ipv6=False: ["127.0.0.1"]


def dominant_frequency(samples: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    """The frequency (Hz) with the most energy in a mono signal."""
    if samples.size < 256:
        return 0.0
    window = np.hanning(samples.size)
    spectrum = np.abs(np.fft.rfft((samples - samples.mean()) * window))
    spectrum[0] = 0.0
    return float(np.fft.rfftfreq(samples.size, 1.0 / rate)[int(np.argmax(spectrum))])


def tone_purity(
    samples: np.ndarray, freq: float, rate: int = SAMPLE_RATE, band: float = 25.0
) -> float:
    """The share of a signal's energy (DC excluded) within `band` Hz of `freq`: ~1.0 for a
    clean tone, low when other sounds (another call's tone, noise) are mixed in."""
    if samples.size < 256:
        return 0.0
    window = np.hanning(samples.size)
    power = np.abs(np.fft.rfft((samples - samples.mean()) * window)) ** 2
    power[0] = 0.0
    total = float(power.sum())
    if total <= 0.0:
        return 0.0
    freqs = np.fft.rfftfreq(samples.size, 1.0 / rate)
    return float(power[np.abs(freqs - freq) <= band].sum() / total)


@dataclass
class CallReport:
    url: str
    tone_hz: float
    connected: bool = False
    received_hz: float | None = None
    purity: float | None = None  # share of the echoed energy that is our tone
    setup_ms: float | None = None  # offer posted -> first echoed audio
    frames_received: int = 0
    audio_seconds: float = 0.0  # how much echoed audio came back
    max_frame_gap_ms: float | None = None  # longest wait between echoed frames, after the first
    error: str | None = None
    session_url: str | None = None
    offer_sdp: str | None = None
    answer_sdp: str | None = None
    stats: dict = field(default_factory=dict)  # delete_status, client (aiortc), server (JSON)

    @property
    def tone_came_back(self) -> bool:
        return self.received_hz is not None and abs(self.received_hz - self.tone_hz) <= 10.0


def _tone_track(freq: float):
    from aiortc.mediastreams import MediaStreamTrack
    from av import AudioFrame

    class ToneTrack(MediaStreamTrack):
        kind = "audio"

        def __init__(self) -> None:
            super().__init__()
            self._pts = 0
            self._start: float | None = None

        async def recv(self) -> AudioFrame:
            if self._start is None:
                self._start = time.monotonic()
            due = self._start + self._pts / SAMPLE_RATE
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            t = (np.arange(FRAME_SAMPLES) + self._pts) / SAMPLE_RATE
            pcm = (0.5 * 32767 * np.sin(2 * np.pi * freq * t)).astype(np.int16)
            frame = AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate = SAMPLE_RATE
            frame.pts = self._pts
            frame.time_base = fractions.Fraction(1, SAMPLE_RATE)
            self._pts += FRAME_SAMPLES
            return frame

    return ToneTrack()


async def _client_rtcp_stats(pc: Any) -> dict[str, Any]:
    """What aiortc learnt from the server's RTCP: loss and RTT of our audio, as reported back."""
    out: dict[str, Any] = {}
    for stat in (await pc.getStats()).values():
        if stat.type == "remote-inbound-rtp":
            out["remote_inbound"] = {
                "packets_lost": stat.packetsLost,
                "fraction_lost": stat.fractionLost,
                "round_trip_time": stat.roundTripTime,
            }
        elif stat.type == "inbound-rtp":
            out["inbound"] = {"packets_received": stat.packetsReceived, "lost": stat.packetsLost}
        elif stat.type == "outbound-rtp":
            out["outbound"] = {"packets_sent": stat.packetsSent}
    return out


async def place_call(
    url: str,
    tone_hz: float = 440.0,
    seconds: float = 2.0,
    timeout: float = 10.0,
    *,
    audio_started: asyncio.Future[CallReport] | None = None,
) -> CallReport:
    """One call against the signaling at `url`; never raises for call failures.

    `audio_started`, if given, gets the (unfinished) report once the first echoed audio
    arrives, offer and answer filled in: a caller can act while the call is in progress.
    """
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

    loopback_only_ice()
    report = CallReport(url=url, tone_hz=tone_hz)
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTrack(_tone_track(tone_hz))
    received: list[np.ndarray] = []
    arrivals: list[float] = []
    first_audio = asyncio.get_running_loop().create_future()

    @pc.on("track")
    def on_track(track) -> None:
        async def pump() -> None:
            with contextlib.suppress(Exception):
                while True:
                    frame = await track.recv()
                    pcm = frame.to_ndarray().astype(np.float64)
                    if frame.layout.name != "mono":
                        pcm = pcm.reshape(-1, len(frame.layout.channels)).mean(axis=1)
                    pcm = pcm.reshape(-1)
                    now = time.monotonic()
                    if not first_audio.done() and np.abs(pcm).max() > 100:
                        first_audio.set_result(now)
                    if first_audio.done():
                        received.append(pcm)
                        arrivals.append(now)

        asyncio.ensure_future(pump())

    session_url = None
    try:
        async with aiohttp.ClientSession() as http:
            await pc.setLocalDescription(await pc.createOffer())
            report.offer_sdp = pc.localDescription.sdp
            posted = time.monotonic()
            async with http.post(
                url.rstrip("/") + "/v1/sessions",
                data=pc.localDescription.sdp,
                headers={"Content-Type": "application/sdp"},
            ) as resp:
                body = await resp.text()
                if resp.status != 201:
                    report.error = f"signaling answered {resp.status}: {body.strip()}"
                    return report
                session_url = str(resp.url.join(aiohttp.client.URL(resp.headers["Location"])))
                report.session_url = session_url
                report.answer_sdp = body
            await pc.setRemoteDescription(RTCSessionDescription(sdp=body, type="answer"))
            try:
                arrived = await asyncio.wait_for(first_audio, timeout)
            except TimeoutError:
                report.error = (
                    f"no audio came back within {timeout:g} s (state {pc.connectionState})"
                )
                return report
            report.connected = True
            report.setup_ms = (arrived - posted) * 1000
            if audio_started is not None and not audio_started.done():
                audio_started.set_result(report)
            await asyncio.sleep(seconds)
            audio = np.concatenate(received[len(received) // 4 :]) if received else np.zeros(0)
            report.frames_received = len(received)
            report.audio_seconds = sum(p.size for p in received) / SAMPLE_RATE
            ticks = [arrived, *arrivals, time.monotonic()]  # silence at either end counts too
            report.max_frame_gap_ms = (
                max(b - a for a, b in zip(ticks, ticks[1:], strict=False)) * 1000
            )
            report.received_hz = dominant_frequency(audio)
            report.purity = tone_purity(audio, tone_hz)
            report.stats["client"] = await _client_rtcp_stats(pc)
            with contextlib.suppress(aiohttp.ClientError, ValueError):
                async with http.get(session_url) as resp:
                    if resp.status == 200:
                        report.stats["server"] = await resp.json()
            with contextlib.suppress(aiohttp.ClientError):
                async with http.delete(session_url) as resp:
                    report.stats["delete_status"] = resp.status
    except (aiohttp.ClientError, OSError) as exc:
        report.error = f"signaling at {url} unreachable: {exc}"
    finally:
        await pc.close()
    return report
