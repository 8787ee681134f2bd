"""`cancernet view` in a real browser: Debian's chromium, headless, started by the tests (no
network, nothing downloaded). A page is loaded with `--dump-dom` (the DOM after its scripts ran:
the viewer writes where it is centred, and every script error, into <body>'s data attributes) or
`--screenshot`. Following a top tile's link is loading its `#tile-N` address, which is what the
click does. Without chromium these tests skip, except where CANCERNET_REQUIRE_BROWSER=1 (CI)."""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image
from test_wsi import ckpt, predict, regions, slide  # noqa: F401  (fixtures)

from cancernet.wsi.synthetic import write_slide

pytestmark = pytest.mark.slow
WINDOW = (1000, 700)


@pytest.fixture(scope="module")
def chromium():
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CANCERNET_REQUIRE_BROWSER") == "1":
            pytest.fail("CANCERNET_REQUIRE_BROWSER=1 but there is no chromium (apt-get install chromium)")
        pytest.skip("needs chromium (apt-get install chromium)")
    return found


def browse(chromium, url: str, tmp_path, screenshot: bool = False):
    """The DOM after the page's scripts ran, or a screenshot (an RGB array) of the window."""
    shot = tmp_path / f"shot{time.monotonic_ns()}.png"
    what = [f"--screenshot={shot}", f"--window-size={WINDOW[0]},{WINDOW[1]}"] if screenshot else ["--dump-dom"]
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000", *what, url]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    return np.asarray(Image.open(shot).convert("RGB")).astype(float) if screenshot else result.stdout


def body(dom: str) -> dict:
    """<body>'s data attributes."""
    tag = re.search(r"<body([^>]*)>", dom).group(1)
    return dict(re.findall(r'data-([\w-]+)="([^"]*)"', tag))


def serve(out):
    from cancernet.wsi.viewer import make_server

    server = make_server(out, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="module")
def served(ckpt, slide, tmp_path_factory):  # noqa: F811
    """predict-slide over two slides (the known tumour, and tissue without one), served."""
    from cancernet.cli import main

    path, tissue, _ = slide
    root = tmp_path_factory.mktemp("view")
    write_slide(root / "clear.tif", tissue, np.zeros_like(tissue), mpp=0.486, seed=8)
    shutil.copy(path, root / "case.tif")
    code = main(["predict-slide", str(root / "case.tif"), str(root / "clear.tif"), "--checkpoint", str(ckpt),
                 "--out", str(root / "out"), "--device", "cpu", "--num-workers", "0", "--geojson"])  # fmt: skip
    assert code == 0
    server, url = serve(root / "out")
    yield url, root / "out"
    server.shutdown()


def test_the_index_lists_every_slide_with_its_probability_in_order(chromium, served, tmp_path):
    url, out = served
    dom = browse(chromium, url + "/", tmp_path)
    rows = re.findall(r'<tr class="slide" data-name="([^"]+)" data-prob="([\d.]+)"', dom)
    scores = {d.name: json.loads((d / "slide.json").read_text())["score"] for d in out.iterdir() if d.is_dir()}
    assert [name for name, _ in rows] == sorted(scores, key=lambda n: -scores[n]) and len(rows) == 2
    assert all(float(p) == pytest.approx(scores[name], abs=1e-6) for name, p in rows)
    assert body(dom)["errors"] == ""


def test_a_slide_page_loads_clean_and_its_overlay_is_hot_on_the_tumour_and_clear_on_glass(chromium, served, tmp_path):
    url, out = served
    summary = json.loads((out / "case" / "slide.json").read_text())
    dom = browse(chromium, f"{url}/slide/case", tmp_path)
    assert body(dom)["errors"] == "" and body(dom)["ready"] == "1", body(dom)
    if os.environ.get("CANCERNET_VIEWER_SCREENSHOT"):  # docs/img/viewer.png is this page, as the test sees it
        Image.fromarray(browse(chromium, f"{url}/slide/case", tmp_path, True).astype(np.uint8)).save(
            os.environ["CANCERNET_VIEWER_SCREENSHOT"]
        )
    cell = summary["cell_um"] / summary["mpp"]  # a cell's side in level-0 pixels
    _, tumour = regions()
    r, c = np.argwhere(tumour).mean(0)  # the tumour region's centre, in cells
    width = 12 * cell  # 12 cells across the ~700 px view: a cell is ~58 px
    view_centre = ((WINDOW[0] - 300) // 2, 35 + (WINDOW[1] - 35) // 2)  # the viewer left of a 300 px panel

    def overlay_change(x, y) -> float:
        """Mean |pixel change| near the view's centre between the overlay at 0.7 and at 0."""
        on, off = (browse(chromium, f"{url}/slide/case#view={x},{y},{width},{o}", tmp_path, True) for o in (0.7, 0))
        cx, cy = view_centre
        box = (slice(cy - 10, cy + 10), slice(cx - 10, cx + 10))
        return float(np.abs(on[box] - off[box]).mean())

    hot = overlay_change((c + 0.5) * cell, (r + 0.5) * cell)
    glass = overlay_change(0.5 * cell, 0.5 * cell)  # the slide's top-left cell: glass
    assert hot > 40 and glass < 2, (hot, glass)


def test_following_a_top_tile_link_centres_the_view_on_that_tile(chromium, served, tmp_path):
    url, out = served
    page = browse(chromium, f"{url}/slide/case", tmp_path)
    tiles = re.findall(r'href="#tile-(\d+)" data-x="(\d+)" data-y="(\d+)" data-size="([\d.]+)"', page)
    assert len(tiles) == 10
    start = float(body(page)["zoom"])
    for i in ("0", "7"):
        _, x, y, size = next(t for t in tiles if t[0] == i)
        dom = browse(chromium, f"{url}/slide/case#tile-{i}", tmp_path)
        cx, cy = map(float, body(dom)["center"].split(","))
        centre = (float(x) + float(size) / 2, float(y) + float(size) / 2)
        assert abs(cx - centre[0]) <= float(size) and abs(cy - centre[1]) <= float(size), (i, cx, cy, centre)
        assert float(body(dom)["zoom"]) > 2 * start and body(dom)["errors"] == ""


def _get(url: str, path: str) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request("GET", path)  # as written: no client-side normalisation of `..`
    response = connection.getresponse()
    return response.status, response.read()


def test_only_the_folders_files_and_its_slides_are_served(served):
    url, out = served
    assert _get(url, "/files/case/slide.json")[0] == 200
    for path in (
        "/files/case/../../../../etc/passwd",
        "/files/../out/case/slide.json",
        "/files//etc/passwd",
        "/files/case//etc/passwd",
        "/static/../viewer.py",
        "/static/%2e%2e/viewer.py",
        "/dzi/..%2f..%2fetc.dzi",
        "/dzi/nonexistent.dzi",
        "/slide/../../etc/passwd",
        "/etc/passwd",
    ):
        status, data = _get(url, path)
        assert status == 404 and b"root:" not in data, path


def test_a_hundred_concurrent_tile_requests_all_answer_with_at_most_max_threads_at_once(served):
    from cancernet.wsi import viewer

    url, out = served
    active, peak, lock = [0], [0], threading.Lock()
    original = viewer.Handler._deepzoom

    def counted(self, parts):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            time.sleep(0.05)  # long enough that requests overlap
            return original(self, parts)
        finally:
            with lock:
                active[0] -= 1

    viewer.Handler._deepzoom = counted
    try:
        dzi = _get(url, "/dzi/case.dzi")[1].decode()
        levels = int(np.ceil(np.log2(max(map(int, re.findall(r'(?:Width|Height)="(\d+)"', dzi)))))) + 1
        paths = [f"/dzi/case_files/{levels - 1}/{k % 10}_{k // 10 % 7}.jpeg" for k in range(100)]  # 70 tiles
        start = time.perf_counter()
        with ThreadPoolExecutor(100) as pool:
            answers = list(pool.map(lambda p: _get(url, p), paths))
        elapsed = time.perf_counter() - start
    finally:
        viewer.Handler._deepzoom = original
    assert all(status == 200 and data[:2] == b"\xff\xd8" for status, data in answers)  # JPEGs, every one
    assert 1 < peak[0] <= viewer.MAX_THREADS and elapsed < 60, (peak[0], elapsed)


def test_a_slide_that_cannot_be_read_costs_its_page_one_line_and_the_rest_works(chromium, served, tmp_path):
    url, out = served
    broken = tmp_path / "out"
    shutil.copytree(out, broken)
    summary = json.loads((broken / "clear" / "slide.json").read_text())
    summary["slide"] = str(tmp_path / "moved_away.tif")
    (broken / "clear" / "slide.json").write_text(json.dumps(summary))
    server, here = serve(broken)
    try:
        page = browse(chromium, f"{here}/slide/clear", tmp_path)
        assert re.search(r'<p class="error">slide .*moved_away.tif.*</p>', page)
        assert body(browse(chromium, f"{here}/slide/case", tmp_path))["ready"] == "1"
        assert len(re.findall(r'<tr class="slide"', browse(chromium, here + "/", tmp_path))) == 2
    finally:
        server.shutdown()


def test_a_slide_level_models_output_shows_its_attention_layer(chromium, tmp_path):
    """predict-slide with a MIL checkpoint (test_slide_mil's run): the page's layer is the attention."""
    from test_slide_mil import patch_checkpoint

    from cancernet.cli import main
    from cancernet.wsi.synthetic import write_slide_set

    write_slide_set(tmp_path / "s", 8, rows=16, cols=20, seed=5)
    backbone = patch_checkpoint(tmp_path / "patch.pt", seed=0)
    common = ("--device", "cpu", "--num-workers", "0")
    assert main(["extract-features", str(tmp_path / "s" / "slides"), "--out", str(tmp_path / "f"),
                 "--checkpoint", str(backbone), *common]) == 0  # fmt: skip
    assert main(["train", "--config", "mil", f"data.features={tmp_path / 'f'}",
                 f"data.slides_csv={tmp_path / 's' / 'slides.csv'}", f"train.out_dir={tmp_path / 'mil'}",
                 "train.steps=4", "train.device=cpu", "train.amp=off", "data.num_workers=0",
                 "data.val_fraction=0.25", "data.test_fraction=0.25", "report.bootstrap=10"]) == 0  # fmt: skip
    best = tmp_path / "mil" / "checkpoints" / "best.pt"
    assert main(["predict-slide", str(tmp_path / "s" / "slides"), "--checkpoint", str(best),
                 "--out", str(tmp_path / "dx"), *common]) == 0  # fmt: skip
    server, url = serve(tmp_path / "dx")
    try:
        dom = browse(chromium, f"{url}/slide/slide_000", tmp_path)
        assert "attention (percentile within the slide)" in dom and body(dom)["errors"] == ""
        status, png = _get(url, "/overlay/slide_000.png")
        assert status == 200 and png[:4] == b"\x89PNG"
        grid = json.loads((tmp_path / "dx" / "slide_000" / "slide.json").read_text())["grid"]
        layer = np.asarray(Image.open(io.BytesIO(png)))
        assert layer.shape[:2] == tuple(grid) and layer[..., 3].max() > 0  # one pixel per cell, visible
    finally:
        server.shutdown()


def test_an_evaluate_slides_output_outlines_the_given_tumour_mask_on_its_cells(chromium, served, ckpt, tmp_path):  # noqa: F811
    """evaluate-slides with --masks keeps each mask on the map's cell grid; the page draws its outline."""
    from cancernet.cli import main

    url, out = served
    _, tumour = regions()
    slides = [json.loads((out / n / "slide.json").read_text())["slide"] for n in ("case", "clear")]
    summary = json.loads((out / "case" / "slide.json").read_text())
    (tmp_path / "masks").mkdir()
    Image.fromarray((tumour * 255).astype(np.uint8)).save(tmp_path / "masks" / "case.png")  # a pixel per cell
    (tmp_path / "labels.csv").write_text("slide,label\ncase,1\nclear,0\n")
    downsample = summary["cell_um"] / summary["mpp"]
    assert main(["evaluate-slides", *slides, "--checkpoint", str(ckpt), "--labels", str(tmp_path / "labels.csv"),
                 "--masks", str(tmp_path / "masks"), "--mask-downsample", str(downsample),
                 "--out", str(tmp_path / "eval"), "--device", "cpu", "--num-workers", "0"]) == 0  # fmt: skip
    assert (np.load(tmp_path / "eval" / "case" / "mask_cells.npy") == tumour).all()
    assert not (tmp_path / "eval" / "clear" / "mask_cells.npy").exists()  # no mask given for it
    server, here = serve(tmp_path / "eval")
    try:
        dom = browse(chromium, f"{here}/slide/case", tmp_path)
        assert "the given tumour mask: magenta outline" in dom and body(dom)["errors"] == ""
        status, png = _get(here, "/truth/case.png")
        outline = np.asarray(Image.open(io.BytesIO(png)))[..., 3] > 0
        rows, cols = np.nonzero(outline)
        inside = np.argwhere(tumour)
        assert status == 200 and outline.shape == (4 * tumour.shape[0], 4 * tumour.shape[1])
        assert rows.min() // 4 == inside[:, 0].min() and rows.max() // 4 == inside[:, 0].max()  # around the region
        assert cols.min() // 4 == inside[:, 1].min() and cols.max() // 4 == inside[:, 1].max()
        assert outline.sum() < 0.5 * 16 * tumour.sum()  # an outline, not the filled region
        assert _get(here, "/truth/clear.png")[0] == 404
    finally:
        server.shutdown()
