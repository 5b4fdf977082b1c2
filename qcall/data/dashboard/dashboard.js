// qcall operations view: draws /api/topology once, then applies each /events snapshot.
// Plain DOM + SVG, no library. Element ids: link-<name>, row-<name>, node-<name>.
"use strict";
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);
let nodes = {};
let linkEnds = {};

function si(v) {
  if (v === null || v === undefined) return "–";
  for (const [u, s] of [["G", 1e9], ["M", 1e6], ["k", 1e3]]) {
    if (v >= s) { const x = v / s; return (x < 10 ? x.toFixed(1) : x.toFixed(0)) + u; }
  }
  return v.toFixed(0);
}

function el(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

function drawTopology(topo) {
  $("topology").textContent = topo.topology;
  const few = topo.nodes.length <= 40;
  for (const n of topo.nodes) nodes[n.name] = n;
  for (const l of topo.links) {
    linkEnds[l.name] = l;
    const a = nodes[l.a], b = nodes[l.b];
    const line = el("line", { id: "link-" + l.name, x1: a.x, y1: a.y, x2: b.x, y2: b.y,
      class: "grey", "data-colour": "grey" });
    const title = el("title", {}); title.textContent = l.name; line.appendChild(title);
    $("links").appendChild(line);
    const row = document.createElement("tr");
    row.id = "row-" + l.name;
    row.innerHTML = `<td>${l.name}</td><td>${l.length_km.toFixed(0)}</td><td class="rate">–</td>` +
      `<td class="target">–</td><td class="qber">–</td><td class="pool">–</td><td class="state">–</td>`;
    $("link-table").tBodies[0].appendChild(row);
    const opt = document.createElement("option"); opt.value = opt.textContent = l.name;
    $("eve-link").appendChild(opt);
  }
  for (const n of topo.nodes) {
    const cls = n.kme ? "kme" : n.kind;
    const r = n.kme ? 0.012 : (n.kind === "access" ? 0.005 : 0.01);
    const c = el("circle", { id: "node-" + n.name, cx: n.x, cy: n.y, r: r, class: cls });
    const title = el("title", {}); title.textContent = n.name + (n.saes.length ? " (" + n.saes.join(", ") + ")" : "");
    c.appendChild(title);
    $("nodes").appendChild(c);
    if (few || n.kme || n.kind === "core") {
      const t = el("text", { x: n.x + 0.015, y: n.y - 0.01 }); t.textContent = n.name;
      $("nodes").appendChild(t);
    }
  }
}

function list(ul, items) {
  ul.replaceChildren();
  if (!items.length) { const li = document.createElement("li"); li.className = "none"; li.textContent = "none"; ul.appendChild(li); }
  for (const text of items) { const li = document.createElement("li"); li.textContent = text; ul.appendChild(li); }
}

function apply(snap) {
  $("uptime").textContent = "live · up " + snap.uptime_s.toFixed(0) + " s";
  for (const [name, l] of Object.entries(snap.links)) {
    const line = $("link-" + name);
    if (!line) continue;
    line.setAttribute("class", l.colour);
    line.setAttribute("data-colour", l.colour);
    const row = $("row-" + name);
    row.className = l.colour;
    row.querySelector(".rate").textContent = si(l.rate_bps);
    row.querySelector(".target").textContent = si(l.target_rate_bps);
    row.querySelector(".qber").textContent = l.qber === null ? "–" : (100 * l.qber).toFixed(1) + " %";
    row.querySelector(".pool").textContent = si(l.pool_bits);
    row.querySelector(".state").textContent = l.alarm ? "ALARM" : (l.eve ? "eve on" : (l.colour === "grey" ? "idle" : "up"));
  }
  list($("alarms"), snap.alarms);
  list($("calls"), snap.calls.map((c) => `${c.master} → ${c.slave}: ${c.route.join(" → ")}`));
  $("routes").replaceChildren();
  for (const c of snap.calls) {
    const pts = c.route.filter((n) => nodes[n]).map((n) => nodes[n].x + "," + nodes[n].y).join(" ");
    $("routes").appendChild(el("polyline", { class: "route", points: pts, "data-call": c.master + "-" + c.slave }));
  }
}

async function eve(fraction) {
  const link = $("eve-link").value;
  const resp = await fetch("/api/eve", { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ link: link, fraction: fraction }) });
  $("eve-result").textContent = resp.ok ? `eavesdropper ${fraction ? "switched on" : "switched off"} for ${link}` : await resp.text();
}

async function main() {
  drawTopology(await (await fetch("/api/topology")).json());
  $("eve-on").onclick = () => eve(1.0);
  $("eve-off").onclick = () => eve(0.0);
  const source = new EventSource("/events");
  source.onmessage = (msg) => apply(JSON.parse(msg.data));
  source.onerror = () => { $("uptime").textContent = "reconnecting…"; };
}
main();
