"use strict";
// Client of the causal-forcing streaming server; the protocol is described in docs/serving.md.
// Frames arrive as binary JPEG messages; they are decoded in order and played at the model's fps
// (faster when the queue grows, so the picture never lags far behind the generator).
(() => {
  const $ = (id) => document.getElementById(id);
  const canvas = $("screen");
  const ctx = canvas.getContext("2d");
  const ui = {
    prompt: $("prompt"), seed: $("seed"), recache: $("recache"), image: $("image"), clearImage: $("clear-image"),
    start: $("start"), switch: $("switch"), stop: $("stop"), download: $("download"), status: $("status"),
    fps: $("fps"), latency: $("latency"), switchLatency: $("switch-latency"), frames: $("frames"), model: $("model"),
  };
  const state = {
    ws: null, hello: null, running: false, busy: false, imageReady: false, uploading: false,
    fps: 16, queue: [], decoding: Promise.resolve(), lastDraw: 0, shownAt: [], switchSentAt: null,
  };
  // Counters for people and for the browser test.
  const stats = { received: 0, shown: 0, blocks: 0, runs: 0, stopped: 0, switches: 0, errors: [] };
  window.cfStats = stats;

  function setStatus(text, isError = false) {
    ui.status.textContent = text;
    ui.status.classList.toggle("error", isError);
  }

  function updateButtons() {
    const connected = state.ws !== null && state.hello !== null;
    ui.start.disabled = !connected || state.running;
    ui.switch.disabled = !connected || !state.running;
    ui.stop.disabled = !connected || !state.running;
    ui.image.disabled = !connected || !state.hello.i2v;
    ui.clearImage.disabled = !state.imageReady;
  }

  function send(message) {
    if (state.ws !== null && state.ws.readyState === WebSocket.OPEN) {
      state.ws.send(typeof message === "string" || message instanceof ArrayBuffer ? message : JSON.stringify(message));
    }
  }

  // ---- messages from the server ------------------------------------------------------------------------
  const handlers = {
    hello(msg) {
      state.hello = msg;
      state.fps = msg.fps;
      canvas.width = msg.width;
      canvas.height = msg.height;
      ui.model.textContent = `${msg.model} · ${msg.width}×${msg.height} @ ${msg.fps} fps`;
      ui.prompt.maxLength = msg.limits.max_prompt_chars;
      setStatus("ready");
    },
    busy(msg) {
      state.busy = true;
      setStatus(msg.message, true);
    },
    started(msg) {
      state.running = true;
      stats.runs += 1;
      ui.download.hidden = true;
      setStatus(`streaming: seed ${msg.seed}${msg.image ? ", from the image" : ""}`);
    },
    block(msg) {
      stats.blocks += 1;
      ui.latency.textContent = msg.latency_ms.toFixed(0);
    },
    prompt_set(msg) {
      stats.switches += 1;
      setStatus(`prompt switched at block ${msg.block}` + (msg.recached ? `, ${msg.recached} frame(s) re-cached` : ""));
    },
    image(msg) {
      state.uploading = false;
      state.imageReady = true;
      setStatus(`image ${msg.width}×${msg.height} ready: Start begins from it`);
    },
    stopped(msg) {
      state.running = false;
      stats.stopped += 1;
      if (msg.download) {
        ui.download.href = msg.download;
        ui.download.download = `causal-forcing-${msg.run}.mp4`;
        ui.download.hidden = false;
      }
      const why = { done: "finished", limit: "stopped at the frame limit", stopped: "stopped" }[msg.reason];
      if (why) setStatus(`${why} after ${msg.frames} frames`);
    },
    error(msg) {
      stats.errors.push(msg);
      if (state.uploading) {
        state.uploading = false;
        state.imageReady = false;
        ui.image.value = "";
      }
      setStatus(`error: ${msg.message}`, true);
    },
    pong() {},
  };

  function onText(text) {
    let msg;
    try {
      msg = JSON.parse(text);
    } catch (e) {
      setStatus("the server sent a message that is not JSON", true);
      return;
    }
    const handler = handlers[msg.type];
    if (handler) handler(msg);
    updateButtons();
  }

  function onFrame(blob) {
    stats.received += 1;
    if (state.switchSentAt !== null && stats.switches > 0) {
      ui.switchLatency.textContent = (performance.now() - state.switchSentAt).toFixed(0);
      state.switchSentAt = null;
    }
    state.decoding = state.decoding
      .then(() => createImageBitmap(blob))
      .then((bitmap) => state.queue.push(bitmap))
      .catch(() => setStatus("a frame could not be decoded", true));
  }

  // ---- playback ------------------------------------------------------------------------------------------
  function draw(now) {
    const interval = 1000 / state.fps;
    const behind = state.queue.length > state.fps;  // more than a second queued: catch up
    if (state.queue.length > 0 && (behind || now - state.lastDraw >= interval)) {
      const bitmap = state.queue.shift();
      ctx.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
      bitmap.close();
      state.lastDraw = now;
      stats.shown += 1;
      ui.frames.textContent = stats.shown;
      state.shownAt.push(now);
    }
    while (state.shownAt.length > 0 && now - state.shownAt[0] > 2000) state.shownAt.shift();
    ui.fps.textContent = state.shownAt.length > 1
      ? ((state.shownAt.length - 1) * 1000 / (now - state.shownAt[0])).toFixed(1) : "–";
    requestAnimationFrame(draw);
  }

  // ---- controls ------------------------------------------------------------------------------------------
  ui.start.addEventListener("click", () => {
    const seedText = ui.seed.value.trim();
    const seed = seedText === "" ? null : Number(seedText);
    if (seed !== null && !(Number.isSafeInteger(seed) && seed >= 0)) {
      setStatus("the seed must be a whole number ≥ 0 (or empty for a random one)", true);
      return;
    }
    send({ type: "start", prompt: ui.prompt.value, seed: seed, image: state.imageReady });
  });
  ui.switch.addEventListener("click", () => {
    state.switchSentAt = performance.now();
    send({ type: "prompt", prompt: ui.prompt.value, recache: ui.recache.checked });
  });
  ui.stop.addEventListener("click", () => send({ type: "stop" }));
  ui.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      (state.running ? ui.switch : ui.start).click();
    }
  });
  ui.image.addEventListener("change", async () => {
    const file = ui.image.files[0];
    if (!file) return;
    if (file.size > state.hello.limits.max_image_bytes) {
      setStatus(`the image is larger than ${state.hello.limits.max_image_bytes} bytes`, true);
      ui.image.value = "";
      return;
    }
    state.uploading = true;
    send(await file.arrayBuffer());
  });
  ui.clearImage.addEventListener("click", () => {
    state.imageReady = false;
    ui.image.value = "";
    setStatus("image cleared");
    updateButtons();
  });

  function connect() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(`${scheme}//${location.host}/ws`);
    ws.binaryType = "blob";
    ws.onmessage = (event) => (typeof event.data === "string" ? onText(event.data) : onFrame(event.data));
    ws.onclose = (event) => {
      state.ws = null;
      state.running = false;
      updateButtons();
      if (!state.busy) setStatus(`disconnected (code ${event.code}); reload the page to reconnect`, true);
    };
    state.ws = ws;
  }

  connect();
  requestAnimationFrame(draw);
})();
