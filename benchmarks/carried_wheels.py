"""The packages the GPU check needs beyond a bare GPU image (torch, numpy, pandas, ... are there),
carried to it as wheels, since the lent machine reaches no registry.

    python benchmarks/carried_wheels.py download .whl               # here: wheels for the GPU image's Python
    python benchmarks/carried_wheels.py download DIR --python-version 3.11
    python benchmarks/carried_wheels.py install .whl /tmp/cancernet-site   # there (gpu_check.sh's first step)

`install` installs, from DIR only (no index), each of them that this Python lacks, into a folder
for PYTHONPATH; a package that is neither installed nor carried is one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

# module -> distribution: what gpu_check.sh imports (pytest for the CUDA tests, the slide row)
NEEDED = {
    "pytest": "pytest",
    "pytest_timeout": "pytest-timeout",
    "tifffile": "tifffile",
    "openslide": "openslide-python",
    "openslide_bin": "openslide-bin",
}
# what those need that a bare image may lack too (installed only where missing, so never a second copy)
SUPPORT = ("iniconfig", "pluggy", "packaging", "pygments")
# the GPU image: Python 3.12 on x86-64 Linux (the device tool's KINDS.md)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def download(dest: Path, python_version: str) -> None:
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(dest)]
    cmd += ["--python-version", python_version, "--implementation", "cp", *platforms]
    subprocess.run([*cmd, *NEEDED.values(), *SUPPORT], check=True)
    for wheel in sorted(dest.glob("*.whl")):
        print(f"{wheel.stat().st_size / 2**20:6.2f} MiB  {wheel.name}")


def install(source: Path, target: Path) -> int:
    wheels = {normal(w.name.split("-")[0]): w for w in source.glob("*.whl")} if source.is_dir() else {}
    missing = [d for d in (*NEEDED.values(), *SUPPORT) if not installed(d)]
    absent = [d for d in missing if normal(d) not in wheels and d in NEEDED.values()]
    if absent:
        print(
            f"gpu_check: {', '.join(absent)} neither installed nor carried in {source}/: run "
            f"`python benchmarks/carried_wheels.py download {source}` here and name {source} in the run's carry",
            file=sys.stderr,
        )
        return 2
    chosen = [str(wheels[normal(d)]) for d in missing if normal(d) in wheels]
    if chosen:
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
        subprocess.run([*pip, "--upgrade", "--target", str(target), *chosen], check=True)
        print(f"installed from carried wheels into {target}: {', '.join(Path(c).name for c in chosen)}")
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    broken = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if broken:
        print(f"gpu_check: {', '.join(broken)} still not importable after the install", file=sys.stderr)
        return 2
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    get = sub.add_parser("download")
    get.add_argument("dest", type=Path)
    get.add_argument("--python-version", default="3.12")
    put = sub.add_parser("install")
    put.add_argument("source", type=Path)
    put.add_argument("target", type=Path)
    args = parser.parse_args()
    if args.what == "download":
        download(args.dest, args.python_version)
        return 0
    return install(args.source, args.target)


if __name__ == "__main__":
    sys.exit(main())
