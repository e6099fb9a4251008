// causvid live: talks the protocol of docs/protocol.md to /ws on the server that served this page.
"use strict";

const $ = (id) => document.getElementById(id);
const HEADER_BYTES = 32;  // "CVF1", index u32, block u32, dropped u32, t_origin f64, t_ready f64

const view = $("view");
const ctx = view.getContext("2d");
let ws = null;
let hello = null;
let running = false;
let stream = null;     // per-stream counters, reset on start
let capture = null;    // v2v input: {timer, sentAt: Map(index -> ms)}

function log(text) {
  const el = $("log");
  el.textContent = `${new Date().toLocaleTimeString()} ${text}\n` + el.textContent.slice(0, 4000);
}

function socketUrl() {
  const url = new URL("/ws", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  const token = new URLSearchParams(location.search).get("token");
  if (token) url.searchParams.set("token", token);
  return url.toString();
}

function connect() {
  if (ws && ws.readyState === WebSocket.OPEN) return Promise.resolve();
  return new Promise((resolve, reject) => {
    ws = new WebSocket(socketUrl());
    ws.binaryType = "arraybuffer";
    ws.onmessage = (message) => {
      if (message.data instanceof ArrayBuffer) return onFrame(message.data);
      const event = JSON.parse(message.data);
      if (event.type === "hello") { hello = event; resolve(); }
      onEvent(event);
    };
    ws.onclose = (close) => {
      setRunning(false);
      $("state").textContent = `disconnected (${close.code}${close.reason ? " " + close.reason : ""})`;
      reject(new Error("connection closed"));
    };
  });
}

function onEvent(event) {
  switch (event.type) {
    case "hello":
      view.width = event.width; view.height = event.height;
      break;
    case "started":
      setRunning(true);
      $("state").textContent = `streaming (${event.mode}, ${event.pacing})`;
      $("current-prompt").textContent = event.prompt;
      if (event.mode === "v2v") startCapture(event.fps);
      break;
    case "prompt":
      $("current-prompt").textContent = event.prompt;
      log(`prompt switched at block ${event.block}${event.cut ? " (cut)" : ""}: ${event.prompt}`);
      break;
    case "status":
      $("dropped").textContent = event.dropped;
      break;
    case "done": case "stopped":
      setRunning(false);
      $("state").textContent = event.type;
      stopCapture();
      break;
    case "error":
      log(`error ${event.code}: ${event.message}`);
      if (event.fatal) $("state").textContent = `refused: ${event.code}`;
      break;
  }
  if (event.type !== "status") log(event.type);
}

function onFrame(buffer) {
  const header = new DataView(buffer, 0, HEADER_BYTES);
  const magic = String.fromCharCode(...new Uint8Array(buffer, 0, 4));
  if (magic !== "CVF1" || !stream) return;
  const index = header.getUint32(4, true);
  const dropped = header.getUint32(12, true);
  const tOrigin = header.getFloat64(16, true);
  const now = Date.now();
  // v2v: from sending input frame i to receiving output frame i; else from the block's start (server clock).
  const sent = capture && capture.sentAt.get(index);
  const latency = sent !== undefined && sent !== null ? now - sent : now - tOrigin * 1000;
  if (capture) capture.sentAt.delete(index);
  stream.frames += 1;
  stream.times.push(now);
  while (stream.times.length > 1 && now - stream.times[0] > 2000) stream.times.shift();
  stream.latency = stream.latency === null ? latency : 0.9 * stream.latency + 0.1 * latency;
  $("frames").textContent = stream.frames;
  $("dropped").textContent = dropped;
  $("latency").textContent = `${Math.round(stream.latency)} ms`;
  if (stream.times.length > 1) {
    const span = (stream.times[stream.times.length - 1] - stream.times[0]) / 1000;
    $("fps").textContent = ((stream.times.length - 1) / span).toFixed(1);
  }
  const jpeg = new Blob([new Uint8Array(buffer, HEADER_BYTES)], { type: "image/jpeg" });
  createImageBitmap(jpeg).then((bitmap) => {
    if (index >= stream.drawn) {  // decoding is async: never draw an older frame over a newer one
      stream.drawn = index;
      ctx.drawImage(bitmap, 0, 0, view.width, view.height);
    }
    bitmap.close();
  });
}

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function start() {
  try { await connect(); } catch (error) { return; }
  const mode = $("mode").value;
  const message = {
    type: "start", mode, prompt: $("prompt").value, seed: Number($("seed").value) || 0,
    pacing: $("pacing").value, interpolate_blocks: Number($("interpolate").value),
  };
  if (mode === "i2v") {
    const file = $("image").files[0];
    if (!file) return log("choose an image first");
    message.image = await readAsDataUrl(file);
  }
  if (mode === "v2v") {
    message.strength = Number($("strength").value);
    if (!(await openSource())) return;
  }
  stream = { frames: 0, times: [], latency: null, drawn: -1 };
  ws.send(JSON.stringify(message));
}

async function openSource() {
  const video = $("source");
  try {
    if ($("source-kind").value === "webcam") {
      video.srcObject = await navigator.mediaDevices.getUserMedia({ video: true });
    } else {
      const file = $("video-file").files[0];
      if (!file) { log("choose a video file first"); return false; }
      video.srcObject = null;
      video.src = URL.createObjectURL(file);
    }
    await video.play();
    return true;
  } catch (error) {
    log(`cannot open the video source: ${error.message}`);
    return false;
  }
}

function startCapture(fps) {
  const video = $("source");
  const grab = document.createElement("canvas");
  grab.width = hello.width; grab.height = hello.height;
  const grabCtx = grab.getContext("2d");
  capture = { sentAt: new Map(), next: 0, busy: false };
  capture.timer = setInterval(() => {
    // Skip a tick rather than queue up frames the server cannot take yet.
    if (capture.busy || ws.bufferedAmount > 256 * 1024 || video.readyState < 2) return;
    capture.busy = true;
    grabCtx.drawImage(video, 0, 0, grab.width, grab.height);
    grab.toBlob((blob) => {
      capture.busy = false;
      if (!running || !blob) return;
      capture.sentAt.set(capture.next++, Date.now());
      ws.send(blob);
    }, "image/jpeg", 0.85);
  }, 1000 / fps);
}

function stopCapture() {
  if (!capture) return;
  clearInterval(capture.timer);
  capture = null;
  const video = $("source");
  if (video.srcObject) video.srcObject.getTracks().forEach((track) => track.stop());
  video.pause();
}

function setRunning(value) {
  running = value;
  $("start").disabled = value;
  $("switch").disabled = !value;
  $("stop").disabled = !value;
}

$("start").onclick = start;
$("stop").onclick = () => { stopCapture(); ws.send(JSON.stringify({ type: "stop" })); };
// How a switch treats the KV cache; the empty choice sends nothing, leaving the model's default.
const SWITCH_MODES = { cut: { cut: true }, keep: { cut: false, recache: false }, recache: { cut: false, recache: true } };
$("switch").onclick = () => ws.send(JSON.stringify({
  type: "prompt", prompt: $("prompt").value, interpolate_blocks: Number($("interpolate").value),
  ...(SWITCH_MODES[$("switch-mode").value] || {}),
}));
$("mode").onchange = () => {
  $("i2v-options").classList.toggle("hidden", $("mode").value !== "i2v");
  $("v2v-options").classList.toggle("hidden", $("mode").value !== "v2v");
};
connect().then(() => { $("state").textContent = "connected"; }).catch(() => {});
