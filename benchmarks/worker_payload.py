"""What each loader worker is sent when a loader starts its workers: the pickled dataset of a
packed split. A pack of 220,025 ids (the full Kaggle set), a 15% split of it (validation).

    python benchmarks/worker_payload.py
"""

import hashlib
import pickle
from pathlib import Path

import numpy as np

from cancernet.data.datasets import PackedDataset
from cancernet.data.packed import Pack

n = 220_025
ids = [hashlib.sha1(str(i).encode()).hexdigest() for i in range(n)]
pack = Pack(Path("/unused"), ids, np.zeros(n, np.int64), {}, 128)
split = ids[: int(0.15 * n)]
dataset = PackedDataset(pack, split, np.zeros(len(split), np.int64))
print(f"{len(split)} of {n} ids: {len(pickle.dumps(dataset)) / 2**20:.2f} MiB pickled per worker")
