// vlbridge test page: protocol v1 over /ws (docs/protocol.md), no build step, no dependencies.
//
// Client keeps one logical session across sockets: every server frame has a seq; after a drop
// it reconnects with ?resume=<session>&last_seq=<n> and backoff, drops replayed frames it has
// already seen, and (after a resume) sends a ping whose pong marks the end of the replay: asks
// the server never acknowledged by then are sent again. Each socket's handlers are bound to
// that socket, so a late event from a dead one is ignored.
//
// The model's state comes from /health (state, progress, detail), polled while it is not
// ready: the status line says "loading the model" or why it failed, and Ask is enabled only
// while the link is up and the model can answer.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const AUTH = document.body.dataset.auth === "on";
  const MAX_PIXELS = 2048 * 2048;
  const MAX_BYTES = 8 * 1024 * 1024;
  const BACKOFF = { initial: 250, factor: 2, max: 5000 };
  const OPEN = new Set(["pending", "sent", "queued", "started"]);
  const HEALTH_POLL = 1000; // ms between /health polls while the model is not ready

  class Client {
    constructor(url, ui) {
      this.url = url;
      this.ui = ui;
      this.token = "";
      this.session = null;
      this.lastSeq = 0;
      this.pingInterval = 45;
      this.asks = new Map(); // id -> {frame, state}
      this.deferred = []; // cancels and resets made while not ready
      this.ready = false;
      this.syncing = false;
      this.ws = null;
      this.attempt = 0;
      this.everConnected = false;
      this.counter = 0;
      this.watchdog = null;
      this.retryTimer = null;
    }

    connect() {
      clearTimeout(this.retryTimer);
      const url = new URL(this.url);
      if (this.token) url.searchParams.set("token", this.token);
      if (this.session) {
        url.searchParams.set("resume", this.session);
        url.searchParams.set("last_seq", String(this.lastSeq));
      }
      this.ui.link(this.everConnected ? "reconnecting" : "connecting", this.attempt);
      const ws = new WebSocket(url);
      this.ws = ws;
      ws.onmessage = (e) => { if (ws === this.ws) this.receive(e.data); };
      ws.onclose = (e) => { if (ws === this.ws) this.closed(e); };
      this.arm();
    }

    arm() { // a server silent past ping_interval + 15 s is dead
      clearTimeout(this.watchdog);
      const ws = this.ws;
      this.watchdog = setTimeout(() => { if (ws === this.ws) ws.close(4000, "server silent"); },
        (this.pingInterval + 15) * 1000);
    }

    closed(event) {
      clearTimeout(this.watchdog);
      this.ready = false;
      this.syncing = false;
      this.ws = null;
      if (event.code === 4401 || (AUTH && !this.everConnected && !this.session)) {
        this.ui.link("refused", 0, event.reason || "check the token");
        return; // the user must act; retrying the same token would only repeat it
      }
      this.attempt += 1;
      const base = Math.min(BACKOFF.max, BACKOFF.initial * BACKOFF.factor ** (this.attempt - 1));
      const delay = base * (0.8 + 0.4 * Math.random());
      this.ui.dropped(event.code, delay, this.attempt);
      this.retryTimer = setTimeout(() => this.connect(), delay);
    }

    send(frame) {
      if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(frame));
    }

    ask(text, images) {
      const id = `w${++this.counter}`;
      const frame = { type: "ask", id, text };
      if (images.length) frame.images = images;
      const ask = { frame, state: "pending" };
      this.asks.set(id, ask);
      if (this.ready) this.sendAsk(ask);
      return id;
    }

    sendAsk(ask) { ask.state = "sent"; this.send(ask.frame); }

    cancel(id) {
      const ask = this.asks.get(id);
      if (!ask || !OPEN.has(ask.state)) return;
      if (ask.state === "pending") {
        ask.state = "failed";
        this.ui.frame({ type: "error", id, code: "cancelled", message: "cancelled before it was sent" });
        return;
      }
      this.control({ type: "cancel", id });
    }

    reset() { this.control({ type: "reset" }); }

    control(frame) { if (this.ready) this.send(frame); else this.deferred.push(frame); }

    receive(data) {
      this.arm();
      let frame;
      try { frame = JSON.parse(data); } catch { console.warn("not JSON", data); return; }
      if (frame.type === "hello") return this.hello(frame);
      if (typeof frame.seq === "number") {
        if (frame.seq <= this.lastSeq) return; // replayed, already shown
        if (frame.seq > this.lastSeq + 1) this.ui.note(`frames ${this.lastSeq + 1}..${frame.seq - 1} were lost`);
        this.lastSeq = frame.seq;
      }
      if (frame.type === "ping") { this.send({ type: "pong", ts: frame.ts }); return; }
      if (frame.type === "pong") { if (this.syncing) this.synced(); return; }
      const ask = frame.id !== undefined ? this.asks.get(frame.id) : undefined;
      if (ask) {
        if (!OPEN.has(ask.state)) return;
        ask.state = { queued: "queued", started: "started", delta: "started", done: "done", error: "failed" }[frame.type] || ask.state; // others ("reading", newer ones) leave it
      }
      this.ui.frame(frame);
    }

    hello(frame) {
      this.pingInterval = frame.ping_interval || 45;
      const resumed = this.session !== null && frame.session === this.session;
      if (this.session !== null && !resumed) {
        this.ui.note("the server no longer knew our session: earlier turns are forgotten");
        for (const [id, ask] of this.asks) {
          if (ask.state === "queued" || ask.state === "started") {
            ask.state = "failed";
            this.ui.frame({ type: "error", id, code: "session_lost", message: "the server lost the session while answering" });
          } else if (ask.state === "sent") ask.state = "pending";
        }
        this.deferred = this.deferred.filter((f) => f.type !== "cancel");
      }
      if (!resumed) this.lastSeq = typeof frame.seq === "number" ? frame.seq : 0;
      this.session = frame.session;
      const wasReconnect = this.everConnected;
      this.everConnected = true;
      this.attempt = 0;
      this.ui.connected(frame, resumed, wasReconnect);
      if (resumed && [...this.asks.values()].some((a) => a.state === "sent")) {
        this.syncing = true;
        this.send({ type: "ping", ts: 0 });
      } else this.synced();
    }

    synced() {
      this.syncing = false;
      this.ready = true;
      this.ui.ready();
      for (const ask of this.asks.values()) if (ask.state === "pending" || ask.state === "sent") this.sendAsk(ask);
      const deferred = this.deferred;
      this.deferred = [];
      deferred.forEach((f) => this.send(f));
    }
  }

  // -- pictures ------------------------------------------------------------------------------

  const readDataURL = (blob) => new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });

  const loadImage = (src) => new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("not a picture this browser can read"));
    img.src = src;
  });

  // The original bytes when they are already fine; else one frame, shrunk, re-encoded.
  async function preparePicture(file) {
    const url = await readDataURL(file);
    const img = await loadImage(url);
    const w = img.naturalWidth, h = img.naturalHeight;
    const plain = ["image/png", "image/jpeg", "image/webp"].includes(file.type);
    if (plain && w * h <= MAX_PIXELS && file.size <= MAX_BYTES) {
      return { url, base64: url.slice(url.indexOf(",") + 1), width: w, height: h, note: "" };
    }
    const scale = Math.min(1, Math.sqrt(MAX_PIXELS / (w * h)));
    const canvas = document.createElement("canvas");
    canvas.width = Math.max(1, Math.round(w * scale));
    canvas.height = Math.max(1, Math.round(h * scale));
    canvas.getContext("2d").drawImage(img, 0, 0, canvas.width, canvas.height);
    const type = file.type === "image/png" || file.type === "image/gif" ? "image/png" : "image/jpeg";
    const out = canvas.toDataURL(type, 0.9);
    return { url: out, base64: out.slice(out.indexOf(",") + 1), width: canvas.width, height: canvas.height, note: "re-encoded" };
  }

  // -- the page ------------------------------------------------------------------------------

  const turns = new Map(); // ask id -> {li, answer, meta, sent, first, text, reconnects}
  let picture = null; // {name, base64, url, width, height, sent}
  let current = null; // id of the answer in progress
  let linked = null; // the status line's text while the link is up (null: it is not)
  // From /health; "unknown" (no /health, e.g. behind a proxy that hides it) does not block asking.
  let model = { state: "unknown", progress: 0, detail: "" };
  let healthTimer = null;
  let healthRun = 0; // only the newest poll goes on (a reconnect may start one while one runs)

  const setStatus = (kind, text) => {
    $("status").className = `status ${kind}`;
    $("status-text").textContent = text;
  };

  const canAnswer = () => model.state === "ready" || model.state === "unknown";

  // The status line: the link's state, and once it is up, the model's.
  function showStatus() {
    if (linked === null) return; // ui.link/dropped show the link's own state
    if (model.state === "loading") {
      const pct = Math.round((model.progress || 0) * 100);
      setStatus("loading", `connected · loading the model, ${pct}%${model.detail ? ` · ${model.detail}` : ""}`);
    } else if (model.state === "failed") {
      setStatus("failed", `connected · the model failed to load: ${model.detail || "no reason given"}`);
    } else if (model.state === "stopped") {
      setStatus("failed", "connected · the model is stopped (the server is shutting down)");
    } else setStatus("online", linked);
    updateAsk();
  }

  function updateAsk() {
    const why = current ? "an answer is in progress"
      : !client.ready ? "not connected"
        : !canAnswer() ? (model.state === "loading" ? "the model is still loading" : "the model cannot answer")
          : "";
    $("send").disabled = Boolean(why);
    $("send").title = why && !current ? `Ask is off: ${why}` : "";
  }

  // Poll /health until the model is ready (again after a reconnect: the server may be new).
  async function pollHealth() {
    clearTimeout(healthTimer);
    healthTimer = null;
    const run = ++healthRun;
    try {
      const response = await fetch("/health", { cache: "no-store" });
      const body = await response.json();
      if (run !== healthRun) return;
      if (typeof body.state === "string") {
        model = { state: body.state, progress: body.progress, detail: body.detail || "" };
      }
    } catch {
      // unreachable now (the link's own status says so) or not ours: try again later
      if (run !== healthRun) return;
    }
    showStatus();
    if (model.state !== "ready") healthTimer = setTimeout(pollHealth, HEALTH_POLL);
  }

  const ui = {
    link(kind, attempt, detail) {
      linked = null;
      updateAsk();
      if (kind === "refused") {
        setStatus("offline", `refused: ${detail}`);
        $("auth").hidden = false;
        $("token").focus();
      } else setStatus(kind === "connecting" ? "connecting" : "reconnecting",
        kind === "connecting" ? "connecting…" : `reconnecting${attempt > 1 ? ` (attempt ${attempt})` : ""}…`);
    },
    dropped(code, delay, attempt) {
      linked = null;
      updateAsk();
      setStatus("reconnecting", `connection lost; retrying in ${(delay / 1000).toFixed(1)} s`);
      if (current) {
        const turn = turns.get(current);
        const text = `⚡ connection lost (code ${code}); reconnecting${attempt > 1 ? `, attempt ${attempt}` : ""}…`;
        if (turn.lost) turn.lost.textContent = text; // one line per outage, not one per attempt
        else {
          turn.lost = addNote(turn, text);
          markAnswer(turn, "⚡", "the connection was lost here");
        }
      }
    },
    connected(hello, resumed, wasReconnect) {
      linked = wasReconnect ? (resumed ? "reconnected · session resumed" : "reconnected · new session") : "connected";
      showStatus();
      if (!resumed || model.state !== "ready") pollHealth(); // a new session: perhaps a new server
      $("session").textContent = `session ${hello.session}${hello.model ? ` · ${hello.model}` : ""}`;
      if (AUTH) $("auth").hidden = true;
      if (wasReconnect && current) {
        const turn = turns.get(current);
        turn.reconnects += 1;
        turn.lost = null;
        addNote(turn, resumed ? "↻ resumed: the answer continues" : "↻ new session");
      }
    },
    ready() { updateAsk(); },
    note(text) { if (current) addNote(turns.get(current), `! ${text}`); else progress(text); },
    frame(frame) {
      const turn = turns.get(frame.id);
      if (!turn) {
        if (frame.type === "error") progress(`server: ${frame.code}: ${frame.message}`);
        return;
      }
      switch (frame.type) {
        case "queued": setTurnState(turn, frame.position ? `queued, position ${frame.position}` : "queued"); break;
        case "reading": setTurnState(turn, "reading the picture…"); break;
        // With a new picture the model reads it now, with the prompt: most of the wait.
        case "started": setTurnState(turn, turn.pictured ? "reading the picture…" : "thinking…"); break;
        case "delta":
          if (turn.first === null) { turn.first = performance.now(); setTurnState(turn, "answering…"); }
          turn.text += frame.text;
          turn.answer.textContent = turn.text;
          break;
        case "done": finish(turn, frame); break;
        case "error":
          if (frame.code === "cancelled") { // asked for: not a failure
            turn.li.classList.add("cancelled");
            setTurnState(turn, "cancelled");
          } else {
            turn.li.classList.add("failed");
            setTurnState(turn, `${frame.code}: ${frame.message}${frame.retry_after ? ` (retry in ${frame.retry_after} s)` : ""}`);
          }
          end(frame.id);
          break;
      }
    },
  };

  function progress(text) { $("progress").textContent = text; }

  function addNote(turn, text) {
    const note = document.createElement("li");
    note.textContent = text;
    turn.notes.append(note);
    return note;
  }

  // An inline mark where the text was when the connection dropped; the text goes on after it.
  function markAnswer(turn, symbol, title) {
    const mark = document.createElement("span");
    mark.className = "mark";
    mark.textContent = symbol;
    mark.title = title;
    turn.answer.after(mark);
    turn.answer = document.createElement("span");
    turn.answer.className = "answer-text";
    mark.after(turn.answer);
    turn.text = "";
  }

  function setTurnState(turn, text) { turn.meta.textContent = text; }

  function finish(turn, frame) {
    const now = performance.now();
    const streamed = [...turn.li.querySelectorAll(".answer-text")].map((s) => s.textContent).join("");
    if (streamed !== frame.text) turn.answer.textContent = turn.text + frame.text.slice(streamed.length);
    const ttft = ((turn.first ?? now) - turn.sent) / 1000;
    const total = (now - turn.sent) / 1000;
    const tokens = frame.usage && frame.usage.completion_tokens;
    const parts = [`TTFT ${ttft.toFixed(2)} s`, `total ${total.toFixed(2)} s`];
    if (typeof tokens === "number") {
      const decode = total - ttft;
      const rate = tokens > 1 && decode > 0 ? (tokens - 1) / decode : tokens / Math.max(total, 1e-3);
      parts.push(`${tokens} tokens, ${rate.toFixed(1)} tokens/s`);
    }
    if (turn.reconnects) parts.push(`resumed after ${turn.reconnects} reconnect${turn.reconnects > 1 ? "s" : ""}`);
    turn.li.classList.add("done");
    setTurnState(turn, parts.join(" · "));
    end(frame.id);
  }

  function end(id) {
    if (current === id) current = null;
    $("cancel").disabled = true;
    updateAsk();
  }

  function addTurn(id, text, pic) {
    const li = document.createElement("li");
    li.className = "turn";
    li.dataset.id = id;
    const q = document.createElement("div");
    q.className = "question";
    if (pic) {
      const thumb = document.createElement("img");
      thumb.src = pic.url;
      thumb.alt = pic.name;
      q.append(thumb);
    }
    q.append(document.createTextNode(text));
    const a = document.createElement("div");
    a.className = "answer";
    const answer = document.createElement("span");
    answer.className = "answer-text";
    a.append(answer);
    const notes = document.createElement("ul");
    notes.className = "notes";
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = client.ready ? "sending…" : "waiting for the connection…";
    li.append(q, a, notes, meta);
    $("turns").append(li);
    li.scrollIntoView({ block: "end" });
    turns.set(id, { li, answer, notes, meta, lost: null, sent: performance.now(), first: null, text: "", reconnects: 0, pictured: Boolean(pic) });
  }

  async function choose(file) {
    if (!file) return;
    try {
      const p = await preparePicture(file);
      picture = { name: file.name || "pasted picture", ...p, sent: false };
    } catch (err) {
      progress(`${file.name}: ${err.message}`);
      return;
    }
    $("preview").src = picture.url;
    $("preview").hidden = false;
    $("drop-hint").hidden = true;
    $("clear-picture").hidden = false;
    showPictureInfo();
  }

  function showPictureInfo() {
    if (!picture) { $("picture-name").textContent = ""; return; }
    const how = picture.sent ? "sent; the model remembers it" : "goes with your next question";
    const note = picture.note ? `, ${picture.note}` : "";
    $("picture-name").textContent = `${picture.name} (${picture.width}×${picture.height}${note}) — ${how}`;
  }

  function clearPicture() {
    picture = null;
    $("preview").hidden = true;
    $("preview").removeAttribute("src");
    $("drop-hint").hidden = false;
    $("clear-picture").hidden = true;
    $("file").value = "";
    showPictureInfo();
  }

  function ask() {
    const text = $("question").value.trim();
    if (!text || current || $("send").disabled) return;
    const send = picture && !picture.sent ? picture : null;
    const id = client.ask(text, send ? [send.base64] : []);
    addTurn(id, text, send);
    if (send) { send.sent = true; showPictureInfo(); }
    current = id;
    $("question").value = "";
    $("cancel").disabled = false;
    updateAsk();
  }

  // -- wiring --------------------------------------------------------------------------------

  const wsUrl = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;
  const client = new Client(wsUrl, ui);
  window.vlbridge = client; // for the curious, and for tests

  $("file").addEventListener("change", (e) => choose(e.target.files[0]));
  $("clear-picture").addEventListener("click", clearPicture);
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); choose(e.dataTransfer.files[0]); });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file").click(); } });
  document.addEventListener("paste", (e) => {
    const item = [...e.clipboardData.items].find((i) => i.type.startsWith("image/"));
    if (item) choose(item.getAsFile());
  });
  $("ask").addEventListener("submit", (e) => { e.preventDefault(); ask(); });
  $("question").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); ask(); }
  });
  $("cancel").addEventListener("click", () => { if (current) client.cancel(current); });
  $("reset").addEventListener("click", () => {
    client.reset();
    if (picture) { picture.sent = false; showPictureInfo(); }
    progress("conversation reset: the model forgets the earlier turns");
  });
  $("auth").addEventListener("submit", (e) => {
    e.preventDefault();
    client.token = $("token").value.trim();
    sessionStorage.setItem("vlbridge-token", client.token);
    client.connect();
  });

  updateAsk();
  pollHealth();
  if (AUTH) {
    client.token = sessionStorage.getItem("vlbridge-token") || "";
    $("auth").hidden = Boolean(client.token);
    if (client.token) client.connect();
    else { setStatus("offline", "token needed"); $("token").focus(); }
  } else client.connect();
})();
