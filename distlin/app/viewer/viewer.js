// A small deep-zoom viewer: reads a DZI descriptor (?dzi=URL) and draws on a canvas only the tiles that are
// visible, from the pyramid level that matches the zoom. Coarser levels already loaded fill the gaps while
// finer tiles arrive, so zooming stays smooth; past 1:1 the deepest level is magnified without smoothing,
// one image pixel per block. Wheel or buttons zoom, drag pans, double-click zooms in.
"use strict";

class TileSource {
  // The pyramid described by a .dzi file: level sizes and tile URLs (`<name>_files/<level>/<col>_<row>.<fmt>`).
  constructor(url, xml) {
    const image = xml.documentElement;
    const size = image.getElementsByTagName("Size")[0];
    this.width = Number(size.getAttribute("Width"));
    this.height = Number(size.getAttribute("Height"));
    this.tileSize = Number(image.getAttribute("TileSize"));
    this.format = image.getAttribute("Format");
    this.topLevel = Math.ceil(Math.log2(Math.max(this.width, this.height)));
    this.base = url.replace(/\.dzi$/, "_files/");
  }

  levelScale(level) { return 2 ** (level - this.topLevel); }

  levelSize(level) {
    const scale = this.levelScale(level);
    return [Math.ceil(this.width * scale), Math.ceil(this.height * scale)];
  }

  tileUrl(level, col, row) { return `${this.base}${level}/${col}_${row}.${this.format}`; }
}

class TileCache {
  // Loaded tile images, least recently drawn evicted first; `onLoad` redraws as tiles arrive.
  constructor(limit, onLoad) {
    this.limit = limit;
    this.onLoad = onLoad;
    this.tiles = new Map();
    this.requested = [];  // every URL ever requested, for tests and curiosity
  }

  get(url, load) {
    let tile = this.tiles.get(url);
    if (tile) {
      this.tiles.delete(url);  // re-insert: most recently used last
      this.tiles.set(url, tile);
    } else if (load) {
      tile = new Image();
      tile.onload = this.onLoad;
      tile.src = url;
      this.requested.push(url);
      this.tiles.set(url, tile);
      for (const old of this.tiles.keys()) {
        if (this.tiles.size <= this.limit) break;
        this.tiles.delete(old);
      }
    }
    return tile && tile.complete && tile.naturalWidth ? tile : null;
  }
}

class DeepZoomViewer {
  constructor(canvas, source, status) {
    this.canvas = canvas;
    this.source = source;
    this.status = status;
    this.cache = new TileCache(600, () => this.redraw());
    this.scale = 1;  // screen pixels per image pixel
    this.x = 0;      // image coordinate at the canvas' left edge
    this.y = 0;      // image coordinate at the canvas' top edge
    this.pending = false;
    new ResizeObserver(() => this.resize()).observe(canvas);
    this.listen();
    this.resize();
    this.home();
  }

  get minScale() { return Math.min(1, 0.5 * this.fitScale()); }
  get maxScale() { return 64; }

  fitScale() {
    return Math.min(this.canvas.width / this.source.width, this.canvas.height / this.source.height);
  }

  home() {
    this.scale = this.fitScale();
    this.x = (this.source.width - this.canvas.width / this.scale) / 2;
    this.y = (this.source.height - this.canvas.height / this.scale) / 2;
    this.redraw();
  }

  zoomAt(factor, sx = this.canvas.width / 2, sy = this.canvas.height / 2) {
    // Zoom by `factor` keeping the image point under screen point (sx, sy) fixed.
    const scale = Math.min(this.maxScale, Math.max(this.minScale, this.scale * factor));
    this.x += sx / this.scale - sx / scale;
    this.y += sy / this.scale - sy / scale;
    this.scale = scale;
    this.redraw();
  }

  level() {
    // The coarsest level with at least one level pixel per screen pixel (the deepest when zoomed past 1:1).
    const wanted = this.source.topLevel + Math.ceil(Math.log2(this.scale) - 1e-9);
    return Math.max(0, Math.min(this.source.topLevel, wanted));
  }

  redraw() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => { this.pending = false; this.draw(); });
  }

  draw() {
    const ctx = this.canvas.getContext("2d");
    ctx.clearRect(0, 0, this.canvas.width, this.canvas.height);
    ctx.imageSmoothingEnabled = this.scale < 1;
    const level = this.level();
    // Level 0 up to the wanted level: coarse tiles are drawn first, finer ones over them.
    for (let l = 0; l <= level; l++) this.drawLevel(ctx, l, l === level || l === this.coarseLevel());
    const percent = (this.scale * 100).toPrecision(3);
    this.status.textContent = `${this.source.width}\u00d7${this.source.height} px \u00b7 ${percent}% \u00b7 level ${level}`;
    this.canvas.dataset.level = level;
    this.canvas.dataset.scale = this.scale;
  }

  coarseLevel() {
    // The deepest level that is still a single tile: always loaded, so the whole image shows at once.
    return Math.min(this.source.topLevel, Math.floor(Math.log2(this.source.tileSize)));
  }

  drawLevel(ctx, level, load) {
    const s = this.source;
    const [w, h] = s.levelSize(level);
    const k = s.levelScale(level);  // level pixels per image pixel
    const t = s.tileSize;
    const first = (v) => Math.max(0, Math.floor((v * k) / t));
    const c0 = first(this.x), r0 = first(this.y);
    const c1 = Math.min(Math.ceil(w / t) - 1, Math.floor(((this.x + this.canvas.width / this.scale) * k) / t));
    const r1 = Math.min(Math.ceil(h / t) - 1, Math.floor(((this.y + this.canvas.height / this.scale) * k) / t));
    const toScreenX = (lx) => Math.round((lx / k - this.x) * this.scale);
    const toScreenY = (ly) => Math.round((ly / k - this.y) * this.scale);
    for (let r = r0; r <= r1; r++) {
      for (let c = c0; c <= c1; c++) {
        const tile = this.cache.get(s.tileUrl(level, c, r), load);
        if (!tile) continue;
        const x0 = toScreenX(c * t), y0 = toScreenY(r * t);
        const x1 = toScreenX(c * t + tile.naturalWidth), y1 = toScreenY(r * t + tile.naturalHeight);
        ctx.drawImage(tile, x0, y0, x1 - x0, y1 - y0);  // rounded edges: neighbouring tiles meet exactly
      }
    }
  }

  resize() {
    const ratio = window.devicePixelRatio || 1;
    const w = Math.round(this.canvas.clientWidth * ratio), h = Math.round(this.canvas.clientHeight * ratio);
    if (w === this.canvas.width && h === this.canvas.height) return;
    const cx = this.x + this.canvas.width / 2 / this.scale, cy = this.y + this.canvas.height / 2 / this.scale;
    this.canvas.width = w;
    this.canvas.height = h;
    this.x = cx - w / 2 / this.scale;
    this.y = cy - h / 2 / this.scale;
    this.redraw();
  }

  listen() {
    const c = this.canvas;
    const ratio = () => window.devicePixelRatio || 1;
    c.addEventListener("wheel", (e) => {
      e.preventDefault();
      this.zoomAt(Math.pow(1.002, -e.deltaY), e.offsetX * ratio(), e.offsetY * ratio());
    }, { passive: false });
    c.addEventListener("dblclick", (e) => this.zoomAt(2, e.offsetX * ratio(), e.offsetY * ratio()));
    let drag = null;
    c.addEventListener("pointerdown", (e) => {
      drag = { x: e.clientX, y: e.clientY };
      c.setPointerCapture(e.pointerId);
      c.classList.add("dragging");
    });
    c.addEventListener("pointermove", (e) => {
      if (!drag) return;
      this.x -= ((e.clientX - drag.x) * ratio()) / this.scale;
      this.y -= ((e.clientY - drag.y) * ratio()) / this.scale;
      drag = { x: e.clientX, y: e.clientY };
      this.redraw();
    });
    const release = () => { drag = null; c.classList.remove("dragging"); };
    c.addEventListener("pointerup", release);
    c.addEventListener("pointercancel", release);
    document.getElementById("zoom-in").onclick = () => this.zoomAt(2);
    document.getElementById("zoom-out").onclick = () => this.zoomAt(0.5);
    document.getElementById("home").onclick = () => this.home();
    document.getElementById("pixels").onclick = () => this.zoomAt(1 / this.scale);
  }
}

async function start() {
  const status = document.getElementById("status");
  const param = new URLSearchParams(location.search).get("dzi");
  if (!param) { status.textContent = "no image"; return; }
  const url = new URL(param, location.href).href;
  const response = await fetch(url);
  if (!response.ok) { status.textContent = `cannot load ${param} (${response.status})`; return; }
  const xml = new DOMParser().parseFromString(await response.text(), "application/xml");
  window.viewer = new DeepZoomViewer(document.getElementById("view"), new TileSource(url, xml), status);
}

start();
