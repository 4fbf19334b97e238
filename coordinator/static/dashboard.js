// dedloc dashboard: polls the coordinator's JSON API and redraws without reloading the page.
"use strict";

const REFRESH_MS = 2000;
const steps = [];          // /api/history rows, ascending by step
let heldout = [];
let lastStep = 0;

const $ = (id) => document.getElementById(id);
const fmt = (x, digits = 3) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits));
const int = (x) => (x === null || x === undefined ? "–" : Math.round(x).toLocaleString("en"));

function ago(t) {
  if (!t) return "–";
  const s = Math.max(0, Date.now() / 1000 - t);
  if (s < 90) return `${Math.round(s)} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  return `${(s / 3600).toFixed(1)} h ago`;
}

function duration(s) {
  if (s === null || s === undefined) return "–";
  if (s < 90) return `${Math.round(s)} s`;
  return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}

async function getJSON(path) {
  const response = await fetch(path, { cache: "no-store" });
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;   // textContent: names published by peers are never interpreted as HTML
  if (cls) td.className = cls;
  row.appendChild(td);
}

const layout = (title, xTitle, yTitle) => ({
  title: { text: title, font: { size: 14 } },
  margin: { l: 55, r: 15, t: 40, b: 45 },
  xaxis: { title: { text: xTitle } },
  yaxis: { title: { text: yTitle }, rangemode: "tozero" },
  legend: { x: 1, xanchor: "right", y: 1, bgcolor: "rgba(255,255,255,0.7)" },
  paper_bgcolor: "rgba(0,0,0,0)",
});
const config = { displayModeBar: false, responsive: true };

function drawCharts() {
  const withLoss = steps.filter((r) => r.loss !== null);
  const lossTraces = [
    { x: withLoss.map((r) => r.step), y: withLoss.map((r) => r.loss), name: "training loss (peers)", mode: "lines+markers" },
    { x: heldout.map((r) => r.step), y: heldout.map((r) => r.loss), name: "held-out loss (coordinator)", mode: "lines+markers" },
  ];
  const lossLayout = layout("Loss", "global step", "loss");
  lossLayout.yaxis.rangemode = "normal";
  Plotly.react("loss-chart", lossTraces, lossLayout, config);
  $("loss-chart").dataset.points = String(withLoss.length);

  const times = steps.map((r) => new Date(r.time * 1000));
  Plotly.react("throughput-chart", [{ x: times, y: steps.map((r) => r.samples_per_second), mode: "lines+markers",
    name: "samples/s", fill: "tozeroy" }], layout("Swarm throughput", "time", "samples/s"), config);
  $("throughput-chart").dataset.points = String(steps.length);

  const peersLayout = layout("Peers online", "time", "peers");
  peersLayout.yaxis.tickformat = "d";
  peersLayout.yaxis.dtick = 1;
  Plotly.react("peers-chart", [{ x: times, y: steps.map((r) => r.peers), mode: "lines+markers", line: { shape: "hv" },
    name: "peers" }], peersLayout, config);
  $("peers-chart").dataset.points = String(steps.length);
}

function drawStatus(s) {
  $("run-id").textContent = s.run_id;
  const stale = Date.now() / 1000 - s.updated_at > 30;
  const state = s.finished ? "finished" : stale ? "stale" : "training";
  $("run-state").textContent = state;
  $("run-state").className = `badge ${state}`;
  $("updated").textContent = `updated ${ago(s.updated_at)}`;
  $("step").textContent = `${s.step} / ${s.stop_at}`;
  $("loss").textContent = fmt(s.loss);
  $("heldout").textContent = fmt(s.heldout_loss);
  $("heldout-step").textContent = s.heldout_step === null ? "no checkpoint evaluated yet" : `at step ${s.heldout_step}`;
  $("throughput").textContent = fmt(s.samples_per_second, 1);
  $("peers").textContent = s.peers;
  $("eta").textContent = s.finished ? "done" : duration(s.eta_next_step);
  $("accumulated").textContent = `${int(s.samples_accumulated)} / ${int(s.target_batch_size)} samples`;
  $("samples").textContent = int(s.samples);
  if (s.checkpoint) {
    $("checkpoint").textContent = `step ${s.checkpoint.step}`;
    $("checkpoint-detail").textContent = `${ago(s.checkpoint.time)} · ${s.checkpoint.path || ""}`;
  }
}

function drawPeers(peers) {
  const body = $("peers-table").querySelector("tbody");
  body.replaceChildren();
  for (const p of peers) {
    const row = document.createElement("tr");
    cell(row, p.short_id, "id");
    cell(row, p.volunteer || "–");
    cell(row, p.device || "–");
    cell(row, p.client_mode === null ? "–" : p.client_mode ? "client" : "full");
    cell(row, p.step);
    cell(row, fmt(p.samples_per_second, 1), "num");
    cell(row, int(p.samples), "num");
    cell(row, ago(p.last_seen));
    body.appendChild(row);
  }
}

function drawLeaderboard(rows) {
  const body = $("leaderboard-table").querySelector("tbody");
  body.replaceChildren();
  const total = rows.reduce((sum, r) => sum + r.samples, 0) || 1;
  rows.forEach((r, i) => {
    const row = document.createElement("tr");
    cell(row, i + 1);
    cell(row, r.name);
    cell(row, int(r.samples), "num");
    cell(row, `${((100 * r.samples) / total).toFixed(1)} %`, "num");
    cell(row, r.peers, "num");
    body.appendChild(row);
  });
}

async function refresh() {
  try {
    const [status, history, peers, board] = await Promise.all([
      getJSON("/api/status"), getJSON(`/api/history?since=${lastStep}`), getJSON("/api/peers"), getJSON("/api/leaderboard"),
    ]);
    for (const row of history.steps) {
      if (row.step > lastStep) { steps.push(row); lastStep = row.step; }
    }
    heldout = history.heldout;
    drawStatus(status);
    drawCharts();
    drawPeers(peers.peers);
    drawLeaderboard(board.leaderboard);
  } catch (error) {
    $("run-state").textContent = "coordinator unreachable";
    $("run-state").className = "badge stale";
    console.warn(error);
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

refresh();
