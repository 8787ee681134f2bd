"""`python -m cancernet aggregate RUN_DIR... [--out DIR]`: one report over runs of the same kind
(seeds and/or folds): each metric's mean, SD and per-run values, the out-of-fold validation AUC
from the runs' pooled validation predictions, each run's test metrics with their intervals.
Runs that differ in anything but the seed and the fold are refused, naming the keys.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from matplotlib.figure import Figure

from cancernet.engine.rundir import RunDir
from cancernet.evaluate.metrics import CALIBRATION, HEADLINE, METRICS, OPERATING, roc_auc
from cancernet.runtime.atomic import atomic_path, write_text
from cancernet.runtime.errors import UserError

# what may differ between the runs of one aggregate (the seed and fold, where each run lives, how it read)
MAY_DIFFER = {
    "train.seed",
    "data.fold",
    "train.out_dir",
    "train.resume",
    "train.overwrite",
    "wandb.name",
    "data.num_workers",  # how the data is read, not what: results do not depend on it
    "train.progress",
}
SUMMARISED = (*HEADLINE, *CALIBRATION)  # each run's, at 0.5; and OPERATING at its val-chosen threshold


def _flat(config: dict) -> dict:
    return {
        f"{section}.{key}": value
        for section, values in config.items()
        if section != "meta"
        for key, value in (values or {}).items()
    }


def differing(configs: list[dict]) -> dict[str, list]:
    """key -> the runs' values, for every key besides MAY_DIFFER whose values are not all equal."""
    flat = [_flat(c) for c in configs]
    keys = sorted(set().union(*flat) - MAY_DIFFER)
    return {k: [f.get(k) for f in flat] for k in keys if len({json.dumps(f.get(k)) for f in flat}) > 1}


def _load(root: Path) -> dict:
    run = RunDir(root)
    if not run.metrics.is_file():
        raise UserError(f"{root} holds no finished run (no report/metrics.json)")
    return {
        "root": str(root),
        "config": yaml.safe_load(run.config.read_text()),
        "metrics": json.loads(run.metrics.read_text()),
        "val": pd.read_csv(run.predictions("val"), dtype={"id": str}),
    }


def aggregate(roots: list[str | Path], out: str | Path) -> dict:
    """Write out/aggregate.json, aggregate.html and aggregate.png; returns the summary."""
    runs = [_load(Path(r)) for r in roots]
    if len(runs) < 2:
        raise UserError("aggregate needs at least two runs")
    differ = differing([r["config"] for r in runs])
    if differ:
        shown = "; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in list(differ.items())[:6])
        raise UserError(
            f"these runs differ in more than seed and fold, so one report over them would mix recipes: {shown}"
        )
    rows = []
    for r in runs:
        m, cfg = r["metrics"], r["config"]
        row = {"run": r["root"], "seed": cfg["train"]["seed"], "fold": cfg["data"].get("fold", 0), "n_test": m["n"]}
        row.update({k: m.get(k) for k in SUMMARISED})
        row.update({f"{k}_ci": m.get(f"{k}_ci") for k in SUMMARISED if METRICS[k].interval})
        row.update({f"val_threshold_{k}": m["at_val_threshold"][k] for k in OPERATING})
        rows.append(row)
    per_run = pd.DataFrame(rows)
    summary = {"runs": len(runs), "metrics": {}}
    for key in (*SUMMARISED, *(f"val_threshold_{k}" for k in OPERATING)):
        values = per_run[key].astype(float)
        summary["metrics"][key] = {
            "mean": float(values.mean()),
            "sd": float(values.std(ddof=1)),
            "values": values.tolist(),
        }
    pooled = pd.concat([r["val"] for r in runs])
    k = int(runs[0]["config"]["data"].get("folds", 1))
    by_seed = per_run.groupby("seed")["fold"].apply(sorted)
    oof = k > 1 and all(folds == list(range(k)) for folds in by_seed)  # each seed ran every fold once
    once = " once per seed" if len(by_seed) > 1 else " once"
    one, many = ("slide", "slides") if runs[0]["metrics"].get("level") == "slide" else ("patch", "patches")
    summary["validation"] = {
        "pooled_auc": roc_auc(pooled["label"].to_numpy(), pooled["prob"].to_numpy()),
        "unit": many,  # MIL runs score slides
        "patches": len(pooled),  # of the unit (the key kept for readers of older files)
        "unique_patches": int(pooled["id"].nunique()),
        "kind": f"out-of-fold: every train+val {one}{once}, scored by the run that did not train on it"
        if oof
        else f"pooled over the runs ({many} may repeat: seeds share their validation split)",
    }
    summary["per_run"] = rows
    out = Path(out)
    write_text(out / "aggregate.json", json.dumps(summary, indent=1))
    figure = _figure(per_run)
    with atomic_path(out / "aggregate.png") as tmp:
        figure.savefig(tmp, dpi=110, format="png")
    write_text(out / "aggregate.html", _page(summary))
    return summary


def _figure(per_run: pd.DataFrame) -> Figure:
    fig = Figure(figsize=(6.5, 3.8), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(per_run))
    auc = per_run["roc_auc"].astype(float).to_numpy()
    cis = np.array([ci if ci else [a, a] for ci, a in zip(per_run["roc_auc_ci"], auc)])
    ax.errorbar(x, auc, yerr=[auc - cis[:, 0], cis[:, 1] - auc], fmt="o", capsize=4, label="test AUC, 95% CI")
    mean, sd = auc.mean(), auc.std(ddof=1)
    ax.axhline(mean, color="C3", label=f"mean {mean:.3f} (SD {sd:.3f})")
    ax.axhspan(mean - sd, mean + sd, color="C3", alpha=0.15)
    ax.set_xticks(x, [f"seed {s}\nfold {f}" for s, f in zip(per_run["seed"], per_run["fold"])], fontsize=8)
    ax.set(title="Test ROC AUC per run", ylabel="ROC AUC")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def _page(summary: dict) -> str:
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{v['mean']:.4f}</td><td>{v['sd']:.4f}</td>"
        f"<td>{', '.join(f'{x:.4f}' for x in v['values'])}</td></tr>"
        for k, v in summary["metrics"].items()
    )
    val = summary["validation"]
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>cancernet aggregate</title></head><body>"
        f"<h1>{summary['runs']} runs</h1><p>validation AUC {val['pooled_auc']:.4f} ({html.escape(val['kind'])}; "
        f"{val['unique_patches']} {val.get('unit', 'patches')})</p>"
        "<table border=1><tr><th>metric</th><th>mean</th><th>SD</th><th>per run</th></tr>"
        f"{rows}</table><img src='aggregate.png'></body></html>\n"
    )
