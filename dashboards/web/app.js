// The built-in xlstm-forecast dashboard: plain JavaScript over the JSON API,
// charts drawn with the vendored uPlot. No build step, nothing fetched from
// anywhere but this server.
"use strict";

(function () {
  const KEY_STORAGE = "xlstm-forecast.apiKey";
  const POLL_ACTIVE_MS = 2000;
  const POLL_IDLE_MS = 15000;
  const FORECASTS_SCORED = 20;
  const RUNS_SHOWN = 25;
  const COLORS = {
    actual: "#2f6fdf",
    forecast: "#e0672a",
    band: "rgba(224, 103, 42, 0.22)",
    bandEdge: "rgba(224, 103, 42, 0.55)",
    now: "#c8323c",
    train: "#2f6fdf",
    val: "#e0672a",
    coverage: "#2e8b57",
  };

  // What the page shows now; also read by the browser test.
  const state = {
    series: [],
    selected: null,
    channel: null,
    rangeDays: 7,
    runs: [],
    selectedRun: null,
    charts: { forecast: null, error: null, loss: null },
    pollTimer: null,
    loaded: false,
  };
  window.xlstmDashboard = state;

  const $ = (selector, root) => (root || document).querySelector(selector);

  // --- the API ---

  class ApiFailure extends Error {
    constructor(status, message, path) {
      super(message);
      this.status = status;
      this.path = path;
    }
    // The route is not served by this build (an older server): show the
    // section as unavailable rather than failing the page.
    get missingRoute() {
      return this.status === 404 || this.status === 405;
    }
  }

  function apiKey() {
    try {
      return localStorage.getItem(KEY_STORAGE) || "";
    } catch (_) {
      return "";
    }
  }

  async function api(path, options) {
    const init = Object.assign({ method: "GET", headers: {} }, options || {});
    init.headers = Object.assign({ Accept: "application/json" }, init.headers);
    const key = apiKey();
    if (key) init.headers.Authorization = "Bearer " + key;
    if (init.json !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(init.json);
      delete init.json;
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (err) {
      throw new ApiFailure(0, "the server did not answer (" + err.message + ")", path);
    }
    const text = await response.text();
    let body = null;
    if (text) {
      try {
        body = JSON.parse(text);
      } catch (_) {
        body = null;
      }
    }
    if (!response.ok) {
      const message = body && body.error && body.error.message ? body.error.message : response.statusText;
      throw new ApiFailure(response.status, message, path);
    }
    return body;
  }

  // Resolves to null when the route answers 404 (not found / not served).
  async function apiOptional(path) {
    try {
      return await api(path);
    } catch (err) {
      if (err instanceof ApiFailure && err.missingRoute) return null;
      throw err;
    }
  }

  const seriesPath = (name) => "/api/v1/series/" + encodeURIComponent(name);

  // --- formatting ---

  function pad(n) {
    return String(n).padStart(2, "0");
  }

  function formatTime(value) {
    if (!value) return "–";
    const at = new Date(value);
    if (isNaN(at)) return "–";
    return at.getUTCFullYear() + "-" + pad(at.getUTCMonth() + 1) + "-" + pad(at.getUTCDate()) + " " +
      pad(at.getUTCHours()) + ":" + pad(at.getUTCMinutes()) + " UTC";
  }

  function formatRelative(value) {
    if (!value) return "";
    const seconds = (new Date(value) - Date.now()) / 1000;
    const magnitude = Math.abs(seconds);
    const text = magnitude < 90 ? Math.round(magnitude) + " s"
      : magnitude < 5400 ? Math.round(magnitude / 60) + " min"
      : magnitude < 172800 ? Math.round(magnitude / 3600) + " h"
      : Math.round(magnitude / 86400) + " d";
    return seconds >= 0 ? "in " + text : text + " ago";
  }

  function formatNumber(value, digits) {
    if (value === null || value === undefined || value === "") return "–";
    const number = Number(value);
    if (!isFinite(number)) return "–";
    if (number !== 0 && (Math.abs(number) < 1e-3 || Math.abs(number) >= 1e6)) return number.toExponential(2);
    return number.toFixed(digits === undefined ? 4 : digits);
  }

  function formatSeconds(value) {
    if (value === null || value === undefined) return "–";
    const seconds = Number(value);
    if (!isFinite(seconds)) return "–";
    if (seconds < 120) return Math.round(seconds) + " s";
    if (seconds < 7200) return Math.round(seconds / 60) + " min";
    return (seconds / 3600).toFixed(1) + " h";
  }

  function element(tag, attributes, children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "text") node.textContent = value;
      else if (name === "onclick") node.addEventListener("click", value);
      else node.setAttribute(name, value === true ? "" : value);
    }
    for (const child of children || []) {
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  const cell = (content, className) =>
    element("td", { class: className }, [content === undefined || content === null ? "–" : content]);

  function setNote(section, message) {
    const note = $("[data-note]", section);
    if (note) note.textContent = message || "";
  }

  let toastTimer = null;
  function toast(message, bad) {
    const box = $("#toast");
    box.textContent = message;
    box.className = "shown" + (bad ? " bad" : "");
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => (box.className = ""), 6000);
  }

  function describeFailure(err) {
    if (!(err instanceof ApiFailure)) return String(err && err.message ? err.message : err);
    if (err.status === 401) return "the server needs an API key for this: enter it at the top (" + err.message + ")";
    if (err.missingRoute) return "not available from this server (" + err.path + ")";
    return err.message + (err.status ? " (HTTP " + err.status + ")" : "");
  }

  // --- series list ---

  async function loadSeriesList() {
    const section = $("#series-section");
    const body = $("#series-table tbody");
    let list;
    try {
      list = (await api("/api/v1/series")).series || [];
    } catch (err) {
      setNote(section, "Cannot list the series: " + describeFailure(err));
      return;
    }
    setNote(section, list.length ? "" : "No series yet: import one with `xlstm-forecast import` or POST /api/v1/series.");
    // The list carries names and channels; the details come per series.
    const details = await Promise.all(list.map(loadSeriesSummary));
    state.series = details;
    body.replaceChildren(...details.map(seriesRow));
    markSelectedSeries();
  }

  async function loadSeriesSummary(series) {
    const [detail, models, schedule] = await Promise.all([
      apiOptional(seriesPath(series.name)).catch(() => null),
      apiOptional(seriesPath(series.name) + "/models").catch(() => null),
      apiOptional(seriesPath(series.name) + "/schedule").catch(() => null),
    ]);
    const champion = models && models.models ? models.models.find((model) => model.is_champion) : null;
    return {
      name: series.name,
      channels: series.channels || [],
      frequency: series.frequency,
      lastObservation: detail && detail.observations ? detail.observations.last : null,
      champion: champion || null,
      modelsKnown: Boolean(models),
      schedule: schedule,
    };
  }

  function seriesRow(summary) {
    const metrics = summary.champion ? summary.champion.metrics || {} : {};
    const schedule = summary.schedule;
    let next = "–";
    if (schedule && schedule.enabled === false) next = "schedule disabled";
    else if (schedule && schedule.next_fire_at) {
      next = formatTime(schedule.next_fire_at) + " (" + formatRelative(schedule.next_fire_at) + ", " + (schedule.mode || "") + ")";
    }
    const row = element("tr", { class: "clickable", "data-series": summary.name }, [
      cell(element("strong", { text: summary.name })),
      cell(summary.channels.join(", ")),
      cell(summary.frequency || "irregular"),
      cell(formatTime(summary.lastObservation) + (summary.lastObservation ? " (" + formatRelative(summary.lastObservation) + ")" : "")),
      cell(summary.champion ? "v" + summary.champion.id : summary.modelsKnown ? "none yet" : "–"),
      cell(formatNumber(metrics.val_mae), "num"),
      cell(formatNumber(metrics.val_mse), "num"),
      cell(next),
    ]);
    row.addEventListener("click", () => selectSeries(summary.name));
    return row;
  }

  function markSelectedSeries() {
    for (const row of document.querySelectorAll("#series-table tbody tr")) {
      row.classList.toggle("selected", row.dataset.series === state.selected);
    }
  }

  // --- selection and the URL ---

  function readHash() {
    const params = new URLSearchParams(location.hash.replace(/^#/, ""));
    return {
      series: params.get("series"),
      channel: params.get("channel"),
      range: params.get("range"),
    };
  }

  function writeHash() {
    const params = new URLSearchParams();
    if (state.selected) params.set("series", state.selected);
    if (state.channel) params.set("channel", state.channel);
    params.set("range", String(state.rangeDays));
    history.replaceState(null, "", "#" + params.toString());
  }

  async function selectSeries(name, channel) {
    const summary = state.series.find((series) => series.name === name);
    if (!summary) return;
    state.selected = name;
    state.channel = channel && summary.channels.includes(channel) ? channel : summary.channels[0] || null;
    state.selectedRun = null;
    markSelectedSeries();
    $("#detail-title").textContent = name;
    const picker = $("#channel");
    picker.replaceChildren(...summary.channels.map((c) => element("option", { value: c, text: c })));
    picker.value = state.channel;
    for (const id of ["#detail", "#runs-section", "#models-section"]) $(id).hidden = false;
    writeHash();
    await Promise.all([loadForecastView(), loadRuns(), loadModels()]);
    schedulePoll();
  }

  // --- actuals, forecast and band ---

  function quantileKey(forecast, level) {
    const keys = Object.keys((forecast.channels[state.channel] || {}).quantiles || {});
    return keys.find((key) => Math.abs(Number(key) - level) < 1e-6) || null;
  }

  async function loadForecastView() {
    const section = $("#detail");
    const name = state.selected;
    const channel = state.channel;
    const summary = state.series.find((series) => series.name === name);
    const forecastsBody = await apiOptional(seriesPath(name) + "/forecasts?limit=" + FORECASTS_SCORED).catch((err) => {
      $("#forecast-note").textContent = "Cannot read forecasts: " + describeFailure(err);
      return null;
    });
    const forecasts = forecastsBody && forecastsBody.forecasts ? forecastsBody.forecasts : [];
    const latest = forecasts[0] || null;

    // Actuals from the start of the range (counted back from the newest
    // observation, so an idle series still shows data) and far enough back
    // to score the older forecasts.
    const last = summary && summary.lastObservation ? new Date(summary.lastObservation) : new Date();
    let from = state.rangeDays > 0 ? new Date(last.getTime() - state.rangeDays * 86400e3) : null;
    const oldestOrigin = forecasts.length ? new Date(forecasts[forecasts.length - 1].origin || forecasts[forecasts.length - 1].created_at) : null;
    const fetchFrom = from && oldestOrigin && oldestOrigin < from ? oldestOrigin : from;
    let query = "?channels=" + encodeURIComponent(channel);
    if (fetchFrom) query += "&from=" + encodeURIComponent(fetchFrom.toISOString());
    let observations = null;
    try {
      observations = await api(seriesPath(name) + "/observations" + query);
    } catch (err) {
      $("#forecast-note").textContent = "Cannot read observations: " + describeFailure(err);
    }
    if (name !== state.selected || channel !== state.channel) return; // the user moved on
    const actual = new Map();
    if (observations) {
      const values = observations.channels[channel] || [];
      observations.timestamps.forEach((ts, i) => {
        if (values[i] !== null && values[i] !== undefined) actual.set(Date.parse(ts) / 1000, values[i]);
      });
    }
    drawForecastChart(actual, latest, from ? from.getTime() / 1000 : null);
    drawErrorChart(actual, forecasts.slice(latest ? 1 : 0));
    const notes = [];
    if (!forecastsBody) notes.push("Persisted forecasts are not available from this server.");
    else if (!latest) notes.push("No persisted forecast yet for this series.");
    else {
      const lo = quantileKey(latest, 0.1);
      const hi = quantileKey(latest, 0.9);
      notes.push("Latest forecast issued " + formatTime(latest.created_at) + " from data up to " + formatTime(latest.origin) +
        " by model v" + latest.model_version_id + ", horizon " + latest.horizon + "." +
        (lo && hi ? " Shaded: 10–90 % band." : " It has no 10 % / 90 % quantiles, so no band."));
    }
    if (observations && actual.size === 0) notes.push("No observations of " + channel + " in this range.");
    $("#forecast-note").textContent = notes.join(" ");
    void section;
  }

  // Vertical "now" line, drawn over the plot.
  function nowMarker() {
    return {
      hooks: {
        draw: [
          (u) => {
            const now = Date.now() / 1000;
            const [min, max] = [u.scales.x.min, u.scales.x.max];
            if (min === null || max === null || now < min || now > max) return;
            const x = Math.round(u.valToPos(now, "x", true));
            const ctx = u.ctx;
            ctx.save();
            ctx.strokeStyle = COLORS.now;
            ctx.lineWidth = 1.5 * devicePixelRatio;
            ctx.setLineDash([6 * devicePixelRatio, 4 * devicePixelRatio]);
            ctx.beginPath();
            ctx.moveTo(x, u.bbox.top);
            ctx.lineTo(x, u.bbox.top + u.bbox.height);
            ctx.stroke();
            ctx.setLineDash([]);
            ctx.fillStyle = COLORS.now;
            ctx.font = 12 * devicePixelRatio + "px system-ui, sans-serif";
            // The label goes left of the line when the line is at the right edge.
            const label = "now";
            const gap = 4 * devicePixelRatio;
            const labelWidth = ctx.measureText(label).width;
            const labelX = x + gap + labelWidth > u.bbox.left + u.bbox.width ? x - gap - labelWidth : x + gap;
            ctx.fillText(label, labelX, u.bbox.top + 14 * devicePixelRatio);
            ctx.restore();
          },
        ],
      },
    };
  }

  function chartWidth(container) {
    return Math.max(320, container.clientWidth || container.parentElement.clientWidth - 32);
  }

  function replaceChart(slot, container, options, data) {
    if (state.charts[slot]) state.charts[slot].destroy();
    container.replaceChildren();
    options.width = chartWidth(container);
    state.charts[slot] = new uPlot(options, data, container);
  }

  const utc = (ts) => uPlot.tzDate(new Date(ts * 1e3), "Etc/UTC");

  function drawForecastChart(actual, latest, from) {
    const container = $("#forecast-chart");
    const points = new Map(); // time (s) -> [actual, mean, low, high]
    for (const [ts, value] of actual) {
      if (from === null || ts >= from) points.set(ts, [value, null, null, null]);
    }
    if (latest && latest.channels && latest.channels[state.channel]) {
      const series = latest.channels[state.channel];
      const lo = quantileKey(latest, 0.1);
      const hi = quantileKey(latest, 0.9);
      latest.timestamps.forEach((stamp, i) => {
        const ts = Date.parse(stamp) / 1000;
        const row = points.get(ts) || [null, null, null, null];
        row[1] = series.mean[i];
        row[2] = lo ? series.quantiles[lo][i] : null;
        row[3] = hi ? series.quantiles[hi][i] : null;
        points.set(ts, row);
      });
    }
    const times = Array.from(points.keys()).sort((a, b) => a - b);
    const column = (index) => times.map((ts) => points.get(ts)[index]);
    const data = [times, column(0), column(1), column(2), column(3)];
    const options = {
      height: 320,
      tzDate: utc,
      // Reach at least to now, so that the "now" marker always shows.
      scales: { x: { time: true, range: (u, min, max) => [min, Math.max(max, Date.now() / 1000 + 1800)] } },
      series: [
        {},
        { label: "actual", stroke: COLORS.actual, width: 1.5 },
        { label: "forecast", stroke: COLORS.forecast, width: 2, dash: [8, 4] },
        { label: "10 %", stroke: COLORS.bandEdge, width: 1 },
        { label: "90 %", stroke: COLORS.bandEdge, width: 1 },
      ],
      bands: [{ series: [4, 3], fill: COLORS.band }],
      axes: [{}, { size: 60 }],
      legend: { live: true },
      plugins: [nowMarker()],
    };
    replaceChart("forecast", container, options, data);
  }

  // Each past forecast scored on the actuals that have arrived for it.
  function scoreForecast(forecast, actual) {
    const series = forecast.channels && forecast.channels[state.channel];
    if (!series) return null;
    const lo = quantileKey(forecast, 0.1);
    const hi = quantileKey(forecast, 0.9);
    let absolute = 0;
    let inside = 0;
    let scored = 0;
    forecast.timestamps.forEach((stamp, i) => {
      const observed = actual.get(Date.parse(stamp) / 1000);
      if (observed === undefined || series.mean[i] === null) return;
      absolute += Math.abs(series.mean[i] - observed);
      if (lo && hi && observed >= series.quantiles[lo][i] && observed <= series.quantiles[hi][i]) inside += 1;
      scored += 1;
    });
    if (!scored) return null;
    return {
      origin: Date.parse(forecast.origin || forecast.created_at) / 1000,
      mae: absolute / scored,
      coverage: lo && hi ? (100 * inside) / scored : null,
    };
  }

  function drawErrorChart(actual, pastForecasts) {
    const container = $("#error-chart");
    const scores = pastForecasts
      .map((forecast) => scoreForecast(forecast, actual))
      .filter(Boolean)
      .sort((a, b) => a.origin - b.origin);
    $("#error-note").textContent = scores.length
      ? "Each point is one earlier persisted forecast, placed at the time of its last observation: mean absolute error against the actuals that arrived, and how many of them fell inside its 10–90 % band."
      : "No earlier forecast has actuals to compare with yet.";
    const data = [scores.map((s) => s.origin), scores.map((s) => s.mae), scores.map((s) => s.coverage)];
    const options = {
      height: 220,
      tzDate: utc,
      scales: { x: { time: true }, mae: {}, coverage: { range: [0, 100] } },
      series: [
        {},
        { label: "MAE", scale: "mae", stroke: COLORS.forecast, width: 2, points: { show: true, size: 7 } },
        { label: "inside band %", scale: "coverage", stroke: COLORS.coverage, width: 1, dash: [4, 4], points: { show: true, size: 6 } },
      ],
      axes: [{}, { scale: "mae", size: 60 }, { scale: "coverage", side: 1, grid: { show: false }, values: (u, ticks) => ticks.map((t) => t + " %") }],
      plugins: [nowMarker()],
    };
    replaceChart("error", container, options, data);
  }

  // --- runs ---

  async function loadRuns() {
    const section = $("#runs-section");
    const name = state.selected;
    let body;
    try {
      body = await apiOptional("/api/v1/runs?series=" + encodeURIComponent(name) + "&limit=" + RUNS_SHOWN);
    } catch (err) {
      setNote(section, "Cannot read runs: " + describeFailure(err));
      return;
    }
    if (name !== state.selected) return;
    if (!body) {
      state.runs = [];
      setNote(section, "Runs are not available from this server.");
      $("#runs-table tbody").replaceChildren();
      return;
    }
    const previous = new Map(state.runs.map((run) => [run.id, run.status]));
    state.runs = body.runs || [];
    setNote(section, state.runs.length ? "" : "No runs yet. “Fine-tune now” queues one.");
    // A run that just finished may have produced a model version.
    const finishedNow = state.runs.some((run) => previous.get(run.id) && previous.get(run.id) !== run.status && isFinal(run.status));
    if (finishedNow) {
      loadModels();
      loadSeriesList();
    }
    if (state.selectedRun === null || !state.runs.some((run) => run.id === state.selectedRun)) {
      const withHistory = state.runs.find((run) => run.progress && Array.isArray(run.progress.history) && run.progress.history.length);
      state.selectedRun = withHistory ? withHistory.id : state.runs[0] ? state.runs[0].id : null;
    }
    $("#runs-table tbody").replaceChildren(...state.runs.map(runRow));
    drawLossChart();
  }

  const isFinal = (status) => ["succeeded", "failed", "cancelled", "skipped"].includes(status);

  function runRow(run) {
    const progress = run.progress || {};
    let progressCell = "–";
    if (progress.epoch !== undefined && progress.epoch !== null) {
      const max = progress.max_epochs;
      const fraction = max ? Math.min(1, Math.max(0, (progress.epoch - 1 + (progress.steps_per_epoch ? (progress.step || 0) / progress.steps_per_epoch : 1)) / max)) : null;
      const done = run.status === "succeeded" ? 1 : fraction;
      progressCell = element("span", {}, [
        element("span", { class: "bar" }, [element("span", { style: "width:" + Math.round((done || 0) * 100) + "%" })]),
        "epoch " + progress.epoch + (max ? " / " + max : ""),
      ]);
    }
    const row = element("tr", { class: "clickable" + (run.id === state.selectedRun ? " selected" : ""), "data-run": run.id }, [
      cell("#" + run.id),
      cell(run.kind),
      cell(element("span", { class: "badge " + run.status, text: run.status })),
      cell(progressCell),
      cell(formatNumber(progress.train_loss), "num"),
      cell(formatNumber(progress.val_loss), "num"),
      cell(formatNumber(progress.best_val_loss), "num"),
      cell(run.status === "running" && progress.eta_seconds !== undefined ? formatSeconds(progress.eta_seconds) : "–"),
      cell(formatTime(run.created_at)),
      cell(formatTime(run.finished_at)),
      cell(run.model_version_id ? "v" + run.model_version_id : "–"),
      cell(run.error || "", run.error ? "error" : null),
    ]);
    row.addEventListener("click", () => {
      state.selectedRun = run.id;
      for (const other of document.querySelectorAll("#runs-table tbody tr")) {
        other.classList.toggle("selected", Number(other.dataset.run) === run.id);
      }
      drawLossChart();
    });
    return row;
  }

  function drawLossChart() {
    const container = $("#loss-chart");
    const run = state.runs.find((candidate) => candidate.id === state.selectedRun);
    const history = run && run.progress && Array.isArray(run.progress.history) ? run.progress.history : [];
    $("#loss-title").textContent = run ? "Loss curve of run #" + run.id + (history.length ? "" : " (no epoch finished yet)") : "Loss curve";
    const data = [
      history.map((entry) => entry.epoch),
      history.map((entry) => (entry.train_loss === undefined ? null : entry.train_loss)),
      history.map((entry) => (entry.val_loss === undefined ? null : entry.val_loss)),
    ];
    const options = {
      height: 220,
      scales: { x: { time: false } },
      series: [
        { label: "epoch" },
        { label: "train loss", stroke: COLORS.train, width: 2, points: { show: true } },
        { label: "validation loss", stroke: COLORS.val, width: 2, points: { show: true } },
      ],
      // Whole epochs only.
      axes: [{ label: "epoch", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500], values: (u, ticks) => ticks.map(String) }, { size: 60 }],
    };
    replaceChart("loss", container, options, data);
  }

  // Poll fast while a run is queued or training, slowly otherwise.
  function schedulePoll() {
    clearTimeout(state.pollTimer);
    const active = state.runs.some((run) => run.status === "queued" || run.status === "running");
    state.pollTimer = setTimeout(async () => {
      if (!document.hidden && state.selected) await loadRuns();
      schedulePoll();
    }, active ? POLL_ACTIVE_MS : POLL_IDLE_MS);
  }

  // --- model versions ---

  async function loadModels() {
    const section = $("#models-section");
    const name = state.selected;
    let body;
    try {
      body = await apiOptional(seriesPath(name) + "/models");
    } catch (err) {
      setNote(section, "Cannot read model versions: " + describeFailure(err));
      return;
    }
    if (name !== state.selected) return;
    const models = body && body.models ? body.models : [];
    setNote(section, !body ? "Model versions are not available from this server." : models.length ? "" : "No model version yet.");
    $("#models-table tbody").replaceChildren(...models.map(modelRow));
  }

  function modelRow(model) {
    const metrics = model.metrics || {};
    const config = model.config || {};
    const status = model.is_champion ? "champion" : model.status;
    const promote = element("button", { type: "button", text: "Promote", disabled: model.is_champion || model.status === "rejected" });
    promote.addEventListener("click", () => promoteVersion(model, promote));
    return element("tr", { "data-model": model.id }, [
      cell("v" + model.id),
      cell(element("span", { class: "badge " + status, text: model.is_champion ? "★ champion" : status })),
      cell(formatTime(model.created_at)),
      cell(model.parent_version_id ? "v" + model.parent_version_id : "–"),
      cell(config.preset || "–"),
      cell((config.lookback || "–") + " / " + (config.horizon || "–")),
      cell(formatNumber(metrics.val_mse), "num"),
      cell(formatNumber(metrics.val_mae), "num"),
      cell(metrics.coverage_80 === undefined || metrics.coverage_80 === null ? "–" : formatNumber(100 * metrics.coverage_80, 1) + " %", "num"),
      cell(metrics.epochs === undefined ? "–" : metrics.epochs, "num"),
      cell(formatSeconds(metrics.train_seconds), "num"),
      cell(metrics.params === undefined ? "–" : Number(metrics.params).toLocaleString("en"), "num"),
      cell(model.is_champion ? "" : promote),
    ]);
  }

  // --- actions ---

  async function promoteVersion(model, button) {
    // Two clicks: the first asks, the second promotes.
    if (!button.classList.contains("confirm")) {
      button.classList.add("confirm");
      button.textContent = "Promote v" + model.id + "?";
      setTimeout(() => {
        button.classList.remove("confirm");
        button.textContent = "Promote";
      }, 4000);
      return;
    }
    button.disabled = true;
    try {
      await api("/api/v1/models/" + model.id + "/promote", { method: "POST" });
      toast("v" + model.id + " is now the champion of " + state.selected + ".");
      await Promise.all([loadModels(), loadSeriesList()]);
    } catch (err) {
      toast("Promotion failed: " + describeFailure(err), true);
      button.disabled = false;
    }
  }

  async function startFinetune() {
    const button = $("#finetune");
    button.disabled = true;
    try {
      const run = await api(seriesPath(state.selected) + "/train", { method: "POST", json: { mode: "finetune" } });
      toast("Fine-tuning queued as run #" + (run && run.id !== undefined ? run.id : "?") + ".");
      state.selectedRun = run && run.id !== undefined ? run.id : state.selectedRun;
      await loadRuns();
      schedulePoll();
    } catch (err) {
      toast("Could not start fine-tuning: " + describeFailure(err), true);
    } finally {
      button.disabled = false;
    }
  }

  function showKeyState() {
    $("#key-state").textContent = apiKey() ? "key saved in this browser" : "no key";
  }

  // --- start ---

  function wireControls() {
    // Not a <form>: browsers would offer to save the key as a password.
    const saveKey = () => {
      const value = $("#api-key").value.trim();
      try {
        if (value) localStorage.setItem(KEY_STORAGE, value);
      } catch (_) {
        toast("This browser does not allow storing the key.", true);
      }
      $("#api-key").value = "";
      showKeyState();
    };
    $("#key-save").addEventListener("click", saveKey);
    $("#api-key").addEventListener("keydown", (event) => {
      if (event.key === "Enter") saveKey();
    });
    $("#key-forget").addEventListener("click", () => {
      try {
        localStorage.removeItem(KEY_STORAGE);
      } catch (_) {
        /* nothing stored */
      }
      showKeyState();
    });
    $("#channel").addEventListener("change", (event) => {
      state.channel = event.target.value;
      writeHash();
      loadForecastView();
    });
    $("#range").addEventListener("change", (event) => {
      state.rangeDays = Number(event.target.value);
      writeHash();
      loadForecastView();
    });
    $("#finetune").addEventListener("click", startFinetune);
    let resizeTimer = null;
    window.addEventListener("resize", () => {
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(() => {
        for (const [slot, id] of [["forecast", "#forecast-chart"], ["error", "#error-chart"], ["loss", "#loss-chart"]]) {
          const chart = state.charts[slot];
          if (chart) chart.setSize({ width: chartWidth($(id)), height: chart.height });
        }
      }, 150);
    });
  }

  async function start() {
    wireControls();
    showKeyState();
    const wanted = readHash();
    if (wanted.range !== null && $("#range option[value='" + Number(wanted.range) + "']")) {
      state.rangeDays = Number(wanted.range);
      $("#range").value = String(state.rangeDays);
    }
    await loadSeriesList();
    const initial = state.series.find((series) => series.name === wanted.series) || state.series[0];
    if (initial) await selectSeries(initial.name, wanted.channel);
    state.loaded = true;
    document.documentElement.dataset.loaded = "true";
  }

  start().catch((err) => {
    toast("The dashboard failed to load: " + describeFailure(err), true);
    state.loaded = true;
    document.documentElement.dataset.loaded = "error";
    throw err;
  });
})();
