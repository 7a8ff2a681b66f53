// The omnivox voice chat page: one call at a time over WebRTC (the server owns playout) or the Realtime
// WebSocket (this page captures PCM16 at 16 kHz, what the engines hear, and plays the agent's 24 kHz audio itself,
// gaplessly).
//
// What the page measures (also exposed on `window.omnivox.stats` for the browser tests):
// - sound activity: every 20 ms block of the microphone and of the agent audio being played is metered on the
//   audio thread; a block above SOUND_LEVEL is sound, and gaps shorter than HANGOVER_MS do not split a segment.
// - turn latency: end of your speech -> first audible agent block played in this page. The end of your speech is
//   the server VAD's `speech_stopped.audio_end_ms` mapped onto this page's capture clock (WebSocket: the page
//   knows when it captured every sample it sent), or the end of the last microphone sound segment (WebRTC; on
//   clean speech it comes ~100 ms before the VAD's end, so WebRTC figures read that much higher).
//   The VAD silence window (the server waits for it before answering) is inside the figure.
// - barge-in: when you start speaking while the agent is audible, the time until its audio stops (WebSocket:
//   when the playback worklet dropped its queue; WebRTC: the last audible block of the server's track).
// - played agent audio: WebSocket, the samples the playback worklet rendered; WebRTC, the length of the agent's
//   sound segments on the remote track (the server owns that queue).

const RATE = 24000;
const CAPTURE_RATE = 16000; // WebSocket mode sends the microphone at the engines' rate: a third less upstream
const SOUND_LEVEL = 0.015;
const HANGOVER_MS = 250;
const INTERRUPTED_HOLD_MS = 3000;
const ICE_GATHERING_TIMEOUT_MS = 2000;
const METER_FULL_SCALE_DB = 60;
const DEFAULT_SILENCE_MS = 500;
const MAX_VAD_LAG_MS = 1000;

const ui = {
  button: document.getElementById("call-button"),
  status: document.getElementById("call-status"),
  error: document.getElementById("error"),
  micLevel: document.getElementById("mic-level"),
  agentState: document.getElementById("agent-state"),
  turnDetection: document.getElementById("turn-detection"),
  latency: document.getElementById("latency"),
  bargeIn: document.getElementById("barge-in"),
  transcript: document.getElementById("transcript"),
  transport: document.getElementById("transport"),
  voice: document.getElementById("voice"),
  instructions: document.getElementById("instructions"),
  transcribe: document.getElementById("transcribe"),
  apiKey: document.getElementById("api-key"),
  serverUrl: document.getElementById("server-url"),
};

const stats = {
  playedSeconds: 0,
  micSegments: [],
  agentSegments: [],
  turns: [],
  lastLatencyMs: null,
  bargeIns: [],
  stateHistory: [],
  truncates: [],
  events: {},
  errors: [],
};

let call = null;

class CallError extends Error {}

// ---------------------------------------------------------------- page state

function setStatus(text) {
  ui.status.textContent = text;
}

function showError(message) {
  stats.errors.push(message);
  ui.error.textContent = message;
  ui.error.hidden = false;
}

function clearError() {
  ui.error.hidden = true;
  ui.error.textContent = "";
}

function setAgentState(state) {
  if (window.omnivox.state === state) return;
  window.omnivox.state = state;
  stats.stateHistory.push({ state, t: performance.now() });
  ui.agentState.textContent = state;
  ui.agentState.dataset.state = state;
}

function setButton(label, disabled = false) {
  ui.button.textContent = label;
  ui.button.disabled = disabled;
}

function transcriptEntry(itemId, speaker) {
  let entry = ui.transcript.querySelector(`li[data-item-id="${CSS.escape(itemId)}"]`);
  if (!entry) {
    entry = document.createElement("li");
    entry.className = `turn ${speaker}`;
    entry.dataset.itemId = itemId;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = speaker === "caller" ? "You" : "Agent";
    const text = document.createElement("p");
    text.className = "text";
    entry.append(who, text);
    ui.transcript.append(entry);
    entry.scrollIntoView({ block: "nearest" });
  }
  return entry.querySelector(".text");
}

function showLatency(turn) {
  ui.latency.textContent = `${Math.round(turn.latencyMs)} ms`;
}

// ---------------------------------------------------------------- sound activity

// Turns 20 ms level readings into sound segments {start, end} (performance.now() milliseconds).
class ActivityTrack {
  constructor(segments, onStart, onEnd) {
    this.segments = segments;
    this.onStart = onStart;
    this.onEnd = onEnd;
    this.open = null;
  }

  get active() {
    return this.open !== null;
  }

  feed(level, endMs, seconds) {
    const startMs = endMs - seconds * 1000;
    if (level >= SOUND_LEVEL) {
      if (this.open && startMs - this.open.end <= HANGOVER_MS) {
        this.open.end = endMs;
        return;
      }
      this.close();
      this.open = { start: startMs, end: endMs };
      this.segments.push(this.open);
      this.onStart(this.open);
    } else if (this.open && endMs - this.open.end > HANGOVER_MS) {
      this.close();
    }
  }

  close() {
    if (!this.open) return;
    const segment = this.open;
    this.open = null;
    this.onEnd(segment);
  }
}

// ---------------------------------------------------------------- one call, whatever the transport

class Call {
  constructor(settings) {
    this.settings = settings;
    this.closed = false;
    this.ready = false;
    this.silenceMs = DEFAULT_SILENCE_MS;
    this.playedBefore = stats.playedSeconds;
    this.agentSegmentsBefore = stats.agentSegments.length;
    this.pendingTurn = null;
    this.pendingBargeIn = null;
    this.interruptedTimer = null;
    // An answer in progress: the server may pause its audio while it judges whether the caller interrupts, so the
    // local playback can drain before `speech_started` says it did.
    this.answering = false;
    this.mic = new ActivityTrack(
      stats.micSegments,
      (segment) => this.onCallerSound(segment),
      () => {},
    );
    this.agent = new ActivityTrack(
      stats.agentSegments,
      (segment) => this.onAgentSound(segment),
      (segment) => this.onAgentSilent(segment),
    );
  }

  async openAudio() {
    if (!navigator.mediaDevices || !window.AudioWorkletNode) {
      throw new CallError(
        "This page needs a secure context for the microphone: open it over https or at http://localhost.",
      );
    }
    try {
      this.micStream = await navigator.mediaDevices.getUserMedia({
        audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
      });
    } catch (error) {
      if (error.name === "NotAllowedError" || error.name === "SecurityError") {
        throw new CallError("Microphone permission was denied. Allow the microphone for this page and try again.");
      }
      if (error.name === "NotFoundError" || error.name === "OverconstrainedError") {
        throw new CallError("No microphone was found. Plug one in and try again.");
      }
      throw new CallError(`The microphone could not be opened: ${error.message}`);
    }
    this.context = new AudioContext({ sampleRate: RATE, latencyHint: "interactive" });
    await this.context.audioWorklet.addModule(new URL("audio-worklets.js", import.meta.url));
    await this.context.resume();
    this.silentSink = this.context.createGain();
    this.silentSink.gain.value = 0;
    this.silentSink.connect(this.context.destination);
    this.tap(this.context.createMediaStreamSource(this.micStream), this.silentSink, {
      sendRate: this.capturesPcm ? CAPTURE_RATE : null,
      onBlock: (message, endMs) => {
        this.mic.feed(message.level, endMs, message.seconds);
        const decibels = 20 * Math.log10(Math.max(message.level, 1e-6));
        ui.micLevel.value = Math.max(0, 1 + decibels / METER_FULL_SCALE_DB);
        if (message.pcm) this.sendPcm(message.pcm, message.endTime);
      },
    });
  }

  // Meters `source` on the audio thread and passes it on to `destination`.
  tap(source, destination, { sendRate = null, onBlock }) {
    const node = new AudioWorkletNode(this.context, "omnivox-tap", { processorOptions: { sendRate } });
    node.port.onmessage = (event) => onBlock(event.data, this.contextToPageTime(event.data.endTime));
    source.connect(node);
    node.connect(destination);
    return node;
  }

  // AudioContext seconds -> performance.now() milliseconds, at the loudspeaker when the browser tells us.
  contextToPageTime(seconds) {
    const stamp = this.context.getOutputTimestamp ? this.context.getOutputTimestamp() : {};
    if (stamp.performanceTime > 0) return stamp.performanceTime + (seconds - stamp.contextTime) * 1000;
    return performance.now() - (this.context.currentTime - seconds) * 1000;
  }

  sessionUpdate() {
    const session = {
      type: "realtime",
      instructions: this.settings.instructions,
      audio: {
        // the browser cancels echo in getUserMedia, so the server need not (it would only add work)
        input: { transcription: this.settings.transcribe ? { model: "default" } : null, echo_cancellation: false },
        output: { voice: this.settings.voice },
      },
    };
    if (this.capturesPcm) {
      session.audio.input.format = { type: "audio/pcm", rate: CAPTURE_RATE };
      session.audio.output.format = { type: "audio/pcm", rate: RATE };
    }
    return { type: "session.update", session };
  }

  updateSettings(settings) {
    this.settings = settings;
    this.send(this.sessionUpdate());
  }

  onCallerSound(segment) {
    if (this.agent.active) this.pendingBargeIn = { onsetAt: segment.start };
  }

  onAgentSound(segment) {
    const turn = this.pendingTurn;
    if (turn && segment.start >= turn.endOfSpeechAt) {
      this.pendingTurn = null;
      turn.firstAudioAt = segment.start;
      turn.latencyMs = segment.start - turn.endOfSpeechAt;
      stats.turns.push(turn);
      stats.lastLatencyMs = turn.latencyMs;
      showLatency(turn);
    }
  }

  onAgentSilent(segment) {
    const bargeIn = this.pendingBargeIn;
    this.pendingBargeIn = null;
    if (bargeIn && bargeIn.onsetAt <= segment.end) {
      bargeIn.stoppedAt = this.playbackStoppedAt(segment);
      bargeIn.stopMs = bargeIn.stoppedAt - bargeIn.onsetAt;
      stats.bargeIns.push(bargeIn);
      ui.bargeIn.textContent = `${Math.round(bargeIn.stopMs)} ms`;
    }
  }

  // The end of the last audible agent block; a door that knows when it cut the audio refines it.
  playbackStoppedAt(segment) {
    return segment.end;
  }

  interrupted() {
    setAgentState("interrupted");
    clearTimeout(this.interruptedTimer);
    this.interruptedTimer = setTimeout(() => {
      if (window.omnivox.state === "interrupted") setAgentState("listening");
    }, INTERRUPTED_HOLD_MS);
  }

  handle(event) {
    stats.events[event.type] = (stats.events[event.type] || 0) + 1;
    switch (event.type) {
      case "session.created":
        setStatus("Connected. Setting up the session…");
        break;
      case "session.updated":
        this.silenceMs = silenceWindow(event.session) ?? this.silenceMs;
        ui.turnDetection.textContent = describeTurnDetection(event.session);
        if (!this.ready) {
          this.ready = true;
          setStatus(`Connected over ${this.kind === "webrtc" ? "WebRTC" : "WebSocket"}. Speak any time.`);
          setAgentState("listening");
        }
        break;
      case "input_audio_buffer.speech_started":
        transcriptEntry(event.item_id, "caller").textContent = "(speech)";
        this.onSpeechStarted();
        break;
      case "input_audio_buffer.speech_stopped":
        this.pendingTurn = { itemId: event.item_id, transport: this.kind, ...this.endOfSpeech(event) };
        if (window.omnivox.state === "interrupted") setAgentState("listening");
        break;
      case "conversation.item.input_audio_transcription.delta":
        this.appendCallerText(event.item_id, event.delta);
        break;
      case "conversation.item.input_audio_transcription.completed":
        transcriptEntry(event.item_id, "caller").textContent = event.transcript || "(speech)";
        break;
      case "response.output_audio_transcript.delta":
      case "response.output_text.delta":
        transcriptEntry(event.item_id, "agent").textContent += event.delta;
        break;
      case "response.output_audio.delta":
        this.playDelta(event);
        break;
      case "conversation.item.truncated":
        transcriptEntry(event.item_id, "agent").parentElement.classList.add("truncated");
        this.send({ type: "conversation.item.retrieve", item_id: event.item_id });
        break;
      case "conversation.item.retrieved":
        this.showHeardText(event.item);
        break;
      case "output_audio_buffer.started":
        setAgentState("speaking");
        break;
      case "output_audio_buffer.stopped":
        if (window.omnivox.state === "speaking") setAgentState("listening");
        break;
      case "output_audio_buffer.cleared":
        this.interrupted();
        break;
      case "response.created":
        this.answering = true;
        break;
      case "response.done":
        this.answering = false;
        if (event.response && event.response.status === "failed") {
          const details = event.response.status_details || {};
          showError(`The agent could not answer: ${(details.error && details.error.message) || "engine failure"}`);
        }
        break;
      case "error":
        this.onServerError(event.error || {});
        break;
      default:
        break;
    }
  }

  // After a truncation the server keeps only the words the caller heard; show those.
  showHeardText(item) {
    const content = item && item.role === "assistant" && item.content && item.content[0];
    if (content && typeof content.transcript === "string") {
      transcriptEntry(item.id, "agent").textContent = content.transcript;
    }
  }

  appendCallerText(itemId, delta) {
    const text = transcriptEntry(itemId, "caller");
    text.textContent = (text.textContent === "(speech)" ? "" : text.textContent) + delta;
  }

  onServerError(error) {
    if (error.code === "invalid_api_key") {
      this.fail("401 Unauthorized: the server rejected the API key. Enter a valid key in Settings.");
    } else if (error.code === "session_limit_reached") {
      this.fail("The server is busy (too many sessions). Try again later.");
    } else if (error.code !== "response_cancel_not_active") {
      showError(`Server error: ${error.message || error.code || "unknown"}`);
    }
  }

  fail(message) {
    showError(message);
    hangUp();
  }

  close() {
    this.closed = true;
    clearTimeout(this.interruptedTimer);
    if (this.micStream) this.micStream.getTracks().forEach((track) => track.stop());
    if (this.context) this.context.close();
  }
}

// ---------------------------------------------------------------- WebSocket: the page owns playout

class WebSocketCall extends Call {
  kind = "websocket";
  capturesPcm = true;
  captureOrigin = null;
  droppedItems = new Set();
  audioItemId = null;
  listeningTimer = null;
  bargeInStoppedAt = null;

  async start() {
    await this.openAudio();
    this.playback = new AudioWorkletNode(this.context, "omnivox-playback", { outputChannelCount: [1] });
    this.playback.port.onmessage = (event) => this.onPlayback(event.data);
    this.tap(this.playback, this.context.destination, {
      onBlock: (message, endMs) => this.agent.feed(message.level, endMs, message.seconds),
    });
    const url = new URL("/v1/realtime", this.settings.server);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    const protocols = ["realtime"];
    if (this.settings.apiKey) protocols.push(`openai-insecure-api-key.${this.settings.apiKey}`);
    this.socket = new WebSocket(url, protocols);
    await new Promise((resolve, reject) => {
      this.socket.onopen = resolve;
      this.socket.onerror = () => reject(unreachable(this.settings.server));
    });
    this.socket.onmessage = (message) => this.handle(JSON.parse(message.data));
    this.socket.onclose = (event) => this.onSocketClosed(event);
    this.send(this.sessionUpdate());
  }

  send(event) {
    if (this.socket && this.socket.readyState === WebSocket.OPEN) this.socket.send(JSON.stringify(event));
  }

  sendPcm(buffer, endTime) {
    if (!this.socket || this.socket.readyState !== WebSocket.OPEN) return;
    const samples = buffer.byteLength / 2;
    if (this.captureOrigin === null) this.captureOrigin = endTime - samples / CAPTURE_RATE;
    this.send({ type: "input_audio_buffer.append", audio: bytesToBase64(new Uint8Array(buffer)) });
  }

  // The server counts `audio_end_ms` from the first sample this page sent; the capture clock dates it.
  endOfSpeech(event) {
    const endOfSpeechAt = this.contextToPageTime(this.captureOrigin + event.audio_end_ms / 1000);
    return { endOfSpeechAt, endOfSpeechFrom: "audio_end_ms" };
  }

  onSpeechStarted() {
    const speaking = window.omnivox.state === "speaking" || this.answering;
    if (this.audioItemId) this.droppedItems.add(this.audioItemId);
    this.playback.port.postMessage({ type: "clear" });
    if (speaking) this.interrupted();
  }

  playDelta(event) {
    if (this.droppedItems.has(event.item_id)) return;
    this.audioItemId = event.item_id;
    const pcm = base64ToInt16(event.delta);
    const samples = new Float32Array(pcm.length);
    for (let i = 0; i < pcm.length; i++) samples[i] = pcm[i] / 0x8000;
    this.playback.port.postMessage({ type: "push", itemId: event.item_id, samples: samples.buffer }, [
      samples.buffer,
    ]);
  }

  onPlayback(message) {
    if (message.playedTotal !== undefined) stats.playedSeconds = this.playedBefore + message.playedTotal / RATE;
    if (message.type === "started") {
      clearTimeout(this.listeningTimer);
      setAgentState("speaking");
    } else if (message.type === "drained") {
      clearTimeout(this.listeningTimer);
      this.listeningTimer = setTimeout(() => {
        if (window.omnivox.state === "speaking") setAgentState("listening");
      }, HANGOVER_MS);
    } else if (message.type === "cleared") {
      this.bargeInStoppedAt = this.contextToPageTime(message.time);
      if (message.itemId && message.dropped > 0) this.truncate(message.itemId, message.played);
    }
  }

  // The playback worklet stopped at the clear; the audio before it may have been a quiet word gap.
  playbackStoppedAt(segment) {
    const cleared = this.bargeInStoppedAt;
    return cleared !== null && cleared >= segment.end && cleared <= segment.end + HANGOVER_MS ? cleared : segment.end;
  }

  // Tells the server how much of the item the caller really heard, so the unheard rest leaves the context.
  truncate(itemId, playedSamples) {
    const truncate = {
      type: "conversation.item.truncate",
      item_id: itemId,
      content_index: 0,
      audio_end_ms: Math.floor((playedSamples * 1000) / RATE),
    };
    stats.truncates.push(truncate);
    this.send(truncate);
  }

  onSocketClosed(event) {
    if (this.closed) return;
    if (event.code === 1008) {
      this.fail("401 Unauthorized: the server rejected the API key. Enter a valid key in Settings.");
    } else if (event.code === 1013) {
      this.fail("The server is busy (too many sessions). Try again later.");
    } else {
      this.fail(`The server closed the connection (code ${event.code}${event.reason ? `: ${event.reason}` : ""}).`);
    }
  }

  close() {
    super.close();
    clearTimeout(this.listeningTimer);
    if (this.socket) this.socket.close(1000, "hang up");
  }
}

// ---------------------------------------------------------------- WebRTC: the server owns playout

class WebRtcCall extends Call {
  kind = "webrtc";
  capturesPcm = false;

  async start() {
    await this.openAudio();
    this.peer = new RTCPeerConnection({ iceServers: [] });
    for (const track of this.micStream.getAudioTracks()) this.peer.addTrack(track, this.micStream);
    this.peer.ontrack = (event) => this.onRemoteTrack(event);
    this.peer.onconnectionstatechange = () => {
      if (this.peer.connectionState === "failed" && !this.closed) {
        this.fail("The WebRTC connection failed (no network path to the server). Try the WebSocket transport.");
      }
    };
    this.channel = this.peer.createDataChannel("oai-events");
    this.channel.onopen = () => this.send(this.sessionUpdate());
    this.channel.onmessage = (message) => this.handle(JSON.parse(message.data));
    this.channel.onclose = () => {
      if (!this.closed) this.fail("The server ended the call.");
    };
    await this.peer.setLocalDescription(await this.peer.createOffer());
    await iceGatheringDone(this.peer);
    const answer = await this.postOffer(this.peer.localDescription.sdp);
    await this.peer.setRemoteDescription({ type: "answer", sdp: answer });
  }

  async postOffer(sdp) {
    const url = new URL("/v1/realtime/calls", this.settings.server);
    const headers = { "Content-Type": "application/sdp" };
    if (this.settings.apiKey) headers.Authorization = `Bearer ${this.settings.apiKey}`;
    let response;
    try {
      response = await fetch(url, { method: "POST", headers, body: sdp });
    } catch {
      throw unreachable(this.settings.server);
    }
    if (response.status === 401) {
      throw new CallError("401 Unauthorized: the server rejected the API key. Enter a valid key in Settings.");
    }
    if (response.status === 404) {
      throw new CallError("This server has no WebRTC door. Choose the WebSocket transport in Settings.");
    }
    if (!response.ok) {
      const detail = (await response.text()).slice(0, 200);
      throw new CallError(`The server refused the call (HTTP ${response.status}): ${detail}`);
    }
    return response.text();
  }

  onRemoteTrack(event) {
    const stream = event.streams[0] || new MediaStream([event.track]);
    // Chrome only feeds a remote WebRTC stream into Web Audio while a media element plays it.
    this.speaker = new Audio();
    this.speaker.autoplay = true;
    this.speaker.srcObject = stream;
    this.speaker.play().catch(() => showError("The browser blocked audio playback: click the page to allow it."));
    this.tap(this.context.createMediaStreamSource(stream), this.silentSink, {
      onBlock: (message, endMs) => {
        this.agent.feed(message.level, endMs, message.seconds);
        stats.playedSeconds = this.playedBefore + this.agentSecondsSinceStart();
      },
    });
  }

  agentSecondsSinceStart() {
    const segments = stats.agentSegments.slice(this.agentSegmentsBefore);
    return segments.reduce((sum, segment) => sum + (segment.end - segment.start) / 1000, 0);
  }

  send(event) {
    if (this.channel && this.channel.readyState === "open") this.channel.send(JSON.stringify(event));
  }

  sendPcm() {}

  // Opus carries no sample positions the page can match with the server's, so the end of the last
  // microphone sound segment stands for the end of speech. When the microphone is still sounding (noise) or
  // that segment ended long before, the server's VAD end is estimated instead: this event's arrival less the
  // silence window.
  endOfSpeech() {
    const vadEnd = performance.now() - this.silenceMs;
    const last = stats.micSegments[stats.micSegments.length - 1];
    const plausible = last && last.end > vadEnd - MAX_VAD_LAG_MS && last.end <= vadEnd + 100;
    return plausible
      ? { endOfSpeechAt: last.end, endOfSpeechFrom: "microphone" }
      : { endOfSpeechAt: vadEnd, endOfSpeechFrom: "speech_stopped arrival" };
  }

  onSpeechStarted() {}

  playDelta() {}

  close() {
    super.close();
    if (this.speaker) this.speaker.srcObject = null;
    if (this.peer) this.peer.close();
  }
}

// ---------------------------------------------------------------- helpers

// "semantic_vad (auto)", "server_vad (500 ms)" or "manual", and who cancels echo.
function describeTurnDetection(session) {
  const input = (session && session.audio && session.audio.input) || {};
  const detection = input.turn_detection;
  let text = "manual";
  if (detection && detection.type === "semantic_vad") text = `semantic_vad (${detection.eagerness || "auto"})`;
  else if (detection) text = `server_vad (${detection.silence_duration_ms} ms)`;
  window.omnivox.turnDetection = detection ? detection.type : null;
  return `${text} · echo cancelled by ${input.echo_cancellation ? "the server" : "the browser"}`;
}

function silenceWindow(session) {
  const detection = session && session.audio && session.audio.input && session.audio.input.turn_detection;
  return detection && Number.isFinite(detection.silence_duration_ms) ? detection.silence_duration_ms : null;
}

function unreachable(server) {
  return new CallError(`Cannot reach the server at ${new URL(server).origin}. Is it running?`);
}

function iceGatheringDone(peer) {
  if (peer.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ICE_GATHERING_TIMEOUT_MS);
    peer.addEventListener("icegatheringstatechange", () => {
      if (peer.iceGatheringState === "complete") {
        clearTimeout(timer);
        resolve();
      }
    });
  });
}

function bytesToBase64(bytes) {
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(binary);
}

function base64ToInt16(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length & ~1);
  for (let i = 0; i < bytes.length; i++) bytes[i] = binary.charCodeAt(i);
  return new Int16Array(bytes.buffer);
}

function readSettings() {
  return {
    transport: ui.transport.value,
    voice: ui.voice.value,
    instructions: ui.instructions.value,
    transcribe: ui.transcribe.checked,
    apiKey: ui.apiKey.value.trim(),
    server: ui.serverUrl.value.trim() || window.location.origin,
  };
}

// ---------------------------------------------------------------- connect / hang up

async function connect() {
  if (call) return;
  clearError();
  const settings = readSettings();
  call = settings.transport === "websocket" ? new WebSocketCall(settings) : new WebRtcCall(settings);
  window.omnivox.transport = call.kind;
  setButton("Connecting…", true);
  setStatus(`Connecting over ${call.kind === "webrtc" ? "WebRTC" : "WebSocket"}…`);
  try {
    await call.start();
    if (call) {
      window.omnivox.connected = true;
      setButton("Hang up");
      ui.button.classList.add("active");
    }
  } catch (error) {
    showError(error instanceof CallError ? error.message : `Could not connect: ${error.message}`);
    hangUp();
  }
}

function hangUp() {
  if (!call) return;
  const ending = call;
  call = null;
  ending.close();
  window.omnivox.connected = false;
  setAgentState("idle");
  setButton("Connect");
  ui.button.classList.remove("active");
  ui.micLevel.value = 0;
  if (ui.error.hidden) setStatus("Not connected");
  else setStatus("Disconnected");
}

window.omnivox = { state: "idle", transport: null, turnDetection: null, connected: false, stats, connect, hangUp };
window.addEventListener("error", (event) => stats.errors.push(`uncaught: ${event.message}`));
window.addEventListener("unhandledrejection", (event) => stats.errors.push(`unhandled: ${event.reason}`));
stats.stateHistory.push({ state: "idle", t: performance.now() });
ui.serverUrl.value = window.location.origin;
ui.button.addEventListener("click", () => (call ? hangUp() : connect()));
for (const field of [ui.voice, ui.instructions, ui.transcribe]) {
  field.addEventListener("change", () => {
    if (call && call.ready) call.updateSettings(readSettings());
  });
}
