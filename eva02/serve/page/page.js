// The page of `eva02 serve`: an image chosen or dropped is sent to POST v1/classify (top-k bars), then to
// POST v1/explain (a PNG heat map shown below). Clicking a bar explains that class with Grad-CAM.
// For an EVA-02-CLIP model (`/v1/model` lists the 'zero-shot' kind) the bars come from POST
// v1/zero-shot over the labels typed in, sent as the form field `labels`, a JSON list.
// Text from the server is only ever set as textContent. URLs are relative, so the page also works
// behind a reverse proxy that serves it under a path prefix.
"use strict";

const $ = (id) => document.getElementById(id);
const METHOD_NAMES = { "attention-rollout": "Attention rollout", gradcam: "Grad-CAM" };
const state = { info: null, file: null, top: null, target: null, run: 0, previewUrl: null, overlayUrl: null };

function setState(name) {
  document.body.dataset.state = name;
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
  if (message) setState("error");
}

async function reason(res) {
  // The server's one-line {"detail": ...}, else the status line.
  try {
    const body = await res.json();
    if (typeof body.detail === "string") return body.detail;
  } catch (_) {
    /* not JSON */
  }
  return `${res.status} ${res.statusText}`;
}

async function postImage(url) {
  const form = new FormData();
  form.append("file", state.file, state.file.name || "upload");
  const extra = labelList();
  if (extra.length) form.append("labels", JSON.stringify(extra));
  return fetch(url, { method: "POST", body: form });
}

function labelList() {
  const box = $("labels");
  if (box.disabled) return [];
  return box.value.split(/[\n,]/).map((s) => s.trim()).filter(Boolean);
}

// ------------------------------------------------------------------------------------- the model
async function loadInfo() {
  let res;
  try {
    res = await fetch("v1/model");
  } catch (e) {
    showError(`cannot reach the server: ${e.message}`);
    return;
  }
  if (!res.ok) {
    showError(await reason(res));
    return;
  }
  const info = await res.json();
  state.info = info;
  const zeroShot = info.kinds.includes("zero-shot");
  let what = "no classifier head (embeddings only)";
  if (info.kinds.includes("classify")) what = `${info.num_classes} classes`;
  else if (zeroShot) what = "EVA-02-CLIP: zero-shot over your labels";
  $("model").textContent = `${info.model} · ${info.img_size} px · ${what} · ${info.device}, ${info.dtype}`;
  const select = $("method");
  select.replaceChildren();
  for (const method of info.explain_methods) {
    const option = document.createElement("option");
    option.value = method;
    option.textContent = METHOD_NAMES[method] || method;
    select.append(option);
  }
  if (zeroShot) {
    $("labels-row").hidden = false;
    $("labels").disabled = false;
    $("classes-title").textContent = "Top labels";
  }
  setState("idle");
}

// ------------------------------------------------------------------------------------ one image
function choose(file) {
  if (!file) return;
  state.file = file;
  state.target = null;
  if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
  state.previewUrl = URL.createObjectURL(file);
  $("preview").src = state.previewUrl;
  $("name").textContent = file.name || "pasted image";
  $("result").hidden = false;
  run();
}

async function run() {
  if (!state.file || !state.info) return;
  const run = ++state.run; // answers for an older image or older options are dropped
  showError("");
  if (await classify(run)) await explain(run);
}

async function classify(run) {
  const info = state.info;
  const zeroShot = !$("labels").disabled && labelList().length > 0;
  if (!info.kinds.includes("classify") && !zeroShot) {
    $("bars").replaceChildren();
    note(
      $("bars-note"),
      info.kinds.includes("zero-shot")
        ? "Type labels above, comma-separated or one per line, to classify the image among them."
        : "This model has no classifier head: it serves embeddings and attention rollout."
    );
    return true;
  }
  setState("classifying");
  const topk = Math.max(1, Math.min(20, parseInt($("topk").value, 10) || 5));
  const res = await postImage(zeroShot ? `v1/zero-shot?topk=${topk}` : `v1/classify?topk=${topk}`);
  if (run !== state.run) return false;
  if (!res.ok) {
    showError(await reason(res));
    return false;
  }
  const record = await res.json();
  if (run !== state.run) return false;
  state.top = record.topk[0];
  drawBars(record.topk);
  note($("bars-note"), info.kinds.includes("classify") ? "Click a class to see its Grad-CAM map." : "");
  return true;
}

function drawBars(topk) {
  const list = $("bars");
  list.replaceChildren();
  for (const entry of topk) {
    const item = document.createElement("li");
    const bar = document.createElement("button");
    bar.type = "button";
    bar.className = "bar";
    bar.dataset.label = entry.label;
    bar.setAttribute("aria-pressed", String(state.target === entry.label));
    bar.title = `class ${entry.label}`;
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = entry.class;
    const track = document.createElement("span");
    track.className = "track";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.width = `${(100 * entry.score).toFixed(2)}%`;
    track.append(fill);
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = `${(100 * entry.score).toFixed(1)}%`;
    bar.append(name, track, score);
    bar.addEventListener("click", () => explainClass(entry.label));
    item.append(bar);
    list.append(item);
  }
}

function explainClass(label) {
  if (!state.info.explain_methods.includes("gradcam")) return;
  state.target = label;
  $("method").value = "gradcam";
  for (const bar of document.querySelectorAll(".bar")) {
    bar.setAttribute("aria-pressed", String(Number(bar.dataset.label) === label));
  }
  explain(++state.run);
}

async function explain(run) {
  const method = $("method").value;
  if (!method) {
    // No explanation for this model (the post-norm image towers of EVA-02-CLIP-E).
    $("explanation").hidden = true;
    setState("done");
    return;
  }
  let url = `v1/explain?method=${encodeURIComponent(method)}`;
  if (method === "gradcam" && state.target !== null) url += `&target=${state.target}`;
  setState("explaining");
  const res = await postImage(url);
  if (run !== state.run) return;
  if (!res.ok) {
    showError(await reason(res));
    return;
  }
  const blob = await res.blob();
  if (run !== state.run) return;
  const explained = res.headers.get("X-Explain-Target");
  const overlay = $("overlay");
  overlay.onload = () => setState("done");
  overlay.onerror = () => showError("the explanation image could not be shown");
  if (state.overlayUrl) URL.revokeObjectURL(state.overlayUrl);
  state.overlayUrl = URL.createObjectURL(blob);
  overlay.src = state.overlayUrl;
  $("explain-title").textContent = explainTitle(method, explained);
  note(
    $("explain-note"),
    method === "gradcam"
      ? "Where the evidence for this class lies, from the last block's gradients."
      : "Where the class token draws its information from, through all blocks' attention."
  );
  $("explanation").hidden = false;
}

function explainTitle(method, explained) {
  if (method !== "gradcam" || explained === null) return METHOD_NAMES[method] || method;
  const bar = document.querySelector(`.bar[data-label="${Number(explained)}"] .name`);
  return `Grad-CAM of class ${explained}${bar ? ` (${bar.textContent})` : ""}`;
}

function note(element, text) {
  element.textContent = text;
  element.hidden = !text;
}

// ------------------------------------------------------------------------------------ wiring
function wire() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => choose(e.target.files[0]));
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (e) => {
      e.preventDefault();
      drop.classList.add("over");
    });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    choose(e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    const item = [...(e.clipboardData?.files || [])].find((f) => f.type.startsWith("image/"));
    if (item) choose(item);
  });
  $("method").addEventListener("change", () => {
    if ($("method").value !== "gradcam") state.target = null;
    if (state.file) explain(++state.run);
  });
  $("topk").addEventListener("change", run);
  $("labels").addEventListener("change", run);
  loadInfo();
}

wire();
