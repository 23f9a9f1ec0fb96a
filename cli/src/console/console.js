// The console's script: the live status table, and retry/skip with the token.
(function () {
  "use strict";
  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    for (var k in attrs || {}) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function secs(s) {
    if (s < 1) return Math.round(s * 1000) + "ms";
    if (s < 60) return s.toFixed(1) + "s";
    s = Math.floor(s);
    if (s < 3600) return Math.floor(s / 60) + "m" + String(s % 60).padStart(2, "0") + "s";
    if (s < 86400) return Math.floor(s / 3600) + "h" + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + "m";
    return Math.floor(s / 86400) + "d" + String(Math.floor((s % 86400) / 3600)).padStart(2, "0") + "h";
  }
  var STATES = { held: "held", live: "live", catching_up: "catching up", stopped: "stopped", at_head: "at head", behind: "behind" };

  function renderStatus(r) {
    var body = document.getElementById("subscribers");
    body.textContent = "";
    r.subscribers.forEach(function (s) {
      var tr = el("tr", { "data-subscriber": s.name });
      tr.appendChild(el("td", { class: "mono" }, s.name));
      var state = STATES[s.state] || s.state;
      var td = el("td");
      td.appendChild(el("span", { class: "state " + state.replace(" ", "-") }, s.held > 0 ? "held (" + s.held + ")" : state));
      tr.appendChild(td);
      tr.appendChild(el("td", { class: "num" }, String(s.position)));
      var lag = String(s.lag_events) + (s.lag_capped ? "+" : "");
      if (s.name.indexOf("#") >= 0 && s.lag_events > 0) lag = "≤ " + lag;
      tr.appendChild(el("td", { class: "num lag" }, lag));
      tr.appendChild(el("td", { class: "num" }, s.lag_events === 0 ? "-" : secs(s.lag_seconds)));
      var lease = "-";
      if (s.lease) lease = s.lease_active ? s.lease.owner + " until " + s.lease.expires_at.substring(11, 19) : "expired or released (" + s.lease.owner + ")";
      tr.appendChild(el("td", {}, lease));
      body.appendChild(tr);
    });
    if (!r.subscribers.length) {
      var tr = el("tr");
      tr.appendChild(el("td", { colspan: "6", class: "muted" }, "no subscriber has saved a checkpoint in this store"));
      body.appendChild(tr);
    }
    renderGroups(r.groups || []);
    document.getElementById("head").textContent = String(r.head);
    document.getElementById("taken").textContent = r.taken_at.replace("T", " ").substring(0, 19) + " UTC";
    document.getElementById("summary").textContent = r.summary;
    var banner = document.getElementById("banner");
    if (r.needs_attention) {
      banner.className = "banner attention";
      banner.textContent = "NOT SETTLED: something waits for an operator (see Dead letters)";
    } else if (r.settled) {
      banner.className = "banner ok";
      banner.textContent = "Settled: every subscriber is at the head, nothing is parked";
    } else {
      banner.className = "banner behind";
      banner.textContent = "Nothing is parked; some subscribers are behind the head";
    }
  }

  // `0-3,7`: sorted partition indexes as ranges.
  function ranges(xs) {
    var out = [], i = 0;
    while (i < xs.length) {
      var j = i;
      while (j + 1 < xs.length && xs[j + 1] === xs[j] + 1) j++;
      out.push(i === j ? String(xs[i]) : xs[i] + "-" + xs[j]);
      i = j + 1;
    }
    return out.length ? out.join(",") : "-";
  }

  // Each consumer group's members and the partitions each holds.
  function renderGroups(groups) {
    var body = document.getElementById("group-rows");
    if (!body) return;
    body.textContent = "";
    document.getElementById("groups").hidden = groups.length === 0;
    groups.forEach(function (g) {
      g.members.forEach(function (m) {
        var tr = el("tr", { "data-group": g.group, "data-member": m.instance });
        tr.appendChild(el("td", { class: "mono" }, g.group));
        tr.appendChild(el("td", {}, m.owner + " (" + m.instance.substring(0, 8) + ")"));
        tr.appendChild(el("td", { class: "mono" }, ranges(m.partitions) + " (" + m.partitions.length + ")"));
        tr.appendChild(el("td", {}, m.joined_at.substring(11, 19)));
        body.appendChild(tr);
      });
      if (g.unheld.length) {
        var tr = el("tr", { "data-group": g.group });
        tr.appendChild(el("td", { class: "mono" }, g.group));
        tr.appendChild(el("td", { class: "muted" }, "(no holder)"));
        tr.appendChild(el("td", { class: "mono" }, ranges(g.unheld) + " (" + g.unheld.length + ")"));
        tr.appendChild(el("td", {}, "-"));
        body.appendChild(tr);
      }
    });
  }

  function poll() {
    fetch("/api/status", { cache: "no-store" })
      .then(function (r) { if (!r.ok) throw new Error("HTTP " + r.status); return r.json(); })
      .then(function (r) { renderStatus(r); document.getElementById("poll-error").textContent = ""; })
      .catch(function (e) { document.getElementById("poll-error").textContent = "cannot refresh: " + e.message; })
      .finally(function () { setTimeout(poll, 1500); });
  }
  if (document.getElementById("subscribers")) poll();

  // The token: from ?token=..., else from this tab's storage.
  // Kept on any page (the printed link opens the status page), for the
  // dead-letters page's buttons.
  var fromUrl = new URLSearchParams(location.search).get("token");
  if (fromUrl) sessionStorage.setItem("aftermath-token", fromUrl);
  var tokenInput = document.getElementById("token");
  if (tokenInput) {
    tokenInput.value = sessionStorage.getItem("aftermath-token") || "";
    tokenInput.addEventListener("input", function () { sessionStorage.setItem("aftermath-token", tokenInput.value); });
  }
  document.querySelectorAll("button[data-action]").forEach(function (b) {
    b.addEventListener("click", function () {
      var action = b.getAttribute("data-action");
      var message = document.getElementById("message");
      var token = tokenInput ? tokenInput.value.trim() : "";
      if (action === "skip" && !confirm("Skip this effect for good? It will never run.")) return;
      b.disabled = true;
      fetch("/api/" + action, {
        method: "POST",
        headers: { "content-type": "application/json", authorization: "Bearer " + token },
        body: JSON.stringify({ reactor: b.getAttribute("data-reactor"), event_id: b.getAttribute("data-event") })
      }).then(function (r) {
        return r.json().catch(function () { return {}; }).then(function (j) {
          if (r.ok) {
            message.className = "ok";
            message.textContent = j.message || "done";
            setTimeout(function () { location.reload(); }, 600);
          } else {
            message.className = "error";
            message.textContent = (j.error || "HTTP " + r.status);
            b.disabled = false;
          }
        });
      }).catch(function (e) { message.className = "error"; message.textContent = e.message; b.disabled = false; });
    });
  });
})();
