"""The GPU check's table from its bench.jsonl: the launch verdict first (host vs device time of
the shipped step), then each measurement, end to end as a share of the step ceiling, and the
recipe's end-to-end rate over the seed-like pipeline's.

    python benchmarks/gpu_summary.py OUT/bench.jsonl
"""

import json
import sys


def key(row: dict) -> tuple:
    return row.get("arch"), row["batch_size"], row.get("compile"), row.get("image_size")


def main(path: str) -> None:
    rows = [json.loads(line) for line in open(path) if line.startswith("{")]
    for r in (r for r in rows if r["bench"] == "launch"):
        print(
            f"launch {r['arch']} batch {r['batch_size']:4d} eager DDP step: host {r['host_ms']:.2f} ms to issue, "
            f"device {r['device_ms']:.2f} ms to run ({100 * r['host_share']:.0f}%): {r['verdict']}"
        )
    ceiling = {key(r): r["images_per_s"] for r in rows if r["bench"] == "step" and not r.get("ddp")}
    for r in (r for r in rows if r["bench"] != "launch"):
        if r["bench"] == "boundary":
            print(
                f"epoch boundary {r['arch']} {r['path']}: validation of {r['val_images']} images {r['val_s']} s, "
                f"checkpoint blocking {r['ckpt_s']} s"
            )
            continue
        if r["bench"] == "slide":
            print(
                f"slide {r['arch']:9s} {r['image_size']:3d} px batch {r['batch_size']:4d} {r['tiles']} tiles, "
                f"{r['num_workers']} readers: {r['tiles_per_s']:>8.0f} tiles/s, model waited for the reader "
                f"{100 * r['reader_wait_share']:.0f}% of the time"
            )
            continue
        extra = ""
        if r["bench"] == "train" and key(r) in ceiling:
            extra = f"  {100 * r['images_per_s'] / ceiling[key(r)]:.0f}% of the step ceiling"
        what = r.get("arch") or r.get("path")
        mode = (
            f"ddp, compiled {'around DDP' if r.get('compile_scope') == 'ddp' else 'inside DDP'}"
            if r.get("ddp") and r.get("compile")
            else f"compile={r.get('compile', '-')}"
        )
        print(
            f"{r['bench']:5s} {what!s:9s} {r['image_size']:3d} px batch {r['batch_size']:4d} {mode:26s} "
            f"augmented={r.get('augmented', '-')!s:5s} {r['images_per_s']:>10.0f} img/s{extra}"
        )
    ours = sorted(
        (r for r in rows if r["bench"] == "train" and r["path"] == "packed"), key=lambda r: r.get("arch") != "resnet34"
    )  # the recipe's arch when measured
    seed = [r for r in rows if r["bench"] == "train" and r["path"] == "folder"]
    if ours and seed:
        print(
            f"ours ({ours[0]['arch']}, packed, {ours[0]['image_size']} px) / seed-like (frozen resnet34, folder, "
            f"{seed[0]['image_size']} px) end to end: {ours[0]['images_per_s'] / seed[0]['images_per_s']:.1f}x"
        )


if __name__ == "__main__":
    main(sys.argv[1])
