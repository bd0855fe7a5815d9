// voicerelay demo: one WebRTC call through the relay to the transceiver's voice agent (or its
// echo app), with the conversation as it happens (Server-Sent Events) and live call figures.
"use strict";

const $ = (id) => document.getElementById(id);
// How long ICE + DTLS may take before the page calls the call failed (?connect_timeout=s).
const CONNECT_TIMEOUT_S = Number(new URLSearchParams(location.search).get("connect_timeout")) || 10;
// Signaling may want a client token (docs/SIGNALING.md): the page takes it from its address's
// fragment (#token=...), which never reaches a server, and then drops it from the address bar.
const AUTH_REQUIRED = document.querySelector('meta[name="voicerelay-auth"]')?.content === "required";
const TOKEN = new URLSearchParams(location.hash.slice(1)).get("token") || null;
if (TOKEN) history.replaceState(null, "", location.pathname + location.search);
// Browsers offer the microphone only to secure contexts: https, or this machine (localhost).
const SECURE = window.isSecureContext && Boolean(navigator.mediaDevices?.getUserMedia);
const INSECURE_MESSAGE = "This page came over plain http from another host, which browsers " +
  "do not trust with a microphone: open it over https (start the stack with " +
  "`relayctl up --https`) or on the machine running it as http://localhost.";
const call = {
  pc: null, stream: null, location: null, timer: null, connectTimer: null,
  relay: "",        // the relay addresses the answer named, for messages
  feed: null,       // the EventSource of the call's conversation events
  events: [],       // every conversation event received, in order
  transcript: [],   // one entry per bubble: {who: "you" | "agent", text, interrupted}
  speaking: "nobody",
};
window.voicerelay = call; // for tests and the curious
call.format = { fmtMs: (s) => fmtMs(s), meterValue: (l) => meterValue(l) };

// ---- Call state ------------------------------------------------------------------------------

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

// Authorization for signaling requests, when the page has a client token.
function authHeaders() {
  return TOKEN ? { Authorization: "Bearer " + TOKEN } : {};
}

function setInCall(inCall) {
  $("talk").disabled = inCall || !SECURE || (AUTH_REQUIRED && !TOKEN);
  $("conversation-empty").textContent = inCall
    ? "Listening: say something. (The echo app only plays your voice back, so nothing shows here with it.)"
    : "Press Talk and say something: what you say and what the agent answers appears here.";
}

const FIGURES = ["pc-state", "ice-state", "dtls-state", "rtt", "sent", "lost-out", "received",
  "lost-in", "route"];

function resetFigures() {
  FIGURES.forEach((id) => { $(id).textContent = "-"; });
}

function resetMeters() {
  $("level-in").value = 0;
  $("level-out").value = 0;
}

// A level meter's position for a WebRTC audioLevel (linear, 1.0 = full scale): -60 dBFS and
// below sit at 0, full scale at 1, so speech moves the meter without pinning it.
function meterValue(level) {
  if (!(level > 0)) return 0;
  return Math.max(0, Math.min(1, (20 * Math.log10(level) + 60) / 60));
}

// A round-trip time in seconds as the page shows it: "-" while unknown (Firefox reports 0
// before it has measured anything).
function fmtMs(seconds) {
  return Number.isFinite(seconds) && seconds > 0 ? (seconds * 1000).toFixed(1) + " ms" : "-";
}

// The relay addresses an answer lists (its candidates), for messages: "192.0.2.1:3478, ...".
function answerRelays(sdp) {
  return sdp.split(/\r?\n/).filter((l) => l.startsWith("a=candidate:"))
    .map((l) => l.split(" ")).filter((f) => f.length >= 6)
    .map((f) => (f[4].includes(":") ? `[${f[4]}]` : f[4]) + ":" + f[5] + (f[2] === "tcp" ? "/tcp" : ""))
    .join(", ");
}

// What to do after an ICE/DTLS failure, in one sentence.
function relayAdvice() {
  const where = call.relay ? ` at ${call.relay}` : "";
  return ` Check that the relay is running and that this device reaches its UDP port${where}; ` +
    "the stack must advertise an address this device can reach (relayctl up --advertise), " +
    "then press Talk again.";
}

function microphoneAdvice(err) {
  if (err.name === "NotAllowedError") {
    return " Allow the microphone for this page (the icon in the address bar), then press Talk again.";
  }
  if (err.name === "NotFoundError") return " Connect a microphone, then press Talk again.";
  return " Check the microphone is not in use by another program, then press Talk again.";
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
  setInCall(true);
  resetConversation();
  resetFigures();
  setState("starting microphone", "connecting");
  try {
    call.stream = await navigator.mediaDevices.getUserMedia({ audio: true, video: false });
  } catch (err) {
    setInCall(false);
    showError("Microphone unavailable: " + err.message + "." + microphoneAdvice(err));
    return;
  }
  const pc = new RTCPeerConnection({ iceServers: [] });
  call.pc = pc;
  call.stream.getTracks().forEach((t) => pc.addTrack(t, call.stream));
  pc.ontrack = (ev) => {
    const audio = $("remote");
    audio.srcObject = ev.streams[0] || new MediaStream([ev.track]);
    audio.play().catch((err) => showError("Cannot play the incoming audio: " + err.message));
  };
  pc.onconnectionstatechange = () => {
    if (call.pc !== pc) return;
    const s = pc.connectionState;
    $("pc-state").textContent = s;
    if (s === "connected") { clearTimeout(call.connectTimer); setState("connected", "connected"); }
    if (s === "failed") {
      showError("The connection failed: ICE or DTLS did not get through to the relay." +
        relayAdvice());
      hangup(true, true);
    }
    if (s === "disconnected") setState("disconnected", "connecting");
  };
  pc.oniceconnectionstatechange = () => { $("ice-state").textContent = pc.iceConnectionState; };

  setState("connecting", "connecting");
  let offer;
  try {
    await pc.setLocalDescription(await pc.createOffer());
    await waitForIceGathering(pc, 1500);
    offer = pc.localDescription.sdp;
  } catch (err) {
    hangup(false, true);
    showError("The browser could not make an offer: " + err.message);
    return;
  }
  let resp, body;
  try {
    resp = await fetch("/v1/sessions", {
      method: "POST", headers: { "Content-Type": "application/sdp", ...authHeaders() }, body: offer,
    });
    body = await resp.text();
  } catch (err) {
    hangup(false, true);
    showError("Signaling is unreachable: " + err.message + ". Check that the stack is still " +
      "running (relayctl up), then reload this page and press Talk.");
    return;
  }
  if (resp.status !== 201) {
    hangup(false, true);
    showError(`Signaling refused the call: HTTP ${resp.status} ${body.trim()}.` +
      (REFUSAL_ADVICE[resp.status] || ""));
    if (resp.status === 401) $("auth-needed").hidden = false; // how to get a (new) token
    return;
  }
  call.relay = answerRelays(body);
  call.location = resp.headers.get("Location");
  openFeed(call.location);
  try {
    await pc.setRemoteDescription({ type: "answer", sdp: body });
  } catch (err) {
    hangup(true, true);
    showError("The answer was not usable: " + err.message);
    return;
  }
  $("hangup").disabled = false;
  call.connectTimer = setTimeout(() => {
    if (pc.connectionState !== "connected") {
      showError(`No connection after ${CONNECT_TIMEOUT_S} s: ICE/DTLS did not complete ` +
        "through the relay." + relayAdvice());
      hangup(true, true);
    }
  }, CONNECT_TIMEOUT_S * 1000);
  call.timer = setInterval(updateStats, 500);
}

// What to do when signaling refuses, by status.
const REFUSAL_ADVICE = {
  401: " This page needs a client token (see below).",
  403: " This token may not place calls: ask the app's backend for a new one.",
  413: " The browser's offer was too large: reload the page and try again.",
  429: " Too many calls from this address: wait a few seconds and press Talk again.",
  503: " The transceiver is full: try again in a moment.",
};

function fmt(n) { return n === undefined || n === null ? "-" : String(n); }

async function updateStats() {
  const pc = call.pc;
  if (!pc) return;
  let report;
  try { report = await pc.getStats(); } catch (err) { return; } // closed meanwhile
  if (call.pc !== pc) return; // hung up while the report was on its way: leave the idle figures
  let pair = null;
  let rtt = null;
  const byId = {};
  report.forEach((s) => { byId[s.id] = s; });
  report.forEach((s) => {
    if (s.type === "transport") {
      $("dtls-state").textContent = fmt(s.dtlsState);
      if (s.selectedCandidatePairId) pair = byId[s.selectedCandidatePairId];
    }
    // Firefox has no transport stats: its pair in use says `selected` (or is the nominated one).
    if (s.type === "candidate-pair" && !pair && (s.selected || (s.nominated && s.state === "succeeded"))) {
      pair = s;
    }
    if (s.type === "outbound-rtp" && s.kind === "audio") $("sent").textContent = fmt(s.packetsSent);
    if (s.type === "remote-inbound-rtp" && s.kind === "audio") {
      $("lost-out").textContent = fmt(s.packetsLost);
      if (s.roundTripTime > 0) rtt = s.roundTripTime;
    }
    if (s.type === "inbound-rtp" && s.kind === "audio") {
      $("received").textContent = fmt(s.packetsReceived);
      $("lost-in").textContent = fmt(s.packetsLost);
      if (s.audioLevel !== undefined) $("level-in").value = meterValue(s.audioLevel);
    }
    if (s.type === "media-source" && s.kind === "audio" && s.audioLevel !== undefined) {
      $("level-out").value = meterValue(s.audioLevel);
    }
  });
  const dtls = pc.getSenders().map((sender) => sender.transport).find(Boolean);
  if ($("dtls-state").textContent === "-" && dtls) $("dtls-state").textContent = dtls.state;
  if (pair) {
    if (pair.currentRoundTripTime > 0) rtt = pair.currentRoundTripTime;
    const remote = byId[pair.remoteCandidateId];
    if (remote) {
      const host = remote.address || remote.ip;
      $("route").textContent = `relay ${host.includes(":") ? `[${host}]` : host}:${remote.port}`;
    }
  }
  $("rtt").textContent = fmtMs(rtt);
}

// End the call (DELETE the session unless told not to); `failed` keeps the error on show.
async function hangup(sendDelete = true, failed = false) {
  clearInterval(call.timer);
  clearTimeout(call.connectTimer);
  closeFeed();
  const { pc, stream, location: where } = call;
  call.pc = null; call.stream = null; call.location = null; // its handlers now stand down
  $("hangup").disabled = true;
  resetMeters();
  setSpeaking(false, false);
  // DELETE before closing the peer connection: the session ends as "deleted", not by the
  // DTLS close that pc.close() sends.
  if (sendDelete && where) {
    try {
      await fetch(where, { method: "DELETE", headers: authHeaders() });
    } catch (err) { /* the page is closing */ }
  }
  if (pc) pc.close();
  if (stream) stream.getTracks().forEach((t) => t.stop());
  setInCall(false);
  if (failed) return; // the states show what went wrong
  setState("idle", "idle");
  if (pc) ["pc-state", "ice-state", "dtls-state"].forEach((id) => { $(id).textContent = "closed"; });
}

// ---- Conversation events (docs/VOICE.md) ------------------------------------------------------

const convo = { turns: [], agentByItem: new Map(), user: false, agent: false };

function resetConversation() {
  call.events = [];
  call.transcript = [];
  convo.turns = [];
  convo.agentByItem = new Map();
  $("conversation").replaceChildren();
  $("conversation-empty").hidden = false;
  showNotice("");
  setSpeaking(false, false);
}

// The session's events: its Location (relative to this page) + "/events".
function openFeed(sessionLocation) {
  closeFeed();
  const url = new URL(sessionLocation + "/events", location.href);
  if (TOKEN) url.searchParams.set("token", TOKEN); // EventSource cannot send headers
  const source = new EventSource(url);
  call.feed = source;
  source.onmessage = (message) => {
    let event;
    try { event = JSON.parse(message.data); } catch (err) { return; }
    if (!event || typeof event.type !== "string") return;
    call.events.push(event);
    applyEvent(event);
  };
  // The server ends the stream only with the call. Reconnecting would replay its backlog (and
  // repeat bubbles), so a broken stream stays closed and the page says so.
  source.onerror = () => {
    if (call.feed !== source) return;
    closeFeed();
    if (call.pc) showNotice("Live conversation updates stopped: the event stream broke off.");
  };
}

function closeFeed() {
  if (call.feed) call.feed.close();
  call.feed = null;
}

function applyEvent(ev) {
  switch (ev.type) {
    case "user.speech_started":
      if (!openUserTurn()) addTurn("you");
      setSpeaking(true, convo.agent);
      break;
    case "user.turn_ended": {
      const turn = openUserTurn() || addTurn("you");
      turn.ended = true;
      setSpeaking(false, convo.agent);
      break;
    }
    case "user.transcript":
      userTranscript(ev.item_id, String(ev.text ?? ""));
      break;
    case "agent.speaking":
      agentTurn(ev.item_id);
      setSpeaking(convo.user, true);
      break;
    case "agent.transcript":
      agentTranscript(agentTurn(ev.item_id), String(ev.text ?? ""), Boolean(ev.final));
      break;
    case "agent.done":
      finishAgentTurn(playingTurn(ev.item_id), null);
      setSpeaking(convo.user, false);
      break;
    case "agent.interrupted":
      finishAgentTurn(playingTurn(ev.item_id), Number(ev.sent_ms) || 0);
      setSpeaking(convo.user, false);
      break;
    case "agent.unavailable":
      showNotice(`The agent is unavailable (${ev.reason || "no reason given"}), so you hear a ` +
        "short prompt instead of an answer.");
      break;
    case "call.ended":
      convo.turns.filter((t) => !t.transcribed && !t.entry.text)
        .forEach((t) => setText(t, "", "(no transcript)"));
      setSpeaking(false, false);
      closeFeed();
      break;
    default: // call.started and anything newer than this page: nothing to draw
  }
}

// A bubble: {who, el, textEl, noteEl, entry (its object in call.transcript), ended, itemId,
// transcribed (the person's turn got its transcript)}.
function addTurn(who) {
  const el = document.createElement("li");
  el.className = `turn ${who} pending`;
  const label = document.createElement("span");
  label.className = "who";
  label.textContent = who === "you" ? "You" : "Agent";
  const textEl = document.createElement("p");
  textEl.className = "text";
  textEl.textContent = "…";
  const noteEl = document.createElement("p");
  noteEl.className = "note";
  noteEl.hidden = true;
  el.append(label, textEl, noteEl);
  const entry = { who, text: "", interrupted: false };
  const turn = { who, el, textEl, noteEl, entry, ended: false, itemId: null, transcribed: false };
  convo.turns.push(turn);
  call.transcript.push(entry);
  keepingScrolled(() => $("conversation").append(el));
  $("conversation-empty").hidden = true;
  return turn;
}

function setText(turn, text, shown) {
  keepingScrolled(() => {
    turn.entry.text = text;
    turn.textEl.textContent = shown ?? (text || "…");
    turn.el.classList.toggle("pending", !text);
  });
}

// Change the list; if it was scrolled to its end, keep its end in view.
function keepingScrolled(change) {
  const list = $("conversation");
  const atEnd = list.scrollHeight - list.scrollTop - list.clientHeight < 24;
  change();
  if (atEnd) list.scrollTop = list.scrollHeight;
}

// The person's bubble still being spoken (started, turn not ended yet).
function openUserTurn() {
  return convo.turns.find((t) => t.who === "you" && !t.ended) || null;
}

// A transcript belongs to the person's oldest turn still waiting for one (ended turns first).
function userTranscript(itemId, text) {
  const mine = convo.turns.filter((t) => t.who === "you");
  let turn = (itemId && mine.find((t) => t.itemId === itemId)) ||
    mine.find((t) => t.ended && !t.transcribed) ||
    mine.find((t) => !t.transcribed);
  if (!turn) {
    turn = addTurn("you");
    turn.ended = true; // its start and end went by unseen
  }
  turn.itemId = itemId || null;
  turn.transcribed = true;
  setText(turn, text, text || "(no words recognised)");
}

function agentTurn(itemId) {
  const key = itemId || "";
  let turn = convo.agentByItem.get(key);
  if (!turn) {
    turn = addTurn("agent");
    turn.itemId = itemId || null;
    turn.el.setAttribute("aria-busy", "true");
    convo.agentByItem.set(key, turn);
  }
  return turn;
}

// The reply an agent.done / agent.interrupted is about: by item, else the latest unfinished one.
function playingTurn(itemId) {
  if (itemId) return agentTurn(itemId);
  return convo.turns.findLast((t) => t.who === "agent" && !t.ended) || null;
}

function agentTranscript(turn, text, final) {
  if (final) {
    setText(turn, text || turn.entry.text);
    turn.el.setAttribute("aria-busy", "false");
  } else {
    setText(turn, turn.entry.text + text);
  }
}

// The reply went out whole (`interruptedMs` null) or was cut off by the person (barge-in).
function finishAgentTurn(turn, interruptedMs) {
  if (!turn) return;
  turn.ended = true;
  turn.el.setAttribute("aria-busy", "false");
  if (interruptedMs === null) return;
  turn.entry.interrupted = true;
  turn.el.classList.add("interrupted");
  turn.noteEl.textContent = `interrupted after ${(interruptedMs / 1000).toFixed(1)} s`;
  turn.noteEl.hidden = false;
}

function setSpeaking(user, agent) {
  convo.user = user;
  convo.agent = agent;
  const who = user ? "you" : agent ? "agent" : "nobody";
  call.speaking = who;
  $("speaking").dataset.who = who;
  $("speaking-who").textContent = who;
}

function showNotice(message) {
  const el = $("notice");
  el.textContent = message;
  el.hidden = !message;
}

$("talk").addEventListener("click", talk);
$("hangup").addEventListener("click", () => hangup(true));
resetMeters();
setInCall(false);
$("auth-needed").hidden = !(AUTH_REQUIRED && !TOKEN);
if (!SECURE) { $("insecure").textContent = INSECURE_MESSAGE; $("insecure").hidden = false; }
