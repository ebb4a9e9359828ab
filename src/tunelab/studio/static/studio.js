// tunelab studio: the page. Plain JS, no build step, no network but the studio's own API.
"use strict";

const $ = (sel, el = document) => el.querySelector(sel);
const state = { schema: [], values: {}, workspace: {}, run: null, compare: null, chat: [], timers: {} };

// ------------------------------------------------------------------ helpers

async function api(path, body) {
  const opts = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const resp = await fetch(path, opts);
  const data = await resp.json().catch(() => ({ error: `HTTP ${resp.status}` }));
  if (!resp.ok) throw { status: resp.status, error: data.error || `HTTP ${resp.status}`, field: data.field };
  return data;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

function debounce(fn, ms) {
  let t = null;
  return (...args) => { clearTimeout(t); t = setTimeout(() => fn(...args), ms); };
}

const fmt = (v, digits = 4) => (v === null || v === undefined) ? "—" :
  (typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toFixed(digits)) : String(v));
function duration(s) {
  if (s === null || s === undefined) return "—";
  s = Math.round(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  return h ? `${h}h ${String(m).padStart(2, "0")}m` : m ? `${m}m ${String(sec).padStart(2, "0")}s` : `${sec}s`;
}
const gib = (bytes) => (bytes / 2 ** 30).toFixed(2) + " GiB";

function fillSelect(select, items, placeholder) {
  const keep = select.value;  // a refresh of the list must not undo the user's choice
  select.replaceChildren(el("option", { value: "", text: placeholder }), ...items.map((i) => el("option", { value: i, text: i })));
  if (items.includes(keep)) select.value = keep;
}

// A poller that outlives a studio restart: a failed request shows a note and the next tick retries.
function poll(fn) {
  return () => fn().then(() => { $("#offline").hidden = true; },
    (err) => { $("#offline").hidden = false; $("#offline").textContent = `studio not reachable (${err.error || err.message || err}); retrying…`; });
}

// ------------------------------------------------------------------ tabs

function show(tab) {
  for (const b of document.querySelectorAll("nav button")) b.classList.toggle("active", b.dataset.tab === tab);
  for (const s of document.querySelectorAll(".tab")) s.classList.toggle("active", s.id === `tab-${tab}`);
  history.replaceState(null, "", `#${tab}`);
  clearInterval(state.timers.runs); clearInterval(state.timers.compare);
  if (tab === "runs") { poll(refreshRuns)(); state.timers.runs = setInterval(poll(refreshRuns), 1000); }
  if (tab === "compare") { poll(refreshCompares)(); state.timers.compare = setInterval(poll(refreshCompares), 2000); }
  if (tab === "new" || tab === "chat" || tab === "compare") poll(loadWorkspace)();
}

async function loadWorkspace() {
  state.workspace = await api("/api/workspace");
  const w = state.workspace;
  const models = [...w.models, ...w.runs];
  fillSelect($("#recipe-from"), w.recipes, "a blank recipe");
  for (const id of ["dl-model", "chat-models"]) {
    const list = document.getElementById(id);
    if (list) list.replaceChildren(...models.map((m) => el("option", { value: m })));
  }
  const dirs = document.getElementById("dl-dirs");
  if (dirs) dirs.replaceChildren(...w.dataset_dirs.map((d) => el("option", { value: d })));
  for (const sel of document.querySelectorAll("select.add-dataset, #cmp-add-dataset")) fillSelect(sel, w.datasets, "a dataset…");
  fillSelect($("#cmp-add-model"), models, "a model or run…");
}

// ------------------------------------------------------------------ New run: the form

function fieldInput(f) {
  const name = f.key;
  if (f.kind === "choice") {
    const select = el("select", { name });
    for (const c of f.choices) select.append(el("option", { value: String(c), text: String(c) }));
    return select;
  }
  if (f.kind === "bool") return el("input", { type: "checkbox", name });
  if (f.kind === "list") return el("textarea", { name, rows: name.startsWith("data.") ? 2 : 1, placeholder: "one a line" });
  const attrs = { name, placeholder: f.optional ? "(empty: default)" : "" };
  if (name === "model.name") attrs.list = "dl-model";
  if (name === "data.dataset_dir") attrs.list = "dl-dirs";
  return el("input", attrs);
}

function renderForm() {
  const form = $("#run-form");
  form.replaceChildren(el("datalist", { id: "dl-model" }), el("datalist", { id: "dl-dirs" }));
  const groups = {};
  for (const f of state.schema) {
    if (!groups[f.group]) { groups[f.group] = el("fieldset", {}, el("legend", { text: f.group })); form.append(groups[f.group]); }
    const input = fieldInput(f);
    input.addEventListener("change", () => onFieldChange(f, input));
    const label = el("label", { text: f.key + " " }, input);
    if (f.kind === "bool") label.prepend(input);
    const box = el("div", { class: "field", "data-field": f.key, "data-methods": f.methods ? f.methods.join(",") : null },
      label, el("div", { class: "help", text: f.help }), el("div", { class: "field-error" }));
    if (f.key === "data.train" || f.key === "data.eval") {
      const add = el("select", { class: "add-dataset" });
      add.addEventListener("change", () => {
        if (!add.value) return;
        input.value = (input.value.trim() ? input.value.trim() + "\n" : "") + add.value;
        add.value = ""; onFieldChange(f, input);
      });
      box.insertBefore(el("div", { class: "hint" }, "add: ", add), box.querySelector(".help"));
    }
    groups[f.group].append(box);
  }
}

function rawValue(f, input) {
  if (f.kind === "bool") return input.checked;
  if (f.kind === "list") return input.value.split("\n").map((s) => s.trim()).filter(Boolean);
  return input.value;
}

function fillForm(values) {
  for (const f of state.schema) {
    const input = document.querySelector(`#run-form [name="${f.key}"]`);
    if (!input || document.activeElement === input) continue;
    const v = values[f.key];
    if (f.kind === "bool") input.checked = !!v;
    else if (f.kind === "list") input.value = Array.isArray(v) ? v.join("\n") : (v ?? "");
    else input.value = v === null || v === undefined ? "" : String(v);
  }
  const method = values["method.name"];
  for (const box of document.querySelectorAll("#run-form .field[data-methods]"))
    box.hidden = !box.dataset.methods.split(",").includes(method);
}

function clearErrors() {
  for (const box of document.querySelectorAll(".field.has-error")) {
    box.classList.remove("has-error"); box.querySelector(".field-error").textContent = "";
  }
  $("#yaml-error").textContent = ""; $("#launch-error").textContent = "";
}

function showError(err, fallback) {
  const box = err.field && document.querySelector(`#run-form .field[data-field="${err.field}"]`);
  if (box) { box.classList.add("has-error"); box.querySelector(".field-error").textContent = err.error; }
  else (fallback || $("#yaml-error")).textContent = err.error;
}

// Form edits and YAML edits are applied one after another, each to the text the previous one left.
let composing = Promise.resolve(true);
function compose(changes) {
  composing = composing.then(() => composeNow(changes), () => composeNow(changes));
  return composing;
}

async function composeNow(changes) {
  try {
    const r = await api("/api/recipe", { yaml: $("#yaml").value, changes });
    clearErrors();
    if (Object.keys(changes).length) $("#yaml").value = r.yaml;
    state.values = r.values; fillForm(r.values); refreshPanels();
    return true;
  } catch (err) { clearErrors(); showError(err); return false; }
}

function onFieldChange(f, input) { compose({ [f.key]: rawValue(f, input) }); }

async function loadRecipe() {
  const path = $("#recipe-from").value;
  try {
    const r = path ? await api(`/api/recipe/file?path=${encodeURIComponent(path)}`) : await api("/api/recipe/default");
    $("#yaml").value = r.yaml;
  } catch (err) { $("#yaml-error").textContent = err.error; return; }
  await compose({});
}

// ------------------------------------------------------------------ New run: what it will do

const refreshPanels = debounce(async () => {
  const v = state.values;
  const base = { model: v["model.name"], template: v["model.template"], dataset_dir: v["data.dataset_dir"],
    cutoff_len: v["data.cutoff_len"] };
  let maxTokens = null;
  if (v["data.train"] && v["data.train"].length) {
    try {
      const s = await api("/api/data/stats", { ...base, datasets: v["data.train"] });
      maxTokens = s.tokens.max;
      $("#stats").replaceChildren(el("table", { class: "grid" }, el("tbody", {},
        el("tr", {}, el("td", { text: "conversations" }), el("td", { text: `${s.conversations} (${s.multi_turn} multi-turn)` })),
        ...Object.entries(s.datasets).map(([k, n]) => el("tr", {}, el("td", { text: k }), el("td", { text: n }))),
        el("tr", {}, el("td", { text: "formats" }), el("td", { text: Object.entries(s.formats).map(([k, n]) => `${k} ${n}`).join(", ") })),
        el("tr", {}, el("td", { text: "tokens" }), el("td", { text: `min ${s.tokens.min} · p50 ${s.tokens.p50} · p95 ${s.tokens.p95} · max ${s.tokens.max}` })),
        el("tr", { class: s.over_cutoff ? "warn" : "" }, el("td", { text: "over cutoff" }),
          el("td", { id: "over-cutoff", text: `${s.over_cutoff} longer than ${s.cutoff_len} tokens` })))));
      const p = await api("/api/data/preview", { ...base, dataset: v["data.train"][0],
        mask_history: v["data.mask_history"], train_on_prompt: v["data.train_on_prompt"] });
      $("#preview").replaceChildren(...p.examples.map((ex) => el("div", {},
        el("div", { class: "muted", text: ex.dropped ? `${ex.source}: dropped (${ex.dropped})` :
          `${ex.source}: ${ex.tokens} tokens, ${ex.supervised} supervised` }),
        ex.segments ? el("div", { class: "preview" }, ...ex.segments.map((seg) =>
          seg.learn ? el("span", { class: "learn", text: seg.text }) : document.createTextNode(seg.text))) : null)));
    } catch (err) {
      $("#stats").textContent = err.error; $("#preview").textContent = "—";
    }
  }
  try {
    const e = await api("/api/estimate", { model: v["model.name"], method: v["method.name"], batch_size: v["train.batch_size"],
      cutoff_len: v["data.cutoff_len"], max_tokens: maxTokens, r: v["method.r"], precision: v["model.precision"],
      gradient_checkpointing: v["train.gradient_checkpointing"], freeze_trainable_layers: v["method.freeze_trainable_layers"] });
    if (!e.available) { $("#estimate").textContent = e.reason; return; }
    const i = e.inputs;
    $("#estimate").replaceChildren(el("div", { text: `${i.method}, ${i.precision}, batch ${i.batch} × ${i.seq} tokens: about ${gib(e.total)}` }),
      el("div", { class: "muted", text: ["weights", "gradients", "optimizer", "activations", "logits", "overhead"]
        .map((k) => `${k} ${gib(e[k])}`).join(" · ") }),
      el("div", { class: "muted", text: `trainable ${e.trainable_params.toLocaleString()} of ${e.params.toLocaleString()} parameters` }));
  } catch (err) { $("#estimate").textContent = err.error; }
}, 400);

async function refreshEnv() {
  let e;
  try { e = await api("/api/env"); } catch (err) { $("#env").textContent = err.error; return; }
  if (!e.ready) { $("#env").textContent = e.error || "measuring the machine (tunelab env)…"; if (!e.error) setTimeout(refreshEnv, 1500); return; }
  const d = e.decisions;
  $("#env").replaceChildren(el("dl", { class: "facts" },
    el("dt", { text: "cpu" }), el("dd", { text: `${e.cpu} (${e.cores} cores; ${e.kind})` }),
    el("dt", { text: "gpu" }), el("dd", { text: e.gpu || "none" }),
    el("dt", { text: "matmul" }), el("dd", { text: Object.entries(e.gflops).map(([k, g]) => `${k} ${g.toFixed(1)}`).join(", ") + " GFLOP/s" }),
    el("dt", { text: "training" }), el("dd", { id: "env-precision", text: `${d.train_precision.value} — ${d.train_precision.reason}` }),
    el("dt", { text: "threads" }), el("dd", { text: `${d.threads.value} — ${d.threads.reason}` })));
}

async function launch() {
  clearErrors();
  const ok = await compose({});
  if (!ok) return;
  try {
    const r = await api("/api/runs", { yaml: $("#yaml").value });
    state.run = r.run; show("runs");
  } catch (err) { showError(err, $("#launch-error")); }
}

// ------------------------------------------------------------------ Runs

async function refreshRuns() {
  const { runs } = await api("/api/runs");
  $("#runs-empty").hidden = runs.length > 0;
  $("#runs-table tbody").replaceChildren(...runs.map((r) => {
    const tr = el("tr", { "data-run": r.run, "data-status": r.status, class: r.run === state.run ? "selected" : "", onclick: () => { state.run = r.run; poll(refreshRuns)(); } },
      el("td", { text: r.run }),
      el("td", {}, el("span", { class: `badge status ${r.status}`, text: r.status }), r.stalled ? el("span", { class: "badge stalled", text: "stalled" }) : null),
      el("td", { text: r.model || "—" }), el("td", { text: r.method || "—" }),
      el("td", { class: "num", text: r.total_steps ? `${r.step}/${r.total_steps}` : fmt(r.step) }),
      el("td", { class: "num", text: fmt(r.loss) }), el("td", { class: "num", text: fmt(r.eval_loss) }),
      el("td", { class: "num", text: fmt(r.tokens_per_second, 0) }), el("td", { class: "num", text: r.eta_s != null ? duration(r.eta_s) : "—" }));
    return tr;
  }));
  if (!state.run && runs.length) state.run = runs[0].run;
  if (state.run) await refreshRun();
}

async function refreshRun() {
  let r;
  try { r = await api(`/api/run?run=${encodeURIComponent(state.run)}`); } catch (err) { $("#run-detail").hidden = true; return; }
  $("#run-detail").hidden = false;
  $("#run-title").textContent = r.run;
  const badge = $("#run-status");
  badge.textContent = r.status + (r.stalled ? " (stalled: no step for a while)" : "");
  badge.className = `badge ${r.status}`;
  badge.dataset.status = r.status;
  $("#stop").disabled = r.status !== "running";
  $("#resume").disabled = !r.resumable;
  $("#run-error").textContent = r.error ? `error: ${r.error}` : "";
  drawChart($("#loss-chart"), r.points);
  const facts = [["model", r.model], ["method", r.method], ["step", r.total_steps ? `${r.step} of ${r.total_steps}` : r.step],
    ["loss", fmt(r.loss)], ["eval loss", fmt(r.eval_loss)], ["learning rate", r.learning_rate != null ? r.learning_rate.toExponential(2) : "—"],
    ["tokens/s", fmt(r.tokens_per_second, 0)], ["ETA", r.eta_s != null ? duration(r.eta_s) : "—"],
    ["checkpoints", r.checkpoints.length ? r.checkpoints.join(", ") : "none"], ["command", r.command || "—"],
    ...r.notes.map((n) => ["", n])];
  $("#run-facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: String(v ?? "—"), id: k === "checkpoints" ? "run-checkpoints" : null })]));
  for (const f of r.files) $("#run-facts").append(el("dt", { text: "" }), el("dd", {}, el("a", { href: `/api/file?path=${encodeURIComponent(f)}`, target: "_blank", text: f })));
  const log = $("#run-log");
  const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
  log.textContent = r.log_tail.join("\n");
  if (atBottom) log.scrollTop = log.scrollHeight;
}

function drawChart(svg, points) {
  const NS = "http://www.w3.org/2000/svg";
  const W = 640, H = 300, L = 52, R = 14, T = 12, B = 30;
  const mk = (tag, attrs, text) => {
    const n = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    if (text !== undefined) n.textContent = text;
    svg.append(n); return n;
  };
  svg.replaceChildren();
  const all = points.loss.concat(points.eval_loss);
  svg.dataset.points = String(all.length);
  svg.dataset.train = String(points.loss.length);
  svg.dataset.eval = String(points.eval_loss.length);
  if (!all.length) { mk("text", { x: W / 2 - 60, y: H / 2 }, "no step logged yet"); return; }
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  let x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (x1 === x0) x1 = x0 + 1;
  const pad = (y1 - y0) * 0.06 || 0.5; y0 -= pad; y1 += pad;
  const sx = (x) => L + (x - x0) / (x1 - x0) * (W - L - R), sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  for (let i = 0; i <= 4; i++) {
    const y = y0 + (y1 - y0) * i / 4;
    mk("line", { x1: L, x2: W - R, y1: sy(y), y2: sy(y), class: "gridline" });
    mk("text", { x: 4, y: sy(y) + 4 }, y.toFixed(3));
  }
  mk("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" });
  mk("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" });
  mk("text", { x: L, y: H - 10 }, `step ${x0}`);
  mk("text", { x: W - R - 70, y: H - 10 }, `step ${x1}`);
  const line = (pts, cls) => pts.length && mk("polyline", { class: cls, points: pts.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ") });
  line(points.loss, "train");
  line(points.eval_loss, "eval");
  for (const p of points.eval_loss) mk("circle", { class: "pt-eval", cx: sx(p[0]), cy: sy(p[1]), r: 3 });
}

async function runAction(kind) {
  try { await api(`/api/run/${kind}`, { run: state.run }); } catch (err) { $("#run-error").textContent = err.error; }
  await poll(refreshRuns)();
}

// ------------------------------------------------------------------ Compare

async function refreshCompares() {
  const { compares } = await api("/api/compares");
  $("#cmp-list").replaceChildren(...compares.map((c) => el("li", { "data-name": c.name, "data-status": c.status, onclick: () => { state.compare = c.name; poll(refreshCompare)(); } },
    el("span", { class: `badge ${c.status}`, text: c.status }), ` ${c.name}: ${c.models.join(" → ")} on ${c.datasets.join(", ")}`)));
  if (state.compare) await refreshCompare();
}

async function refreshCompare() {
  const c = await api(`/api/compare?name=${encodeURIComponent(state.compare)}`);
  const box = $("#cmp-detail");
  box.hidden = false;
  const parts = [el("div", { class: "row spread" }, el("h2", { text: c.name }), el("span", { id: "cmp-status", class: `badge ${c.status}`, "data-status": c.status, text: c.status }))];
  if (c.error) parts.push(el("div", { class: "field-error", text: `error: ${c.error}` }));
  if (c.status !== "finished") {
    parts.push(el("pre", { text: (c.log_tail || []).join("\n") }));
    box.replaceChildren(...parts); return;
  }
  if (c.report_html) parts.push(el("p", {}, el("a", { id: "cmp-report", href: `/api/file?path=${encodeURIComponent(c.report_html)}`, target: "_blank", text: "open the HTML report" })));
  for (const [test, t] of Object.entries(c.tables)) {
    parts.push(el("h3", { text: `${test} (${t.rows_in_test} rows)` }));
    parts.push(el("table", { class: "grid cmp-table" }, el("thead", {}, el("tr", {}, ...t.header.map((h) => el("th", { text: h })))),
      el("tbody", {}, ...t.rows.map((row) => el("tr", {}, ...row.map((cell, i) => el("td", { class: i ? "num" : "", text: cell })))))));
    const s = c.samples[test];
    for (const [title, rows] of [[`best rows of ${s.model}`, s.best], [`worst rows of ${s.model}`, s.worst]]) {
      parts.push(el("h3", { text: title }));
      for (const row of rows) parts.push(el("div", { class: "sample" },
        el("div", { class: "muted", text: `row ${row.row + 1}: ${row.prompt}` }),
        el("div", { class: "pair" }, el("div", {}, el("div", { class: "who", text: "reference" }), row.reference),
          ...Object.entries(row.answers).map(([m, a]) => el("div", {}, el("div", { class: "who", text: `${m} · ROUGE-L ${a.rougeL.toFixed(3)}${a.em ? " · exact" : ""}` }), a.prediction)))));
    }
    parts.push(el("h3", { text: "side by side (first rows)" }));
    for (const ex of c.examples[test] || []) parts.push(el("div", { class: "pair" },
      el("div", {}, el("div", { class: "who", text: "prompt" }), ex.prompt), el("div", {}, el("div", { class: "who", text: "reference" }), ex.reference),
      ...Object.entries(ex.predictions).map(([m, p]) => el("div", {}, el("div", { class: "who", text: m }), p))));
  }
  box.replaceChildren(...parts);
}

async function launchCompare() {
  $("#cmp-error").textContent = "";
  const lines = (id) => $(id).value.split("\n").map((s) => s.trim()).filter(Boolean);
  try {
    const c = await api("/api/compares", { name: $("#cmp-name").value.trim(), models: lines("#cmp-models"), datasets: lines("#cmp-datasets"),
      metrics: $("#cmp-metrics").value, max_new_tokens: $("#cmp-max-new").value, max_samples: $("#cmp-max-samples").value });
    state.compare = c.name; poll(refreshCompares)();
  } catch (err) { $("#cmp-error").textContent = err.error; }
}

// ------------------------------------------------------------------ Chat

function chatBubble(role, text) {
  const node = el("div", { class: `msg ${role}`, text });
  $("#chat-log").append(node); $("#chat-log").scrollTop = $("#chat-log").scrollHeight;
  return node;
}

function readDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject({ error: `cannot read ${file.name}` });
    reader.readAsDataURL(file);
  });
}

async function sendChat() {
  const text = $("#chat-input").value.trim();
  if (!text) return;
  $("#chat-error").textContent = "";
  $("#chat-input").value = "";
  const message = { role: "user", content: text };
  const file = $("#chat-image").files[0];
  if (file) { message.images = [await readDataURL(file)]; $("#chat-image").value = ""; }
  state.chat.push(message);
  const mine = chatBubble("user", text);
  if (message.images) mine.prepend(el("img", { src: message.images[0], class: "thumb", alt: file.name }), el("br"));
  const bubble = chatBubble("assistant", "");
  bubble.dataset.chunks = "0";
  $("#chat-send").disabled = true;
  const body = { model: $("#chat-model").value.trim(), system: $("#chat-system").value, messages: state.chat,
    settings: { max_new_tokens: $("#chat-max-new").value, temperature: $("#chat-temperature").value, top_p: $("#chat-top-p").value,
      top_k: $("#chat-top-k").value, repetition_penalty: $("#chat-rep").value } };
  let answer = "";
  try {
    const resp = await fetch("/api/chat", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    if (!resp.ok) { const e = await resp.json(); throw { error: e.error }; }
    const reader = resp.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data: ")) continue;
        const event = JSON.parse(line.slice(6));
        if (event.status) bubble.dataset.status = event.status;
        if (event.text !== undefined && !event.done) {
          answer += event.text; bubble.textContent = answer;
          bubble.dataset.chunks = String(Number(bubble.dataset.chunks) + 1);
        }
        if (event.error) throw { error: event.error };
        if (event.done) {
          answer = event.text; bubble.textContent = answer;
          bubble.append(el("span", { class: "meta", text: `${event.completion_tokens} tokens · ${event.finish_reason}${event.fallback ? " · fallback reply" : ""}` }));
          bubble.dataset.done = "true";
        }
      }
    }
    state.chat.push({ role: "assistant", content: answer });
  } catch (err) {
    state.chat.pop(); bubble.remove();
    $("#chat-error").textContent = err.error || String(err);
  } finally { $("#chat-send").disabled = false; }
}

// ------------------------------------------------------------------ start

async function start() {
  for (const b of document.querySelectorAll("nav button")) b.addEventListener("click", () => show(b.dataset.tab));
  const info = await api("/api/info");
  $("#workspace").textContent = `workspace ${info.workspace} · tunelab ${info.version}`;
  state.schema = (await api("/api/schema")).fields;
  renderForm();
  await loadWorkspace();
  $("#load-recipe").addEventListener("click", loadRecipe);
  $("#yaml").addEventListener("input", debounce(() => compose({}), 600));
  $("#launch").addEventListener("click", launch);
  $("#stop").addEventListener("click", () => runAction("stop"));
  $("#resume").addEventListener("click", () => runAction("resume"));
  $("#cmp-launch").addEventListener("click", launchCompare);
  const appendLine = (target) => (e) => { if (e.target.value) { const t = $(target); t.value = (t.value.trim() ? t.value.trim() + "\n" : "") + e.target.value; e.target.value = ""; } };
  $("#cmp-add-model").addEventListener("change", appendLine("#cmp-models"));
  $("#cmp-add-dataset").addEventListener("change", appendLine("#cmp-datasets"));
  $("#chat-send").addEventListener("click", sendChat);
  $("#chat-input").addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); sendChat(); } });
  $("#chat-clear").addEventListener("click", () => { state.chat = []; $("#chat-log").replaceChildren(); });
  await loadRecipe();
  refreshEnv();
  show((location.hash || "#new").slice(1));
  document.body.dataset.ready = "true";
}

start().catch((err) => { document.body.prepend(el("div", { class: "field-error", text: `studio: ${err.error || err}` })); });
