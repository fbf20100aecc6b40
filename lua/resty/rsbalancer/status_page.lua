-- resty.rsbalancer.status_page: the admin API's live status page, one self-contained
-- HTML document (inline CSS and JavaScript, no external assets; the admin API sends it
-- with a Content-Security-Policy that forbids any).
--
-- The page holds no state itself: every second it fetches the admin API's JSON state
-- (GET <prefix> with Accept: application/json) and renders every pool (with its
-- admission queue) and node (with its tries per second and success share over the
-- last minute, `recent`, and its learned limit as the whole tries it lets in). When
-- the admin API wants a bearer token, the page takes it from the URL fragment
-- (`.../status#token=SECRET`: a fragment is never sent to the server, so it stays out
-- of access logs), or asks for it, and keeps it in sessionStorage for the tab.
--
-- render(prefix) -> the HTML text; `prefix` must be a plain path (the admin module
-- checks it: [A-Za-z0-9/._~-]), it is embedded in the script as a string.

local _M = {}

local HTML = [==[<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>rsbalancer status</title>
<style>
  :root { --fg: #1d232a; --muted: #66707a; --line: #d9dee3; --bg: #f6f8fa; --card: #fff;
          --ok: #1a7f37; --warn: #9a6700; --bad: #cf222e; --info: #0969da; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif;
         color: var(--fg); background: var(--bg); }
  header { display: flex; align-items: baseline; gap: 16px; padding: 14px 24px;
           background: #24292f; color: #fff; }
  header h1 { margin: 0; font-size: 18px; font-weight: 600; }
  header .meta { color: #c9d1d9; font-size: 13px; }
  main { padding: 16px 24px; }
  .pool { background: var(--card); border: 1px solid var(--line); border-radius: 6px;
          margin-bottom: 18px; overflow-x: auto; }
  .pool h2 { margin: 0; padding: 10px 14px; font-size: 16px; border-bottom: 1px solid var(--line);
             display: flex; flex-wrap: wrap; gap: 6px 18px; align-items: baseline; }
  .pool h2 .facts { font-size: 13px; font-weight: normal; color: var(--muted); }
  table { border-collapse: collapse; width: 100%; }
  th, td { padding: 6px 8px; text-align: right; border-bottom: 1px solid var(--line);
           white-space: nowrap; font-variant-numeric: tabular-nums; }
  th { font-size: 12px; font-weight: 600; color: var(--muted); background: var(--bg); }
  th:nth-child(-n+3), td:nth-child(-n+3) { text-align: left; }
  tr:last-child td { border-bottom: 0; }
  .state { display: inline-block; min-width: 78px; padding: 1px 8px; border-radius: 10px;
           font-size: 12px; font-weight: 600; text-align: center; color: #fff; }
  .s-healthy { background: var(--ok); } .s-slow_start { background: var(--info); }
  .s-draining { background: var(--warn); } .s-cooling { background: var(--warn); }
  .s-ejected, .s-down { background: var(--bad); }
  .track { display: inline-block; width: 60px; height: 8px; margin-left: 8px;
           background: var(--bg); border: 1px solid var(--line); border-radius: 2px;
           vertical-align: middle; overflow: hidden; }
  .fill { display: block; height: 100%; background: var(--info); opacity: .6; }
  .full { color: var(--bad); font-weight: 600; }
  .backup { color: var(--muted); font-size: 12px; }
  .on { color: var(--bad); font-weight: 600; }
  .admission { padding: 6px 14px; font-size: 13px; color: var(--muted);
               border-bottom: 1px solid var(--line); }
  #error { display: none; margin: 0 0 14px; padding: 10px 14px; border-radius: 6px;
           background: #ffebe9; border: 1px solid #ff8182; color: var(--bad); }
  #login { display: none; margin: 0 0 14px; padding: 14px; background: var(--card);
           border: 1px solid var(--line); border-radius: 6px; }
  #login input { font: inherit; padding: 4px 8px; width: 320px; }
</style>
</head>
<body>
<header>
  <h1>rsbalancer</h1>
  <span class="meta" id="meta">loading&hellip;</span>
</header>
<main>
  <div id="error"></div>
  <form id="login">
    <label>This admin API wants a bearer token:
      <input id="token" type="password" autocomplete="off" placeholder="token"></label>
    <button type="submit">Show status</button>
  </form>
  <div id="pools"></div>
</main>
<script>
"use strict";
(function () {
  var PREFIX = "@PREFIX@";
  var KEY = "rsbalancer-admin-token";
  var m = /(?:^#|&)token=([^&]*)/.exec(location.hash);
  if (m) {
    sessionStorage.setItem(KEY, decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function num(v, digits) {
    return Number(v).toLocaleString("en-US", { maximumFractionDigits: digits });
  }
  function ms(v) {
    return v > 0 ? (v >= 10000 ? num(v / 1000, 0) + " s" : num(v / 1000, 1) + " s") : "\u2014";
  }
  var COLUMNS = [
    ["id", "node"], ["addr", "address"], ["state", "state"], ["weight", "weight"],
    ["effective", "effective weight"], ["ewma", "EWMA"], ["inflight", "in flight / limit"],
    ["rate", "tries/s (1 min)"], ["success", "success (1 min)"],
    ["cooldown", "cooldown left"], ["limits", "provider headroom / budget"],
    ["requests", "requests"], ["failures", "failures"], ["busy", "429s"],
    ["ttft", "TTFT / queue"], ["tpot", "ms/token"], ["tokens", "tokens out"], ["cut", "cut streams"]
  ];
  // What a node's provider said is left (less picks since), and its tpm/rpm window.
  function limits(n) {
    var parts = [];
    if (n.remaining_requests !== undefined && n.remaining_requests !== null)
      parts.push(num(n.remaining_requests, 0) + " req left");
    if (n.remaining_tokens !== undefined && n.remaining_tokens !== null)
      parts.push(num(n.remaining_tokens, 0) + " tok left");
    if (n.tpm > 0) parts.push(num(n.budget_tokens_used, 0) + " / " + num(n.tpm, 0) + " tpm");
    if (n.rpm > 0) parts.push(num(n.budget_requests_used, 0) + " / " + num(n.rpm, 0) + " rpm");
    return parts.length ? parts.join(" \u00b7 ") : "\u2014";
  }
  // The admission queue of a pool: waiting now (by priority, highest first), admitted
  // now, and since start: admitted from the queue, timed out, evicted, gone; in
  // cluster mode, the fleet's queue as the last sync saw it.
  function queueFacts(a) {
    if (!a) return null;
    if (!a.enabled) return "admission queue off";
    var by = [];
    for (var i = a.waiting_by_priority.length; i >= 1; i--) {
      var w = a.waiting_by_priority[i - 1];
      if (w > 0) by.push("p" + i + " " + num(w, 0));
    }
    return "queue " + num(a.queue_len, 0) + " waiting" + (by.length ? " (" + by.join(", ") + ")" : "") +
      " \u00b7 " + num(a.admitted, 0) + " admitted now \u00b7 " + num(a.queue_admitted, 0) +
      " admitted from the queue \u00b7 " + num(a.queue_timeouts, 0) + " timeouts \u00b7 " +
      num(a.queue_evicted, 0) + " evicted \u00b7 " + num(a.queue_aborted, 0) + " left" +
      (a.fleet && a.fleet.valid ? " \u00b7 fleet: " + num(a.fleet.waiting, 0) + " waiting, " +
        num(a.fleet.elsewhere, 0) + " at other gateways" : "");
  }
  // A scraped node's queue (src/scrape.rs): waiting / running, KV-cache usage, what
  // the cost adds now; flagged when stale (ignored) or when scrapes fail.
  function nodeQueue(q) {
    if (!q) return "\u2014";
    var parts = [];
    if (q.waiting !== undefined || q.running !== undefined)
      parts.push((q.waiting !== undefined ? num(q.waiting, 0) : "?") + " / " +
        (q.running !== undefined ? num(q.running, 0) : "?"));
    if (q.kv_cache_usage !== undefined) parts.push("KV " + num(q.kv_cache_usage * 100, 0) + "%");
    if (!q.stale) parts.push("+" + num(q.backlog, 0) + " in cost");
    if (q.stale) parts.push("stale");
    if (q.failing) parts.push("scrape failing");
    return parts.join(" \u00b7 ") || "\u2014";
  }
  function cell(tr, name, content) {
    var td = el("td", "c-" + name);
    if (typeof content === "string") td.textContent = content; else td.appendChild(content);
    tr.appendChild(td);
    return td;
  }
  // A discovery pool's source: up or failing, nodes, last answer, last error.
  function discoveryFacts(d) {
    var parts = ["discovery " + d.source + ": " + (d.up ? "up" : "FAILING"),
      num(d.nodes, 0) + " nodes", num(d.answers, 0) + " answers", num(d.errors, 0) + " errors"];
    if (d.last_success_age_s !== null && d.last_success_age_s !== undefined) {
      parts.push("last answer " + num(d.last_success_age_s, 0) + " s ago");
    } else {
      parts.push("no answer yet");
    }
    if (!d.up && d.last_error) parts.push("last error: " + d.last_error);
    return parts.join(" \u00b7 ");
  }
  function renderPool(name, p) {
    var box = el("section", "pool");
    box.setAttribute("data-pool", name);
    var h = el("h2", null, name);
    var facts = [p.algorithm, num(p.requests, 0) + " requests", num(p.retries, 0) + " retries"];
    if (p.canary_share !== undefined) facts.push("canary " + num(p.canary_share * 100, 2) + "%");
    if (p.mean_completion_tokens > 0) facts.push("mean answer " + num(p.mean_completion_tokens, 0) + " tokens");
    if (p.prefix) {
      facts.push("prefix: " + num(p.prefix.hits, 0) + " home, " + num(p.prefix.spills, 0) +
        " spilled, " + num(p.prefix.nokey, 0) + " no key (c " + p.prefix.load_factor + ")");
    }
    h.appendChild(el("span", "facts", facts.join(" \u00b7 ")));
    if (p.emergency) {
      var em = el("span", "facts emergency", "emergency " + p.emergency.mode +
        (p.emergency.active ? " (ACTIVE)" : " (inactive)"));
      if (p.emergency.active) em.className += " on";
      h.appendChild(em);
    }
    box.appendChild(h);
    var q = queueFacts(p.admission);
    if (q) box.appendChild(el("div", "admission", q));
    if (p.discovery) box.appendChild(el("div", "discovery", discoveryFacts(p.discovery)));
    var table = el("table");
    var head = el("tr");
    // A pool that scrapes its nodes' /metrics gets a queue column.
    var scraped = p.nodes.some(function (n) { return n.queue; });
    var columns = scraped ? COLUMNS.concat([["queue", "node queue: waiting / running"]]) : COLUMNS;
    columns.forEach(function (c) { head.appendChild(el("th", null, c[1])); });
    table.appendChild(el("thead")).appendChild(head);
    var body = el("tbody");
    var maxEff = 0;
    p.nodes.forEach(function (n) { maxEff = Math.max(maxEff, n.effective_weight || 0); });
    p.nodes.forEach(function (n) {
      var tr = el("tr", "node");
      tr.setAttribute("data-id", n.id);
      var idCell = cell(tr, "id", n.id);
      if (n.backup) idCell.appendChild(el("span", "backup", " backup"));
      cell(tr, "addr", n.addr);
      cell(tr, "state", el("span", "state s-" + n.state, n.state));
      cell(tr, "weight", num(n.weight, 0));
      var eff = cell(tr, "effective", num(n.effective_weight, 2));
      var track = el("span", "track"), fill = el("span", "fill");
      fill.style.width = (maxEff > 0 ? (100 * n.effective_weight / maxEff).toFixed(1) : 0) + "%";
      track.appendChild(fill);
      eff.appendChild(track);
      cell(tr, "ewma", n.ewma_us > 0 ? num(n.ewma_us / 1000, 1) + " ms" : "\u2014");
      // A learned limit of 8.7 lets 8 tries in at once: show the whole part.
      var slots = Math.floor(n.limit);
      var inf = cell(tr, "inflight", num(n.inflight, 0) + " / " + (slots > 0 ? num(slots, 0) : "\u2014"));
      if (slots > 0 && n.inflight >= slots) inf.className += " full";
      var r = n.recent || {};
      cell(tr, "rate", r.tries > 0 ? num(r.rate, 1) : "\u2014");
      var ok = cell(tr, "success", r.success === null || r.success === undefined ? "\u2014" :
        num(r.success * 100, 1) + "%");
      if (r.success !== null && r.success < 0.95) ok.className += " full";
      cell(tr, "cooldown", ms(n.unavailable_ms));
      cell(tr, "limits", limits(n));
      cell(tr, "requests", num(n.requests, 0));
      cell(tr, "failures", num(n.failures, 0));
      cell(tr, "busy", num(n.busy, 0));
      // Stream signals (src/stream.rs): a dash where the node sent none.
      var sg = n.stream || {};
      var dash = function (v, unit) { return v === null || v === undefined ? "\u2014" : num(v, 1) + unit; };
      cell(tr, "ttft", dash(sg.ttft_ms, " ms") + (sg.queue_ms > 0 ? " / " + num(sg.queue_ms, 0) + " ms" : ""));
      cell(tr, "tpot", dash(sg.time_per_token_ms, ""));
      cell(tr, "tokens", sg.completion_tokens > 0 ? num(sg.completion_tokens, 0) : "\u2014");
      cell(tr, "cut", num(sg.stream_failures || 0, 0));
      if (scraped) {
        var qc = cell(tr, "queue", nodeQueue(n.queue));
        if (n.queue && (n.queue.stale || n.queue.failing)) qc.className += " full";
      }
      body.appendChild(tr);
    });
    table.appendChild(body);
    box.appendChild(table);
    return box;
  }
  function render(state) {
    var pools = document.getElementById("pools");
    var next = document.createDocumentFragment();
    Object.keys(state.pools).sort().forEach(function (name) {
      next.appendChild(renderPool(name, state.pools[name]));
    });
    pools.replaceChildren(next);
    document.getElementById("meta").textContent = "updated " +
      new Date().toLocaleTimeString("en-GB") + " \u00b7 generation " + state.generation;
  }
  function fail(text) {
    var e = document.getElementById("error");
    e.textContent = text;
    e.style.display = text ? "block" : "none";
  }
  var timer;
  function tick() {
    clearTimeout(timer);
    var headers = { "Accept": "application/json" };
    var token = sessionStorage.getItem(KEY);
    if (token) headers["Authorization"] = "Bearer " + token;
    fetch(PREFIX, { headers: headers, cache: "no-store", credentials: "same-origin" })
      .then(function (r) {
        if (r.status === 401) {
          document.getElementById("login").style.display = "block";
          throw new Error(token ? "the token was refused" : "a token is needed");
        }
        return r.json().then(function (j) {
          if (!r.ok) throw new Error(j.error || ("HTTP " + r.status));
          return j;
        });
      })
      .then(function (state) {
        document.getElementById("login").style.display = "none";
        fail("");
        render(state);
      })
      .catch(function (e) { fail("Cannot read the admin API: " + e.message); })
      .then(function () { timer = setTimeout(tick, 1000); });
  }
  document.getElementById("login").addEventListener("submit", function (ev) {
    ev.preventDefault();
    sessionStorage.setItem(KEY, document.getElementById("token").value);
    tick();
  });
  tick();
})();
</script>
</body>
</html>
]==]

function _M.render(prefix)
    return (HTML:gsub("@PREFIX@", prefix))
end

return _M
