"""`cancernet view OUT`: a predict-slide or evaluate-slides output folder in the browser.

An index of the slides (thumbnail, probability, label when evaluate-slides had one, sorted by
probability, filterable) and a page per slide: the slide itself in deep zoom (OpenSlide's
DeepZoomGenerator, tiles made on request and cached), the model's map laid over it at level-0
alignment (the patch heatmap, or a MIL model's attention as its percentile within the slide; an
opacity slider, a colour bar), `--geojson`'s tumour regions as outlines, and a side panel with the
slide's numbers and its top tiles, each a link that zooms to it. OpenSeadragon (BSD-3-Clause,
vendored in cancernet/wsi/static/) draws it, so the page works offline.

Read-only and narrow: the standard library's threaded HTTP server, bound to 127.0.0.1 unless
--host says otherwise, serves the output folder's own files and the slides its slide.json files
name, nothing else (anything else, `..` included, is a 404); at most MAX_THREADS requests are
worked on at once, the others wait in the listen queue.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import mimetypes
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd

from cancernet.runtime.errors import DataError
from cancernet.wsi.driver import RESULT
from cancernet.wsi.viewer_pages import index_page, slide_page

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
TILE, OVERLAP = 254, 1  # deep zoom tiles of 256 px with their 1 px overlap each side
MAX_THREADS = 16
CACHED_TILES = 4096
TOP = 10  # top tiles listed beside a heatmap (a MIL slide lists what slide.json holds)


class Catalogue:
    """The slides of one output folder: each sub-folder holding a slide.json."""

    def __init__(self, out: Path):
        self.out = out.resolve()
        if not self.out.is_dir():
            raise DataError(f"{out} is not a folder (a predict-slide or evaluate-slides --out)")
        self.summaries = {
            folder.name: json.loads((folder / RESULT).read_text())
            for folder in sorted(self.out.iterdir())
            if (folder / RESULT).is_file()
        }
        if not self.summaries:
            raise DataError(f"{out} holds no slide outputs (<slide>/{RESULT}): point to predict-slide's --out")
        table = self.out / "slides.csv"
        labels = pd.read_csv(table, dtype={"slide": str}) if table.is_file() else pd.DataFrame()
        self.labels = dict(zip(labels["slide"], labels["label"])) if {"slide", "label"} <= set(labels) else {}
        self._zoom: dict[str, object] = {}
        self._lock = threading.Lock()

    def prob(self, name: str) -> float:
        s = self.summaries[name]
        return float(s.get("slide_prob", s["score"]))

    def is_mil(self, name: str) -> bool:
        return "slide_prob" in self.summaries[name]

    def deepzoom(self, name: str):
        """The slide's DeepZoomGenerator (opened once)."""
        from openslide.deepzoom import DeepZoomGenerator

        from cancernet.wsi.slide import open_slide

        path = Path(self.summaries[name]["slide"])
        if not path.is_file():
            raise DataError(f"slide {path} is not there (moved, or on another machine?): {name}/{RESULT} names it")
        with self._lock:
            if name not in self._zoom:
                self._zoom[name] = DeepZoomGenerator(open_slide(path), TILE, OVERLAP)
            return self._zoom[name]

    def file(self, relative: str) -> Path | None:
        """A file of the output folder, or None (outside it, or missing)."""
        path = (self.out / relative).resolve()
        return path if path.is_file() and path.is_relative_to(self.out) else None

    def level0_tile(self, name: str) -> float:
        """A tile's side in level-0 pixels."""
        s = self.summaries[name]
        if self.is_mil(name):
            return s["tile"] * s["tile_mpp"] / s["mpp"]
        return 96 * s["train_mpp"] / s["mpp"]

    def top_tiles(self, name: str) -> list[dict]:
        """The slide's top tiles, most telling first: {x, y, size (level 0), value, what}."""
        s, size = self.summaries[name], self.level0_tile(name)
        if self.is_mil(name):
            return [
                {"x": t["x"], "y": t["y"], "size": size, "value": t["attention"], "what": "attention"}
                for t in s.get("top_tiles", [])
            ]
        tiles = self.file(f"{name}/tiles.csv")
        if tiles is None:
            return []
        top = pd.read_csv(tiles).nlargest(TOP, "prob")
        return [
            {"x": int(r.x), "y": int(r.y), "size": size, "value": float(r.prob), "what": "P(tumour)"}
            for r in top.itertuples()
        ]

    def layer(self, name: str) -> tuple[np.ndarray, str] | None:
        """(the map on the cell grid, in [0, 1]; its colour map), or None."""
        from cancernet.wsi.figures import attention_percentiles

        if self.is_mil(name):
            path = self.file(f"{name}/attention.npy")
            return None if path is None else (attention_percentiles(np.load(path)), "viridis")
        path = self.file(f"{name}/heatmap.npy")
        return None if path is None else (np.load(path), "inferno")


@functools.lru_cache(maxsize=CACHED_TILES)
def _tile(catalogue: Catalogue, name: str, level: int, col: int, row: int) -> bytes:
    image = catalogue.deepzoom(name).get_tile(level, (col, row))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def _png(rgba: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, "PNG")
    return buffer.getvalue()


@functools.lru_cache(maxsize=256)
def _overlay(catalogue: Catalogue, name: str) -> bytes | None:
    """The map as a PNG, one pixel per cell: coloured, clear outside tissue and below 0.1."""
    from matplotlib import colormaps

    from cancernet.wsi.figures import opacity

    found = catalogue.layer(name)
    if found is None:
        return None
    values, cmap = found
    rgba = colormaps[cmap](np.nan_to_num(values, nan=0.0), bytes=True)
    rgba[..., 3] = np.rint(255 * opacity(values, 1.0)).astype(np.uint8)
    return _png(rgba)


@functools.lru_cache(maxsize=256)
def _truth(catalogue: Catalogue, name: str) -> bytes | None:
    """evaluate-slides' tumour mask on the cell grid, outlined in magenta (4 px a cell), as a PNG."""

    from cancernet.wsi.slide_eval import TRUTH

    path = catalogue.file(f"{name}/{TRUTH}")
    if path is None:
        return None
    inside = np.kron(np.load(path).astype(bool), np.ones((4, 4), bool))
    padded = np.pad(inside, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    rgba = np.zeros((*inside.shape, 4), np.uint8)
    rgba[inside & ~interior] = (255, 0, 200, 255)
    return _png(rgba)


@functools.lru_cache(maxsize=256)
def _regions(catalogue: Catalogue, name: str) -> bytes | None:
    """tumour.geojson's outlines as a PNG over the same grid (4 px a cell)."""
    from PIL import Image, ImageDraw

    path = catalogue.file(f"{name}/tumour.geojson")
    if path is None:
        return None
    s, scale = catalogue.summaries[name], 4
    rows, cols = s["grid"]
    per_px = s["cell_um"] / s["mpp"] / scale  # level-0 pixels per image pixel
    image = Image.new("RGBA", (cols * scale, rows * scale), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    for feature in json.loads(path.read_text()).get("features", []):
        geometry = feature["geometry"]
        polygons = geometry["coordinates"] if geometry["type"] == "MultiPolygon" else [geometry["coordinates"]]
        for polygon in polygons:
            for ring in polygon:
                draw.line([(x / per_px, y / per_px) for x, y in ring], fill=(0, 230, 255, 255), width=2)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


class Handler(BaseHTTPRequestHandler):
    catalogue: Catalogue  # set on the class the server makes

    def log_message(self, fmt, *args):  # the server's own log: quiet, on debug
        log.debug("%s " + fmt, self.address_string(), *args)

    def do_GET(self):
        try:
            self._get(unquote(urlparse(self.path).path))
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _send(self, body: bytes | None, kind: str = "text/html; charset=utf-8", cache: bool = False) -> None:
        if body is None:
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "max-age=3600" if cache else "no-cache")
        self.end_headers()
        self.wfile.write(body)

    def _get(self, path: str) -> None:
        c = self.catalogue
        parts = path.strip("/").split("/")
        if path == "/":
            return self._send(index_page(c))
        if parts[0] == "slide" and len(parts) == 2 and parts[1] in c.summaries:
            return self._send(slide_page(c, parts[1]))
        if parts[0] == "static" and len(parts) >= 2:
            target = (STATIC / "/".join(parts[1:])).resolve()
            if target.is_file() and target.is_relative_to(STATIC.resolve()):
                return self._send(target.read_bytes(), mimetypes.guess_type(target.name)[0] or "text/plain", True)
        if parts[0] == "files" and len(parts) >= 3 and parts[1] in c.summaries:
            target = c.file("/".join(parts[1:]))
            if target is not None:
                return self._send(
                    target.read_bytes(), mimetypes.guess_type(target.name)[0] or "application/octet-stream"
                )
        layers = {"overlay": _overlay, "regions": _regions, "truth": _truth}
        if parts[0] in layers and len(parts) == 2 and parts[1].endswith(".png"):
            name = parts[1].removesuffix(".png")
            if name in c.summaries:
                return self._send(layers[parts[0]](c, name), "image/png")
        if parts[0] == "dzi":
            return self._deepzoom(parts[1:])
        self._send(None)

    def _deepzoom(self, parts: list[str]) -> None:
        """NAME.dzi, or NAME_files/LEVEL/COL_ROW.jpeg."""
        c = self.catalogue
        if len(parts) == 1 and parts[0].endswith(".dzi") and parts[0].removesuffix(".dzi") in c.summaries:
            try:
                return self._send(c.deepzoom(parts[0].removesuffix(".dzi")).get_dzi("jpeg").encode(), "application/xml")
            except DataError:
                return self._send(None)
        if len(parts) == 3 and parts[0].endswith("_files") and parts[0].removesuffix("_files") in c.summaries:
            name, level, place = parts[0].removesuffix("_files"), parts[1], parts[2].removesuffix(".jpeg")
            col, _, row = place.partition("_")
            if level.isdigit() and col.isdigit() and row.isdigit():
                try:
                    return self._send(_tile(c, name, int(level), int(col), int(row)), "image/jpeg", True)
                except (ValueError, DataError):  # a tile outside the slide
                    pass
        self._send(None)


class Server(ThreadingHTTPServer):
    """At most MAX_THREADS requests worked on at once; more wait in the listen queue."""

    daemon_threads = True
    request_queue_size = 256

    def __init__(self, address, handler):
        super().__init__(address, handler)
        self.slots = threading.BoundedSemaphore(MAX_THREADS)

    def process_request(self, request, client_address):
        self.slots.acquire()
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def make_server(out: Path, host: str = "127.0.0.1", port: int = 8765) -> Server:
    catalogue = Catalogue(Path(out))
    handler = type("CatalogueHandler", (Handler,), {"catalogue": catalogue})
    return Server((host, port), handler)
