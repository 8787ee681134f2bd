"""The collective helpers on 2 real gloo processes (spawned, a few seconds)."""

import os
import time

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from cancernet.config import Config
from cancernet.engine import checkpoint
from cancernet.engine.inference import Predictor, sha256_of
from cancernet.models.classifier import build_for_weights
from cancernet.runtime.distributed import DistInfo, broadcast_buffers, gather_objects, gather_rows, session


def _worker(rank: int, world: int, init_file: str, ckpt: str, results) -> None:
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    dist = DistInfo(rank=rank, world_size=world)
    try:
        # 5 rows over 2 ranks (3 + 2): what ShardSampler gives; no padded row may come back
        rows = torch.arange(rank, 5, world, dtype=torch.float64)[:, None].repeat(1, 3)
        gathered = gather_rows(rows, dist)
        # BatchNorm statistics that differ per rank, as after each rank's last training batch
        bn = torch.nn.BatchNorm1d(2)
        bn.running_mean.fill_(float(rank + 1))
        broadcast_buffers(bn, dist)
        # the final test: only rank 0 opens best.pt (rank 1's view of the shared filesystem may be
        # stale, here: the file does not exist for it); every rank then scores with its weights
        model = torch.nn.Linear(3, 2)
        shared = checkpoint.load_on_main(ckpt if rank == 0 else ckpt + ".missing", model, dist)
        # the inference handle (predict, predict-slide, export) the same way, with an override
        path = ckpt.replace("best.pt", "classifier.pt")
        predictor = Predictor.load(path if rank == 0 else path + ".missing", dist, ["slide.top_k=3"])
        results[rank] = {
            "predictor": {
                "sha256": predictor.sha256,
                "weights": float(sum(p.double().sum() for p in predictor.model.state_dict().values())),
                "top_k": predictor.cfg.slide.top_k,
                "temperature": predictor.temperature,
                "threshold": predictor.threshold(tta=False),
                "eval": not predictor.model.training,
            },
            "gathered": gathered.tolist(),
            "running_mean": bn.running_mean.tolist(),
            "objects": gather_objects({"rank": rank}, dist),
            "weight": model.weight.tolist(),
            "temperature": shared.temperature(),
            "has_optimizer": "optimizer" in shared.state,
        }
    finally:
        tdist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    manager = mp.Manager()
    results = manager.dict()
    folder = tmp_path_factory.mktemp("dist")
    weights = torch.nn.Linear(3, 2).state_dict()
    checkpoint.save(folder / "best.pt", {"model": weights, "config": {}, "temperature": 1.5, "optimizer": {"x": 1}})
    cfg = Config()
    cfg.model.arch, cfg.model.pretrained, cfg.data.image_size = "resnet18", "none", 32
    model = build_for_weights(cfg)
    point = {"threshold": 0.3, "tta": False, "temperature": 2.0}
    state = {"model": model.state_dict(), "config": cfg.to_dict(), "temperature": 2.0, "operating_point": point}
    checkpoint.save(folder / "classifier.pt", state)
    mp.spawn(_worker, args=(2, str(folder / "init"), str(folder / "best.pt"), results), nprocs=2, join=True)
    summed = float(sum(p.double().sum() for p in model.state_dict().values()))
    return dict(results) | {
        "saved": weights["weight"].tolist(),
        "classifier": (sha256_of(folder / "classifier.pt"), summed),
    }


def test_uneven_shards_gather_to_exactly_the_rows_there_are(two_ranks):
    for rank in (0, 1):
        firsts = [row[0] for row in two_ranks[rank]["gathered"]]
        assert firsts == [0.0, 2.0, 4.0, 1.0, 3.0]  # rank 0's rows, then rank 1's: none padded or repeated


def test_every_rank_validates_with_rank_0s_batchnorm_statistics(two_ranks):
    assert two_ranks[0]["running_mean"] == two_ranks[1]["running_mean"] == [1.0, 1.0]


def test_objects_are_gathered_in_rank_order(two_ranks):
    assert two_ranks[1]["objects"] == [{"rank": 0}, {"rank": 1}]


def test_only_rank_0_reads_the_final_checkpoint_and_every_rank_gets_its_weights(two_ranks):
    for rank in (0, 1):
        assert two_ranks[rank]["weight"] == two_ranks["saved"]
        assert two_ranks[rank]["temperature"] == 1.5
    assert not two_ranks[1]["has_optimizer"]  # the training state is not sent around


def test_the_inference_handle_is_read_by_rank_0_and_the_same_on_every_rank(two_ranks):
    sha, summed = two_ranks["classifier"]
    for rank in (0, 1):  # rank 1's path does not exist: it gets everything from rank 0
        p = two_ranks[rank]["predictor"]
        assert p["sha256"] == sha and p["weights"] == pytest.approx(summed, rel=1e-12)
        assert p["top_k"] == 3 and p["temperature"] == 2.0 and p["threshold"] == 0.3 and p["eval"]


def _leaving(rank: int, world: int, port: int, folder: str, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    with session("cpu"):
        if rank == 0:  # a last write that takes a while (last.pt on a slow filesystem)
            time.sleep(2.0)
            with open(f"{folder}/last.pt", "w") as f:
                f.write("whole")
            results["written"] = time.time()
    results[rank] = time.time()


def test_no_rank_leaves_the_session_before_rank_0_has_finished_writing(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_leaving, args=(2, port, str(tmp_path), results), nprocs=2, join=True)
    assert (tmp_path / "last.pt").read_text() == "whole"
    assert results[1] >= results["written"]  # rank 1 waited, although it had nothing left to do
