"""Slide-level recipes on a real-patch cohort: the shipped command per cohort size, recipe and seed,
each best.pt scored on held-out slides, beside the patch model's own baselines.

    python benchmarks/mil_recipe.py COHORT FEATS OUT --sizes 40 100 200 400 --seeds 0 1 2 3 4 \\
        --recipe shipped --recipe tuned:optim.lr=1e-3,train.steps=3000

COHORT: `benchmarks/real_slides.py cohort`'s folder (slides.csv: the training cohort, of which the
first N slides make the cohort of size N; test.csv: held-out slides sharing no patch with it).
FEATS: `extract-features --checkpoint PATCH_MODEL` over COHORT/slides (the same features for all).
Each run is `python train_ddp.py --config configs/mil.yaml data.features=FEATS
data.slides_csv=OUT/labels_N.csv train.seed=S [recipe overrides]` (its own validation and test
split out of the N slides); a finished run is not run again. Prints a markdown table: held-out
slide AUC, mean +- SD over the seeds, and the baselines with their 95% bootstrap intervals.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]


def run(feats: Path, labels: Path, out: Path, seed: int, overrides: list[str]) -> None:
    if (out / "report" / "metrics.json").is_file():
        return
    command = [
        sys.executable,
        str(ROOT / "train_ddp.py"),
        "--config",
        str(ROOT / "configs" / "mil.yaml"),
        f"data.features={feats}",
        f"data.slides_csv={labels}",
        f"train.out_dir={out}",
        f"train.seed={seed}",
        "train.progress=off",
        "report.figures=false",
        *overrides,
    ]
    subprocess.run(command, check=True, capture_output=True, cwd=ROOT)


def heldout_probs(best: Path, feats: Path, slides: list[str]) -> np.ndarray:
    """P(tumour) of each held-out slide by best.pt (at its temperature), from the stored features:
    what predict-slide gives on these slides, without extracting them again."""
    from cancernet.config import from_dict
    from cancernet.data.tile_features import TileFeatures, path_of
    from cancernet.models.mil import build_mil

    state = torch.load(best, weights_only=True)
    model = build_mil(from_dict(state["config"]).model.mil, state["feature_dim"]).eval()
    model.load_state_dict(state["model"])
    temperature = float(state.get("temperature") or 1.0)
    probs = []
    with torch.no_grad():
        for slide in slides:
            bag = torch.from_numpy(TileFeatures(path_of(feats, slide)).features().astype(np.float32))[None]
            probs.append(float(torch.sigmoid(model(bag)[0][0] / temperature)))
    return np.array(probs)


def baselines(feats: Path, cohort: pd.DataFrame, test: pd.DataFrame, seed: int) -> dict[str, np.ndarray]:
    """The held-out slides' scores by the patch head's poolings and by the mean-feature logistic
    regression fitted on the whole cohort."""
    from cancernet.evaluate.slide_baselines import mean_feature_scores, patch_head_scores

    head = patch_head_scores(feats, list(test["slide"]))
    scores = {f"patch head, {c}": head[c].to_numpy() for c in head.columns} if head is not None else {}
    train = cohort.rename(columns={"slide": "id"})
    scores["mean feature, logistic regression"] = mean_feature_scores(feats, train, list(test["slide"]), seed)
    return scores


def interval(labels: np.ndarray, scores: np.ndarray) -> str:
    from cancernet.evaluate.metrics import bootstrap_cis

    lo, hi = bootstrap_cis(labels, scores, {}, 1000, 0)["roc_auc"]
    return f"{roc_auc_score(labels, scores):.3f} [{lo:.3f}, {hi:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("cohort", type=Path)
    parser.add_argument("feats", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--sizes", type=int, nargs="+", default=[40, 100, 200, 400])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--recipe", action="append", required=True, help="NAME[:key=value,key=value]")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    slides, test = pd.read_csv(args.cohort / "slides.csv"), pd.read_csv(args.cohort / "test.csv")
    labels = test["label"].to_numpy()
    rows = []
    for size in args.sizes:
        cohort = slides.head(size)
        cohort.to_csv(args.out / f"labels_{size}.csv", index=False)
        for name, score in baselines(args.feats, cohort, test, 0).items():
            rows.append({"recipe": name, "size": size, "seed": None, "heldout_auc": roc_auc_score(labels, score)})
            print(f"n={size} {name}: held-out AUC {interval(labels, score)}", flush=True)
        for recipe in args.recipe:
            name, _, given = recipe.partition(":")
            overrides = [o for o in given.split(",") if o]
            for seed in args.seeds:
                out = args.out / name / f"n{size}" / f"seed{seed}"
                run(args.feats, args.out / f"labels_{size}.csv", out, seed, overrides)
                probs = heldout_probs(out / "checkpoints" / "best.pt", args.feats, list(test["slide"]))
                summary = pd.read_csv(out / "summary.csv")
                metrics = json.loads((out / "report" / "metrics.json").read_text())
                rows.append(
                    {
                        "recipe": name,
                        "size": size,
                        "seed": seed,
                        "heldout_auc": roc_auc_score(labels, probs),
                        "run_test_auc": metrics["roc_auc"],
                        "best_epoch": metrics["run"]["best_epoch"],
                        "epochs": len(summary),
                        "train_s": summary["epoch_s"].sum(),
                    }
                )
                print(f"n={size} {name} seed {seed}: held-out AUC {interval(labels, probs)}", flush=True)
    frame = pd.DataFrame(rows)
    frame.to_csv(args.out / "results.csv", index=False)
    table = frame.groupby(["size", "recipe"], sort=False)["heldout_auc"].agg(["mean", "std", "min", "max", "count"])
    print(table.round(3).to_string())


if __name__ == "__main__":
    main()
