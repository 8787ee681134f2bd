"""The viewer's HTML: the index of an output folder's slides and a slide's page (wsi/viewer.py serves them;
`catalogue` is its Catalogue)."""

from __future__ import annotations

import html
import json

from cancernet.runtime.errors import DataError


def _page(title: str, body: str, head: str = "") -> bytes:
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style>{head}</head>"
        f"<body data-errors=''>{body}{ERRORS_JS}</body></html>"
    ).encode()


STYLE = """
body{font-family:system-ui,sans-serif;margin:0;color:#222}
header{padding:8px 16px;background:#333;color:#eee}header a{color:#9cf}
table{border-collapse:collapse;margin:12px 16px}td,th{padding:4px 10px;border-bottom:1px solid #ddd;text-align:left}
img.thumb{max-height:80px;max-width:140px}#filter{margin:12px 16px;padding:4px;width:240px}
#main{display:flex;height:calc(100vh - 40px)}#view{flex:1;background:#eee}
#side{width:300px;padding:10px 14px;overflow:auto;font-size:14px}
.bar{height:12px;border:1px solid #999}.scale{display:flex;justify-content:space-between;font-size:12px}
.error{color:#b00;padding:16px}
"""
# every page records script errors and failed tiles where a reader (or a test) sees them
ERRORS_JS = """<script>
function noteError(m){document.body.dataset.errors+=(document.body.dataset.errors?' | ':'')+m}
window.addEventListener('error',function(e){noteError(e.message)});
var _ce=console.error;console.error=function(){noteError([].join.call(arguments,' '));_ce.apply(console,arguments)};
</script>"""


def index_page(catalogue) -> bytes:
    names = sorted(catalogue.summaries, key=lambda n: -catalogue.prob(n))
    labelled = bool(catalogue.labels)
    rows = []
    for name in names:
        s = catalogue.summaries[name]
        label = catalogue.labels.get(name)
        thumb = (
            f"<img class='thumb' src='/files/{name}/thumbnail.jpg' alt=''>"
            if catalogue.file(f"{name}/thumbnail.jpg")
            else ""
        )
        rows.append(
            f"<tr class='slide' data-name='{html.escape(name)}' data-prob='{catalogue.prob(name):.6f}'>"
            f"<td>{thumb}</td><td><a href='/slide/{html.escape(name)}'>{html.escape(name)}</a></td>"
            f"<td>{catalogue.prob(name):.3f}</td>"
            + (f"<td>{'' if label is None else int(label)}</td>" if labelled else "")
            + f"<td>{s.get('tiles', '')}</td></tr>"
        )
    kind = "P(tumour), slide-level model" if any(map(catalogue.is_mil, names)) else "slide score"
    head = (
        "<tr><th></th><th>slide</th><th>"
        + kind
        + "</th>"
        + ("<th>label</th>" if labelled else "")
        + "<th>tiles</th></tr>"
    )
    body = (
        f"<header>cancernet view: {html.escape(str(catalogue.out))} ({len(names)} slides)</header>"
        "<input id='filter' placeholder='filter by name' oninput='filterRows(this.value)'>"
        f"<table id='slides'>{head}{''.join(rows)}</table>"
        "<script>function filterRows(q){document.querySelectorAll('tr.slide').forEach(function(r){"
        "r.style.display=r.dataset.name.indexOf(q)>=0?'':'none'})}</script>"
    )
    return _page("cancernet view", body)


def slide_page(catalogue, name: str) -> bytes:
    s = catalogue.summaries[name]
    try:
        zoom = catalogue.deepzoom(name)
    except DataError as e:  # one line on its page; the index and the other slides work
        return _page(name, f"<header><a href='/'>all slides</a></header><p class='error'>{html.escape(str(e))}</p>")
    width, height = zoom.level_dimensions[-1]
    rows, cols = s["grid"]
    cell_px = s["cell_um"] / s["mpp"]
    mil = catalogue.is_mil(name)
    facts = [("P(tumour)" if mil else f"score ({s.get('score_kind', '')})", f"{catalogue.prob(name):.3f}")]
    if name in catalogue.labels:
        facts.append(("label", str(int(catalogue.labels[name]))))
    if s.get("threshold") is not None:
        facts.append(("operating threshold (validation)", f"{s['threshold']:.3f}"))
    if s.get("tumour_area_mm2") is not None:
        facts.append(("tumour area at it", f"{s['tumour_area_mm2']:.3f} mm²"))
    facts += [("tiles scored", str(s.get("tiles", ""))), ("microns per pixel (level 0)", f"{s['mpp']:.3f}")]
    top = catalogue.top_tiles(name)
    tiles = "".join(
        f"<li><a class='tile' href='#tile-{i}' data-x='{t['x']}' data-y='{t['y']}' data-size='{t['size']:.1f}'>"
        f"({t['x']}, {t['y']}): {t['what']} {t['value']:.3g}</a></li>"
        for i, t in enumerate(top)
    )
    layer = "attention (percentile within the slide)" if mil else "P(tumour)"
    cmap = "#440154,#3b528b,#21918c,#5ec962,#fde725" if mil else "#000004,#57106e,#bc3754,#f98e09,#fcffa4"
    config = {
        "dzi": f"/dzi/{name}.dzi",
        "overlay": f"/overlay/{name}.png" if catalogue.layer(name) is not None else None,
        "regions": f"/regions/{name}.png" if catalogue.file(f"{name}/tumour.geojson") else None,
        "truth": f"/truth/{name}.png" if catalogue.file(f"{name}/mask_cells.npy") else None,
        "overlayWidth": cols * cell_px / width,  # viewport units: the slide is 1 wide
        "slideWidth": width,
        "slideHeight": height,
    }
    side = (
        f"<h3>{html.escape(name)}</h3><table>"
        + "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in facts)
        + f"</table><p>{layer}: opacity <input id='opacity' type='range' min='0' max='1' step='0.05' value='0.7'></p>"
        f"<div class='bar' style='background:linear-gradient(to right,{cmap})'></div>"
        "<div class='scale'><span>0</span><span>0.5</span><span>1</span></div>"
        "<p>clear below 0.1, full from 0.5"
        + (" (tumour regions at the threshold: cyan outlines)" if config["regions"] else "")
        + (" (the given tumour mask: magenta outline)" if config["truth"] else "")
        + "</p>"
        f"<h4>top tiles</h4><ol id='tiles'>{tiles}</ol>"
    )
    body = (
        f"<header><a href='/'>all slides</a> / {html.escape(name)}</header>"
        f"<div id='main'><div id='view'></div><div id='side'>{side}</div></div>"
        "<script src='/static/openseadragon/openseadragon.min.js'></script>"
        f"<script>var CONFIG={json.dumps(config)};</script><script src='/static/viewer.js'></script>"
    )
    return _page(name, body)
