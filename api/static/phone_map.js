// The rider's map: the service area, the bikes on the list and the point distances are measured from,
// drawn in SVG by the page itself (no tile server). A local flat projection around the area's centre.
"use strict";

const LatchMap = (() => {
  const NS = "http://www.w3.org/2000/svg";
  const W = 320, H = 200, PAD = 12;
  let view = null;   // {lat0, lon0, mPerPx, cx, cy}

  function node(tag, attrs, text) {
    const n = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    if (text) n.textContent = text;
    return n;
  }
  function toXY(lat, lon) {
    const dy = (lat - view.lat0) * 111320, dx = (lon - view.lon0) * 111320 * Math.cos(view.lat0 * Math.PI / 180);
    return [view.cx + dx / view.mPerPx, view.cy - dy / view.mPerPx];
  }
  function toLatLon(x, y) {
    const dx = (x - view.cx) * view.mPerPx, dy = (view.cy - y) * view.mPerPx;
    return [view.lat0 + dy / 111320, view.lon0 + dx / (111320 * Math.cos(view.lat0 * Math.PI / 180))];
  }

  // area: [lat, lon, radius_m] or null; origin: [lat, lon] or null; bikes: [{id, name, pos, yours}]
  function draw(svg, {area, origin, originLabel, bikes}) {
    const title = svg.querySelector("title");
    svg.replaceChildren(title);
    const pts = bikes.filter((b) => b.pos).map((b) => b.pos);
    if (origin) pts.push(origin);
    if (!area && !pts.length) { view = null; return false; }
    const lat0 = area ? area[0] : pts[0][0], lon0 = area ? area[1] : pts[0][1];
    view = {lat0, lon0, mPerPx: 1, cx: W / 2, cy: H / 2};
    let rx = area ? area[2] : 200, ry = rx;   // metres from the centre the map must show, each way
    for (const [la, lo] of pts) {
      const [x, y] = toXY(la, lo);   // at 1 m per px
      rx = Math.max(rx, Math.abs(x - W / 2)); ry = Math.max(ry, Math.abs(y - H / 2));
    }
    view.mPerPx = 1.08 * Math.max(rx / (W / 2 - PAD), ry / (H / 2 - PAD));
    svg.append(node("rect", {x: 0, y: 0, width: W, height: H, class: "map-bg"}));
    if (area) {
      svg.append(node("circle", {cx: W / 2, cy: H / 2, r: area[2] / view.mPerPx, class: "map-area"}));
    }
    // a 500 m scale bar
    const bar = 500 / view.mPerPx;
    svg.append(node("line", {x1: PAD, y1: H - PAD, x2: PAD + bar, y2: H - PAD, class: "map-scale"}));
    svg.append(node("text", {x: PAD, y: H - PAD - 4, class: "map-label"}, "500 m"));
    for (const b of bikes) {
      if (!b.pos) continue;
      const [x, y] = toXY(b.pos[0], b.pos[1]);
      const dot = node("circle", {cx: x.toFixed(1), cy: y.toFixed(1), r: b.yours ? 7 : 5,
                                  class: "map-bike" + (b.yours ? " yours" : "") + (b.avoid ? " avoid" : ""),
                                  "data-bike": b.id});
      dot.append(node("title", {}, (b.name || b.id) + (b.yours ? " (your bike)" : "")));
      svg.append(dot);
    }
    if (origin) {
      const [x, y] = toXY(origin[0], origin[1]);
      const me = node("g", {class: "map-me"});
      me.append(node("circle", {cx: x.toFixed(1), cy: y.toFixed(1), r: 6}));
      me.append(node("title", {}, originLabel || "You"));
      svg.append(me);
    }
    return true;
  }

  // the [lat, lon] under a click on the SVG
  function pointAt(svg, event) {
    if (!view) return null;
    const box = svg.getBoundingClientRect();
    const x = (event.clientX - box.left) * (W / box.width), y = (event.clientY - box.top) * (H / box.height);
    const [lat, lon] = toLatLon(x, y);
    return [Math.round(lat * 1e6) / 1e6, Math.round(lon * 1e6) / 1e6];
  }

  return {draw, pointAt};
})();
