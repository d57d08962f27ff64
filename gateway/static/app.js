// The gateway's web page: upload a recording, watch the transcript arrive, correct it, export it.
// It uses only the public API (the same calls any client makes) and no library: no build step.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_STORAGE = "asr-gateway.api-key";

  // One sentence per error code (gateway/errors.py); the code itself is shown too.
  const SENTENCES = {
    BAD_REQUEST: "The request was not understood.",
    MISSING_FILE: "Choose a file first.",
    EMPTY_FILE: "The file is empty.",
    INVALID_OPTION: "An option of the request is not valid.",
    INVALID_BODY: "The request body is not valid.",
    UNAUTHORIZED: "The gateway refused the API key.",
    REQUEST_TIMEOUT: "The upload stalled and the gateway gave up waiting for it.",
    TOO_MANY_STREAMS: "Too many transcriptions are running for this key; try again when one ends.",
    PAYLOAD_TOO_LARGE: "The file is larger than this gateway accepts.",
    UNSUPPORTED_MEDIA_TYPE: "This file type is not supported.",
    DECODE_ERROR: "The file could not be decoded as audio.",
    NOT_FOUND: "There is no such transcript (it may belong to another key).",
    UNKNOWN_ENGINE: "The gateway has no such engine.",
    CAPACITY_EXHAUSTED: "The engine's queue is full; try again in a moment.",
    CAPACITY_TIMEOUT: "The engine stayed busy too long; try again in a moment.",
    UPSTREAM_ERROR: "The speech recogniser failed.",
    UPSTREAM_UNAVAILABLE: "The speech recogniser is unavailable.",
    TIMEOUT: "The transcription ran out of time.",
    SHUTTING_DOWN: "The gateway is shutting down; try again shortly.",
    STORE_ERROR: "The transcript could not be stored.",
    INTERNAL_ERROR: "The gateway failed unexpectedly.",
    NETWORK: "The gateway could not be reached.",
    MICROPHONE: "The microphone could not be opened (permission refused, or no microphone).",
    LIVE_REFUSED: "The gateway refused the live stream (the key, the engine or its capacity).",
    DISCONNECTED: "The connection closed before the transcript was done.",
  };

  const state = {
    key: sessionStorage.getItem(KEY_STORAGE) || "",
    controller: null, // the running upload's AbortController
    transcript: null, // the last complete transcript: {id, segments, ...}
  };

  class ApiError extends Error {
    constructor(status, code, detail) {
      super(detail || code);
      this.status = status;
      this.code = code;
      this.detail = detail || "";
    }
  }

  // --- the API -----------------------------------------------------------------------------------

  function authHeaders(extra) {
    const headers = new Headers(extra || {});
    if (state.key) headers.set("Authorization", `Bearer ${state.key}`);
    return headers;
  }

  // An error answer's code and detail, whichever API shape it has (native or OpenAI).
  async function apiError(response) {
    let code = `HTTP_${response.status}`;
    let detail = "";
    try {
      const body = await response.json();
      const error = body.error || body;
      if (response.status === 401) code = "UNAUTHORIZED";
      else if (typeof error.code === "string" && error.code) code = error.code;
      detail = error.detail || error.message || "";
    } catch (_) {
      // not JSON: keep the status
    }
    return new ApiError(response.status, code, detail);
  }

  async function api(path, init) {
    const sentKey = Boolean(state.key);
    let response;
    try {
      response = await fetch(path, { ...init, headers: authHeaders(init && init.headers) });
    } catch (exc) {
      if (exc.name === "AbortError") throw exc;
      throw new ApiError(0, "NETWORK", String(exc.message || exc));
    }
    if (!response.ok) {
      const error = await apiError(response);
      if (response.status === 401) askForKey(sentKey);
      throw error;
    }
    return response;
  }

  // Server-sent events from a fetch() body: EventSource cannot POST a file.
  async function* sseEvents(body) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let event = "message";
    let data = [];
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      for (;;) {
        const end = /\r\n|\r|\n/.exec(buffer);
        // A "\r" that ends the chunk may be the first half of a "\r\n": wait for more.
        if (!end || (end[0] === "\r" && end.index === buffer.length - 1)) break;
        const line = buffer.slice(0, end.index);
        buffer = buffer.slice(end.index + end[0].length);
        if (line === "") {
          if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
          event = "message";
          data = [];
        } else if (line.startsWith("event:")) {
          event = line.slice(6).trim();
        } else if (line.startsWith("data:")) {
          data.push(line.slice(5).replace(/^ /, ""));
        } // ":" starts a comment (keepalives): ignored
      }
    }
  }

  // --- the key -----------------------------------------------------------------------------------

  function askForKey(wrongKey) {
    $("key-panel").hidden = false;
    const error = $("key-error");
    if (wrongKey) {
      state.key = "";
      sessionStorage.removeItem(KEY_STORAGE);
      error.textContent =
        "That API key was refused: it is wrong or has been revoked. Check it and enter it again.";
      error.hidden = false;
    } else {
      error.hidden = true;
    }
    $("key-input").focus();
  }

  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const key = $("key-input").value.trim();
    if (!key) return;
    state.key = key;
    sessionStorage.setItem(KEY_STORAGE, key);
    $("key-input").value = "";
    start();
  });

  // --- showing a transcription -------------------------------------------------------------------

  function setStatus(text) {
    $("status").textContent = text;
  }

  function showError(error) {
    const sentence = SENTENCES[error.code] || "The request failed.";
    const detail = error.detail && error.detail !== error.code ? ` The gateway said: ${error.detail}` : "";
    const box = $("error");
    box.textContent = `${error.code}: ${sentence}${detail}`;
    box.hidden = false;
  }

  function setProgress(current, total) {
    const bar = $("progress");
    if (total === null || total === undefined || !(total > 0)) {
      bar.removeAttribute("value"); // indeterminate: a live stream has no end yet
      $("progress-text").textContent = `${current.toFixed(1)} s`;
      return;
    }
    const percent = Math.min(100, Math.round((100 * current) / total));
    bar.value = percent;
    bar.textContent = `${percent} %`;
    $("progress-text").textContent = `${percent} %`;
  }

  function joinText(segments) {
    return segments
      .map((s) => s.text.trim())
      .filter((t) => t)
      .join(" ");
  }

  // The committed segments as plain text, the tentative tail (which may still change) apart.
  function renderTranscript(segments, committed) {
    const region = $("transcript");
    const done = joinText(segments.slice(0, committed));
    const tail = joinText(segments.slice(committed));
    const spans = [];
    if (done) {
      const span = document.createElement("span");
      span.className = "committed";
      span.textContent = done;
      spans.push(span);
    }
    if (tail) {
      const span = document.createElement("span");
      span.className = "tentative";
      span.title = "tentative: may still change";
      span.textContent = (done ? " " : "") + tail;
      spans.push(span);
    }
    region.replaceChildren(...spans);
  }

  function resetResult() {
    state.transcript = null;
    $("error").hidden = true;
    $("cached").hidden = true;
    $("corrected").hidden = true;
    $("exports").hidden = true;
    $("editor-panel").hidden = true;
    $("save-status").textContent = "";
    $("transcript").replaceChildren();
    setProgress(0, 1);
  }

  function formatTime(seconds) {
    const m = Math.floor(seconds / 60);
    const s = (seconds - 60 * m).toFixed(1).padStart(4, "0");
    return `${m}:${s}`;
  }

  // A complete transcript (a stream's done, a stored one): text, badges, exports, editor.
  function showComplete(t, { cached = false } = {}) {
    state.transcript = t;
    renderTranscript(t.segments, t.segments.length);
    $("transcript").setAttribute("aria-busy", "false");
    setProgress(1, 1);
    $("cached").hidden = !cached;
    $("corrected").hidden = !t.corrected;
    const base = `/v1/transcriptions/${encodeURIComponent(t.id)}`;
    for (const link of $("exports").querySelectorAll("a[data-format]")) {
      const format = link.dataset.format;
      link.href = `${base}?format=${format}`;
      link.download = `transcript-${t.id}.${format}`;
    }
    const permalink = `/?id=${encodeURIComponent(t.id)}`;
    $("permalink").href = permalink;
    $("exports").hidden = false;
    history.replaceState(null, "", permalink);
    fillEditor(t.segments);
  }

  // --- upload ------------------------------------------------------------------------------------

  function setBusy(busy) {
    $("record").disabled = busy || !live.supported();
    $("transcribe").disabled = busy;
    $("cancel").disabled = !busy;
    $("transcript").setAttribute("aria-busy", String(busy));
  }

  function handleEvent({ event, data }) {
    if (event === "queued") {
      setStatus(`Waiting in the queue: position ${data.position}.`);
    } else if (event === "transcription") {
      renderTranscript(data.segments, data.committed ?? data.segments.length);
      setProgress(data.current_time, data.total_time);
      const total = data.total_time ? ` of ${data.total_time.toFixed(1)} s` : "";
      setStatus(`Transcribing: ${data.current_time.toFixed(1)} s${total}.`);
    } else if (event === "done") {
      showComplete(data, { cached: data.cached });
      setStatus(data.cached ? "Done (from cache)." : "Done.");
      return true;
    } else if (event === "error") {
      showError(new ApiError(0, data.code, data.detail));
      setStatus("Failed.");
      return true;
    }
    return false;
  }

  async function transcribe(file) {
    resetResult();
    setBusy(true);
    setStatus(`Uploading ${file.name}…`);
    const controller = new AbortController();
    state.controller = controller;
    const engine = $("engine").value;
    const query = engine ? `?engine=${encodeURIComponent(engine)}` : "";
    const body = new FormData();
    body.append("file", file, file.name);
    let ended = false;
    try {
      const response = await api(`/v1/transcriptions/stream${query}`, {
        method: "POST",
        body,
        signal: controller.signal,
      });
      for await (const event of sseEvents(response.body)) {
        if (handleEvent(event)) ended = true;
      }
      if (!ended) {
        showError(new ApiError(0, "DISCONNECTED", ""));
        setStatus("Failed.");
      }
    } catch (exc) {
      if (exc.name === "AbortError") {
        setStatus("Cancelled.");
      } else if (exc instanceof ApiError) {
        showError(exc);
        setStatus("Failed.");
      } else {
        showError(new ApiError(0, "NETWORK", String(exc.message || exc)));
        setStatus("Failed.");
      }
    } finally {
      state.controller = null;
      setBusy(false);
    }
  }

  $("upload-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const file = $("file").files[0];
    if (!file) {
      showError(new ApiError(0, "MISSING_FILE", ""));
      $("file").focus();
      return;
    }
    transcribe(file);
  });

  $("cancel").addEventListener("click", () => {
    if (state.controller) state.controller.abort();
  });

  const zone = $("drop-zone");
  zone.addEventListener("dragover", (e) => {
    e.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer && e.dataTransfer.files.length) {
      $("file").files = e.dataTransfer.files;
      setStatus(`Ready: ${e.dataTransfer.files[0].name}. Press Transcribe.`);
      $("transcribe").focus();
    }
  });

  // --- exports: with a key, a plain link cannot carry the Bearer header, so fetch the file -------

  $("exports").addEventListener("click", async (e) => {
    const link = e.target.closest("a[data-format]");
    if (!link || !state.key) return;
    e.preventDefault();
    try {
      const response = await api(link.getAttribute("href"));
      const url = URL.createObjectURL(await response.blob());
      const a = document.createElement("a");
      a.href = url;
      a.download = link.download;
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    } catch (exc) {
      if (exc instanceof ApiError) showError(exc);
    }
  });

  // --- the segment editor ------------------------------------------------------------------------

  function fillEditor(segments) {
    const list = $("segments");
    list.replaceChildren(
      ...segments.map((segment, i) => {
        const item = document.createElement("li");
        const label = document.createElement("label");
        label.htmlFor = `segment-${i}`;
        label.textContent = `${formatTime(segment.start)} – ${formatTime(segment.end)}`;
        const input = document.createElement("textarea");
        input.id = `segment-${i}`;
        input.value = segment.text.trim();
        input.rows = Math.max(1, Math.ceil(input.value.length / 72));
        item.append(label, input);
        return item;
      }),
    );
    $("editor-panel").hidden = segments.length === 0;
  }

  $("editor").addEventListener("submit", async (e) => {
    e.preventDefault();
    const t = state.transcript;
    if (!t) return;
    const segments = t.segments.map((segment, i) => ({
      ...segment,
      text: $(`segment-${i}`).value.trim(),
    }));
    $("save").disabled = true;
    $("save-status").textContent = "Saving…";
    try {
      const response = await api(`/v1/transcriptions/${encodeURIComponent(t.id)}/corrections`, {
        method: "PUT",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ segments }),
      });
      showComplete(await response.json());
      $("save-status").textContent = "Saved.";
    } catch (exc) {
      $("save-status").textContent = "Not saved.";
      if (exc instanceof ApiError) showError(exc);
    } finally {
      $("save").disabled = false;
    }
  });

  // --- the microphone ----------------------------------------------------------------------------

  // Record streams the microphone through the live WebSocket (GET /v1/transcriptions/live) as
  // WebM/Opus from MediaRecorder with format=auto, not PCM from an AudioWorklet: at 32 kbit/s
  // (Chromium's default is 128) Opus is about 4 KB/s where 16 kHz PCM is 32 KB/s, which matters
  // on a phone's uplink; it needs no worklet module, and the browser encodes off the main
  // thread. The cost is the recorder's 250 ms slices and an Opus decoder per stream on the
  // gateway. A key travels as a subprotocol ("bearer.<key>"): a browser cannot set headers on
  // a WebSocket, and a key in a URL ends up in logs.
  const SLICE_MS = 250;
  const OPUS_BITS = 32000;
  const OPUS_TYPES = ["audio/webm;codecs=opus", "audio/ogg;codecs=opus"];

  const live = {
    socket: null,
    recorder: null,
    media: null,
    sending: Promise.resolve(), // audio and the final "end" leave in order

    supported() {
      return Boolean(
        navigator.mediaDevices &&
          window.MediaRecorder &&
          OPUS_TYPES.some((t) => MediaRecorder.isTypeSupported(t)),
      );
    },

    async start() {
      resetResult();
      setLiveBusy(true);
      try {
        this.media = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1 } });
      } catch (exc) {
        showError(new ApiError(0, "MICROPHONE", String(exc.message || exc)));
        setStatus("Failed.");
        setLiveBusy(false);
        return;
      }
      const mimeType = OPUS_TYPES.find((t) => MediaRecorder.isTypeSupported(t));
      const params = new URLSearchParams({ format: "auto" });
      if ($("engine").value) params.set("engine", $("engine").value);
      const scheme = location.protocol === "https:" ? "wss:" : "ws:";
      const protocols = ["asr-gateway", ...(state.key ? [`bearer.${state.key}`] : [])];
      const url = `${scheme}//${location.host}/v1/transcriptions/live?${params}`;
      const socket = new WebSocket(url, protocols);
      const recorder = new MediaRecorder(this.media, { mimeType, audioBitsPerSecond: OPUS_BITS });
      this.socket = socket;
      this.recorder = recorder;
      this.sending = Promise.resolve();
      let ended = false;
      const send = (piece) => {
        this.sending = this.sending.then(async () => {
          const data = typeof piece === "string" ? piece : await piece.arrayBuffer();
          if (socket.readyState === WebSocket.OPEN) socket.send(data);
        });
      };
      recorder.addEventListener("dataavailable", (e) => {
        if (e.data.size) send(e.data);
      });
      recorder.addEventListener("stop", () => send(JSON.stringify({ type: "end" })));
      socket.addEventListener("open", () => {
        recorder.start(SLICE_MS);
        setStatus("Listening: press Stop to finish.");
        $("stop").disabled = false;
        $("stop").focus();
      });
      socket.addEventListener("message", (m) => {
        const data = JSON.parse(m.data);
        if (handleEvent({ event: data.type, data })) ended = true;
      });
      socket.addEventListener("close", (e) => {
        this.release();
        setLiveBusy(false);
        if (!ended) {
          // A refusal before the upgrade (a key, an engine, capacity) reaches a browser only as
          // a close without a frame: its body is not readable from a WebSocket.
          const code = e.code === 1006 ? "LIVE_REFUSED" : "DISCONNECTED";
          showError(new ApiError(0, code, e.reason));
          setStatus("Failed.");
        }
      });
    },

    // Stop the microphone; the recorder's last slice and then "end" go out, and the gateway
    // answers with done (or error) and closes.
    stop() {
      $("stop").disabled = true;
      if (this.recorder && this.recorder.state !== "inactive") {
        this.recorder.stop();
        setStatus("Finishing the transcript…");
      }
      this.releaseMedia();
    },

    releaseMedia() {
      if (this.media) for (const track of this.media.getTracks()) track.stop();
      this.media = null;
    },

    release() {
      if (this.recorder && this.recorder.state !== "inactive") this.recorder.stop();
      this.releaseMedia();
      this.recorder = null;
      this.socket = null;
    },
  };

  function setLiveBusy(busy) {
    $("record").disabled = busy || !live.supported();
    $("stop").disabled = true; // enabled once the socket is open
    $("transcribe").disabled = busy;
    $("transcript").setAttribute("aria-busy", String(busy));
  }

  $("record").addEventListener("click", () => live.start());
  $("stop").addEventListener("click", () => live.stop());
  if (live.supported()) {
    $("record").disabled = false;
    $("live-note").textContent = "Record streams your microphone; Stop ends it.";
  } else {
    $("live-note").textContent = window.isSecureContext
      ? "This browser cannot record Opus audio: microphone transcription is not available."
      : "The microphone needs HTTPS (or localhost): open the gateway over TLS to record.";
  }

  // --- start -------------------------------------------------------------------------------------

  async function loadEngines() {
    const response = await api("/v1/models");
    const models = (await response.json()).data;
    const select = $("engine");
    const chosen = select.value;
    const options = [new Option("Default engine", "")];
    // Aliases (OpenAI model names) run on an engine of their own name's `root`: list engines.
    for (const model of models) {
      if ((model.root ?? model.id) === model.id) options.push(new Option(model.id, model.id));
    }
    select.replaceChildren(...options);
    select.value = chosen;
    if (select.selectedIndex < 0) select.value = "";
  }

  async function reopen(id) {
    setStatus("Loading the stored transcript…");
    const response = await api(`/v1/transcriptions/${encodeURIComponent(id)}`);
    const t = await response.json();
    showComplete(t);
    setStatus(`Stored transcript (engine ${t.engine}).`);
  }

  async function start() {
    resetResult();
    try {
      await loadEngines();
      $("key-panel").hidden = true;
      const id = new URLSearchParams(location.search).get("id");
      if (id) {
        await reopen(id);
      } else {
        setStatus("Choose a file to start.");
      }
    } catch (exc) {
      if (!(exc instanceof ApiError)) throw exc;
      if (exc.status === 401) {
        setStatus("An API key is needed.");
      } else {
        showError(exc);
        setStatus("Failed.");
      }
    }
  }

  start();
})();
