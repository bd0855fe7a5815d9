// voicerelay demo: one WebRTC call to the echo app through the relay, with live stats.
"use strict";

const $ = (id) => document.getElementById(id);
// How long ICE + DTLS may take before the page calls the call failed (?connect_timeout=s).
const CONNECT_TIMEOUT_S = Number(new URLSearchParams(location.search).get("connect_timeout")) || 10;
const call = { pc: null, stream: null, location: null, timer: null, connectTimer: null };
window.voicerelay = call; // for tests and the curious

function setState(text, kind) {
  const el = $("state");
  el.textContent = text;
  el.className = "pill " + (kind || "");
}

function showError(message) {
  const el = $("error");
  el.textContent = message;
  el.hidden = !message;
  if (message) setState("failed", "failed");
}

function waitForIceGathering(pc, ms) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { pc.removeEventListener("icegatheringstatechange", check); resolve(); };
    const check = () => { if (pc.iceGatheringState === "complete") done(); };
    pc.addEventListener("icegatheringstatechange", check);
    setTimeout(done, ms);
  });
}

async function talk() {
  showError("");
  $("talk").disabled = true;
  setState("starting microphone", "connecting");
  try {
    call.stream = await navigator.mediaDevices.getUserMedia({ audio: true, video: false });
  } catch (err) {
    $("talk").disabled = false;
    showError("Microphone unavailable: " + err.message);
    return;
  }
  const pc = new RTCPeerConnection({ iceServers: [] });
  call.pc = pc;
  call.stream.getTracks().forEach((t) => pc.addTrack(t, call.stream));
  pc.ontrack = (ev) => {
    const audio = $("remote");
    audio.srcObject = ev.streams[0] || new MediaStream([ev.track]);
    audio.play().catch((err) => showError("Cannot play the echo: " + err.message));
  };
  pc.onconnectionstatechange = () => {
    const s = pc.connectionState;
    $("pc-state").textContent = s;
    if (s === "connected") { clearTimeout(call.connectTimer); setState("connected", "connected"); }
    if (s === "failed") {
      showError("The connection failed: ICE or DTLS did not get through to the relay.");
      hangup(true, true);
    }
    if (s === "disconnected") setState("disconnected", "connecting");
  };
  pc.oniceconnectionstatechange = () => { $("ice-state").textContent = pc.iceConnectionState; };

  setState("connecting", "connecting");
  await pc.setLocalDescription(await pc.createOffer());
  await waitForIceGathering(pc, 1500);
  let resp;
  try {
    resp = await fetch("/v1/sessions", {
      method: "POST", headers: { "Content-Type": "application/sdp" }, body: pc.localDescription.sdp,
    });
  } catch (err) {
    hangup(false);
    showError("Signaling is unreachable: " + err.message);
    return;
  }
  const body = await resp.text();
  if (resp.status !== 201) {
    hangup(false);
    showError(`Signaling refused the call: HTTP ${resp.status} ${body.trim()}`);
    return;
  }
  call.location = resp.headers.get("Location");
  await pc.setRemoteDescription({ type: "answer", sdp: body });
  $("hangup").disabled = false;
  call.connectTimer = setTimeout(() => {
    if (pc.connectionState !== "connected") {
      showError(`No connection after ${CONNECT_TIMEOUT_S} s: ICE/DTLS did not complete ` +
        "through the relay. Is the relay running, and reachable at the address in the answer?");
      hangup(true, true);
    }
  }, CONNECT_TIMEOUT_S * 1000);
  call.timer = setInterval(updateStats, 500);
}

function fmt(n) { return n === undefined || n === null ? "-" : String(n); }

async function updateStats() {
  const pc = call.pc;
  if (!pc) return;
  const report = await pc.getStats();
  let pair = null;
  const byId = {};
  report.forEach((s) => { byId[s.id] = s; });
  report.forEach((s) => {
    if (s.type === "transport") {
      $("dtls-state").textContent = fmt(s.dtlsState);
      if (s.selectedCandidatePairId) pair = byId[s.selectedCandidatePairId];
    }
    if (s.type === "outbound-rtp" && s.kind === "audio") $("sent").textContent = fmt(s.packetsSent);
    if (s.type === "remote-inbound-rtp" && s.kind === "audio") {
      $("lost-out").textContent = fmt(s.packetsLost);
      if (s.roundTripTime !== undefined) $("rtt").textContent = (s.roundTripTime * 1000).toFixed(1) + " ms";
    }
    if (s.type === "inbound-rtp" && s.kind === "audio") {
      $("received").textContent = fmt(s.packetsReceived);
      $("lost-in").textContent = fmt(s.packetsLost);
      if (s.audioLevel !== undefined) $("level-in").value = Math.min(1, s.audioLevel * 3);
    }
    if (s.type === "media-source" && s.kind === "audio" && s.audioLevel !== undefined) {
      $("level-out").value = Math.min(1, s.audioLevel * 3);
    }
  });
  if (pair) {
    if (pair.currentRoundTripTime !== undefined) {
      $("rtt").textContent = (pair.currentRoundTripTime * 1000).toFixed(1) + " ms";
    }
    const remote = byId[pair.remoteCandidateId];
    if (remote) $("route").textContent = `relay ${remote.address || remote.ip}:${remote.port}`;
  }
}

// End the call (DELETE the session unless told not to); `failed` keeps the error on show.
async function hangup(sendDelete = true, failed = false) {
  clearInterval(call.timer);
  clearTimeout(call.connectTimer);
  if (sendDelete && call.location) {
    try { await fetch(call.location, { method: "DELETE" }); } catch (err) { /* the page is closing */ }
  }
  if (call.pc) call.pc.close();
  if (call.stream) call.stream.getTracks().forEach((t) => t.stop());
  call.pc = null; call.stream = null; call.location = null;
  $("talk").disabled = false;
  $("hangup").disabled = true;
  $("level-in").value = 0; $("level-out").value = 0;
  if (!failed) setState("idle", "idle");
}

$("talk").addEventListener("click", talk);
$("hangup").addEventListener("click", () => hangup(true));
