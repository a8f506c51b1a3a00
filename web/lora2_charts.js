// LoRA² charts for ComfyUI: a live loss curve and per-block rank bars on "Train LoRA² (SDXL)" (from the
// "lora2.progress" messages the node sends while it trains), and mean-rank-per-block bars on
// "Load LoRA² Adapter" after it runs (from its UI output "lora2_ranks").  Plain JS, no build step; drawn on the
// node's canvas in onDrawForeground, below its widgets.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

// the train node, and the all-inputs node of earlier workflows
const TRAIN_TYPES = ["LoRA2TrainSDXL", "LoRA2Train"];
const LOAD = "LoRA2LoadAdapter";
const CHART_H = 230;
const SAMPLE_H = 96; // row of the newest sample images under the charts, when the run draws samples
const MAX_POINTS = 2000;
const COLORS = { loss: "#4fc3f7", mse: "#ffb74d", bar: "#81c784", full: "#5c6bc0", text: "#ddd", dim: "#888" };

// group label of a kohya key, as lora2_train.plot.block_of: te1, te2, down.N, mid, up.N, other
export function blockOf(key) {
  if (key.startsWith("lora_te1_")) return "te1";
  if (key.startsWith("lora_te2_")) return "te2";
  const m = /^lora_unet_(input_blocks|middle_block|output_blocks)_(\d+)/.exec(key);
  if (!m) return "other";
  if (m[1] === "middle_block") return "mid";
  return (m[1] === "input_blocks" ? "down." : "up.") + m[2];
}

function blockOrder(b) {
  const [head, idx] = b.split(".");
  const rank = { te1: -2, te2: -1, down: 0, mid: 1, up: 2, other: 3 }[head] ?? 3;
  return rank * 1000 + (idx ? Number(idx) : 0);
}

export function meanRankByBlock(ranks) {
  const groups = {};
  for (const [k, r] of Object.entries(ranks || {})) (groups[blockOf(k)] ??= []).push(r);
  const out = {};
  for (const b of Object.keys(groups).sort((a, c) => blockOrder(a) - blockOrder(c)))
    out[b] = groups[b].reduce((s, v) => s + v, 0) / groups[b].length;
  return out;
}

function fmt(v) {
  if (v === undefined || v === null || Number.isNaN(v)) return "–";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e4)) return v.toExponential(2);
  return v.toFixed(a < 1 ? 4 : 2);
}

function fmtCount(n) {
  if (n >= 1e6) return (n / 1e6).toFixed(2) + "M";
  if (n >= 1e3) return (n / 1e3).toFixed(1) + "k";
  return String(n ?? "–");
}

// y of the first pixel below the node's widgets
function widgetsBottom(node) {
  let bottom = 0;
  const rowH = (globalThis.LiteGraph && LiteGraph.NODE_WIDGET_HEIGHT) || 20;
  for (const w of node.widgets || []) {
    const y = w.last_y ?? w.y;
    if (typeof y !== "number") continue;
    let h = rowH;
    if (w.computeSize) {
      try { h = w.computeSize(node.size[0])[1]; } catch (e) { h = rowH; }
    }
    bottom = Math.max(bottom, y + h);
  }
  return bottom + 6;
}

function ensureRoom(node, top, extra = 0) {
  const need = top + CHART_H + extra;
  if (node.size[1] < need) {
    const size = [node.size[0], need];
    if (node.setSize) node.setSize(size);
    else node.size = size;
  }
}

function drawFrame(ctx, x, y, w, h, title) {
  ctx.fillStyle = "rgba(0,0,0,0.25)";
  ctx.fillRect(x, y, w, h);
  ctx.fillStyle = COLORS.dim;
  ctx.font = "11px sans-serif";
  ctx.textAlign = "left";
  ctx.textBaseline = "top";
  ctx.fillText(title, x + 4, y + 3);
}

function drawLoss(ctx, x, y, w, h, points) {
  drawFrame(ctx, x, y, w, h, "loss (total / mse)");
  if (!points.length) return;
  const top = y + 16, bot = y + h - 4, left = x + 4, right = x + w - 4;
  let lo = Infinity, hi = -Infinity;
  for (const p of points) for (const v of [p.loss, p.mse]) {
    if (Number.isFinite(v)) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  }
  if (!Number.isFinite(lo)) return;
  if (hi - lo < 1e-12) { hi += 1e-6; lo -= 1e-6; }
  const s0 = points[0].step, s1 = Math.max(points[points.length - 1].step, s0 + 1);
  const px = (s) => left + ((s - s0) / (s1 - s0)) * (right - left);
  const py = (v) => bot - ((v - lo) / (hi - lo)) * (bot - top);
  for (const [key, color] of [["mse", COLORS.mse], ["loss", COLORS.loss]]) {
    ctx.strokeStyle = color;
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    let started = false;
    for (const p of points) {
      const v = p[key];
      if (!Number.isFinite(v)) continue;
      if (!started) { ctx.moveTo(px(p.step), py(v)); started = true; } else ctx.lineTo(px(p.step), py(v));
    }
    if (points.length === 1 && started) ctx.arc(px(points[0].step), py(points[0][key]), 2, 0, 2 * Math.PI);
    ctx.stroke();
  }
  ctx.fillStyle = COLORS.dim;
  ctx.textAlign = "right";
  ctx.fillText(fmt(hi), right, y + 3);
  ctx.textBaseline = "bottom";
  ctx.fillText(fmt(lo), right, bot);
}

// bars: {label: value} (and optional second series drawn behind, e.g. the full adapter under a budget)
function drawBars(ctx, x, y, w, h, title, series, behind) {
  drawFrame(ctx, x, y, w, h, title);
  const labels = Object.keys(series);
  if (!labels.length) return;
  const top = y + 16, bot = y + h - 14, left = x + 4, right = x + w - 4;
  let max = 0;
  for (const v of Object.values(series)) max = Math.max(max, v);
  if (behind) for (const v of Object.values(behind)) max = Math.max(max, v);
  max = max || 1;
  const slot = (right - left) / labels.length;
  const bw = Math.max(2, slot * 0.7);
  ctx.font = "9px sans-serif";
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  const widest = Math.max(...labels.map((b) => ctx.measureText(b).width)) + 3;
  const every = Math.max(1, Math.ceil(widest / slot)); // label every n-th bar so that labels never overlap
  labels.forEach((b, i) => {
    const cx = left + slot * (i + 0.5);
    if (behind && behind[b] !== undefined) {
      const hb = (behind[b] / max) * (bot - top);
      ctx.fillStyle = COLORS.full;
      ctx.fillRect(cx - bw / 2, bot - hb, bw, hb);
    }
    const hv = (series[b] / max) * (bot - top);
    ctx.fillStyle = COLORS.bar;
    ctx.fillRect(cx - bw / 2 + (behind ? bw * 0.2 : 0), bot - hv, bw * (behind ? 0.6 : 1), hv);
    if (i % every === 0) {
      ctx.fillStyle = COLORS.dim;
      ctx.fillText(b, cx, bot + 2);
    }
  });
  ctx.textAlign = "right";
  ctx.fillText("max " + fmt(max), right, y + 3);
}

// Room below the node's widgets, and the context saved and set for a status line: {top, x, w}.
function beginPanel(node, ctx, color, extra = 0, at = null) {
  const top = at ?? widgetsBottom(node);
  ensureRoom(node, top, extra);
  ctx.save();
  ctx.font = "11px sans-serif";
  ctx.textAlign = "left";
  ctx.textBaseline = "top";
  ctx.fillStyle = color;
  return { top, x: 8, w: node.size[0] - 16 };
}

// peak device memory of the run (CUDA only; absent on other devices)
function peak(mb) {
  return typeof mb === "number" ? `  peak ${Math.round(mb)} MiB` : "";
}

// URL of a sample image the node saved in ComfyUI's temp folder ({filename, subfolder, type}), served by /view
export function viewUrl(ref) {
  const q = new URLSearchParams({ filename: ref.filename, subfolder: ref.subfolder || "", type: ref.type || "temp" });
  const path = "/view?" + q.toString();
  return api.apiURL ? api.apiURL(path) : path;
}

// the newest samples, side by side in a row of height h (each image scaled to fit its slot)
function drawSamples(ctx, x, y, w, h, st) {
  drawFrame(ctx, x, y, w, h, `samples, step ${st.sampleStep}`);
  const imgs = st.sampleImages.filter((im) => im.complete && im.naturalWidth > 0);
  if (!imgs.length) return;
  const slot = w / st.sampleImages.length, top = y + 16, hh = h - 20;
  st.sampleImages.forEach((im, i) => {
    if (!(im.complete && im.naturalWidth > 0)) return;
    const s = Math.min((slot - 4) / im.naturalWidth, hh / im.naturalHeight);
    const iw = im.naturalWidth * s, ih = im.naturalHeight * s;
    ctx.drawImage(im, x + slot * i + (slot - iw) / 2, top + (hh - ih) / 2, iw, ih);
  });
}

function samplesRoom(node) {
  const st = node.lora2;
  return st && st.sampleImages && st.sampleImages.length ? SAMPLE_H + 4 : 0;
}

// at: the y of the panel's widget (the panel is the node's last widget, so that a multiline text widget, which
// takes the node's free height, does not grow into it); without it, below the widgets
function drawTrain(node, ctx, at = null) {
  const st = node.lora2;
  const extra = samplesRoom(node);
  const { top, x, w } = beginPanel(node, ctx, st && st.status === "interrupted" ? "#ef9a9a" : COLORS.text, extra, at);
  let line = "LoRA²: waiting for training";
  if (st) {
    if (st.status === "interrupted") line = st.message || "cancelled";
    else if (st.status === "done") line = `done: ${st.step}/${st.total} steps, saved ${st.saved || ""}` + peak(st.peak);
    else line = `step ${st.step ?? 0}/${st.total ?? "?"}  loss ${fmt(st.last?.loss)}  params ${fmtCount(st.last?.num_params)}` +
      peak(st.peak);
  }
  ctx.fillText(line, x, top, w);
  const h = (CHART_H - 24) / 2;
  drawLoss(ctx, x, top + 18, w, h, st ? st.points : []);
  drawBars(ctx, x, top + 22 + h, w, h, "mean rank per block", (st && st.blocks) || {});
  if (extra) drawSamples(ctx, x, top + CHART_H, w, SAMPLE_H, st);
  ctx.restore();
}

function drawLoad(node, ctx) {
  const info = node.lora2;
  if (!info) return;
  const { top, x, w } = beginPanel(node, ctx, COLORS.text);
  const budget = info.full_num_parameters && info.full_num_parameters !== info.num_parameters;
  ctx.fillText(`${info.name}: ${fmtCount(info.num_parameters)} params` +
    (budget ? ` of ${fmtCount(info.full_num_parameters)} (budget)` : ""), x, top, w);
  drawBars(ctx, x, top + 18, w, CHART_H - 22, budget ? "mean rank per block (loaded / full)" :
    "mean rank per block", meanRankByBlock(info.ranks), budget ? meanRankByBlock(info.full_ranks) : null);
  ctx.restore();
}

function nodeById(id) {
  const graph = app.graph;
  if (!graph || id === undefined || id === null) return null;
  return graph.getNodeById(Number(id)) || graph.getNodeById(id) || null;
}

function onProgress(event) {
  const d = event.detail || {};
  const node = nodeById(d.node);
  if (!node) return;
  if (d.status === "started" || !node.lora2) node.lora2 = { points: [], blocks: {}, step: 0, total: d.total };
  const st = node.lora2;
  st.status = d.status;
  st.total = d.total ?? st.total;
  if (d.status === "running") {
    st.step = d.step;
    st.last = d;
    st.points.push({ step: d.step, loss: d.loss, mse: d.mse });
    if (st.points.length > MAX_POINTS) st.points.splice(0, st.points.length - MAX_POINTS);
  }
  if (Array.isArray(d.samples) && d.samples.length) {
    st.sampleStep = d.samples[0].step ?? d.step;
    st.sampleImages = d.samples.filter((r) => r && r.filename).map((r) => {
      const im = new Image();
      im.onload = () => node.setDirtyCanvas?.(true, true);
      im.src = viewUrl(r);
      return im;
    });
  }
  if (d.ranks_by_block) st.blocks = d.ranks_by_block;
  if (d.saved) st.saved = d.saved;
  if (d.message) st.message = d.message;
  if (typeof d.peak_memory_mb === "number") st.peak = d.peak_memory_mb;
  node.setDirtyCanvas?.(true, true);
}

function chain(proto, name, fn) {
  const orig = proto[name];
  proto[name] = function (...args) {
    const r = orig ? orig.apply(this, args) : undefined;
    try {
      fn.apply(this, args);
    } catch (e) {
      console.warn("LoRA² chart:", e);
    }
    return r;
  };
}

app.registerExtension({
  name: "lora2.charts",
  async setup() {
    api.addEventListener("lora2.progress", onProgress);
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (TRAIN_TYPES.includes(nodeData.name)) {
      chain(nodeType.prototype, "onNodeCreated", function () {
        // the panel as a widget of its own height: the layout keeps that room below the other widgets
        this.addCustomWidget?.({
          name: "lora2_chart", type: "lora2_chart", value: null, serialize: false, options: { serialize: false },
          draw(ctx, node, _width, y) {
            if (!node.flags?.collapsed) drawTrain(node, ctx, y);
          },
          computeSize(width) {
            return [width ?? 0, CHART_H + samplesRoom(this.node)];
          },
        });
        const w = this.widgets?.[this.widgets.length - 1];
        if (w && w.name === "lora2_chart") w.node = this;
      });
      chain(nodeType.prototype, "onDrawForeground", function (ctx) {
        // without the panel widget (a frontend without addCustomWidget): below the widgets, as before
        if (!this.flags?.collapsed && !this.widgets?.some((w) => w.name === "lora2_chart")) drawTrain(this, ctx);
      });
    } else if (nodeData.name === LOAD) {
      chain(nodeType.prototype, "onExecuted", function (output) {
        const info = output?.lora2_ranks?.[0];
        if (info) {
          this.lora2 = info;
          this.setDirtyCanvas?.(true, true);
        }
      });
      chain(nodeType.prototype, "onDrawForeground", function (ctx) {
        if (!this.flags?.collapsed) drawLoad(this, ctx);
      });
    }
  },
});
