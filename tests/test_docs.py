"""The shell blocks of README.md and docs/SLIDES.md run as written: in a fresh copy of the
repository, after the README's set-up line (`make demo`), in a clean shell with .venv active. A
block that needs what a CPU machine cannot have here (GPUs, a Slurm cluster, data to download,
the network) says so on its first line, `# needs: ...`, and is left out for that reason alone.
The run is `make test-docs` (CI runs it after `make test`; it takes minutes: the demo, then every
runnable block); the fast test below holds every block to the rule."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT

PAGES = ("README.md", "docs/SLIDES.md")
NEEDS = re.compile(r"^\s*# needs: (.+)$")
REASONS = ("data", "network", "GPUs", "cluster")


def blocks(page: str) -> list[str]:
    """The page's bash blocks, dedented (a block inside a list item is indented)."""
    found = re.findall(r"^( *)```bash\n(.*?)^ *```", (ROOT / page).read_text(), re.S | re.M)
    return ["\n".join(line[len(indent) :] for line in body.splitlines()) + "\n" for indent, body in found]


def needs(block: str) -> str | None:
    m = NEEDS.match(block.splitlines()[0])
    return m and m.group(1)


def test_every_shell_block_runs_or_says_what_it_needs():
    """README's first block is the set-up; every other block is run by test-docs unless its first
    line names what it needs, and only these reasons count."""
    assert "make demo" in blocks("README.md")[0]
    runnable = 0
    for page in PAGES:
        for block in blocks(page)[1 if page == "README.md" else 0 :]:
            reason = needs(block)
            if reason is None:
                runnable += 1
            else:
                assert any(r in reason for r in REASONS), f"{page}: '# needs: {reason}' names none of {REASONS}"
    assert runnable >= 3  # the pages do have blocks a new user can run as written


def _copy_of_the_repository(dest: Path) -> None:
    """The files a clone has (tracked and not ignored), modification times kept so that make finds
    .venv up to date; .venv itself linked: the set-up line's install, already done here."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True, text=True
    ).stdout
    for name in filter(None, listed.split("\0")):
        source, target = ROOT / name, dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():  # configs -> cancernet/configs, as git keeps it
            target.symlink_to(os.readlink(source))
        elif source.is_file():
            shutil.copy2(source, target)
    (dest / ".venv").symlink_to(ROOT / ".venv")


def _run(block: str, where: Path, env: dict, timeout: int) -> None:
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block], cwd=where, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, (
        f"exit {result.returncode}:\n{block}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )


@pytest.mark.docs
def test_the_readme_and_slides_blocks_run_as_written(tmp_path):
    repo = tmp_path / "clone"
    _copy_of_the_repository(repo)
    env = {  # a clean shell with .venv active (what `source .venv/bin/activate` sets)
        "PATH": f"{repo / '.venv' / 'bin'}:/usr/local/bin:/usr/bin:/bin",
        "VIRTUAL_ENV": str(repo / ".venv"),
        "HOME": str(tmp_path / "home"),
        "LANG": "C.UTF-8",
    }
    if os.environ.get("TMPDIR"):
        env["TMPDIR"] = os.environ["TMPDIR"]
    # the set-up is done (.venv is this checkout's): -o keeps make from redoing it into the shared
    # .venv (an editable install pointing at this temporary copy) whatever the files' times say
    _run("make demo -o .venv/.installed\n", repo, env, timeout=1800)
    assert (repo / "runs" / "demo" / "report" / "index.html").is_file()
    for page in PAGES:
        for block in blocks(page)[1 if page == "README.md" else 0 :]:
            if needs(block) is None:
                _run(block, repo, env, timeout=900)
    assert (repo / "heatmaps" / "slides.csv").is_file() and (repo / "demo_dx" / "slides.csv").is_file()
