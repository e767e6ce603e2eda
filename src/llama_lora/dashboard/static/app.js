// llama-lora dashboard: the page's routes (#/, #/run/ID/TAB, #/compare/IDS, #/chat/IDS), each drawn from the
// JSON API. Live views poll: a reload or a lost connection just starts the next poll from the beginning.
"use strict";

const { lineChart, smooth, fmt } = window.Charts;
const KEY = (() => {
  const given = new URLSearchParams(location.search).get("key");
  if (given) sessionStorage.setItem("llama-lora-key", given);
  return sessionStorage.getItem("llama-lora-key");
})();
const view = document.getElementById("view");
let timers = [];

function authHeaders() { return KEY ? { Authorization: `Bearer ${KEY}` } : {}; }

async function api(path, init) {
  const response = await fetch(path, { ...(init || {}), headers: { ...authHeaders(), ...((init || {}).headers || {}) } });
  const body = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

// h("a", {href: "#/"}, "text", child...): text children are text nodes, never parsed as HTML.
function h(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "class") node.className = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  add(node, ...children);
  return node;
}
// Children may be nested arrays; null and undefined are skipped (a section that does not apply).
function clean(children) {
  return children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false).map((c) => (c instanceof Node ? c : String(c)));
}
function add(node, ...children) { node.append(...clean(children)); }
function fill(node, ...children) { node.replaceChildren(...clean(children)); }

function every(ms, fn) { fn(); timers.push(setInterval(fn, ms)); }
function enc(id) { return encodeURIComponent(id); }
function duration(s) {
  if (s === null || s === undefined) return "-";
  if (s < 60) return `${Math.round(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}
function badge(state) { return h("span", { class: `state state-${String(state).replace(/ /g, "-")}` }, state); }
function methodOf(r) {
  const m = (r.method || "-").toUpperCase().replace("DORA", "DoRA").replace("LORA", "LoRA");
  return `${m}${r.r ? ` r${r.r}` : ""}${r.alpha ? ` α${r.alpha}` : ""} · ${r.objective || "sft"}`;
}
function errorBox(message) { return h("p", { class: "error", role: "alert" }, message); }

function route() {
  timers.forEach(clearInterval);
  timers = [];
  const parts = location.hash.replace(/^#\/?/, "").split("/");
  const nav = parts[0] || "runs";
  document.querySelectorAll("header nav a").forEach((a) => a.setAttribute("aria-current", a.dataset.nav === nav ? "page" : "false"));
  view.textContent = "";
  const ids = (parts[1] || "").split(",").filter(Boolean).map(decodeURIComponent);
  if (nav === "run" && parts[1]) runPage(decodeURIComponent(parts[1]), parts[2] || "curves");
  else if (nav === "compare") comparePage(ids);
  else if (nav === "chat") chatPage(ids);
  else runsPage();
}

// ---------------------------------------------------------------------------------------------- runs

const runsState = { filter: "", state: "all", sort: "date", desc: true, selected: new Set() };
const COLUMNS = [
  ["id", "run"], ["model", "model"], ["method", "method"], ["status", "state"], ["step", "steps"],
  ["loss", "loss"], ["eval_loss", "eval loss"], ["tokens_per_second", "tokens/s"], ["date", "started"],
  ["duration_s", "duration"],
];

function runsPage() {
  const root = h("p", { class: "muted" }, "");
  const filter = h("input", { id: "run-filter", type: "search", value: runsState.filter, placeholder: "name, model, data" });
  const state = h("select", { id: "state-filter" }, ["all", "running", "finished", "failed", "died", "interrupted"].map((s) => h("option", { value: s, selected: s === runsState.state }, s)));
  const table = h("table", { id: "runs-table" });
  const compareButton = h("button", { id: "compare-selected", type: "button" }, "Compare selected");
  const chatButton = h("button", { id: "chat-selected", type: "button" }, "Chat with selected");
  let rows = [];
  const draw = () => drawRuns(table, rows, [compareButton, chatButton]);
  filter.addEventListener("input", () => { runsState.filter = filter.value; draw(); });
  state.addEventListener("change", () => { runsState.state = state.value; draw(); });
  compareButton.addEventListener("click", () => { location.hash = `#/compare/${[...runsState.selected].map(enc).join(",")}`; });
  chatButton.addEventListener("click", () => { location.hash = `#/chat/${[...runsState.selected].map(enc).join(",")}`; });
  add(view, 
    h("h1", {}, "Runs"), root,
    h("div", { class: "toolbar" },
      h("label", { for: "run-filter" }, "Filter "), filter,
      h("label", { for: "state-filter" }, "State "), state, compareButton, chatButton),
    table);
  every(3000, async () => {
    try {
      const data = await api("/api/runs");
      root.textContent = `${data.runs.length} run(s) under ${data.root}`;
      const changed = JSON.stringify(data.runs) !== JSON.stringify(rows);
      rows = data.runs;
      if (changed || !table.childElementCount) draw();  // redrawn only when it changed: focus stays put
    } catch (e) { fill(root, errorBox(`could not read the runs: ${e.message}`)); }
  });
}

function drawRuns(table, rows, buttons) {
  const f = runsState.filter.toLowerCase();
  const shown = rows.filter((r) => (runsState.state === "all" || r.status === runsState.state) &&
    [r.id, r.model, r.data].some((v) => String(v || "").toLowerCase().includes(f)));
  const key = runsState.sort;
  shown.sort((a, b) => {
    const x = a[key], y = b[key];
    const order = x === y ? 0 : x === null || x === undefined ? 1 : y === null || y === undefined ? -1 : x < y ? -1 : 1;
    return runsState.desc ? -order : order;
  });
  const head = h("tr", {}, h("th", { scope: "col" }, h("span", { class: "sr-only" }, "select")),
    COLUMNS.map(([k, label]) => h("th", { scope: "col", "aria-sort": k === key ? (runsState.desc ? "descending" : "ascending") : "none" },
      h("button", { type: "button", class: "sort", onclick: () => { runsState.desc = k === key ? !runsState.desc : false; runsState.sort = k; drawRuns(table, rows, buttons); } },
        label, k === key ? (runsState.desc ? " ▼" : " ▲") : ""))));
  const body = shown.map((r) => h("tr", { "data-run": r.id, "data-state": r.status },
    h("td", {}, h("input", { type: "checkbox", "aria-label": `select ${r.id}`, checked: runsState.selected.has(r.id),
      onchange: (ev) => { ev.target.checked ? runsState.selected.add(r.id) : runsState.selected.delete(r.id); drawRuns(table, rows, buttons); } })),
    h("td", {}, h("a", { href: `#/run/${enc(r.id)}` }, r.id)),
    h("td", {}, r.model || "-"),
    h("td", {}, methodOf(r)),
    h("td", {}, badge(r.status), r.error ? h("div", { class: "error-line" }, r.error) : null),
    h("td", { class: "num" }, r.step === null ? "-" : `${r.step}${r.steps ? ` / ${r.steps}` : ""}`),
    h("td", { class: "num" }, fmt(r.loss)),
    h("td", { class: "num" }, fmt(r.eval_loss)),
    h("td", { class: "num" }, r.tokens_per_second === null ? "-" : Math.round(r.tokens_per_second)),
    h("td", {}, (r.date || "-").slice(0, 16).replace("T", " ")),
    h("td", { class: "num" }, duration(r.duration_s))));
  fill(table, h("caption", { class: "sr-only" }, "Training runs"), h("thead", {}, head),
    h("tbody", {}, body.length ? body : h("tr", {}, h("td", { colspan: 11 }, "no runs match"))));
  const n = runsState.selected.size;
  buttons[0].disabled = n < 2;
  buttons[1].disabled = n < 1 || n > 2;
  buttons[0].textContent = `Compare selected (${n})`;
}

// ----------------------------------------------------------------------------------------------- a run

const TABS = [["curves", "Curves"], ["config", "Config"], ["data", "Data"], ["report", "Report"], ["artifacts", "Artifacts"]];

async function runPage(id, tab) {
  const header = h("div", { class: "run-header" });
  const panel = h("section", { id: `panel-${tab}`, role: "tabpanel", "aria-labelledby": `tab-${tab}` });
  add(view, h("p", {}, h("a", { href: "#/" }, "← all runs")), header,
    h("nav", { role: "tablist", class: "tabs" }, TABS.map(([k, label]) => h("a", {
      id: `tab-${k}`, role: "tab", href: `#/run/${enc(id)}/${k}`, "aria-selected": k === tab ? "true" : "false",
    }, label))), panel);
  let detail;
  try { detail = await api(`/api/run?id=${enc(id)}`); } catch (e) { add(panel, errorBox(e.message)); return; }
  drawHeader(header, detail);
  if (tab === "curves") curvesTab(panel, id, header, detail);
  else if (tab === "config") add(panel, configTable(detail.config));
  else if (tab === "data") dataTab(panel, id);
  else if (tab === "report") reportTab(panel, id, detail);
  else if (tab === "artifacts") artifactsTab(panel, detail);
}

function drawHeader(header, detail) {
  const r = detail.row, st = detail.status || {}, s = detail.summary || {};
  const settings = s.settings || {};
  const cfg = detail.config || {}, train = cfg.train || {}, data = cfg.data || {};
  const facts = [
    ["model", r.model], ["method", methodOf(r)], ["data", r.data], ["learning rate", train.learning_rate],
    ["batch size", train.batch_size], ["max length", data.max_length],
    ["device", settings.device || train.device], ["precision", settings.precision || train.precision],
    ["steps", r.step === null ? "-" : `${r.step}${r.steps ? ` of ${r.steps}` : ""}`],
    ["started", (r.started_at || "-").replace("T", " ")], ["duration", duration(r.duration_s)],
  ];
  fill(header, 
    h("h1", {}, detail.id, " ", badge(r.status)),
    r.error ? errorBox(r.error) : null,
    st.state === "interrupted" && st.checkpoint ? h("p", {}, `resume with: llama-lora train ${detail.id}/config.yaml --resume`) : null,
    h("dl", { class: "facts" }, facts.map(([k, v]) => h("div", {}, h("dt", {}, k), h("dd", {}, v === undefined || v === null ? "-" : String(v))))));
}

const ORDER = ["loss", "learning_rate", "grad_norm", "tokens_per_second", "reward", "rewards", "accuracy", "logps", "logits", "kl"];

// Chart groups: loss (train raw + smoothed, eval); then one chart per metric family, a key and its eval_
// twin together (rewards/chosen with eval_rewards/chosen), grouped by the part before the first "/".
function chartGroups(records) {
  const groups = new Map();
  for (const rec of records) {
    for (const [k, v] of Object.entries(rec)) {
      if (["step", "epoch", "loss", "eval_loss"].includes(k) || typeof v !== "number") continue;
      const base = k.replace(/^eval_/, "");
      const group = base.split("/")[0];
      if (!groups.has(group)) groups.set(group, new Set());
      groups.get(group).add(k);
    }
  }
  const rank = (g) => { const i = ORDER.indexOf(g); return i < 0 ? ORDER.length : i; };
  return [...groups.entries()].sort((a, b) => rank(a[0]) - rank(b[0]) || a[0].localeCompare(b[0]));
}

function series(records, key) {
  return records.filter((r) => typeof r[key] === "number").map((r) => [r.step, r[key]]);
}

function lossSeries(records, name, color) {
  const train = series(records, "loss"), evals = series(records, "eval_loss");
  const out = [];
  if (!name) out.push({ name: "train loss (raw)", points: train, thin: true, color: "#1f5fa8" });
  out.push({ name: name ? `${name} train` : "train loss (smoothed)", points: smooth(train, 0.6), color: color || "#1f5fa8" });
  out.push({ name: name ? `${name} eval` : "eval loss", points: evals, dots: true, dashed: !!name, color: color || "#c2571a" });
  return out;
}

function drawCharts(grid, records) {
  const boxes = [h("div", { class: "chart-box", id: "chart-loss" })];
  lineChart(boxes[0], "loss", lossSeries(records));
  for (const [group, keys] of chartGroups(records)) {
    const box = h("div", { class: "chart-box", id: `chart-${group}` });
    lineChart(box, group, [...keys].sort().map((k) => ({ name: k, points: series(records, k), dots: k.startsWith("eval_"), dashed: k.startsWith("eval_") })));
    boxes.push(box);
  }
  fill(grid, ...boxes);
}

function curvesTab(panel, id, header, detail) {
  const line = h("p", { id: "live-line", "aria-live": "polite" });
  const grid = h("div", { class: "charts" });
  add(panel, line, grid);
  let records = [], next = 0, lastState = detail.row.status;
  every(2000, async () => {
    try {
      const m = await api(`/api/metrics?id=${enc(id)}&since=${next}`);
      if (m.reset) records = [];
      records = records.concat(m.records);
      next = m.next;
      const r = m.row;
      line.textContent = r.status === "running"
        ? `running: step ${r.step ?? 0}${r.steps ? ` of ${r.steps}` : ""}, ${records.length} records; following new ones`
        : `${r.status}: ${records.length} records`;
      if (m.records.length || m.reset || !grid.childElementCount) drawCharts(grid, records);
      if (r.status !== lastState) { lastState = r.status; drawHeader(header, await api(`/api/run?id=${enc(id)}`)); }
    } catch (e) { line.textContent = `waiting for the dashboard (${e.message})`; }
  });
}

function configTable(config) {
  const rows = flatten(config || {});
  return h("table", { class: "config" }, h("caption", { class: "sr-only" }, "Resolved configuration"),
    h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "key"), h("th", { scope: "col" }, "value"))),
    h("tbody", {}, Object.entries(rows).map(([k, v]) => h("tr", {}, h("th", { scope: "row" }, k), h("td", {}, show(v))))));
}

function flatten(obj, prefix) {
  const out = {};
  for (const [k, v] of Object.entries(obj)) {
    if (v && typeof v === "object" && !Array.isArray(v) && Object.keys(v).length) Object.assign(out, flatten(v, `${prefix || ""}${k}.`));
    else out[`${prefix || ""}${k}`] = v;
  }
  return out;
}
function show(v) { return v === null || v === undefined ? "null" : typeof v === "object" ? JSON.stringify(v) : String(v); }

async function dataTab(panel, id) {
  add(panel, h("p", { class: "muted" }, "Loading the data as `llama-lora data inspect` builds it..."));
  let report;
  try { report = await api(`/api/data?id=${enc(id)}&n=5`); } catch (e) { fill(panel, errorBox(e.message)); return; }
  const s = report.summary;
  const count = (c) => Object.entries(c).map(([k, v]) => `${k.replace(/_/g, " ")} ${v}`).join(", ");
  fill(panel, 
    h("p", {}, `${s.source} with the ${s.template} template on ${s.model}. Trained text is `, h("mark", { class: "trained" }, "marked"), "; the rest is context."),
    h("p", {}, `train: ${count(s.train)}`), h("p", {}, `eval: ${count(s.eval)}`),
    report.warnings.length ? h("ul", { class: "warnings" }, report.warnings.map((w) => h("li", {}, `${w.kind}: ${w.message}`))) : null,
    ...report.examples.map((ex) => h("article", { class: "example" },
      h("h3", {}, `example ${ex.index}${ex.side ? ` (${ex.side})` : ""}: ${ex.tokens} tokens, ${ex.trained_tokens} trained${ex.truncated ? ", truncated" : ""}`),
      h("pre", {}, ex.segments.map((seg) => seg.trained ? h("mark", { class: "trained" }, seg.text) : seg.text)))));
}

async function reportTab(panel, id, detail) {
  const c = detail.compare;
  if (!c) { add(panel, h("p", {}, "No compare report yet. Make one with: ", h("code", {}, `llama-lora compare ${detail.row.run}`))); return; }
  add(panel, h("h2", {}, `Held-out rows (${c.n ?? "?"})`), simpleTable(["metric", "base", "adapter"], c.held_out.map(([k, b, a]) => [k, fmt(b), fmt(a)])));
  if (c.benchmarks) add(panel, h("h2", {}, "General skills"), simpleTable(["task", "metric", "base", "adapter", "delta", "verdict"], c.benchmarks));
  if (detail.report) {
    const frame = h("iframe", { title: "compare report", class: "report", sandbox: "" });
    add(panel, h("h2", {}, "Full report"), frame);
    const r = await fetch(`/api/file?id=${enc(id)}&name=report.html`, { headers: authHeaders() });
    frame.srcdoc = await r.text();
  }
}

function simpleTable(head, rows) {
  return h("table", {}, h("thead", {}, h("tr", {}, head.map((x) => h("th", { scope: "col" }, x)))),
    h("tbody", {}, rows.map((row) => h("tr", {}, row.map((x) => h("td", {}, x))))));
}

function artifactsTab(panel, detail) {
  if (!detail.artifacts.length) { add(panel, h("p", {}, "No artifacts yet: the adapter is saved when training finishes.")); return; }
  for (const a of detail.artifacts) {
    const checks = a.checks ? Object.entries(a.checks).map(([k, v]) => `${k} ${typeof v === "number" ? fmt(v) : show(v)}`).join(", ") : null;
    add(panel, h("article", { class: "artifact" },
      h("h2", {}, a.kind), h("p", {}, h("code", {}, a.path), ` (${(a.size_bytes / 1e6).toFixed(1)} MB)`),
      checks ? h("p", {}, `checks: ${checks}`) : null,
      h("pre", {}, h("code", {}, a.commands.join("\n")))));
  }
}

// -------------------------------------------------------------------------------------------- compare

async function comparePage(ids) {
  add(view, h("p", {}, h("a", { href: "#/" }, "← all runs")), h("h1", {}, "Compare runs"));
  if (ids.length < 2) { add(view, h("p", {}, "Select two or more runs in the runs table.")); return; }
  const grid = h("div", { class: "charts" });
  const only = h("input", { type: "checkbox", id: "only-differences", checked: true });
  const table = h("div");
  add(view, grid, h("h2", {}, "Configs"), h("p", {}, only, h("label", { for: "only-differences" }, " only the keys that differ")), table);
  let rows;
  try {
    const [cmp, ...all] = await Promise.all([api(`/api/compare?ids=${ids.map(enc).join(",")}`), ...ids.map((id) => api(`/api/metrics?id=${enc(id)}`))]);
    rows = cmp.rows;
    const colors = window.Charts.PALETTE;
    const loss = h("div", { class: "chart-box", id: "chart-loss" });
    lineChart(loss, "loss", ids.flatMap((id, i) => lossSeries(all[i].records, id, colors[i % colors.length])));
    const boxes = [loss];
    for (const key of ["learning_rate", "grad_norm", "tokens_per_second"]) {
      const box = h("div", { class: "chart-box", id: `chart-${key}` });
      lineChart(box, key, ids.map((id, i) => ({ name: id, points: series(all[i].records, key), color: colors[i % colors.length] })));
      boxes.push(box);
    }
    fill(grid, ...boxes);
  } catch (e) { add(view, errorBox(e.message)); return; }
  const draw = () => fill(table, h("table", { id: "config-diff" }, h("caption", { class: "sr-only" }, "Configs side by side"),
    h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "key"), ids.map((id) => h("th", { scope: "col" }, id)))),
    h("tbody", {}, rows.filter((r) => r.differs || !only.checked).map((r) => h("tr", { class: r.differs ? "differs" : null },
      h("th", { scope: "row" }, r.key, r.differs ? h("span", { class: "diff-mark" }, " (differs)") : null),
      r.values.map((v) => h("td", {}, show(v))))))));
  only.addEventListener("change", draw);
  draw();
}

// ----------------------------------------------------------------------------------------------- chat

async function chatPage(ids) {
  add(view, h("p", {}, h("a", { href: "#/" }, "← all runs")), h("h1", {}, "Chat: base and adapters side by side"));
  const chosen = new Set(ids);
  const picker = h("fieldset", { class: "picker" }, h("legend", {}, "Adapters (one or two runs trained on the same base)"));
  const prompt = h("textarea", { id: "chat-prompt", rows: 3 }, "");
  const tokens = h("input", { id: "chat-max-tokens", type: "number", min: 1, max: 1024, value: 128 });
  const send = h("button", { id: "chat-send", type: "button" }, "Send");
  const columns = h("div", { class: "columns", "aria-live": "polite" });
  add(view, picker,
    h("label", { for: "chat-prompt" }, "Prompt"), prompt,
    h("div", { class: "toolbar" }, h("label", { for: "chat-max-tokens" }, "Max new tokens "), tokens, send),
    h("p", { class: "muted" }, "Greedy decoding: the columns differ by their adapters alone."), columns);
  try {
    const data = await api("/api/runs");
    const usable = data.runs.filter((r) => r.status === "finished" || chosen.has(r.id));
    add(picker, ...usable.map((r) => h("label", { class: "pick" }, h("input", { type: "checkbox", value: r.id, checked: chosen.has(r.id),
      onchange: (ev) => { ev.target.checked ? chosen.add(r.id) : chosen.delete(r.id); } }), ` ${r.id} (${methodOf(r)})`)));
  } catch (e) { add(picker, errorBox(e.message)); }
  send.addEventListener("click", () => ask(prompt.value, [...chosen], Number(tokens.value) || 128, columns, send));
  prompt.addEventListener("keydown", (ev) => { if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) send.click(); });
}

async function ask(text, ids, maxTokens, columns, send) {
  send.disabled = true;
  fill(columns, h("p", { class: "muted" }, "Loading the models (the first time) and generating..."));
  const cells = {};
  try {
    const response = await fetch("/api/chat", {
      method: "POST", headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify({ prompt: text, runs: ids, max_tokens: maxTokens }),
    });
    if (!response.ok) { const body = await response.json().catch(() => ({})); throw new Error(body.error || response.statusText); }
    const reader = response.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n")) >= 0) {
        const event = JSON.parse(buffer.slice(0, cut));
        buffer = buffer.slice(cut + 1);
        if (event.columns) {
          fill(columns, ...event.columns.map((name, i) => {
            cells[name] = { text: h("div", { class: "answer", "data-column": name }), foot: h("p", { class: "muted" }, "...") };
            const shown = i === 0 ? `${name.split("/").pop()} (base)` : name;  // the base may be a long path
            return h("section", { class: "column" }, h("h2", { title: name }, shown), cells[name].text, cells[name].foot);
          }));
        } else if (event.text !== undefined) add(cells[event.column].text, event.text);
        else if (event.done) { cells[event.column].foot.textContent = `${event.tokens} tokens, ${event.finish}`; cells[event.column].text.dataset.done = "1"; }
        else if (event.error) fill(cells[event.column].foot, errorBox(event.error));
      }
    }
  } catch (e) { fill(columns, errorBox(e.message)); }
  send.disabled = false;
}

window.addEventListener("hashchange", route);
route();
