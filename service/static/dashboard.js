// The FlashTune dashboard: jobs with live progress, one job (loss chart, events, evaluation, download, aliases), a
// form to start a job, adapters and their aliases, and an analyze playground. Plain ES modules; every text goes in
// through textContent.

import { ApiError, api, download, followEvents, getKey, onOpenServer, onUnauthorized, setKey, upload } from "./api.js";
import { drawLossChart } from "./chart.js";
import { reliabilityDiagram } from "./reliability.js";

const $ = (id) => document.getElementById(id);
const FINAL = new Set(["succeeded", "failed", "cancelled"]);
const LABELS = ["bearish", "neutral", "bullish"];
const HP_FIELDS = [
  ["epochs", "Epochs", "int"],
  ["batch_size", "Batch size", "int"],
  ["learning_rate", "Learning rate", "float"],
  ["max_length", "Max length (tokens)", "int"],
  ["lora_r", "LoRA r", "int"],
  ["lora_alpha", "LoRA alpha", "float"],
  ["lora_dropout", "LoRA dropout", "float"],
  ["target_modules", "Target modules (comma-separated)", "list"],
  ["quantization", "Quantization", "choice:auto,nf4,none"],
  ["validation_fraction", "Validation fraction", "float"],
  ["seed", "Seed", "int"],
  ["step_order", "Step order", "choice:balanced,shuffled"],
];

/** An element with attributes and children (strings become text nodes). */
function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// ------------------------------------------------------------------------------------------------ formatting
function duration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}

function when(iso) {
  if (!iso) return "";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? iso : date.toLocaleString();
}

function num(value, digits = 4) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

/** A number for people: at most 4 significant digits (0.02835039055553749 -> 0.02835). */
function short(value) {
  return Number.isFinite(value) ? String(Number(value.toPrecision(4))) : String(value);
}

/** An event message as people read it: long decimals rounded, Python's None as "–". */
function tidy(message) {
  return String(message ?? "")
    .replace(/-?\d+\.\d{5,}(?:e[-+]?\d+)?/gi, (match) => short(Number(match)))
    .replace(/\bNone\b/g, "–");
}

function pct(value) {
  return value === null || value === undefined ? "–" : `${(value * 100).toFixed(1)}%`;
}

function fraction(job) {
  if (job.status === "succeeded") return 1;
  return Math.min(1, Math.max(0, job.progress?.fraction || 0));
}

function progressText(job) {
  const p = job.progress || {};
  if (job.status === "queued") return job.attempts > 0 ? `queued again (attempt ${job.attempts + 1} of ${job.max_attempts})` : "waiting for a worker";
  if (job.status === "running" && !p.total_steps) return "starting: loading the model and the data";
  const parts = [];
  if (p.total_steps) parts.push(`step ${p.step}/${p.total_steps}`);
  if (p.total_epochs) parts.push(`epoch ${Number(p.epoch || 0).toFixed(2)}/${p.total_epochs}`);
  if (p.loss !== null && p.loss !== undefined) parts.push(`loss ${num(p.loss)}`);
  if (job.status === "running") {
    if (p.tokens_per_second) parts.push(`${Math.round(p.tokens_per_second).toLocaleString()} tokens/s`);
    if (p.eta_seconds !== null && p.eta_seconds !== undefined) parts.push(`ETA ${duration(p.eta_seconds)}`);
  }
  if (job.status === "succeeded" && job.started_at && job.finished_at) {
    parts.push(`done in ${duration((new Date(job.finished_at) - new Date(job.started_at)) / 1000)}`);
  }
  if (job.status === "failed" && job.error) parts.push(`failed: ${job.error.type}`);
  if (job.status === "cancelled") parts.push("cancelled");
  return parts.join(" · ");
}

function statusBadge(status, id) {
  return h("span", { class: `status ${status}`, id, text: status });
}

// ------------------------------------------------------------------------------------------- notices and key
function showNotice(message) {
  const notice = $("notice");
  notice.textContent = message;
  notice.hidden = false;
}

function clearNotice() {
  $("notice").hidden = true;
  $("notice").textContent = "";
}

function report(err) {
  if (err instanceof ApiError && err.status === 401) return; // the key panel says it
  if (err && err.name === "AbortError") return;
  showNotice(err instanceof ApiError ? `${err.message}` : `Cannot reach the API: ${err.message || err}`);
}

let serverAuth = "unknown"; // "open": a call without a key succeeded (no FLASHTUNE_API_KEY); "required": a 401

function refreshKeyState() {
  const set = Boolean(getKey());
  const says = { open: "Open server: no API key needed", required: "API key: not set", unknown: "" };
  $("key-state").textContent = set ? "API key: set for this tab" : says[serverAuth];
  $("key-change").textContent = set ? "Change key" : "Set key";
  $("key-change").hidden = !set && serverAuth !== "required";
}

onOpenServer(() => {
  if (serverAuth !== "open") {
    serverAuth = "open";
    refreshKeyState();
  }
});

function showKeyPanel(reason) {
  $("key-reason").textContent = reason;
  if ($("key-panel").hidden) {
    $("key-panel").hidden = false;
    $("api-key").focus();
  }
}

onUnauthorized(() => {
  serverAuth = "required";
  refreshKeyState();
  showKeyPanel(getKey()
    ? "The server did not accept this key. Enter the right one (it is kept in this tab only)."
    : "This server needs an API key. It is kept in this tab only (sessionStorage) and sent as Authorization: Bearer <key>.");
});

function setupKeyPanel() {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("api-key").value.trim();
    if (!value) return;
    setKey(value);
    $("api-key").value = "";
    $("key-panel").hidden = true;
    refreshKeyState();
    route();
  });
  $("key-forget").addEventListener("click", () => {
    setKey("");
    $("api-key").value = "";
    refreshKeyState();
  });
  $("key-cancel").addEventListener("click", () => {
    $("key-panel").hidden = true;
  });
  $("key-change").addEventListener("click", () => showKeyPanel("Enter the API key. It is kept in this tab only (sessionStorage)."));
  refreshKeyState();
}

// ---------------------------------------------------------------------------------------------------- routing
let cleanups = [];

function onLeave(fn) {
  cleanups.push(fn);
}

/** Run ``fn`` now and then every ``ms`` until the view changes or ``fn`` returns true (done). */
function poll(fn, ms) {
  let stopped = false;
  let timer = null;
  const tick = async () => {
    if (stopped) return;
    let done = false;
    if (!document.hidden) {
      try {
        done = (await fn()) === true;
      } catch (err) {
        report(err);
        // 401: until a key is entered (route() runs again); 404 and the like: asking again will not help
        if (err instanceof ApiError && err.status < 500 && err.status !== 429) done = true;
      }
    }
    if (!stopped && !done) timer = setTimeout(tick, ms);
  };
  tick();
  onLeave(() => {
    stopped = true;
    clearTimeout(timer);
  });
}

function route() {
  cleanups.forEach((fn) => fn());
  cleanups = [];
  clearNotice();
  const hash = location.hash.replace(/^#/, "") || "/";
  let view = "missing";
  let param = null;
  const job = hash.match(/^\/jobs\/(\d+)$/);
  if (hash === "/" || hash === "/jobs") view = "jobs";
  else if (job) [view, param] = ["job", Number(job[1])];
  else if (hash === "/new") view = "new";
  else if (hash === "/analyze") view = "analyze";
  else if (hash === "/adapters") view = "adapters";
  for (const section of document.querySelectorAll(".view")) section.hidden = section.id !== `view-${view}`;
  for (const link of document.querySelectorAll("[data-nav]")) {
    const current = link.dataset.nav === view || (view === "job" && link.dataset.nav === "jobs");
    if (current) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const titles = {
    jobs: "Jobs", job: `Job ${param}`, new: "New job", analyze: "Analyze", adapters: "Adapters", missing: "Not found",
  };
  document.title = `${titles[view]} · FlashTune`;
  if (view === "jobs") showJobs();
  else if (view === "job") showJob(param);
  else if (view === "new") showNewJob();
  else if (view === "analyze") showAnalyze();
  else if (view === "adapters") showAdapters();
}

// ------------------------------------------------------------------------------------------------- jobs list
let jobsLimit = 50;

function jobRow(job) {
  const bar = h("progress", { max: 1, value: fraction(job), class: job.status, "aria-label": `Job ${job.id} progress` });
  return h("tr", { "data-job-id": job.id },
    h("td", {}, h("a", { href: `#/jobs/${job.id}`, text: `#${job.id}${job.name ? ` ${job.name}` : ""}` }),
      h("span", { class: "sub", text: job.base_model })),
    h("td", {}, statusBadge(job.status)),
    h("td", { class: "dataset", text: job.dataset }),
    h("td", {}, bar, h("p", { class: "progress-text", text: progressText(job) })),
    h("td", { class: "small", text: when(job.created_at) }));
}

function updateRow(row, job) {
  const bar = row.querySelector("progress");
  bar.value = fraction(job);
  bar.className = job.status;
  row.querySelector(".progress-text").textContent = progressText(job);
  const badge = row.querySelector(".status");
  badge.className = `status ${job.status}`;
  badge.textContent = job.status;
}

function showJobs() {
  const body = $("jobs-body");
  const more = $("jobs-more");
  more.onclick = () => {
    jobsLimit = Math.min(jobsLimit + 50, 200);
  };
  poll(async () => {
    const page = await api(`/jobs?limit=${jobsLimit}`);
    const rows = new Map([...body.querySelectorAll("tr")].map((row) => [Number(row.dataset.jobId), row]));
    const ordered = page.data.map((job) => {
      const row = rows.get(job.id);
      if (row) {
        updateRow(row, job);
        rows.delete(job.id);
        return row;
      }
      return jobRow(job);
    });
    rows.forEach((row) => row.remove());
    ordered.forEach((row, i) => {
      if (body.children[i] !== row) body.insertBefore(row, body.children[i] || null);
    });
    $("jobs-empty").hidden = page.data.length > 0;
    $("jobs-table").hidden = page.data.length === 0;
    more.hidden = !page.has_more || jobsLimit >= 200;
    const running = page.data.filter((j) => j.status === "running").length;
    const queued = page.data.filter((j) => j.status === "queued").length;
    const notice = queued ? (await fetch("/readyz").then((r) => r.json()).catch(() => ({}))).workers?.notice : null;
    $("jobs-summary").textContent = `${running} running, ${queued} queued` + (notice ? ` (${notice})` : "");
  }, 1000);
}

// ------------------------------------------------------------------------------------------------- one job
function fillKv(dl, entries) {
  dl.replaceChildren(...entries.flatMap(([key, value]) => [h("dt", { text: key }), h("dd", { text: value })]));
}

function renderJobHead(job) {
  $("job-title").textContent = `Job #${job.id}${job.name ? ` ${job.name}` : ""}`;
  const badge = $("job-status");
  badge.className = `status ${job.status}`;
  badge.textContent = job.status;
  const bar = $("job-bar");
  bar.value = fraction(job);
  bar.className = job.status;
  bar.setAttribute("aria-valuetext", `${Math.round(fraction(job) * 100)}%`);
  const text = progressText(job);
  if ($("job-progress-text").textContent !== text) $("job-progress-text").textContent = text;
  $("job-cancel").hidden = FINAL.has(job.status);
  const error = $("job-error");
  if (job.error && job.status !== "succeeded") {
    error.replaceChildren(h("strong", { text: `${job.error.type}: ` }), job.error.message,
      job.error.hint ? h("p", { class: "small", text: `Hint: ${job.error.hint}` }) : null);
    error.hidden = false;
  } else {
    error.hidden = true;
  }
  const hp = job.hyperparameters || {};
  fillKv($("job-hp"), Object.entries(hp).map(([key, value]) => [key, Array.isArray(value) ? value.join(", ") : String(value)]));
  fillKv($("job-meta"), [
    ["base model", job.base_model],
    ["dataset", job.dataset],
    ["attempts", `${job.attempts} of ${job.max_attempts}`],
    ["created", when(job.created_at)],
    ["started", when(job.started_at) || "–"],
    ["finished", when(job.finished_at) || "–"],
    ["adapter", job.adapter || "–"],
  ]);
}

function metricsTable(metrics) {
  const rows = [
    ["accuracy", "Accuracy", pct],
    ["macro_f1", "Macro-F1", (v) => num(v, 3)],
    ["valid_format", "Answers in the valid format", pct],
    ["nll", "NLL of the gold label", (v) => num(v, 3), true],
    ["brier", "Brier score", (v) => num(v, 3), true],
    ["ece", "ECE (top label, 10 bins)", (v) => num(v, 3), true],
    ["calibrated.nll", "NLL after calibration", (v) => num(v, 3), true],
    ["calibrated.ece", "ECE after calibration", (v) => num(v, 3), true],
    ["calibrated.temperature", "Temperature fitted", (v) => num(v, 2), null],
  ];
  const get = (who, key) => key.split(".").reduce((o, k) => o?.[k], metrics[who]);
  return h("table", { class: "metrics-table" },
    h("caption", { class: "sr-only", text: "Base model versus adapter on the held-out split" }),
    h("thead", {}, h("tr", {}, h("th", { scope: "col", text: "metric" }), h("th", { scope: "col", text: "base model" }),
      h("th", { scope: "col", text: "adapter" }))),
    h("tbody", {}, rows.filter(([key]) => get("adapter", key) !== undefined || !key.includes(".")).map(([key, label, f, lower]) => {
      const base = get("base", key);
      const adapter = get("adapter", key);
      const better = lower === null ? false : lower ? adapter < base : adapter > base; // NLL, Brier, ECE: lower
      return h("tr", { "data-metric": key }, h("th", { scope: "row", text: label }), h("td", { text: f(base) }),
        h("td", { class: better ? "better" : "", text: f(adapter) }));
    })));
}

/** What /analyze does with the adapter's probabilities (metrics.calibration, fitted by the job). */
function calibrationNote(metrics) {
  const c = metrics.calibration;
  if (!c) return null;
  const text = c.applied
    ? `/analyze serves this adapter's probabilities calibrated: the label log-likelihoods divided by temperature ${num(c.temperature, 2)} (fitted on the ${c.num_items} held-out examples; cross-fitted NLL ${num(c.nll_before, 3)} → ${num(c.nll_after, 3)}).`
    : `/analyze serves this adapter's probabilities uncalibrated: temperature ${num(c.temperature, 2)} did not lower the cross-fitted NLL (${num(c.nll_before, 3)} → ${num(c.nll_after, 3)}).`;
  return h("p", { class: "muted small calibration-note", text });
}

function confusionTable(title, confusion) {
  return h("table", { class: "confusion" },
    h("caption", { text: title }),
    h("thead", {}, h("tr", {}, h("th", { scope: "col", text: "gold \\ predicted" }),
      LABELS.map((label) => h("th", { scope: "col", text: label })))),
    h("tbody", {}, LABELS.map((gold) => h("tr", {}, h("th", { scope: "row", text: gold }),
      LABELS.map((predicted) => h("td", { class: gold === predicted ? "diag" : "", text: confusion?.[gold]?.[predicted] ?? 0 }))))));
}

async function showEvaluation(job) {
  const panel = $("eval-panel");
  if (job.status !== "succeeded" || !job.adapter) {
    panel.hidden = true;
    return;
  }
  const adapter = await api(`/adapters/${encodeURIComponent(job.adapter)}`);
  showPromotion(adapter);
  const metrics = adapter.metrics || {};
  const body = $("eval-body");
  if (!metrics.num_labelled) {
    body.replaceChildren(h("p", { class: "muted", text: "No labelled held-out examples: nothing to compare." }));
  } else {
    body.replaceChildren(
      h("p", { class: "muted small", text: `${metrics.num_labelled} labelled held-out examples; rows of the confusion matrices are the gold labels.` }),
      metricsTable(metrics),
      calibrationNote(metrics),
      h("div", { class: "confusions" }, confusionTable("Base model", metrics.base?.confusion),
        confusionTable("Adapter", metrics.adapter?.confusion), reliabilityDiagram(metrics)));
  }
  const link = $("adapter-download");
  const url = `/adapters/${encodeURIComponent(job.adapter)}/download`;
  link.href = url;
  link.setAttribute("download", `${job.adapter}.tar.gz`);
  link.onclick = async (event) => {
    if (!getKey()) return; // no key: the plain link works
    event.preventDefault();
    $("download-state").textContent = "downloading…";
    try {
      await download(url, `${job.adapter}.tar.gz`);
      $("download-state").textContent = "";
    } catch (err) {
      $("download-state").textContent = "";
      report(err);
    }
  };
  panel.hidden = false;
}

/** What the job's promotion decided (promote_to), the aliases pointing at the adapter, and the promote form. */
function showPromotion(adapter) {
  const parts = [];
  const promotion = adapter.promotion;
  if (promotion) {
    parts.push(promotion.status === "pending"
      ? `Asked to be promoted to ${promotion.alias}: decided when the job succeeds.`
      : `Promotion to ${promotion.alias}: ${promotion.status}. ${promotion.reason || ""}`);
  }
  parts.push(adapter.aliases.length ? `Serves as: ${adapter.aliases.join(", ")}.` : "No alias points at this adapter.");
  $("promotion-state").textContent = parts.join(" ");
  $("promotion-state").dataset.aliases = adapter.aliases.join(",");
  const form = $("promote-form");
  form.onsubmit = async (event) => {
    event.preventDefault();
    clearInvalid(form);
    const alias = $("promote-alias").value.trim();
    const status = $("promote-status");
    $("promote-submit").disabled = true;
    try {
      const set = await api(`/adapters/${encodeURIComponent(adapter.name)}/aliases`, { method: "POST", body: { alias } });
      status.textContent = `${set.alias} now serves ${set.adapter}`;
      showPromotion(await api(`/adapters/${encodeURIComponent(adapter.name)}`));
    } catch (err) {
      status.textContent = `Not promoted: ${err.message || err}`; // the field's own message is beside it
      markInvalid(form, err, (field) => (field === "alias" ? "promote-alias" : null));
      if (!(err instanceof ApiError)) report(err);
    } finally {
      $("promote-submit").disabled = false;
    }
  };
}

function eventItem(event) {
  const time = new Date(event.created_at);
  return h("li", { class: event.level, "data-event-id": event.id, "data-type": event.type },
    h("time", { datetime: event.created_at, text: Number.isNaN(time.getTime()) ? "" : time.toLocaleTimeString() }),
    h("span", { class: "type", text: event.type }),
    h("span", { class: "message", text: tidy(event.message) }));
}

function showJob(id) {
  $("job-title").textContent = `Job #${id}`;
  $("job-events").replaceChildren();
  $("eval-panel").hidden = true;
  $("job-error").hidden = true;
  $("loss-summary").textContent = "";
  drawLossChart($("loss-chart"), { train_loss: [], eval_loss: [] });
  const seen = new Set();
  let status = null;
  let finalMetricsDrawn = false;

  const stopEvents = followEvents(id, {
    onEvent: (event) => {
      if (seen.has(event.id)) return;
      seen.add(event.id);
      const list = $("job-events");
      const stick = list.scrollTop + list.clientHeight >= list.scrollHeight - 8;
      list.append(eventItem(event));
      if (stick) list.scrollTop = list.scrollHeight;
    },
    onError: report,
  });
  onLeave(stopEvents);

  const cancel = $("job-cancel");
  let armed = null;
  cancel.textContent = "Cancel job";
  cancel.disabled = false;
  cancel.onclick = async () => {
    if (!armed) { // two clicks, so that a stray one does not throw away hours of training
      cancel.textContent = "Click again to cancel";
      armed = setTimeout(() => {
        armed = null;
        cancel.textContent = "Cancel job";
      }, 5000);
      return;
    }
    clearTimeout(armed);
    armed = null;
    cancel.disabled = true;
    try {
      renderJobHead(await api(`/jobs/${id}/cancel`, { method: "POST" }));
    } catch (err) {
      report(err);
    } finally {
      cancel.disabled = false;
      cancel.textContent = "Cancel job";
    }
  };
  onLeave(() => clearTimeout(armed));

  poll(async () => {
    const job = await api(`/jobs/${id}`);
    renderJobHead(job);
    const becameFinal = FINAL.has(job.status) && status !== job.status;
    status = job.status;
    if (becameFinal) await showEvaluation(job);
    return FINAL.has(job.status) && finalMetricsDrawn;
  }, 1000);

  poll(async () => {
    const metrics = await api(`/jobs/${id}/metrics`);
    $("loss-summary").textContent = drawLossChart($("loss-chart"), metrics);
    if (FINAL.has(metrics.status)) finalMetricsDrawn = true;
    return finalMetricsDrawn;
  }, 2000);
}

// --------------------------------------------------------------------------------------------------- new job
async function showNewJob() {
  $("new-status").textContent = "";
  const select = $("new-dataset");
  const [datasets, defaults] = await Promise.all([api("/datasets"), api("/ui/defaults")]).catch((err) => {
    report(err);
    return [[], null];
  });
  const chosen = select.value;
  select.replaceChildren(h("option", { value: "builtin", text: "builtin: the built-in flash-news examples" }),
    ...datasets.map((d) => h("option", { value: d.id, text: `${d.id} · ${d.filename || d.format} · ${d.num_examples} examples` })));
  if (chosen) select.value = chosen;
  if (!defaults) return;
  const base = $("new-base");
  if (!base.value) base.placeholder = defaults.server_base_model;
  renderHpFields(defaults);
}

function renderHpFields(defaults) {
  const grid = $("hp-fields");
  const previous = Object.fromEntries([...grid.querySelectorAll("[name]")].map((input) => [input.name, input.value]));
  grid.replaceChildren(...HP_FIELDS.map(([name, label, kind]) => {
    const value = defaults.hyperparameters[name];
    const shown = Array.isArray(value) ? value.join(", ") : String(value);
    const id = `hp-${name}`;
    let input;
    if (kind.startsWith("choice:")) {
      input = h("select", { id, name }, h("option", { value: "", text: `default (${shown})` }),
        kind.slice(7).split(",").map((c) => h("option", { value: c, text: c })));
    } else {
      input = h("input", { id, name, type: kind === "list" ? "text" : "number", placeholder: shown,
        step: kind === "float" ? "any" : "1", min: kind === "list" ? null : "0", "aria-describedby": `${id}-default` });
    }
    if (previous[name]) input.value = previous[name];
    return h("div", { class: "field" }, h("label", { for: id, text: label }), input,
      h("span", { id: `${id}-default`, class: "muted small", text: `default: ${shown}` }));
  }));
  $("hp-defaults-note").textContent = `(empty: the default for ${defaults.base_model})`;
}

function readHyperparameters() {
  const hp = {};
  for (const [name, , kind] of HP_FIELDS) {
    const raw = $(`hp-${name}`)?.value.trim();
    if (!raw) continue;
    if (kind === "int") hp[name] = Number.parseInt(raw, 10);
    else if (kind === "float") hp[name] = Number.parseFloat(raw);
    else if (kind === "list") hp[name] = raw.split(",").map((s) => s.trim()).filter(Boolean);
    else hp[name] = raw;
  }
  return hp;
}

function describeError(err) {
  if (!(err instanceof ApiError)) return String(err.message || err);
  const details = Array.isArray(err.details)
    ? err.details.map((d) => (d.field ? `${d.field}: ${d.message}` : d.message || JSON.stringify(d))).join("; ")
    : "";
  return details ? `${err.message} (${details})` : err.message;
}

/** Undo :func:`markInvalid` in ``form``. */
function clearInvalid(form) {
  for (const input of form.querySelectorAll('[aria-invalid="true"]')) {
    input.removeAttribute("aria-invalid");
    input.removeAttribute("aria-errormessage");
  }
  for (const message of form.querySelectorAll(".field-error")) message.remove();
}

/**
 * Highlight the inputs of ``form`` that an API error names (its details' ``field``, e.g. "hyperparameters.epochs"),
 * each with the API's message beside it; ``inputFor(field)`` gives the input's id. Returns how many were marked.
 */
function markInvalid(form, err, inputFor) {
  const details = err instanceof ApiError && Array.isArray(err.details) ? err.details : [];
  let first = null;
  for (const detail of details) {
    const input = $(inputFor(String(detail.field ?? "")) || "");
    if (!input || !form.contains(input) || input.getAttribute("aria-invalid") === "true") continue;
    const id = `${input.id}-error`;
    input.setAttribute("aria-invalid", "true");
    input.setAttribute("aria-errormessage", id);
    input.insertAdjacentElement("afterend", h("span", { id, class: "field-error", text: detail.message || "invalid" }));
    first = first || input;
  }
  if (first) first.focus();
  return first ? 1 : 0;
}

function newJobInput(field) {
  const [head, sub] = field.split(".");
  if (head === "hyperparameters" && sub) return `hp-${sub}`;
  return { dataset: "new-dataset", name: "new-name", base_model: "new-base", promote_to: "new-promote" }[head];
}

function setupNewJobForm() {
  $("new-base").addEventListener("change", async () => {
    const base = $("new-base").value.trim();
    try {
      renderHpFields(await api(`/ui/defaults${base ? `?base_model=${encodeURIComponent(base)}` : ""}`));
    } catch (err) {
      report(err);
    }
  });
  $("new-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const status = $("new-status");
    const submit = $("new-submit");
    const form = $("new-form");
    clearInvalid(form);
    const unreadable = [...form.querySelectorAll("input")].filter((input) => input.validity.badInput);
    if (unreadable.length) { // a number field holding what is no number: the browser gives "" for it
      markInvalid(form, new ApiError(0, "", "", unreadable.map((i) => ({ field: i.id, message: "not a number" }))), (f) => f);
      status.textContent = "Not started: fix the highlighted fields";
      return;
    }
    submit.disabled = true;
    let stage = "job";
    try {
      let dataset = $("new-dataset").value;
      const file = $("new-file").files[0];
      if (file) {
        stage = "upload";
        status.textContent = `uploading ${file.name}…`;
        const form = new FormData();
        form.append("file", file);
        if ($("new-format").value) form.append("format", $("new-format").value);
        if ($("new-options").value.trim()) form.append("options", $("new-options").value.trim());
        const uploaded = await upload("/datasets", form);
        dataset = uploaded.id;
        status.textContent = `uploaded ${uploaded.id}: ${uploaded.num_examples} examples, ${uploaded.rejected_count} rejected lines`;
        stage = "job";
      }
      const body = { dataset, hyperparameters: readHyperparameters() };
      const name = $("new-name").value.trim();
      const base = $("new-base").value.trim();
      const promote = $("new-promote").value.trim();
      if (name) body.name = name;
      if (base) body.base_model = base;
      if (promote) body.promote_to = promote;
      const job = await api("/jobs", { method: "POST", body });
      $("new-file").value = "";
      status.textContent = `job ${job.id} queued`;
      location.hash = `#/jobs/${job.id}`;
    } catch (err) {
      status.textContent = `Not started: ${describeError(err)}`;
      if (stage === "upload") markInvalid(form, new ApiError(0, "", "", [{ field: "file", message: err.message }]), () => "new-file");
      else markInvalid(form, err, newJobInput);
      if (!(err instanceof ApiError)) report(err);
    } finally {
      submit.disabled = false;
    }
  });
}

// ------------------------------------------------------------------------------------------ adapters and aliases
function f1(metrics, who) {
  const value = metrics?.[who]?.macro_f1;
  return value === undefined || value === null ? "–" : num(value, 3);
}

function aliasRow(alias) {
  const remove = h("button", { type: "button", class: "secondary small-button", text: "Remove",
    "aria-label": `Remove alias ${alias.alias}` });
  remove.onclick = async () => {
    remove.disabled = true;
    try {
      await api(`/aliases/${encodeURIComponent(alias.alias)}`, { method: "DELETE" });
      $("alias-status").textContent = `alias ${alias.alias} removed`;
      await showAdapters();
    } catch (err) {
      report(err);
      remove.disabled = false;
    }
  };
  return h("tr", { "data-alias": alias.alias },
    h("th", { scope: "row", text: alias.alias }),
    h("td", { class: "alias-adapter" }, h("a", { href: `#/jobs/${alias.adapter.replace(/^job-/, "")}`, text: alias.adapter })),
    h("td", { class: "small", text: alias.reason }),
    h("td", { class: "small", text: when(alias.updated_at) }),
    h("td", {}, remove));
}

function adapterRow(adapter) {
  const promotion = adapter.promotion;
  return h("tr", { "data-adapter": adapter.name },
    h("td", {}, h("a", { href: `#/jobs/${adapter.job_id}`, text: adapter.name }), h("span", { class: "sub", text: adapter.base_model })),
    h("td", { class: "dataset", text: adapter.dataset }),
    h("td", { text: adapter.metrics?.num_labelled ? `${f1(adapter.metrics, "base")} → ${f1(adapter.metrics, "adapter")}` : "no evaluation" }),
    h("td", { class: "aliases", text: adapter.aliases.join(", ") || "–" }),
    h("td", { class: "small", text: promotion ? `${promotion.alias}: ${promotion.status}` : "–",
      title: promotion?.reason || undefined }));
}

async function showAdapters() {
  const [aliases, adapters] = await Promise.all([api("/aliases"), api("/adapters")]).catch((err) => {
    report(err);
    return [[], []];
  });
  $("aliases-body").replaceChildren(...aliases.map(aliasRow));
  $("aliases-empty").hidden = aliases.length > 0;
  $("aliases-table").hidden = aliases.length === 0;
  $("adapters-body").replaceChildren(...adapters.map(adapterRow));
  $("adapters-empty").hidden = adapters.length > 0;
  $("adapters-table").hidden = adapters.length === 0;
  const select = $("alias-adapter");
  const chosen = select.value;
  select.replaceChildren(...adapters.map((a) => h("option", { value: a.name,
    text: `${a.name} · ${a.metrics?.num_labelled ? `macro-F1 ${f1(a.metrics, "adapter")}` : "no evaluation"}` })));
  if (chosen && [...select.options].some((o) => o.value === chosen)) select.value = chosen;
  $("alias-submit").disabled = adapters.length === 0;
}

function setupAliasForm() {
  const form = $("alias-form");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearInvalid(form);
    const alias = $("alias-name").value.trim();
    const adapter = $("alias-adapter").value;
    const status = $("alias-status");
    if (!alias) {
      markInvalid(form, new ApiError(0, "", "", [{ field: "alias", message: "name the alias, e.g. production" }]), () => "alias-name");
      return;
    }
    $("alias-submit").disabled = true;
    try {
      const set = await api(`/aliases/${encodeURIComponent(alias)}`, { method: "PUT", body: { adapter } });
      status.textContent = `${set.alias} now serves ${set.adapter}`;
      await showAdapters();
    } catch (err) {
      status.textContent = `Not set: ${err.message || err}`;
      markInvalid(form, err, (field) => ({ alias: "alias-name", adapter: "alias-adapter" })[field]);
      if (!(err instanceof ApiError)) report(err);
    } finally {
      $("alias-submit").disabled = false;
    }
  });
}

// --------------------------------------------------------------------------------------------------- analyze
async function showAnalyze() {
  let adapters = [];
  let aliases = [];
  try {
    [adapters, aliases] = await Promise.all([api("/adapters"), api("/aliases")]);
  } catch (err) {
    report(err);
  }
  const options = (extra) => [
    ...extra,
    h("option", { value: "none", text: "none: the base model alone" }),
    ...(adapters.length ? [h("option", { value: "latest", text: "latest adapter (with an evaluation)" })] : []),
    ...aliases.map((a) => h("option", { value: a.alias, text: `${a.alias} → ${a.adapter}` })),
    ...adapters.map((a) => h("option", { value: a.name, text: `${a.name} (${a.base_model}, dataset ${a.dataset})` })),
  ];
  for (const [id, extra] of [["analyze-adapter", []], ["analyze-compare", [h("option", { value: "", text: "no comparison" })]]]) {
    const select = $(id);
    const chosen = select.value;
    select.replaceChildren(...options(extra));
    if (chosen && [...select.options].some((o) => o.value === chosen)) select.value = chosen;
    else if (id === "analyze-adapter") select.value = adapters.length ? "latest" : "none";
  }
}

function resultCard(adapterChoice, result) {
  const probs = result.probs || {};
  return h("section", { class: "panel result", "aria-label": `Result of ${adapterChoice}` },
    h("h3", {}, h("span", { text: result.adapter === "none" ? "Base model"
      : `Adapter ${result.adapter}${result.alias ? ` via ${result.alias}` : ""}` }),
      h("span", { class: "muted small", text: `${Math.round(result.latency_ms)} ms` })),
    h("p", { class: `label ${result.label}`, "data-label": result.label, text: result.label }),
    h("ul", { class: "probs", "aria-label": "Label probabilities" }, LABELS.map((label) => {
      const fill = h("span", { class: label });
      fill.style.width = `${((probs[label] || 0) * 100).toFixed(1)}%`; // CSSOM: allowed under the CSP
      return h("li", {}, h("span", { text: label }),
        h("div", { class: "bar", role: "img", "aria-label": `${label} ${pct(probs[label])}` }, fill),
        h("span", { class: "pct", text: pct(probs[label]) }));
    })),
    h("dl", { class: "kv" },
      h("dt", { text: "importance" }), h("dd", { text: result.importance ? `${"★".repeat(result.importance)} (${result.importance}/5)` : "–" }),
      h("dt", { text: "market reaction" }), h("dd", { text: result.market_reaction || "–" }),
      h("dt", { text: "probabilities" }), h("dd", { class: "calibrated", text: result.calibrated
        ? `calibrated (temperature ${num(result.temperature, 2)})` : "not calibrated" }),
      h("dt", { text: "base model" }), h("dd", { text: result.base_model }),
      h("dt", { text: "context used" }), h("dd", { class: "context-used", text: (result.context_used || []).join(", ") || "–" }),
      h("dt", { text: "context left out" }), h("dd", { class: "context-ignored", text: (result.context_ignored || []).join(", ") || "–" })),
    result.analysis ? h("p", { class: "analysis", text: result.analysis }) : null,
    result.consistent === false
      ? h("p", { class: "inconsistent", role: "note", text: "This freely generated text does not state the scored label." })
      : null);
}

const METADATA = ["star", "country", "previous", "consensus", "actual"];
const MARKET = ["pre_ret", "volatility", "trend"];

function analyzeInput(field) {
  const [head, sub] = field.split(".");
  if (head === "metadata" && METADATA.includes(sub)) return `md-${sub}`;
  if (head === "market_context" && MARKET.includes(sub)) return `mc-${sub}`;
  return { text: "analyze-text", max_new_tokens: "analyze-tokens", adapter: "analyze-adapter" }[head];
}

/** ``{metadata?, market_context?}`` from the filled-in fields; null (and the bad fields marked) when one is no number. */
function readContext(form) {
  const metadata = {};
  const market = {};
  const bad = [];
  for (const name of METADATA) {
    const value = $(`md-${name}`).value.trim();
    if (value) metadata[name] = name === "star" ? Number.parseInt(value, 10) : value;
  }
  for (const name of MARKET) {
    const input = $(`mc-${name}`);
    const value = input.value.trim();
    if (input.validity.badInput) bad.push({ field: `market_context.${name}`, message: "not a number" });
    else if (value) market[name] = name === "trend" ? value : Number(value);
  }
  if (bad.length) {
    markInvalid(form, new ApiError(0, "", "", bad), analyzeInput);
    return null;
  }
  return {
    ...(Object.keys(metadata).length ? { metadata } : {}),
    ...(Object.keys(market).length ? { market_context: market } : {}),
  };
}

function setupAnalyzeForm() {
  $("analyze-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = $("analyze-text").value.trim();
    const status = $("analyze-status");
    if (!text) {
      status.textContent = "Paste a news text first.";
      return;
    }
    const choices = [$("analyze-adapter").value, $("analyze-compare").value].filter(Boolean);
    const tokens = $("analyze-tokens").value.trim();
    const form = $("analyze-form");
    clearInvalid(form);
    const extra = readContext(form);
    if (!extra) {
      status.textContent = "Fix the highlighted fields.";
      return;
    }
    const submit = $("analyze-submit");
    submit.disabled = true;
    status.textContent = "analyzing…";
    const results = $("analyze-results");
    try {
      const answers = await Promise.all(choices.map((adapter) => {
        const body = { text, adapter, ...extra };
        if (tokens) body.max_new_tokens = Number.parseInt(tokens, 10);
        return api("/analyze", { method: "POST", body }).then((r) => resultCard(adapter, r), (err) => {
          markInvalid(form, err, analyzeInput);
          return h("section", { class: "panel result error-box", role: "alert" }, h("h3", { text: adapter }), describeError(err));
        });
      }));
      results.replaceChildren(...answers);
      status.textContent = "done";
    } catch (err) {
      status.textContent = "";
      report(err);
    } finally {
      submit.disabled = false;
    }
  });
}

// ------------------------------------------------------------------------------------------------------ start
setupKeyPanel();
setupNewJobForm();
setupAnalyzeForm();
setupAliasForm();
window.addEventListener("hashchange", route);
route();
