"""The page `gen-lightning play` serves: the generated screen, scaled up, that turns mouse and keyboard input into
actions (gen_lightning.actions) POSTed to the server one at a time.

Self-contained (no external assets): it must work on a cluster node without internet, through `ssh -L`.
A model step takes from milliseconds to a second, far longer than between two mouse moves, so while a request is in
flight the moves that follow coalesce into the latest position; presses, releases and keys are queued, never dropped.
URLs are relative, so the page also works behind a proxy that serves it under a path (jupyter-server-proxy).
`document.body.dataset.state` is "idle" once the queue is empty and the last frame is shown (the browser test
waits on it).
"""

from __future__ import annotations

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>gen-lightning play</title>
<style>
  body { margin: 0; padding: 16px; font: 14px system-ui, sans-serif; background: #202124; color: #e8eaed; }
  #screen { display: block; image-rendering: pixelated; cursor: crosshair; user-select: none;
            border: 0; margin: 0 0 12px 0; background: #000; }
  #bar { display: flex; gap: 16px; align-items: center; }
  #status.error { color: #f28b82; }
  button { font: inherit; padding: 4px 12px; }
  kbd { border: 1px solid #5f6368; border-radius: 3px; padding: 0 4px; }
</style>
</head>
<body data-state="loading">
<img id="screen" alt="generated screen" draggable="false">
<div id="bar">
  <button id="reset" type="button">Reset</button>
  <span>step <b id="step">-</b></span>
  <span id="status">loading…</span>
</div>
<p>Move, click and drag on the screen; type <kbd>a</kbd>–<kbd>z</kbd>, <kbd>0</kbd>–<kbd>9</kbd>, <kbd>Space</kbd>,
<kbd>Backspace</kbd>, <kbd>Enter</kbd>, <kbd>Tab</kbd>. Every event is one model step.</p>
<script>
"use strict";
const screenEl = document.getElementById("screen");
const stepEl = document.getElementById("step");
const statusEl = document.getElementById("status");
const NAMED_KEYS = {" ": "space", "Backspace": "BackSpace", "Enter": "Return", "Tab": "Tab"};
const queue = [];            // items: {kind: "move" | "input" | "reset", action}
const pointer = {x: 0.5, y: 0.5, button: 0};
let busy = false;

function keyName(event) {
  if (event.ctrlKey || event.altKey || event.metaKey) return null;  // browser shortcuts stay the browser's
  if (event.key in NAMED_KEYS) return NAMED_KEYS[event.key];
  const key = event.key.length === 1 ? event.key.toLowerCase() : "";
  return /^[a-z0-9]$/.test(key) ? key : null;
}

function setPointer(event) {
  const rect = screenEl.getBoundingClientRect();
  const clamp = (v) => Math.min(1, Math.max(0, v));
  pointer.x = clamp((event.clientX - rect.left) / rect.width);
  pointer.y = clamp((event.clientY - rect.top) / rect.height);
}

function action(click, key) {
  return {x: pointer.x, y: pointer.y, button: pointer.button, click: click, key: key};
}

function setState(state, text) {
  document.body.dataset.state = state;
  statusEl.textContent = text;
  statusEl.className = state === "error" ? "error" : "";
}

function enqueue(item) {
  const last = queue[queue.length - 1];
  if (item.kind === "move" && last && last.kind === "move") queue[queue.length - 1] = item;  // coalesce
  else queue.push(item);
  pump();
}

async function show(data) {
  screenEl.src = data.frame;
  await screenEl.decode();
  stepEl.textContent = String(data.step);
}

async function pump() {
  if (busy || queue.length === 0) return;
  busy = true;
  setState("busy", "generating…");
  const item = queue.shift();
  try {
    const response = await fetch(item.kind === "reset" ? "reset" : "action", {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(item.action || {}),
    });
    const data = await response.json();
    if (!response.ok) throw new Error(data.error || response.statusText);
    await show(data);
    busy = false;
    if (queue.length === 0) setState("idle", "ready (last step " + (1000 * data.seconds).toFixed(0) + " ms)");
  } catch (error) {
    busy = false;
    setState("error", String(error.message || error));
  }
  pump();
}

window.addEventListener("mousemove", (event) => {
  if (event.target !== screenEl && !pointer.button) return;  // a drag may leave the image; plain moves may not
  setPointer(event);
  enqueue({kind: "move", action: action(0, "")});
});
screenEl.addEventListener("mousedown", (event) => {
  if (event.button !== 0) return;
  event.preventDefault();  // no text selection or image drag
  setPointer(event);
  pointer.button = 1;
  enqueue({kind: "input", action: action(1, "")});
});
window.addEventListener("mouseup", (event) => {
  if (event.button !== 0 || !pointer.button) return;
  setPointer(event);
  pointer.button = 0;
  enqueue({kind: "input", action: action(0, "")});
});
screenEl.addEventListener("contextmenu", (event) => event.preventDefault());
document.addEventListener("keydown", (event) => {
  const key = keyName(event);
  if (key === null) return;
  event.preventDefault();  // Space would scroll, Tab move the focus, Enter press the Reset button
  enqueue({kind: "input", action: action(0, key)});
});
document.getElementById("reset").addEventListener("click", (event) => {
  event.currentTarget.blur();
  queue.length = 0;  // what was still waiting belonged to the old episode
  enqueue({kind: "reset"});
});

async function start() {
  try {
    const state = await (await fetch("state")).json();
    screenEl.width = state.image_size * state.scale;
    screenEl.height = state.image_size * state.scale;
    screenEl.src = "frame.png?step=" + state.step;
    await screenEl.decode();
    stepEl.textContent = String(state.step);
    setState("idle", "ready (" + state.sample_steps + " sampler steps per frame)");
  } catch (error) {
    setState("error", "cannot reach the server: " + error);
  }
}
start();
</script>
</body>
</html>
"""
