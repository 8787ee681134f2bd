"""The same measurement as epoch_boundary.py against the code before issue 10 (commit 10ea1e3):
    git worktree add /tmp/old 10ea1e3
    (cd /tmp/old && python -c "...prepare with data.packed_dir=DATA_ROOT/packed_old...")
    (cd /tmp/old && python /path/to/epoch_boundary_before.py DATA_ROOT)"""
import json
import sys
import tempfile
import time
sys.path.insert(0, "/tmp/old")
from cancernet.config import load_config
from cancernet.distributed import DistInfo
from cancernet.runner import build
from cancernet.engine import evaluate
from cancernet.data.loaders import set_epoch
root = sys.argv[1]
with tempfile.TemporaryDirectory() as tmp:
    cfg = load_config("/tmp/old/configs/base.yaml", [f"data.root={root}", "data.packed_dir=/tmp/b20k/packed_old", "model.pretrained=none", "model.arch=resnet18",
                      "train.device=cpu", "train.amp='off'", "data.num_workers=2", f"train.out_dir={tmp}", "train.batch_size=128"])
    t = build(cfg, DistInfo())
    split = t.loaders["train"]
    for param in t.model_without_ddp.parameters():  # one step, so the optimizer holds its moments as in training
        param.grad = param.detach() * 0 + 1e-3
    t.optimizer.step()
    out = {"code": "before (10ea1e3)"}
    for epoch in range(2):
        set_epoch(split, epoch)
        start = time.perf_counter(); it = iter(split.loader); next(it); out[f"first_batch_s_epoch{epoch + 1}"] = round(time.perf_counter() - start, 3)
        del it
    start = time.perf_counter(); t.save("last.pt"); t.save("best.pt"); out["ckpt_s"] = round(time.perf_counter() - start, 3)
    start = time.perf_counter()
    evaluate(t.model_without_ddp, t.loaders["val"].loader, t.dist, "off", t.loaders["val"].device_augment)
    out["val_s"] = round(time.perf_counter() - start, 3); out["val_images"] = len(t.loaders["val"].ids)
    print(json.dumps(out))
