// One call with werift, a WebRTC stack independent of ours, for tests/e2e/test_other_hosts.py:
// POST an offer to the stack's /v1/sessions, wait for ICE and DTLS, send the given Opus frames
// as RTP every 20 ms and collect the payloads that come back (the stack runs --app echo).
//
//   node call.js SIGNALING_URL TOKEN FRAMES_FILE FAMILY
//
// FRAMES_FILE holds one Opus payload per line, in hex; FAMILY is 4 or 6 (the only address
// family werift gathers). Prints one JSON line: {"ok": true, "connected_ms", "sent", "echoed":
// [hex, ...], "session": the server's stats of the call}, or {"ok": false, "step":
// "signaling" | "answer" | "ice" | "media", "error"} with exit code 1.
"use strict";

const dgram = require("dgram");
const fs = require("fs");
const { MediaStreamTrack, RTCPeerConnection, RTCRtpCodecParameters, RtpHeader, RtpPacket } =
  require("werift");

const CONNECT_TIMEOUT_MS = 10000;
const GATHER_TIMEOUT_MS = 3000;
const MAGIC_COOKIE = 0x2112a442;
const LINGER_MS = 1000; // how long to wait for the last echoes after the last frame

class StepError extends Error {
  constructor(step, message) {
    super(message);
    this.step = step;
  }
}

function report(result, code) {
  process.stdout.write(JSON.stringify(result) + "\n");
  process.exit(code);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function waitFor(check, ms) {
  return new Promise((resolve) => {
    const deadline = Date.now() + ms;
    const poll = () => {
      if (check()) resolve(true);
      else if (Date.now() > deadline) resolve(false);
      else setTimeout(poll, 20);
    };
    poll();
  });
}

// werift asks a STUN server for a reflexive candidate of every IPv4 address (a public one,
// its built-in default, unless given one) and finishes gathering only when that query is
// answered or after 5 s. This one, on the client's own loopback, answers at once with the
// address it saw: nothing leaves the host and gathering takes milliseconds.
function loopbackStunServer() {
  const sock = dgram.createSocket("udp4");
  sock.on("message", (msg, from) => {
    if (msg.length < 20 || msg.readUInt16BE(0) !== 0x0001 || msg.readUInt32BE(4) !== MAGIC_COOKIE) {
      return; // not a Binding request
    }
    const reply = Buffer.alloc(32);
    reply.writeUInt16BE(0x0101, 0); // Binding success response
    reply.writeUInt16BE(12, 2); // one attribute: XOR-MAPPED-ADDRESS, 8 bytes
    msg.copy(reply, 4, 4, 20); // magic cookie and transaction id
    reply.writeUInt16BE(0x0020, 20);
    reply.writeUInt16BE(8, 22);
    reply.writeUInt16BE(0x0001, 24); // IPv4
    reply.writeUInt16BE(from.port ^ (MAGIC_COOKIE >>> 16), 26);
    const ip = from.address.split(".").reduce((acc, octet) => acc * 256 + Number(octet), 0);
    reply.writeUInt32BE((ip ^ MAGIC_COOKIE) >>> 0, 28);
    sock.send(reply, from.port, from.address);
  });
  return new Promise((resolve) => sock.bind(0, "127.0.0.1", () => resolve(sock)));
}

async function postOffer(url, token, sdp) {
  let resp, body;
  try {
    resp = await fetch(url + "/v1/sessions", {
      method: "POST",
      headers: { "Content-Type": "application/sdp", Authorization: "Bearer " + token },
      body: sdp,
    });
    body = await resp.text();
  } catch (err) {
    throw new StepError("signaling", `${url} unreachable: ${err.cause || err.message}`);
  }
  if (resp.status !== 201) {
    throw new StepError("signaling", `HTTP ${resp.status} ${body.trim()}`);
  }
  return { answer: body, location: resp.headers.get("Location") };
}

async function call(url, token, frames, family, stunPort) {
  const pc = new RTCPeerConnection({
    iceUseIpv4: family === 4,
    iceUseIpv6: family === 6,
    iceServers: [{ urls: `stun:127.0.0.1:${stunPort}` }],
    codecs: {
      audio: [new RTCRtpCodecParameters({ mimeType: "audio/opus", clockRate: 48000, channels: 2 })],
      video: [],
    },
  });
  const echoed = [];
  const track = new MediaStreamTrack({ kind: "audio" });
  const transceiver = pc.addTransceiver(track, { direction: "sendrecv" });
  transceiver.onTrack.subscribe((remote) => {
    remote.onReceiveRtp.subscribe((rtp) => echoed.push(rtp.payload.toString("hex")));
  });
  try {
    await pc.setLocalDescription(await pc.createOffer());
    await waitFor(() => pc.iceGatheringState === "complete", GATHER_TIMEOUT_MS);
    const offer = pc.localDescription.sdp;
    if (!/ typ host/.test(offer)) {
      throw new StepError("ice", `no IPv${family} host candidate in ${GATHER_TIMEOUT_MS} ms`);
    }
    const { answer, location } = await postOffer(url, token, offer);
    try {
      await pc.setRemoteDescription({ type: "answer", sdp: answer });
    } catch (err) {
      throw new StepError("answer", err.message);
    }
    const started = Date.now();
    if (!(await waitFor(() => pc.connectionState === "connected", CONNECT_TIMEOUT_MS))) {
      throw new StepError(
        "ice",
        `not connected after ${CONNECT_TIMEOUT_MS} ms (ICE ${pc.iceConnectionState}, ` +
          `connection ${pc.connectionState})`,
      );
    }
    const connectedMs = Date.now() - started;
    const ssrc = (Math.random() * 0xffffffff) >>> 0;
    for (let i = 0; i < frames.length; i++) {
      const header = new RtpHeader({
        payloadType: transceiver.codecs[0].payloadType,
        sequenceNumber: i & 0xffff,
        timestamp: (i * 960) >>> 0,
        ssrc,
        marker: i === 0,
      });
      track.writeRtp(new RtpPacket(header, Buffer.from(frames[i], "hex")));
      await sleep(20);
    }
    await waitFor(() => echoed.length >= frames.length, LINGER_MS);
    // What the server saw of this call (its stats, read with the same token), then hang up.
    const where = new URL(location, url);
    const auth = { Authorization: "Bearer " + token };
    const session = await (await fetch(where, { headers: auth })).json();
    await fetch(where, { method: "DELETE", headers: auth });
    return { ok: true, connected_ms: connectedMs, sent: frames.length, echoed, session };
  } finally {
    await pc.close().catch(() => {});
  }
}

async function main() {
  const [url, token, framesFile, familyText] = process.argv.slice(2);
  const family = Number(familyText);
  if (!url || !token || !framesFile || ![4, 6].includes(family)) {
    report({ ok: false, step: "usage", error: "node call.js URL TOKEN FRAMES_FILE 4|6" }, 2);
  }
  const frames = fs.readFileSync(framesFile, "utf8").split("\n").filter((l) => l.trim());
  const stun = await loopbackStunServer();
  try {
    report(await call(url, token, frames, family, stun.address().port), 0);
  } catch (err) {
    report({ ok: false, step: err.step || "media", error: err.message }, 1);
  }
}

main();
