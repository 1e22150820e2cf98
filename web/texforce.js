// TexForce for ComfyUI: the browser side.
//
// TexForce Train nodes get a live chart of the per-epoch reward (mean line, ±1 std band) with the latest
// approx-KL and clip fraction and the run's status, fed by the server's `texforce.progress` events. After a
// page reload (or a reconnect) the chart asks the server for the run's history (GET /texforce/runs, then
// /texforce/runs/<name>) and redraws. Other TexForce nodes show the text they return in `ui.text`, if any.
//
// Plain ES module, no build step, nothing downloaded.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EXTENSION = "texforce.web";
const EVENT = "texforce.progress";
const TRAIN_NODE = "TexForceTrain";
const CHART_WIDGET = "texforce_chart";
const REPORT_WIDGET = "texforce_report";
const CHART_HEIGHT = 200;
const MAX_POINTS = 10000; // the server keeps the same number of epochs

// run name -> {run, status, epoch, epochs, error, history: [{epoch, reward_mean, reward_std, ...}], at}
const runs = new Map();

function runState(name) {
  let state = runs.get(name);
  if (!state) {
    state = { run: name, status: null, epoch: 0, epochs: null, error: null, history: [], at: 0 };
    runs.set(name, state);
  }
  return state;
}

function graphNodes() {
  const graph = app.rootGraph ?? app.graph;
  return graph?._nodes ?? graph?.nodes ?? [];
}

function trainNodes() {
  return graphNodes().filter((n) => n?.comfyClass === TRAIN_NODE || n?.type === TRAIN_NODE);
}

function widgetValue(node, name) {
  return node.widgets?.find((w) => w.name === name)?.value;
}

function loraName(node) {
  const v = widgetValue(node, "lora_name");
  return typeof v === "string" ? v.trim() : "";
}

// The run a node shows: the one its own id last reported (its lora_name may come from a link), unless the
// lora_name widget was edited since; else the one its lora_name names.
function nodeRun(node) {
  const tf = node.texforce;
  const name = loraName(node);
  return tf?.run && tf.runNameAtEvent === name ? tf.run : name;
}

// -- numbers ---------------------------------------------------------------------------------------------

function isNum(v) {
  return typeof v === "number" && Number.isFinite(v);
}

function fmt(v) {
  if (!isNum(v)) return "–";
  const a = Math.abs(v);
  if (a === 0) return "0";
  if (a >= 1e4 || a < 1e-3) return v.toExponential(2);
  return v.toPrecision(4).replace(/\.?0+$/, "");
}

// -- run state -------------------------------------------------------------------------------------------

function addEpoch(state, stats) {
  if (!Number.isInteger(stats.epoch) || stats.epoch < 1) return;
  const h = state.history;
  while (h.length && h[h.length - 1].epoch >= stats.epoch) h.pop(); // the run started again from there
  h.push(stats);
  if (h.length > MAX_POINTS) h.splice(0, h.length - MAX_POINTS);
}

function epochStats(detail) {
  const out = {};
  for (const [k, v] of Object.entries(detail)) {
    if (k === "node" || k === "run" || k === "status" || k === "epochs" || k === "error") continue;
    if (typeof v === "number" || v === null) out[k] = v;
  }
  return out;
}

function applyEvent(detail) {
  const name = typeof detail.run === "string" ? detail.run.trim() : "";
  if (!name) return null;
  const state = runState(name);
  const status = detail.status;
  if (Number.isInteger(detail.epochs) && detail.epochs > 0) state.epochs = detail.epochs;
  if (status === "running") {
    const last = state.history.length ? state.history[state.history.length - 1].epoch : 0;
    addEpoch(state, epochStats(detail));
    if (Number.isInteger(detail.epoch)) state.epoch = detail.epoch;
    if (state.status !== "running") state.error = null;
    // a gap (resumed run, page opened mid-run): the server has the epochs we missed
    if (detail.epoch > last + 1) state.needsHistory = true;
  } else if (Number.isInteger(detail.epoch) && detail.epoch > 0) {
    state.epoch = detail.epoch;
  }
  if (status === "failed") state.error = String(detail.error ?? "unknown error");
  state.status = status ?? state.status;
  state.at = Date.now();
  return state;
}

function applyServerRun(data, askedAt) {
  if (!data || typeof data.run !== "string") return;
  const state = runState(data.run);
  if (state.at <= askedAt) {
    // no event came while we were asking: the server's status is the latest
    state.status = data.status ?? state.status;
    state.epoch = data.epoch ?? state.epoch;
    state.epochs = data.epochs ?? state.epochs;
    state.error = data.error ?? null;
  }
  state.serverUpdated = data.updated;
  // the server's history is complete; keep any newer epoch that arrived while we were asking
  const newer = state.history.filter((h) => h.epoch > (data.history?.at(-1)?.epoch ?? 0));
  state.history = [...(Array.isArray(data.history) ? data.history : []), ...newer];
  state.needsHistory = false;
  state.at = Date.now();
}

// -- server ----------------------------------------------------------------------------------------------

let refreshTimer = null;
let refreshingSince = 0; // a refresh in flight (a hung request frees the slot after 15 s)

async function getJson(path) {
  const res = await api.fetchApi(path, { cache: "no-store" });
  if (!res.ok) return null;
  return await res.json();
}

// Ask the server about the runs our nodes show (only names it lists: no 404s in the console).
async function refreshFromServer() {
  if (refreshingSince && Date.now() - refreshingSince < 15000) return scheduleRefresh(250);
  const nodes = trainNodes();
  if (!nodes.length) return;
  const since = (refreshingSince = Date.now());
  try {
    const listed = await getJson("/texforce/runs");
    if (!Array.isArray(listed)) return;
    const wanted = new Set(nodes.map(nodeRun).filter(Boolean));
    for (const summary of listed) {
      if (!wanted.has(summary.run)) continue;
      const local = runs.get(summary.run);
      if (local && !local.needsHistory && local.serverUpdated === summary.updated) continue;
      const askedAt = Date.now();
      const data = await getJson(`/texforce/runs/${encodeURIComponent(summary.run)}`);
      if (data) applyServerRun(data, askedAt);
    }
  } catch (e) {
    console.warn("TexForce: could not load training history", e);
  } finally {
    if (refreshingSince === since) refreshingSince = 0;
  }
  for (const node of nodes) drawNode(node);
}

function scheduleRefresh(delay = 100) {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(refreshFromServer, delay);
}

// -- drawing ---------------------------------------------------------------------------------------------

const COLORS = {
  running: "#5fb3ff",
  done: "#6fcf7f",
  cancelled: "#f0a43a",
  failed: "#ff6b6b",
  starting: "#5fb3ff",
  idle: "#999",
};

function statusText(state, override) {
  const of = state?.epochs ? `/${state.epochs}` : "";
  switch (override?.status ?? state?.status) {
    case "starting":
      return ["starting", `starting: sampling ${state?.epoch ? `epoch ${state.epoch + 1}` : "the first epoch"}…`];
    case "running":
      return ["running", `running: epoch ${state.epoch}${of}`];
    case "done":
      return ["done", `done: ${state.epoch}${of} epochs`];
    case "cancelled":
      return ["cancelled", state?.epoch
        ? `cancelled after epoch ${state.epoch}${of} (queue again with resume on to continue)`
        : "cancelled before the first epoch finished"];
    case "failed":
      return ["failed", `failed: ${(override ? override.error : state.error) || "unknown error"}`];
    default:
      return ["idle", "no training data yet: queue the workflow to train"];
  }
}

function drawChart(canvas, history, kind) {
  const dpr = window.devicePixelRatio || 1;
  const w = Math.max(1, Math.floor(canvas.clientWidth));
  const h = Math.max(1, Math.floor(canvas.clientHeight));
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(h * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  ctx.fillStyle = "rgba(0,0,0,0.25)";
  ctx.fillRect(0, 0, w, h);

  const pts = history.filter((p) => isNum(p.reward_mean));
  const left = 46, right = 8, top = 16, bottom = 18;
  const pw = w - left - right, ph = h - top - bottom;
  ctx.font = "10px sans-serif";
  ctx.fillStyle = "#bbb";
  ctx.textBaseline = "top";
  ctx.fillText("reward per epoch (mean ± std)", left, 2);
  if (!pts.length || pw < 10 || ph < 10) {
    ctx.textAlign = "center";
    ctx.textBaseline = "middle";
    ctx.fillStyle = "#888";
    ctx.fillText("no epochs yet", left + pw / 2, top + ph / 2);
    ctx.textAlign = "left";
    return 0;
  }
  let lo = Infinity, hi = -Infinity;
  for (const p of pts) {
    const s = isNum(p.reward_std) ? p.reward_std : 0;
    lo = Math.min(lo, p.reward_mean - s);
    hi = Math.max(hi, p.reward_mean + s);
  }
  if (!(hi > lo)) {
    const pad = Math.abs(lo) * 0.05 || 0.5;
    lo -= pad;
    hi += pad;
  }
  const padY = (hi - lo) * 0.06;
  lo -= padY;
  hi += padY;
  const e0 = pts[0].epoch, e1 = Math.max(pts[pts.length - 1].epoch, e0 + 1);
  const X = (e) => left + ((e - e0) / (e1 - e0)) * pw;
  const Y = (v) => top + (1 - (v - lo) / (hi - lo)) * ph;

  // axes and labels
  ctx.strokeStyle = "#555";
  ctx.lineWidth = 1;
  ctx.beginPath();
  ctx.moveTo(left, top);
  ctx.lineTo(left, top + ph);
  ctx.lineTo(left + pw, top + ph);
  ctx.stroke();
  ctx.fillStyle = "#aaa";
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  ctx.fillText(fmt(hi), left - 4, top + 4);
  ctx.fillText(fmt(lo), left - 4, top + ph - 4);
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  ctx.fillText(`epoch ${e0}`, left + 22, top + ph + 3);
  ctx.fillText(`${pts[pts.length - 1].epoch}`, left + pw - 8, top + ph + 3);
  ctx.textAlign = "left";

  // ±std band
  ctx.fillStyle = "rgba(95,179,255,0.22)";
  ctx.beginPath();
  pts.forEach((p, i) => {
    const y = Y(p.reward_mean + (isNum(p.reward_std) ? p.reward_std : 0));
    i ? ctx.lineTo(X(p.epoch), y) : ctx.moveTo(X(p.epoch), y);
  });
  for (let i = pts.length - 1; i >= 0; i--) {
    const p = pts[i];
    ctx.lineTo(X(p.epoch), Y(p.reward_mean - (isNum(p.reward_std) ? p.reward_std : 0)));
  }
  ctx.closePath();
  ctx.fill();

  // mean line and points
  ctx.strokeStyle = COLORS.running;
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  pts.forEach((p, i) => (i ? ctx.lineTo(X(p.epoch), Y(p.reward_mean)) : ctx.moveTo(X(p.epoch), Y(p.reward_mean))));
  ctx.stroke();
  if (pts.length <= 200) {
    ctx.fillStyle = COLORS.running;
    for (const p of pts) {
      ctx.beginPath();
      ctx.arc(X(p.epoch), Y(p.reward_mean), 2, 0, 2 * Math.PI);
      ctx.fill();
    }
  }

  // a run that did not finish says so over the chart
  if (kind === "cancelled" || kind === "failed") {
    ctx.font = "bold 14px sans-serif";
    ctx.textAlign = "right";
    ctx.textBaseline = "top";
    ctx.fillStyle = COLORS[kind];
    ctx.fillText(kind.toUpperCase(), left + pw - 4, top + 2);
    ctx.textAlign = "left";
  }
  return pts.length;
}

function drawNode(node) {
  const ui = node.texforce;
  if (!ui?.element) return;
  const name = nodeRun(node);
  const state = name ? runs.get(name) : null;
  // ComfyUI's own events (executing / execution_error / interrupted) tell what the run's events cannot (a run
  // refused before its first epoch); when both say cancelled or failed, the run's state says more.
  const newer = ui.override && (!state || ui.override.at > state.at);
  const override = newer && state?.status !== ui.override.status ? ui.override : null;
  const [kind, text] = statusText(state, override);
  const history = state?.history ?? [];
  ui.drawn = ui.canvas.clientWidth > 0 ? drawChart(ui.canvas, history, kind) : ui.drawn ?? 0;
  const last = history.length ? history[history.length - 1] : null;
  ui.metrics.textContent = last
    ? `reward ${fmt(last.reward_mean)} ± ${fmt(last.reward_std)} · approx-KL ${fmt(last.approx_kl)} · ` +
      `clip frac ${fmt(last.clipfrac)}`
    : "reward – · approx-KL – · clip frac –";
  ui.status.textContent = text;
  ui.status.title = text;
  ui.status.style.color = COLORS[kind] ?? COLORS.idle;
  ui.status.style.whiteSpace = kind === "failed" ? "normal" : "nowrap"; // up to 3 lines of the error
  ui.status.style.maxHeight = kind === "failed" ? "3.9em" : "";
  ui.element.dataset.status = kind;
  ui.element.dataset.points = String(history.length);
  ui.kind = kind;
  ui.text = text;
  ui.shown = name;
}

function redrawRun(name) {
  for (const node of trainNodes()) if (nodeRun(node) === name) drawNode(node);
}

// -- widgets ---------------------------------------------------------------------------------------------

function addChart(node) {
  if (node.texforce?.element) return;
  const element = document.createElement("div");
  element.className = "texforce-chart";
  Object.assign(element.style, {
    display: "flex", flexDirection: "column", width: "100%", height: "100%", boxSizing: "border-box",
    font: "11px sans-serif", color: "#ddd", gap: "2px", overflow: "hidden", pointerEvents: "none",
  });
  const canvas = document.createElement("canvas");
  Object.assign(canvas.style, { flex: "1 1 auto", width: "100%", minHeight: "0", borderRadius: "4px" });
  const metrics = document.createElement("div");
  const status = document.createElement("div");
  for (const el of [metrics, status]) {
    Object.assign(el.style, { whiteSpace: "nowrap", overflow: "hidden", textOverflow: "ellipsis", flex: "0 0 auto" });
  }
  status.style.fontWeight = "bold";
  status.style.lineHeight = "1.3em";
  element.append(canvas, metrics, status);

  const widget = node.addDOMWidget(CHART_WIDGET, "texforce_chart", element, {
    serialize: false, // not an input: never in widgets_values nor in the prompt
    hideOnZoom: false,
    getMinHeight: () => CHART_HEIGHT,
    getValue: () => undefined,
    setValue: () => {},
  });
  widget.serialize = false;
  node.texforce = { ...(node.texforce ?? {}), element, canvas, metrics, status, widget, drawn: 0 };
  if (typeof ResizeObserver !== "undefined") {
    const ro = new ResizeObserver(() => drawNode(node));
    ro.observe(canvas);
    node.texforce.resizeObserver = ro;
  }
  const loraWidget = node.widgets?.find((w) => w.name === "lora_name");
  if (loraWidget) {
    const callback = loraWidget.callback;
    loraWidget.callback = function (...args) {
      const r = callback?.apply(this, args);
      drawNode(node);
      scheduleRefresh();
      return r;
    };
  }
  const [w, h] = node.computeSize();
  node.setSize([Math.max(node.size[0], w, 380), Math.max(node.size[1], h)]);
  drawNode(node);
}

function showReport(node, text) {
  let widget = node.widgets?.find((w) => w.name === REPORT_WIDGET);
  if (!widget) {
    const area = document.createElement("textarea");
    area.readOnly = true;
    Object.assign(area.style, {
      width: "100%", height: "100%", boxSizing: "border-box", font: "11px monospace", resize: "none",
      background: "rgba(0,0,0,0.25)", color: "#ddd", border: "none", borderRadius: "4px",
    });
    widget = node.addDOMWidget(REPORT_WIDGET, "texforce_report", area, {
      serialize: false, getMinHeight: () => 80, getValue: () => area.value, setValue: () => {},
    });
    widget.serialize = false;
    widget.texforceArea = area;
    const [w, h] = node.computeSize();
    node.setSize([Math.max(node.size[0], w), Math.max(node.size[1], h)]);
  }
  widget.texforceArea.value = text;
}

// The node's state as a plain object (what the chart shows); used by the browser tests.
function nodeState(node) {
  const name = nodeRun(node);
  const state = name ? runs.get(name) : null;
  return {
    run: name, status: node.texforce?.kind ?? null, text: node.texforce?.text ?? "", epoch: state?.epoch ?? 0,
    epochs: state?.epochs ?? null, error: state?.error ?? null, points: state?.history.length ?? 0,
    drawn: node.texforce?.drawn ?? 0, history: (state?.history ?? []).map((h) => ({ ...h })),
  };
}

// -- events ----------------------------------------------------------------------------------------------

function matchingNodes(nodeId, runName) {
  const id = nodeId == null ? null : String(nodeId);
  return trainNodes().filter((n) => (id !== null && String(n.id) === id) || (runName && loraName(n) === runName));
}

function onProgress({ detail }) {
  if (!detail || typeof detail !== "object") return;
  const state = applyEvent(detail);
  if (!state) return;
  const id = detail.node == null ? null : String(detail.node);
  for (const node of matchingNodes(id, state.run)) {
    node.texforce = node.texforce ?? {};
    if (String(node.id) === id) {
      node.texforce.run = state.run;
      node.texforce.runNameAtEvent = loraName(node);
    }
  }
  if (state.needsHistory) scheduleRefresh(0);
  redrawRun(state.run);
  for (const node of matchingNodes(id, null)) drawNode(node);
}

function setOverride(nodeId, override) {
  if (nodeId == null) return;
  for (const node of trainNodes()) {
    if (String(node.id) !== String(nodeId) || !node.texforce) continue;
    node.texforce.override = { ...override, at: Date.now() };
    drawNode(node);
  }
}

app.registerExtension({
  name: EXTENSION,

  async beforeRegisterNodeDef(nodeType, nodeData) {
    const name = nodeData?.name ?? "";
    if (name === TRAIN_NODE) {
      const onNodeCreated = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function (...args) {
        const r = onNodeCreated?.apply(this, args);
        addChart(this);
        return r;
      };
      const onConfigure = nodeType.prototype.onConfigure;
      nodeType.prototype.onConfigure = function (...args) {
        const r = onConfigure?.apply(this, args);
        if (this.texforce) this.texforce.run = null; // a loaded workflow: show the run its lora_name names
        drawNode(this);
        scheduleRefresh();
        return r;
      };
      // Widget values can change without any event we see (restored tabs, undo, edits): check per frame.
      const onDrawForeground = nodeType.prototype.onDrawForeground;
      nodeType.prototype.onDrawForeground = function (...args) {
        const r = onDrawForeground?.apply(this, args);
        const name = nodeRun(this);
        if (this.texforce?.element && this.texforce.shown !== name) {
          drawNode(this);
          if (name && !runs.has(name)) scheduleRefresh();
        }
        return r;
      };
      const onRemoved = nodeType.prototype.onRemoved;
      nodeType.prototype.onRemoved = function (...args) {
        this.texforce?.resizeObserver?.disconnect();
        return onRemoved?.apply(this, args);
      };
      nodeType.prototype.texforceState = function () {
        return nodeState(this);
      };
    } else if (name.startsWith("TexForce")) {
      // other TexForce nodes: show the text they return in ui.text (reports, scores), if they return any
      const onExecuted = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (message) {
        const r = onExecuted?.apply(this, arguments);
        const text = message?.text;
        if (text != null) showReport(this, Array.isArray(text) ? text.join("\n") : String(text));
        return r;
      };
    }
  },

  async setup() {
    api.addEventListener(EVENT, onProgress);
    api.addEventListener("executing", ({ detail }) => {
      if (detail != null) setOverride(detail, { status: "starting" });
    });
    api.addEventListener("execution_error", ({ detail }) => {
      if (detail?.node_id != null)
        setOverride(detail.node_id, { status: "failed", error: String(detail.exception_message ?? "error").trim() });
    });
    api.addEventListener("execution_interrupted", ({ detail }) => {
      if (detail?.node_id != null) setOverride(detail.node_id, { status: "cancelled" });
    });
    api.addEventListener("reconnected", () => scheduleRefresh());
    scheduleRefresh();
  },

  async afterConfigureGraph() {
    scheduleRefresh();
  },
});
