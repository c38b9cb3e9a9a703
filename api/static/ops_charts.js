// Plain SVG charts for the console: stacked bars and lines over minutes. No library, no build step.
"use strict";

const OpsCharts = (() => {
  const NS = "http://www.w3.org/2000/svg";
  const W = 480, H = 170, L = 40, R = 8, T = 8, B = 22;   // view box and margins

  function svg(tag, attrs = {}, text) {
    const e = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function niceMax(v) {
    if (v <= 0) return 1;
    const p = 10 ** Math.floor(Math.log10(v));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  function hhmm(ms) { return new Date(ms).toLocaleTimeString([], {hour: "2-digit", minute: "2-digit"}); }

  // axes, grid and x labels; returns the scale functions
  function frame(root, n, start, step, max, unit) {
    const x = (i) => L + (i / n) * (W - L - R);
    const y = (v) => T + (1 - v / max) * (H - T - B);
    for (const f of [0, 0.5, 1]) {
      const v = max * f;
      root.append(svg("line", {x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid-line"}));
      root.append(svg("text", {x: L - 4, y: y(v) + 4, "text-anchor": "end", class: "axis"},
        (Number.isInteger(v) ? v : v.toFixed(1)) + (f === 1 && unit ? " " + unit : "")));
    }
    for (const i of [0, Math.floor(n / 2), n]) {
      const anchor = i === 0 ? "start" : i === n ? "end" : "middle";
      root.append(svg("text", {x: x(i), y: H - 6, "text-anchor": anchor, class: "axis"},
        hhmm(start + i * step)));
    }
    return {x, y};
  }

  function mount(container, label) {
    const root = svg("svg", {viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": label, class: "chart-svg"});
    root.append(svg("title", {}, label));
    const legend = document.createElement("ul");
    legend.className = "legend";
    container.replaceChildren(root, legend);
    return {root, legend};
  }

  function key(legend, name, color, dash, value) {
    const li = document.createElement("li");
    const sw = document.createElement("span");
    sw.className = "swatch" + (dash ? " dashed" : "");
    sw.style.borderColor = color;
    if (!dash) sw.style.background = color;
    li.append(sw, ` ${name}` + (value !== undefined ? `: ${value}` : ""));
    li.dataset.series = name;
    legend.append(li);
  }

  // {start, step, series: {name: [counts per minute]}, colors: {name: color}}
  function stacked(container, {start, step, series, colors, order}) {
    const names = (order || Object.keys(series)).filter((k) => series[k]);
    const n = names.length ? series[names[0]].length : 60;
    const totals = Array.from({length: n}, (_, i) => names.reduce((a, k) => a + (series[k][i] || 0), 0));
    const sum = totals.reduce((a, b) => a + b, 0);
    const label = `Commands per minute by outcome over ${n} minutes: ${sum} in all` +
      names.map((k) => `, ${k} ${series[k].reduce((a, b) => a + b, 0)}`).join("");
    const {root, legend} = mount(container, label);
    const max = niceMax(Math.max(0, ...totals));
    const {x, y} = frame(root, n, start, step, max, "");
    const bw = Math.max(1, (W - L - R) / n - 1);
    for (let i = 0; i < n; i++) {
      let acc = 0;
      for (const k of names) {
        const v = series[k][i] || 0;
        if (!v) continue;
        const r = svg("rect", {x: x(i), y: y(acc + v), width: bw, height: y(acc) - y(acc + v), fill: colors[k] || "#596072"});
        r.append(svg("title", {}, `${hhmm(start + i * step)}: ${v} ${k}`));
        root.append(r);
        acc += v;
      }
    }
    for (const k of names) key(legend, k, colors[k] || "#596072", false, series[k].reduce((a, b) => a + b, 0));
    if (!names.length) key(legend, "no commands in this hour", "#c9ced8", false);
    return root;
  }

  // {start, step, lines: [{name, values (null = no data), color, dash}], unit}
  function lines(container, {start, step, lines: ls, unit, label}) {
    const n = ls.length ? ls[0].values.length : 60;
    const all = ls.flatMap((l) => l.values.filter((v) => v !== null && v !== undefined));
    const {root, legend} = mount(container, label + (all.length ? `; highest ${Math.max(...all)} ${unit || ""}` : "; no data"));
    const max = niceMax(Math.max(0, ...all));
    const {x, y} = frame(root, n, start, step, max, unit);
    const half = (W - L - R) / n / 2;
    for (const l of ls) {
      let d = "";
      let pen = false;
      l.values.forEach((v, i) => {
        if (v === null || v === undefined) { pen = false; return; }
        d += `${pen ? "L" : "M"}${(x(i) + half).toFixed(1)},${y(v).toFixed(1)} `;
        pen = true;
      });
      if (d) {
        root.append(svg("path", {d, fill: "none", stroke: l.color, "stroke-width": 2,
          "stroke-dasharray": l.dash ? "5 3" : "none", "data-series": l.name}));
        // single points (a minute with data between two without) stay visible
        l.values.forEach((v, i) => {
          if (v === null || v === undefined) return;
          const lone = (l.values[i - 1] ?? null) === null && (l.values[i + 1] ?? null) === null;
          if (lone) root.append(svg("circle", {cx: x(i) + half, cy: y(v), r: 2.5, fill: l.color}));
        });
      }
      const last = [...l.values].reverse().find((v) => v !== null && v !== undefined);
      if (l.legend !== false) key(legend, l.name, l.color, l.dash, last === undefined ? "–" : `${last}${unit ? " " + unit : ""}`);
    }
    return root;
  }

  return {stacked, lines};
})();
