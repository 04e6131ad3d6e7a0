// TuneGraph live training panel: a loss chart (raw + smoothed, log toggle), lr / step / samples/s /
// ETA, the latest validation thumbnails and the run buttons, on TrainLoKr nodes; a caching progress
// strip on CacheLatents. Fed by the pack's `tunegraph.train` websocket events; the history of a run
// (page reload mid-training, an earlier run) comes from GET /tunegraph/runs/{run_id}/metrics.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EVENT = "tunegraph.train"; // one per optimizer step
const RUN_EVENT = "tunegraph.run"; // checkpoint / validate / stop / finished
const TRAIN_NODE = "TuneGraphTrainLoKr";
const CACHE_NODE = "TuneGraphCacheLatents";
const SMOOTHING = 0.9; // same EMA (debiased) as the trainer's loss.png
const runs = new Map(); // run_id -> run state, shared by every panel
const panels = new Set(); // every panel; a node's id is only final once the graph is configured

function newRun(runId) {
  return { runId, node: null, total: null, samples: null, points: new Map(), evals: new Map(),
           checkpoints: [], validation: [], active: false, status: "", lastStep: 0 };
}

function getRun(runId) {
  if (!runs.has(runId)) runs.set(runId, newRun(runId));
  return runs.get(runId);
}

function runPath(runId, tail) {
  return `/tunegraph/runs/${runId.split("/").map(encodeURIComponent).join("/")}/${tail}`;
}

// -- data ---------------------------------------------------------------------------------------

function addRecord(run, r) {
  const step = Number(r.step);
  if (typeof r.loss === "number") run.points.set(step, { loss: r.loss, lr: r.lr, seconds: r.seconds });
  if (typeof r.eval_loss === "number") run.evals.set(step, r.eval_loss);
  run.lastStep = Math.max(run.lastStep, step);
}

async function loadHistory(runId) {
  const res = await api.fetchApi(runPath(runId, "metrics"));
  if (!res.ok) return null;
  const body = await res.json();
  const run = getRun(runId);
  run.points.clear();
  run.evals.clear();
  run.lastStep = 0;
  for (const r of body.records) addRecord(run, r);
  Object.assign(run, { total: body.total, checkpoints: body.checkpoints, validation: body.validation,
                       active: body.active });
  if (body.node != null) run.node = String(body.node);
  return run;
}

function onTrainEvent(d) {
  if (!d || !d.run_id) return;
  const run = getRun(d.run_id);
  if (d.node != null) run.node = String(d.node);
  if (d.total != null) run.total = d.total;
  if (d.samples != null) run.samples = d.samples;
  if (d.action) {
    onAction(run, d);
  } else {
    if (run.points.size && d.step <= run.lastStep) {
      // re-queued from a checkpoint: the file was cut back, so take the history again
      loadHistory(run.runId).then(() => redrawRun(run));
    }
    run.active = true;
    addRecord(run, d);
  }
  redrawRun(run);
}

function onAction(run, d) {
  if (d.action === "checkpoint") {
    if (!run.checkpoints.includes(d.checkpoint)) run.checkpoints.push(d.checkpoint);
    run.status = `${d.checkpoint} saved`;
  } else if (d.action === "validate") {
    run.status = d.images.length ? `validated at step ${d.step}` : "no validation prompts";
    loadHistory(run.runId).then(() => redrawRun(run));
  } else if (d.action === "stop") {
    run.status = `stopping at step ${d.step}`;
  } else if (d.action === "finished") {
    run.active = false;
    run.status = `finished at step ${d.step}`;
    loadHistory(run.runId).then(() => redrawRun(run));
  }
}

function redrawRun(run) {
  for (const panel of panels) {
    if (run.node === panel.nodeId) panel.show(run.runId);
  }
}

// -- numbers ------------------------------------------------------------------------------------

function smooth(values) {
  let avg = 0;
  return values.map((v, i) => {
    avg = SMOOTHING * avg + (1 - SMOOTHING) * v;
    return avg / (1 - SMOOTHING ** (i + 1));
  });
}

function clock(seconds) {
  if (!isFinite(seconds)) return "–";
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  return (h ? `${h}:${String(m).padStart(2, "0")}` : `${m}`) + `:${String(r).padStart(2, "0")}`;
}

function stats(run) {
  const steps = [...run.points.keys()].sort((a, b) => a - b);
  if (!steps.length) return run.active ? "starting…" : "no steps yet";
  const last = run.points.get(steps[steps.length - 1]);
  const recent = steps.slice(-20).map((s) => run.points.get(s).seconds).filter((x) => x > 0);
  const perStep = recent.length ? recent.reduce((a, b) => a + b, 0) / recent.length : NaN;
  const parts = [`step ${run.lastStep}/${run.total ?? "?"}`, `loss ${last.loss.toFixed(4)}`];
  if (typeof last.lr === "number") parts.push(`lr ${last.lr.toExponential(2)}`);
  if (run.samples && perStep > 0) parts.push(`${(run.samples / perStep).toFixed(1)} samples/s`);
  if (run.active && run.total && perStep > 0) parts.push(`ETA ${clock((run.total - run.lastStep) * perStep)}`);
  return parts.join(" · ");
}

// -- chart --------------------------------------------------------------------------------------

function drawChart(canvas, run, logScale) {
  const ratio = window.devicePixelRatio || 1;
  const w = Math.max(200, canvas.clientWidth), h = Math.max(100, canvas.clientHeight);
  canvas.width = w * ratio;
  canvas.height = h * ratio;
  const g = canvas.getContext("2d");
  g.setTransform(ratio, 0, 0, ratio, 0, 0);
  g.fillStyle = "#1b1b1f";
  g.fillRect(0, 0, w, h);
  const steps = run ? [...run.points.keys()].sort((a, b) => a - b) : [];
  const losses = steps.map((s) => run.points.get(s).loss);
  const evals = run ? [...run.evals.entries()].sort((a, b) => a[0] - b[0]) : [];
  canvas.dataset.points = String(steps.length);
  canvas.dataset.evalPoints = String(evals.length);
  g.font = "11px sans-serif";
  if (!steps.length && !evals.length) {
    g.fillStyle = "#888";
    g.fillText(run ? "waiting for the first step…" : "queue this node to see its loss", 12, h / 2);
    return;
  }
  const ys = [...losses, ...evals.map((e) => e[1])];
  const useLog = logScale && ys.every((y) => y > 0);
  const f = (y) => (useLog ? Math.log10(y) : y);
  let lo = Math.min(...ys.map(f)), hi = Math.max(...ys.map(f));
  if (hi - lo < 1e-12) { lo -= 0.5; hi += 0.5; }
  const x0 = 46, x1 = w - 8, y0 = 8, y1 = h - 18;
  const xmax = Math.max(run.active ? run.total || 0 : 0, run.lastStep, 1); // a stopped run: its own length
  const X = (s) => x0 + (s / xmax) * (x1 - x0);
  const Y = (y) => y1 - ((f(y) - lo) / (hi - lo)) * (y1 - y0);
  g.strokeStyle = "#333";
  g.strokeRect(x0, y0, x1 - x0, y1 - y0);
  g.fillStyle = "#999";
  const label = (v) => (useLog ? (10 ** v).toPrecision(3) : v.toPrecision(3));
  g.fillText(label(hi), 2, y0 + 9);
  g.fillText(label(lo), 2, y1);
  g.fillText("0", x0, h - 4);
  g.fillText(String(xmax), x1 - 6 * String(xmax).length, h - 4);
  const line = (xs, vs, color, width) => {
    g.strokeStyle = color;
    g.lineWidth = width;
    g.beginPath();
    vs.forEach((v, i) => (i ? g.lineTo(X(xs[i]), Y(v)) : g.moveTo(X(xs[i]), Y(v))));
    g.stroke();
  };
  line(steps, losses, "rgba(90,160,255,0.35)", 1);
  line(steps, smooth(losses), "#5aa0ff", 2);
  g.fillStyle = "#ffa040";
  for (const [s, v] of evals) {
    g.beginPath();
    g.arc(X(s), Y(v), 3, 0, 2 * Math.PI);
    g.fill();
  }
}

// -- panel --------------------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  Object.assign(e, attrs);
  e.append(...children);
  return e;
}

const STYLE = `
.tunegraph-panel { display:flex; flex-direction:column; gap:4px; font:11px sans-serif; color:#ddd;
  background:#222; border-radius:4px; padding:4px; box-sizing:border-box; width:100%; height:100%; }
.tunegraph-panel canvas { width:100%; height:150px; border-radius:3px; }
.tunegraph-panel .tg-row { display:flex; gap:4px; align-items:center; flex-wrap:wrap; }
.tunegraph-panel button { font:11px sans-serif; padding:2px 6px; cursor:pointer; }
.tunegraph-panel .tg-thumbs img { height:56px; border-radius:2px; }
.tunegraph-panel select { max-width:160px; font:11px sans-serif; }
`;

class TrainPanel {
  constructor(node) {
    this.node = node;
    this.runId = null;
    this.select = el("select", { className: "tg-run", title: "runs of this node" });
    this.select.onchange = () => this.show(this.select.value, true);
    this.log = el("input", { type: "checkbox", className: "tg-log" });
    this.log.onchange = () => this.draw();
    this.canvas = el("canvas", { className: "tg-chart" });
    this.stats = el("div", { className: "tg-stats" });
    this.status = el("div", { className: "tg-status" });
    this.saved = el("div", { className: "tg-checkpoints" });
    this.thumbs = el("div", { className: "tg-row tg-thumbs" });
    const button = (text, action, cls) => {
      const b = el("button", { textContent: text, className: cls });
      b.onclick = () => this.request(action);
      return b;
    };
    this.buttons = [button("Save checkpoint now", "checkpoint", "tg-checkpoint"),
                    button("Validate now", "validate", "tg-validate"),
                    button("Stop and save", "stop", "tg-stop")];
    this.root = el("div", { className: "tunegraph-panel" },
      el("div", { className: "tg-row" }, this.select, el("label", {}, this.log, " log scale")),
      this.canvas, this.stats, el("div", { className: "tg-row" }, ...this.buttons), this.status, this.saved,
      this.thumbs);
  }

  get nodeId() {
    return String(this.node.id);
  }

  show(runId, pinned = false) {
    const run = runs.get(runId);
    if (!run) return;
    // a new run on this node takes the panel, unless the user picked another run in the list
    if (this.runId !== runId && (pinned || !this.pinned || run.active)) {
      this.runId = runId;
      this.pinned = pinned;
    }
    this.scheduleDraw();
  }

  scheduleDraw() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      this.draw();
    });
  }

  draw() {
    const ids = [...runs.values()].filter((r) => r.node === this.nodeId).map((r) => r.runId);
    if (!this.runId && ids.length) this.runId = ids[ids.length - 1];
    const run = this.runId ? runs.get(this.runId) : null;
    if (this.select.options.length !== ids.length) {
      this.select.replaceChildren(...ids.map((id) => el("option", { value: id, textContent: id })));
    }
    if (this.runId) this.select.value = this.runId;
    this.root.dataset.runId = this.runId || "";
    drawChart(this.canvas, run, this.log.checked);
    this.stats.textContent = run ? stats(run) : "";
    this.status.textContent = run ? [run.status, this.message].filter(Boolean).join(" · ") : "";
    this.saved.textContent = run?.checkpoints.length ? `checkpoints: ${run.checkpoints.join(", ")}` : "";
    for (const b of this.buttons) b.disabled = !(run && run.active);
    const shown = run ? run.validation : [];
    if (this.thumbs.dataset.key !== JSON.stringify(shown)) {
      this.thumbs.dataset.key = JSON.stringify(shown);
      this.thumbs.replaceChildren(...shown.map((v) => el("img", {
        src: api.apiURL(`/view?${new URLSearchParams(v)}`), title: v.filename })));
    }
  }

  async request(action) {
    if (!this.runId) return;
    const res = await api.fetchApi(runPath(this.runId, action), { method: "POST" });
    const body = await res.json().catch(() => ({}));
    this.message = res.ok ? `${action} requested` : body.error || `${action} failed (${res.status})`;
    this.scheduleDraw();
  }
}

// CacheLatents: ComfyUI's own progress events for that node, as a thin bar with text.
class CachePanel {
  constructor(node) {
    this.node = node;
    this.bar = el("div", { style: "height:6px;background:#5aa0ff;width:0%;border-radius:3px" });
    this.text = el("div", { textContent: "not cached yet" });
    this.root = el("div", { className: "tunegraph-panel tunegraph-cache" },
      el("div", { style: "background:#333;border-radius:3px" }, this.bar), this.text);
  }

  get nodeId() {
    return String(this.node.id);
  }

  progress(value, max) {
    this.bar.style.width = `${(100 * value) / Math.max(max, 1)}%`;
    this.text.textContent = `cached ${value}/${max} dataset${max === 1 ? "" : "s"}`;
  }

  show() {}

  draw() {}
}

function attach(node, panel, height) {
  panels.add(panel);
  node.addDOMWidget("tunegraph_panel", "tunegraph_panel", panel.root, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => height,
    getMaxHeight: () => height + 40,
  });
  const onRemoved = node.onRemoved;
  node.onRemoved = function () {
    panels.delete(panel);
    return onRemoved?.apply(this, arguments);
  };
  setTimeout(() => panel.draw(), 0); // after a loaded workflow gave the node its id
}

async function restoreActiveRuns() {
  // a reload mid-training: the events so far are gone, so take each active run's history
  const res = await api.fetchApi("/tunegraph/runs");
  if (!res.ok) return;
  for (const a of (await res.json()).active) {
    const run = await loadHistory(a.run_id);
    if (run) redrawRun(run);
  }
}

app.registerExtension({
  name: "TuneGraph.TrainPanel",
  async setup() {
    document.head.append(el("style", { textContent: STYLE }));
    api.addEventListener(EVENT, (e) => onTrainEvent(e.detail));
    api.addEventListener(RUN_EVENT, (e) => onTrainEvent(e.detail));
    api.addEventListener("progress", ({ detail }) => {
      const panel = [...panels].find((p) => p.nodeId === String(detail?.node));
      if (panel instanceof CachePanel) panel.progress(detail.value, detail.max);
    });
    api.addEventListener("reconnected", () => restoreActiveRuns());
    window.TuneGraphPanel = { runs, panels, loadHistory };
    await restoreActiveRuns();
  },
  nodeCreated(node) {
    if (node.comfyClass === TRAIN_NODE) attach(node, new TrainPanel(node), 300);
    else if (node.comfyClass === CACHE_NODE) attach(node, new CachePanel(node), 36);
  },
});
