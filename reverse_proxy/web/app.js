// djs dashboard: renders what /api/events pushes (server-sent events); no polling timer.
"use strict";
const $ = (sel) => document.querySelector(sel);
let selected = null;   // ticket shown in the detail panel
let last = null;       // last snapshot pushed by the server
let lastPush = 0;      // when it came (ms): a proxy that stops pushing is shown stale
const STALE_MS = 3000; // the server pushes at least once a second

// A part of the page is not redrawn while the pointer is on it or text in it is selected:
// redrawn under the pointer, a click on a job row was lost or opened another job (rows move
// as new jobs come in), and a selection (a ticket to copy) was wiped every second.
function busy(el, hover = true) {
  if (hover && el.matches(":hover")) return true;
  const sel = window.getSelection();
  return sel !== null && !sel.isCollapsed && el.contains(sel.anchorNode);
}

// Set a scrolled box's text, keeping where the reader is; one scrolled to its end follows it.
function setText(el, text) {
  if (el.textContent === text) return;
  const atEnd = el.scrollTop + el.clientHeight >= el.scrollHeight - 4;
  const top = el.scrollTop;
  el.textContent = text;
  el.scrollTop = atEnd && top > 0 ? el.scrollHeight : top;
}

function esc(text) {
  return String(text ?? "").replace(/[&<>"']/g, (c) =>
    ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
}
function badge(state) { return `<span class="badge s-${esc(state)}">${esc(state)}</span>`; }
function clock(t) { return t ? new Date(t * 1000).toISOString().slice(11, 23) : ""; }
function took(job) {
  if (!job.started_at) return "";
  if (job.finished_at) return `${(job.finished_at - job.started_at).toFixed(3)} s`;
  // running: for how long so far, by this browser's clock against the node's
  return `${Math.max(0, Date.now() / 1000 - job.started_at).toFixed(1)} s…`;
}

function finishedText(job) {
  if (job.finished_at) return clock(job.finished_at) + (job.started_at ? ` (${took(job)})` : "");
  return job.started_at ? "running" : "";
}

function jobTime(seconds) {
  if (seconds === null) return "";
  return seconds < 1 ? `${(seconds * 1000).toFixed(1)} ms` : `${seconds.toFixed(2)} s`;
}

function renderCluster(c) {
  $("#queue-length").textContent = c.queue_length;
  const rate = c.throughput.length ? c.throughput[c.throughput.length - 1].rate : 0;
  $("#throughput").textContent = rate.toFixed(1);
  const alive = c.nodes.filter((n) => n.state === "alive").length;
  $("#nodes-alive").textContent = `${alive} / ${c.nodes.length}`;
  $("#completed").textContent = c.completed;
  $("#duplicates").textContent = c.duplicates;
  $("#typical-job").textContent = jobTime(c.typical_job_seconds) || "–";
  const alert = $("#store-alert");
  alert.hidden = c.store_error === null;
  alert.textContent = c.store_error === null ? "" : "The proxy's stable storage is failing: "
    + `${c.store_error}. Nodes are refused until it takes commits again; nothing committed is lost.`;
  $("#nodes tbody").innerHTML = c.nodes.map((n) => `
    <tr data-node="${esc(n.node_id)}" data-state="${esc(n.state)}">
      <td><b>${esc(n.node_id)}</b></td><td class="state">${badge(n.state)}${n.leaving
        ? `<div class="why">left: ${esc(n.leaving)}</div>` : ""}</td>
      <td>${n.slots}</td><td>${n.running}</td><td>${n.queued}</td><td>${n.assigned}</td>
      <td>${n.done}</td><td>${n.failed}</td><td>${n.duplicates}</td>
      <td>${jobTime(n.mean_job_seconds)}</td>
      <td>${n.last_info_age.toFixed(1)} s</td><td class="mono">${esc(n.client_address || "")}</td>
    </tr>`).join("");
  drawChart(c.throughput);
}

function drawChart(samples) {
  const canvas = $("#chart");
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  canvas.width = w * ratio; canvas.height = h * ratio;
  const g = canvas.getContext("2d");
  g.scale(ratio, ratio);
  g.clearRect(0, 0, w, h);
  const pts = samples.slice(-120);
  const pad = 24;
  g.strokeStyle = "#2a323c"; g.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const y = pad / 2 + (h - pad) * i / 4;
    g.beginPath(); g.moveTo(40, y); g.lineTo(w, y); g.stroke();
  }
  if (pts.length < 2) return;
  const series = [["queue", "#d29922"], ["rate", "#58a6ff"]];
  series.forEach(([key, color], idx) => {
    const max = Math.max(1, ...pts.map((p) => p[key]));
    g.strokeStyle = color; g.lineWidth = 2; g.beginPath();
    pts.forEach((p, i) => {
      const x = 40 + (w - 40) * i / (120 - 1) + (w - 40) * (120 - pts.length) / (120 - 1);
      const y = pad / 2 + (h - pad) * (1 - p[key] / max);
      if (i === 0) g.moveTo(x, y); else g.lineTo(x, y);
    });
    g.stroke();
    g.fillStyle = color; g.font = "11px system-ui";
    g.fillText(`${key === "queue" ? "queue" : "jobs/s"} max ${max.toFixed(key === "rate" ? 1 : 0)}`,
               4 + idx * 0, 12 + idx * 14);
  });
  // The time axis, under the plot: the newest sample at the right edge, 120 slots across.
  const period = (pts[pts.length - 1].t - pts[0].t) / (pts.length - 1);
  g.fillStyle = "#8b949e"; g.font = "10px system-ui"; g.textBaseline = "bottom";
  [[0, "left"], [60, "center"], [119, "right"]].forEach(([slot, align]) => {
    const age = Math.round((119 - slot) * period);
    g.textAlign = align;
    g.fillText(age ? `${age} s ago` : "now", 40 + (w - 40) * slot / 119, h);
  });
}

function renderJobs(jobs, counts, matched) {
  // the table shows the newest jobs only: say of how many
  $("#job-counts").textContent = (matched > jobs.length ? `${jobs.length} newest of ${matched} · ` : "")
    + Object.entries(counts).map(([k, v]) => `${k} ${v}`).join(" · ");
  const body = $("#jobs tbody");
  if (busy(body)) { $("#jobs-paused").hidden = false; return; }
  $("#jobs-paused").hidden = true;
  const focused = body.contains(document.activeElement) ? document.activeElement.dataset.ticket
    : null;  // a keyboard user's row keeps the focus across the redraw
  if (!jobs.length) {
    body.innerHTML = `<tr><td colspan="9" class="note">no jobs${$("#job-search").value.trim()
      || $("#job-filter").value ? " match" : " yet"}</td></tr>`;
    return;
  }
  body.innerHTML = jobs.map((j) => `
    <tr tabindex="0" data-ticket="${esc(j.ticket)}" data-state="${esc(j.state)}"
        class="${j.ticket === selected ? "selected" : ""}">
      <td class="ticket">${esc(j.ticket)}</td>
      <td class="job" title="${esc([j.type, ...j.args].join(" "))}">${esc([j.type, ...j.args].join(" "))}</td>
      <td class="state">${badge(j.state)}</td><td>${esc(j.origin)}</td><td>${esc(j.node || "")}</td>
      <td>${j.attempts.length}</td><td>${clock(j.submitted_at)}</td><td>${took(j)}</td>
      <td class="result" title="${esc(j.result || "")}">${esc(j.result || "")}</td>
    </tr>`).join("");
  if (focused) body.querySelector(`tr[data-ticket="${CSS.escape(focused)}"]`)?.focus({preventScroll: true});
}

const SHOWN_ATTEMPTS = 20;  // the last ones; each ending cut to one line's worth
function short(text) { return text.length > 160 ? `${text.slice(0, 160)}…` : text; }

// An `sh` job's output is kept as one line, its newlines, tabs and backslashes escaped
// (cluster_node/output_text.py): the detail shows them as they were. Other escapes
// (control characters, bytes that are not UTF-8) stay as they are, safe to show.
const UNESCAPE = {n: "\n", t: "\t", "\\": "\\"};
function asWritten(j, text) {
  return j.type === "sh" ? text.replace(/\\([nt\\])/g, (_, c) => UNESCAPE[c]) : text;
}
function resultText(j) { return j.result == null ? "(not yet)" : asWritten(j, j.result); }
function outputText(j) { return j.output.map((line) => asWritten(j, line)).join("\n"); }

function renderDetail(j) {
  const panel = $("#job-detail");
  if (panel.dataset.ticket === j.ticket && busy(panel, false)) return;
  $("#detail-ticket").textContent = j.ticket;
  const first = Math.max(0, j.attempts.length - SHOWN_ATTEMPTS);
  const attempts = (first ? `(${first} earlier not shown)<br>` : "") + j.attempts.slice(first)
    .map((a, i) => `${first + i + 1}. ${esc(a.node)} at ${clock(a.dispatched_at)}` +
      (a.finished_at === null ? "" : `, ended ${clock(a.finished_at)}: ${esc(short(a.result ?? ""))}`)
    ).join("<br>") || "none yet";
  if (panel.dataset.ticket === j.ticket && $("#detail-result")) {
    // the same job: its scrolled boxes keep where the reader is
    $("#detail-state").innerHTML = badge(j.state);
    $("#detail-attempts").innerHTML = attempts;
    $("#detail-node").textContent = j.node || "";
    $("#detail-started").textContent = clock(j.started_at);
    $("#detail-finished").textContent = finishedText(j);
    setText($("#detail-result"), resultText(j));
    if (j.output && j.output.length && $("#detail-output")) {
      setText($("#detail-output"), outputText(j));
      return;
    }
    if (!(j.output && j.output.length)) return;
  }
  panel.dataset.ticket = j.ticket;
  panel.innerHTML = `<dl>
    <dt>job</dt><dd>${esc([j.type, ...j.args].join(" "))}</dd>
    <dt>state</dt><dd id="detail-state">${badge(j.state)}</dd>
    <dt>origin</dt><dd>${esc(j.origin)}</dd>
    <dt>node</dt><dd id="detail-node">${esc(j.node || "")}</dd>
    <dt>attempts</dt><dd id="detail-attempts">${attempts}</dd>
    <dt>submitted</dt><dd>${clock(j.submitted_at)}</dd>
    <dt>started</dt><dd id="detail-started">${clock(j.started_at)}</dd>
    <dt>finished</dt><dd id="detail-finished">${esc(finishedText(j))}</dd>
    <dt>result</dt><dd><pre id="detail-result">${esc(resultText(j))}</pre></dd>
    ${j.output && j.output.length ? `<dt>output</dt><dd><pre id="detail-output">${esc(outputText(j))}</pre></dd>` : ""}</dl>`;
}

async function showDetail(ticket) {
  selected = ticket;
  let resp;
  try {
    resp = await fetch(`/api/jobs/${encodeURIComponent(ticket)}`);
  } catch (err) {
    return;  // the dashboard server is away: the badge says so; the next push tries again
  }
  if (resp.ok) { renderDetail(await resp.json()); return; }
  const error = (await resp.json()).error;
  if (resp.status === 404 && selected === ticket) selected = null;  // gone: stop asking
  $("#job-detail").dataset.ticket = "";
  $("#job-detail").innerHTML = `<span class="err">${esc(error)}</span>`;
}

async function refreshJobs() {
  if (!last) return;
  const state = $("#job-filter").value, q = $("#job-search").value.trim();
  if (!state && !q) {
    renderJobs(last.jobs, last.counts, Object.values(last.counts).reduce((a, b) => a + b, 0));
    return;
  }
  const resp = await fetch(`/api/jobs?limit=50&state=${encodeURIComponent(state)}&q=${encodeURIComponent(q)}`);
  const body = await resp.json();
  renderJobs(body.jobs || [], body.counts || last.counts, body.matched ?? 0);
}

function onSnapshot(snapshot) {
  last = snapshot;
  lastPush = Date.now();
  if ($("#conn").textContent !== "live") { $("#conn").textContent = "live"; $("#conn").className = "conn on"; }
  renderCluster(snapshot.cluster);
  refreshJobs();
  if (selected) showDetail(selected);  // its own call: it carries the live output
}

function connect() {
  const source = new EventSource("/api/events");
  source.onopen = () => { $("#conn").textContent = "live"; $("#conn").className = "conn on"; };
  source.onmessage = (ev) => onSnapshot(JSON.parse(ev.data));
  source.onerror = () => { $("#conn").textContent = "reconnecting…"; $("#conn").className = "conn off"; };
}

// A proxy that hangs keeps the connection open and pushes nothing: say the figures are old.
setInterval(() => {
  if (lastPush && Date.now() - lastPush > STALE_MS && $("#conn").textContent === "live") {
    $("#conn").textContent = `stale: no news for ${Math.round((Date.now() - lastPush) / 1000)} s`;
    $("#conn").className = "conn off";
  }
}, 1000);

$("#jobs tbody").addEventListener("click", (ev) => {
  const row = ev.target.closest("tr");
  if (row && row.dataset.ticket) showDetail(row.dataset.ticket);
});
$("#jobs tbody").addEventListener("keydown", (ev) => {  // rows take the focus: Enter opens
  const row = ev.target.closest("tr");
  if ((ev.key === "Enter" || ev.key === " ") && row && row.dataset.ticket) {
    ev.preventDefault();
    showDetail(row.dataset.ticket);
  }
});
$("#job-filter").addEventListener("change", refreshJobs);
$("#job-search").addEventListener("input", refreshJobs);
$("#submit-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const out = $("#submit-result");
  const button = $("#submit-form button[type=submit]") || $("#submit-form button");
  if (button.disabled) return;  // one job per press: a double click made two
  button.disabled = true;
  out.innerHTML = `<span class="note">submitting…</span>`;
  const body = {type: $("#job-type").value, args: $("#job-args").value,
                priority: parseInt($("#job-priority").value || "0", 10)};
  let resp, reply;
  try {
    resp = await fetch("/api/jobs", {method: "POST", headers: {"Content-Type": "application/json"},
                                     body: JSON.stringify(body)});
    reply = await resp.json();
  } catch (err) {
    out.innerHTML = `<span class="err">could not reach the dashboard server: ${esc(err.message)}; `
      + "the job was not submitted</span>";
    return;
  } finally {
    button.disabled = false;
  }
  if (resp.ok) {
    out.innerHTML = `Ticket <b id="submitted-ticket" class="mono">${esc(reply.ticket)}</b> at ${esc(reply.node)}`;
    showDetail(reply.ticket);
  } else {
    out.innerHTML = `<span class="err">${esc(reply.error)}</span>`;
  }
});
connect();
