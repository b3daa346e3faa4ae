// The activeindex web page: search by image, and activate & compare. Plain JS, no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);

function setStatus(el, text, isError = false) {
  el.textContent = text;
  el.classList.toggle("error", isError);
}

// A refusal in words: the service's reason, or, for a 422 of a parameter out of range, one
// sentence per parameter ("psnr: Input should be greater than or equal to 10").
async function errorText(resp) {
  try {
    const body = await resp.json();
    const detail = Array.isArray(body.detail)
      ? body.detail.map((d) => `${(d.loc || []).slice(1).join(".") || "request"}: ${d.msg}`).join("; ")
      : typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    return `${resp.status}: ${detail}`;
  } catch (e) {
    return `${resp.status} ${resp.statusText}`;
  }
}

// A number field's value within [min, max] as the field declares them, or null.
function numberIn(input) {
  const v = Number(input.value);
  const min = Number(input.min), max = Number(input.max);
  return input.value.trim() !== "" && Number.isFinite(v) && v >= min && v <= max ? v : null;
}

// -- tabs ------------------------------------------------------------------------------------
document.querySelectorAll(".tab").forEach((tab) => {
  tab.addEventListener("click", () => {
    document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t === tab));
    document.querySelectorAll(".panel").forEach((p) => { p.hidden = p.id !== `tab-${tab.dataset.tab}`; });
  });
});

// -- drop zones ------------------------------------------------------------------------------
function dropZone(zoneId, inputId, onFile) {
  const zone = $(zoneId), input = $(inputId);
  input.addEventListener("change", () => {
    const file = input.files[0];
    // Cleared, so that choosing the same file again (after fixing the token, k or the PSNR)
    // is a change too and is sent again.
    input.value = "";
    if (file) onFile(file);
  });
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer.files.length) onFile(e.dataTransfer.files[0]);
  });
}

// -- collection info -------------------------------------------------------------------------
const decisions = { single: "", dihedral: "" };

function queryMode() {
  return $("query-dihedral").checked ? "dihedral" : "single";
}

function showDecision() {
  const text = decisions[queryMode()];
  $("copy-decision").textContent = text ? `Copy decision: ${text}.` : "";
}

async function loadInfo() {
  try {
    const resp = await fetch("/api/info");
    if (!resp.ok) throw new Error(await errorText(resp));
    const { collection: c, service: s } = await resp.json();
    $("query-k").max = s.max_k;
    const model = c.extractor.name || c.extractor.path || c.extractor.kind;
    const thr = c.threshold == null ? "no calibrated copy threshold" : `copy threshold ${c.threshold.toFixed(3)}`;
    // What "copy" means here, in words (the calibrated false-positive rate and recall), per query mode.
    decisions.single = c.copy_decision;
    decisions.dihedral = c.dihedral_copy_decision;
    showDecision();
    $("collection-info").textContent =
      `${c.images} images · ${c.factory} (nprobe ${c.nprobe}) · model ${model}, ${c.dim}-d · ${thr}` +
      (s.writes_enabled ? "" : " · read-only");
  } catch (e) {
    $("collection-info").textContent = `cannot read the collection: ${e.message}`;
  }
}

// -- search ----------------------------------------------------------------------------------
function decision(copy) {
  const b = document.createElement("span");
  b.className = "badge";
  if (copy === true) { b.classList.add("copy"); b.textContent = "copy"; }
  else if (copy === false) { b.classList.add("not-copy"); b.textContent = "not a copy"; }
  else { b.textContent = "no verdict"; b.title = $("copy-decision").textContent || "the collection has no calibrated copy threshold"; }
  if (copy !== null && copy !== undefined) b.title = $("copy-decision").textContent;
  return b;
}

let previewUrl = null;

function clearQueryResult() {
  // The previous query's matches never stay on screen under another file's name.
  $("query-result").hidden = true;
  $("matches").replaceChildren();
  $("query-name").textContent = "";
  $("query-preview").removeAttribute("src");
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = null;
}

async function runQuery(file) {
  const status = $("query-status");
  clearQueryResult();
  const k = numberIn($("query-k"));
  if (k === null || !Number.isInteger(k)) {
    setStatus(status, `matches must be a whole number from ${$("query-k").min} to ${$("query-k").max}`, true);
    return;
  }
  setStatus(status, `searching for ${file.name}…`);
  const form = new FormData();
  form.append("file", file, file.name);
  const t0 = performance.now();
  const dihedral = $("query-dihedral").checked;
  const resp = await fetch(`/api/query?k=${k}${dihedral ? "&dihedral=true" : ""}`, { method: "POST", body: form });
  if (!resp.ok) {
    setStatus(status, `${file.name}: ${await errorText(resp)}`, true);
    return;
  }
  const result = await resp.json();
  decisions[result.query_mode] = result.copy_decision;  // the answer's own mode and threshold
  $("copy-decision").textContent = `Copy decision: ${result.copy_decision}.`;
  previewUrl = URL.createObjectURL(file);
  $("query-preview").src = previewUrl;
  $("query-name").textContent = file.name;
  const list = $("matches");
  for (const m of result.matches) {
    const li = document.createElement("li");
    li.className = "match" + (m.copy === true ? " copy" : "");
    li.dataset.id = m.id;
    const img = document.createElement("img");
    img.src = m.thumbnail;
    img.alt = m.name;
    img.loading = "lazy";
    const name = document.createElement("div");
    name.className = "name";
    name.textContent = m.name;
    const line = document.createElement("div");
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = m.score.toFixed(3);
    line.append(score, " ", decision(m.copy), ` id ${m.id}`);
    li.append(img, name, line);
    list.append(li);
  }
  $("query-result").hidden = false;
  setStatus(status, `${result.matches.length} matches in ${Math.round(performance.now() - t0)} ms`);
}

// -- activate & compare ----------------------------------------------------------------------
function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the browser cannot display this image"));
    img.src = src;
  });
}

let comparePixels = null;  // {a: ImageData, b: ImageData}

function drawTo(canvas, img) {
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(img, 0, 0);
  return ctx.getImageData(0, 0, canvas.width, canvas.height);
}

function drawDiff() {
  if (!comparePixels) return;
  const k = parseInt($("amp").value, 10);
  $("amp-value").textContent = k;
  const { a, b } = comparePixels;
  const canvas = $("cv-diff");
  canvas.width = a.width;
  canvas.height = a.height;
  const ctx = canvas.getContext("2d");
  const out = ctx.createImageData(a.width, a.height);
  for (let i = 0; i < a.data.length; i += 4) {
    for (let c = 0; c < 3; c++) out.data[i + c] = Math.min(255, Math.abs(a.data[i + c] - b.data[i + c]) * k);
    out.data[i + 3] = 255;
  }
  ctx.putImageData(out, 0, 0);
}

async function runActivate(file) {
  const status = $("activate-status");
  const token = $("token").value.trim();
  sessionStorage.setItem("activeindex-token", token);
  $("compare").hidden = true;
  if (!token) { setStatus(status, "enter the service's token first", true); return; }
  const psnr = numberIn($("psnr"));
  if (psnr === null) {
    setStatus(status, `the PSNR floor must be a number of dB from ${$("psnr").min} to ${$("psnr").max}`, true);
    return;
  }
  setStatus(status, `activating ${file.name}…`);
  const form = new FormData();
  form.append("file", file, file.name);
  const resp = await fetch(`/api/images?activate=true&psnr=${psnr}`, {
    method: "POST", body: form, headers: { Authorization: `Bearer ${token}` },
  });
  if (!resp.ok) { setStatus(status, `${file.name}: ${await errorText(resp)}`, true); return; }
  const out = await resp.json();
  const r = out.released;
  if (!r || !r.data_base64) {
    setStatus(status, `already in the collection as id ${out.id} (${out.mode}); no released file to compare`);
    return;
  }
  const releasedUrl = `data:${r.media_type};base64,${r.data_base64}`;
  const [orig, act] = await Promise.all([loadImage(URL.createObjectURL(file)), loadImage(releasedUrl)]);
  const a = drawTo($("cv-original"), orig);
  const b = drawTo($("cv-activated"), act);
  $("released-link").href = releasedUrl;
  $("released-link").download = out.name.replace(/\.[^.]*$/, "") + ".png";
  if (a.width !== b.width || a.height !== b.height) {
    setStatus(status, `sizes differ (${a.width}×${a.height} vs ${b.width}×${b.height}): cannot compare`, true);
    return;
  }
  comparePixels = { a, b };
  drawDiff();
  const fmt = (v, d) => (v == null ? "–" : v.toFixed(d));
  $("compare-stats").textContent =
    `id ${out.id}${out.duplicate ? " (already added)" : ""} · PSNR ${fmt(r.psnr, 2)} dB · SSIM ${fmt(r.ssim, 3)} · ` +
    `L∞ ${fmt(r.linf, 0)}/255` +
    (r.cos_before == null ? "" : ` · cosine to the stored code ${fmt(r.cos_before, 3)} → ${fmt(r.cos_after, 3)}`);
  $("compare").hidden = false;
  setStatus(status, out.duplicate ? "already in the collection: showing its released file" : "added and activated");
  loadInfo();
}

$("query-dihedral").addEventListener("change", showDecision);
$("amp").addEventListener("input", drawDiff);
// A compare picture opens at its own size (scrollable) on a click: on a phone the three are
// stacked and fit the width, and a click shows the pixels.
document.querySelectorAll(".compare figure").forEach((fig) => {
  fig.addEventListener("click", (e) => { if (!e.target.closest("a")) fig.classList.toggle("zoomed"); });
});
$("token").value = sessionStorage.getItem("activeindex-token") || "";
dropZone("query-drop", "query-file", (f) => runQuery(f).catch((e) => setStatus($("query-status"), e.message, true)));
dropZone("activate-drop", "activate-file", (f) => runActivate(f).catch((e) => setStatus($("activate-status"), e.message, true)));
loadInfo();
