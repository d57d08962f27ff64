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

  // Record and Stop stream the microphone through the live WebSocket endpoint once the gateway
  // has one; until then they stay disabled and the note says why.
  const live = {
    available: false,
    start() {
      setStatus("Microphone transcription is not available yet.");
    },
    stop() {},
  };
  $("record").addEventListener("click", () => live.start());
  $("stop").addEventListener("click", () => live.stop());

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
