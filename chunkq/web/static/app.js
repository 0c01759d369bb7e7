// Live updates without reload: the page names its JSON twin in <body data-live>; every few seconds the
// values are fetched and written into the elements that name them (data-field), table rows kept in step
// by key (data-rows, cloned from a <template>). Text goes in as textContent, never as HTML.
"use strict";
(function () {
  const body = document.body;
  const url = body.dataset.live;
  if (!url) return;
  const every = Number(body.dataset.every) || 2000;
  const status = document.querySelector("[data-live-status]");

  function fill(root, values) {
    for (const el of root.querySelectorAll("[data-field]")) {
      const value = values[el.dataset.field];
      if (value === undefined) continue;
      if (el.tagName === "PROGRESS") el.value = value;
      else if (el.textContent !== String(value)) el.textContent = value;
    }
    for (const el of root.querySelectorAll("[data-href]")) {
      const href = values[el.dataset.href];
      if (typeof href === "string" && href.startsWith("/")) el.setAttribute("href", href);
    }
    for (const el of root.querySelectorAll("[data-state-field]")) {
      const state = values[el.dataset.stateField];
      if (state !== undefined) el.dataset.state = state;
    }
  }

  function syncRows(name, rows) {
    const tbody = document.querySelector(`[data-rows="${name}"]`);
    const template = document.querySelector(`[data-row-template="${name}"]`);
    if (!tbody || !template) return;
    const existing = new Map();
    for (const tr of tbody.querySelectorAll(":scope > tr")) existing.set(tr.dataset.key, tr);
    let previous = null;
    for (const row of rows) {
      let tr = existing.get(row.key);
      if (tr) existing.delete(row.key);
      else {
        tr = template.content.firstElementChild.cloneNode(true);
        tr.dataset.key = row.key;
      }
      fill(tr, row);
      const want = previous ? previous.nextElementSibling : tbody.firstElementChild;
      if (want !== tr) tbody.insertBefore(tr, want);
      previous = tr;
    }
    for (const tr of existing.values()) tr.remove();
    const empty = document.querySelector(`[data-empty="${name}"]`);
    if (empty) empty.hidden = rows.length > 0;
  }

  function apply(data) {
    if (data.fields) fill(document, data.fields);
    for (const [name, rows] of Object.entries(data.rows || {})) syncRows(name, rows);
  }

  function say(text) {
    if (status) status.textContent = text;
  }

  async function tick() {
    if (!document.hidden) {
      try {
        const response = await fetch(url, {headers: {Accept: "application/json"}, credentials: "same-origin"});
        if (response.ok) {
          apply(await response.json());
          say("live");
        } else {
          say(response.status === 503 ? "database unreachable" : `update failed (${response.status})`);
        }
      } catch (error) {
        say("server unreachable");
      }
    }
    setTimeout(tick, every);
  }
  setTimeout(tick, every);
})();
