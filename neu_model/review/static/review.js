// The review page: one tile at a time, a key per decision, the next tile already loaded.
//
// The page holds a few tiles (the one shown and the next ones, leased to this reviewer by the
// server) with their images fetched and decoded ahead, so a key press shows the next tile at
// once and the decision is posted behind it. Requests go out one after another (an undo never
// overtakes the label it takes back). window.reviewTimings gets, per key press, the ms from the
// press to the next tile's image on screen (two animation frames after it is put in place).
"use strict";
(() => {
  const CLASSES = [["Cr", "crazing"], ["In", "inclusion"], ["Pa", "patches"], ["PS", "pitted surface"],
    ["RS", "rolled-in scale"], ["Sc", "scratches"]];
  const NAMES = Object.fromEntries([...CLASSES, ["unknown", "none of these"]]);
  const PAST = 50; // decided tiles kept for the left arrow
  const $ = (id) => document.getElementById(id);
  window.reviewTimings = [];
  let token = "";
  let reviewer = "";
  let queue = []; // tiles held; queue[0] is the one to decide
  let past = []; // {tile, label} decided on this page, newest last
  let view = 0; // 0: queue[0] is shown; k > 0: past[past.length - k]
  let shownAt = performance.now();
  let pressedAt = null; // the key press waiting for its tile to appear
  let overlay = false;
  let chain = Promise.resolve();
  let idle = null;

  async function api(path, body) {
    const init = { method: body === undefined ? "GET" : "POST", headers: { "X-Review-Token": token } };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    const data = (response.headers.get("content-type") || "").includes("json") ? await response.json() : null;
    if (!response.ok) throw Object.assign(new Error((data && data.error) || `${response.status}`),
      { status: response.status });
    return data;
  }

  function send(path, body) { // in order, one at a time
    const done = chain.then(() => api(path, body));
    chain = done.catch(() => {});
    return done;
  }

  async function image(url) {
    const response = await fetch(url, { headers: { "X-Review-Token": token } });
    if (!response.ok) {
      const data = await response.json().catch(() => null);
      throw new Error((data && data.error) || `${response.status}`);
    }
    const img = new Image();
    img.src = URL.createObjectURL(await response.blob());
    await img.decode(); // decoded now, so that showing it later costs nothing
    return img;
  }

  function prepare(tile) {
    if (!tile.ready) {
      tile.ready = Promise.all([image(`/api/tiles/${tile.id}/tile.png`), image(`/api/tiles/${tile.id}/context.png`)])
        .then(([own, around]) => { tile.own = own; tile.around = around; },
          (error) => { tile.refused = error.message; });
    }
    return tile.ready;
  }

  function forget(tile) {
    for (const img of [tile.own, tile.around]) if (img) URL.revokeObjectURL(img.src);
  }

  const say = (text) => { $("message").textContent = text; };
  const fail = (error) => say(`not recorded: ${error.message}`);
  const current = () => (view === 0 ? queue[0] : past[past.length - view].tile);

  function counts(c) {
    $("counter").textContent = `reviewed ${c.reviewed} / left ${c.left}`;
    $("conflicts").textContent = `conflicts ${c.conflicts}`;
    $("audit").textContent = `audit ${c.audited} checked, ${c.escapes} wrong` +
      (c.changed ? ` · ${c.changed} refused (file changed)` : "");
  }

  function facts(tile) {
    const pct = (p) => `${(100 * p).toFixed(1)} %`;
    const [first, second] = tile.top;
    $("top1").textContent = `${first[0]} ${NAMES[first[0]]} ${pct(first[1])}`;
    $("top2").textContent = second ? `${second[0]} ${NAMES[second[0]]} ${pct(second[1])}` : "";
    $("unknown").textContent = tile.unknown_score === null ? "-" :
      `${tile.unknown_score.toFixed(3)}${tile.unknown ? " (unlike the training images)" : ""}`;
    $("model").textContent = tile.model_version;
    $("file").textContent = tile.file;
    $("xy").textContent = `${tile.x}, ${tile.y}`;
    $("boxes").textContent = tile.boxes === null ? "none in the CSV" : `${tile.boxes.length} (o shows them)`;
    const badge = tile.queue === "audit" ? ["audit", "audit: a confident tile drawn at random"] :
      tile.unknown ? ["unknown", "flagged: unknown input"] : ["", "flagged: low confidence"];
    $("badge").innerHTML = "";
    $("badge").append(Object.assign(document.createElement("span"), { className: badge[0], textContent: badge[1] }));
    $("conflict").textContent = tile.conflict ? "conflict: " + Object.entries(tile.conflict)
      .map(([who, label]) => `${who} ${label}`).join(", ") + "; your label decides" : "";
    $("where").textContent = view === 0 ? "" :
      `decided here: ${past[past.length - view].label} (a key labels it again; → goes forward)`;
  }

  function boxes(tile) {
    const svg = $("overlay");
    svg.replaceChildren();
    const on = overlay && !!tile && !!tile.boxes;
    svg.classList.toggle("on", on); // a class, not the hidden attribute: that one is HTML's, not SVG's
    if (!on) return;
    for (const [x0, y0, x1, y1] of tile.boxes) {
      const rect = document.createElementNS("http://www.w3.org/2000/svg", "rect");
      Object.entries({ x: x0, y: y0, width: x1 - x0, height: y1 - y0 }).forEach(([k, v]) => rect.setAttribute(k, v));
      svg.append(rect);
    }
  }

  async function show() {
    const tile = current();
    $("main").hidden = !tile;
    $("done").hidden = !!tile;
    if (!tile) {
      pressedAt = null;
      idle = idle || setTimeout(() => { idle = null; refill(); }, 10000); // leases of others run out
      return;
    }
    await prepare(tile);
    if (tile !== current()) return; // moved on while it loaded
    if (tile.refused) { // its file changed since it was predicted: say so, never label it
      say(`skipped: ${tile.refused}`);
      if (view === 0) {
        queue.shift();
      } else {
        past.splice(past.length - view, 1);
        view--;
      }
      refill();
      return show();
    }
    $("tileslot").replaceChildren(tile.own);
    $("contextslot").replaceChildren(tile.around);
    facts(tile);
    boxes(tile);
    shownAt = performance.now();
    if (pressedAt !== null) {
      const start = pressedAt;
      pressedAt = null;
      requestAnimationFrame(() => requestAnimationFrame(() => window.reviewTimings.push(performance.now() - start)));
    }
    queue.slice(1).forEach(prepare);
  }

  async function refill() {
    const holding = queue.map((t) => t.id);
    try {
      const answer = await send("/api/claim", { reviewer, holding });
      const sent = new Set(holding);
      const first = queue[0];
      queue = queue.filter((t) => !sent.has(t.id) || answer.keep.includes(t.id));
      for (const tile of answer.add) if (!queue.some((t) => t.id === tile.id)) queue.push(tile);
      queue.slice(0, 4).forEach(prepare);
      counts(answer.counts);
      if (view === 0 && queue[0] !== first) show();
    } catch (error) { fail(error); }
  }

  function decide(kind, label, pressed) {
    if (view > 0) { // a tile decided earlier: label it again, stay there
      const entry = past[past.length - view];
      if (kind !== "label") return;
      send("/api/decide", { reviewer, id: entry.tile.id, kind, label, seconds: null })
        .then((r) => { entry.label = label; counts(r.counts); facts(entry.tile); say(`${entry.tile.file}: now ${label}`); }, fail);
      return;
    }
    const tile = queue[0];
    if (!tile || !tile.own) return;
    const seconds = (performance.now() - shownAt) / 1000;
    queue.shift();
    past.push({ tile, label: kind === "skip" ? "skipped" : label });
    while (past.length > PAST) forget(past.shift().tile);
    pressedAt = pressed;
    show();
    send("/api/decide", { reviewer, id: tile.id, kind, label: kind === "label" ? label : null, seconds })
      .then((r) => { counts(r.counts); refill(); }, (error) => { // put it back: nothing was recorded
        fail(error);
        past = past.filter((p) => p.tile !== tile);
        if (!/changed|cannot be read/.test(error.message)) queue.unshift(tile);
        view = 0;
        show();
      });
  }

  function undo(pressed) {
    send("/api/undo", { reviewer }).then((r) => {
      counts(r.counts);
      if (!r.tile || r.tile.id === undefined) return say(`undone: ${r.undone.label || "skip"}`);
      const earlier = past.find((p) => p.tile.id === r.tile.id);
      const tile = earlier ? Object.assign(earlier.tile, r.tile) : r.tile;
      past = past.filter((p) => p.tile.id !== tile.id);
      queue = [tile, ...queue.filter((t) => t.id !== tile.id)];
      view = 0;
      pressedAt = pressed;
      say(`undone: ${r.undone.label || "skip"} of ${tile.file} (${tile.x}, ${tile.y})`);
      show();
    }, fail);
  }

  document.addEventListener("keydown", (event) => {
    if (!$("login").hidden || event.ctrlKey || event.metaKey || event.altKey) return;
    const key = event.key;
    const pressed = event.timeStamp;
    if (event.repeat && key !== "ArrowLeft" && key !== "ArrowRight") return; // a held key decides once
    if (key >= "1" && key <= "6") decide("label", CLASSES[Number(key) - 1][0], pressed);
    else if (key === "u") decide("label", "unknown", pressed);
    else if (key === "s") decide("skip", null, pressed);
    else if (key === "z") undo(pressed);
    else if (key === "o") { overlay = !overlay; boxes(current()); }
    else if (key === "ArrowLeft" && view < past.length) { view++; pressedAt = pressed; show(); }
    else if (key === "ArrowRight" && view > 0) { view--; pressedAt = pressed; show(); }
    else return;
    event.preventDefault();
  });

  async function start() {
    $("who").textContent = `reviewer: ${reviewer}`;
    try {
      counts((await api(`/api/state?reviewer=${encodeURIComponent(reviewer)}`)).counts);
    } catch (error) {
      return login(error.status === 403 ? "the token was refused; enter it again" : error.message);
    }
    $("login").hidden = true;
    await refill();
    show();
  }

  function login(why) {
    if (why) say(why);
    $("login").hidden = false;
    $("tokenrow").hidden = !!document.querySelector('meta[name="review-token"]').content;
    $("name").value = reviewer;
    ($("tokenrow").hidden ? $("name") : $("token")).focus();
  }

  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    reviewer = $("name").value.trim();
    if (!$("tokenrow").hidden && $("token").value) token = $("token").value;
    if (!reviewer || !token) return login("a reviewer name (and the token) are needed");
    localStorage.setItem("neu-review.reviewer", reviewer);
    sessionStorage.setItem("neu-review.token", token);
    start();
  });

  const params = new URLSearchParams(location.search);
  token = document.querySelector('meta[name="review-token"]').content || params.get("token") ||
    sessionStorage.getItem("neu-review.token") || "";
  if (params.has("token")) { // keep it out of the address bar, the history and screenshots
    sessionStorage.setItem("neu-review.token", token);
    history.replaceState(null, "", location.pathname);
  }
  reviewer = localStorage.getItem("neu-review.reviewer") || "";
  if (reviewer && token) start(); else login("");
})();
