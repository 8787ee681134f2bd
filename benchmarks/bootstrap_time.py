"""Time the bootstrap CIs of the report: 60,000 predictions, 1,000 resamples, two thresholds."""

import time

import numpy as np

from cancernet.evaluate.metrics import bootstrap_cis

rng = np.random.default_rng(1)
labels = rng.integers(0, 2, 60_000)
probs = np.clip(labels * 0.3 + rng.normal(0.35, 0.2, 60_000), 0, 1).astype(np.float32)
for _ in range(2):
    start = time.perf_counter()
    bootstrap_cis(labels, probs, {"at_0.5": 0.5, "at_val_threshold": 0.42}, resamples=1000)
    print(f"60,000 predictions x 1,000 resamples: {time.perf_counter() - start:.2f} s")
