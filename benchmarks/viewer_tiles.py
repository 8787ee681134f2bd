"""How fast `cancernet view` serves a slide: the first view (the page, the .dzi and the tiles that
fill an 800 x 600 view), 256 px tiles made on request, and the same tiles from the cache.

    python benchmarks/viewer_tiles.py OUT    # a predict-slide output folder (its slides readable)

Prints one JSON line: medians in ms over every tile of the slide's full-resolution level."""

from __future__ import annotations

import http.client
import json
import re
import statistics
import sys
import threading
import time
from pathlib import Path

from cancernet.wsi.viewer import TILE, make_server


def get(port: int, path: str) -> bytes:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("GET", path)
    response = connection.getresponse()
    assert response.status == 200, (path, response.status)
    return response.read()


def main() -> None:
    out = Path(sys.argv[1])
    server = make_server(out, "127.0.0.1", 0)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    name = next(iter(server.RequestHandlerClass.catalogue.summaries))
    start = time.perf_counter()
    get(port, f"/slide/{name}")
    dzi = get(port, f"/dzi/{name}.dzi").decode()
    width, height = (int(v) for v in re.findall(r'(?:Width|Height)="(\d+)"', dzi))
    top = (max(width, height) - 1).bit_length()  # the full-resolution level
    # the first view: the whole slide fitted in 800 x 600 px, the level that covers it and the one below
    fit = max(width / 800, height / 600)
    level = max(0, top - max(0, int(fit).bit_length() - 1))
    scale = 2 ** (top - level)
    for col in range(-(-width // scale // TILE)):
        for row in range(-(-height // scale // TILE)):
            get(port, f"/dzi/{name}_files/{level}/{col}_{row}.jpeg")
    get(port, f"/overlay/{name}.png")
    first_view = time.perf_counter() - start
    tiles = [(c, r) for c in range(-(-width // TILE)) for r in range(-(-height // TILE))]
    timings = {}
    for kind in ("made", "cached"):
        times = []
        for col, row in tiles:
            t = time.perf_counter()
            get(port, f"/dzi/{name}_files/{top}/{col}_{row}.jpeg")
            times.append(1000 * (time.perf_counter() - t))
        timings[kind] = times
    server.shutdown()
    print(
        json.dumps(
            {
                "slide": name,
                "level0": [width, height],
                "tiles": len(tiles),
                "first_view_s": round(first_view, 3),
                "tile_ms_median": round(statistics.median(timings["made"]), 2),
                "tile_ms_p90": round(sorted(timings["made"])[int(0.9 * len(tiles))], 2),
                "cached_ms_median": round(statistics.median(timings["cached"]), 2),
            }
        )
    )


if __name__ == "__main__":
    main()
