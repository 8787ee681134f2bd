"""The command line: one rule for config overrides, and every command the README and docs show
parses with the real parser (a renamed command or flag fails here, not in a user's shell)."""

import re
import shlex

import pytest

from cancernet.cli import build_parser, main
from cancernet.cli.options import split_overrides

from conftest import ROOT


def test_overrides_may_stand_anywhere_and_keep_their_order():
    line = ["evaluate", "train.device=cpu", "--run", "r", "data.limit=5", "--split", "val", "train.device=auto"]
    rest, overrides = split_overrides(line)
    assert rest == ["evaluate", "--run", "r", "--split", "val"]
    assert overrides == ["train.device=cpu", "data.limit=5", "train.device=auto"]  # later ones win
    # a slide path is not an override, nor is an option's value with an '=' but no section.key
    assert split_overrides(["predict-slide", "a=b.svs", "slides/x.tif", "slide.stride=16"])[1] == ["slide.stride=16"]


def test_a_command_without_config_refuses_overrides(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["export", "--checkpoint", "c.pt", "--out", "o", "train.device=cpu"])
    assert exit.value.code == 2
    assert "export takes no config overrides: train.device=cpu" in capsys.readouterr().err


def documented_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of every cancernet command in a bash block of README.md and docs/*.md."""
    found = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        blocks = re.findall(r"```bash\n(.*?)```", page.read_text(), re.S)
        for block in blocks:
            for line in block.replace("\\\n", " ").splitlines():
                if re.search(r"\[-|\.\.\.|\|", line.split("#")[0]):
                    continue  # a synopsis ([--tta], key=value ..., a|b), not a command line
                words = shlex.split(line, comments=True)
                words = [w for w in words if not re.fullmatch(r"[A-Z_]+=\S*", w)] if words else []  # env settings
                if "cancernet" in words and "-m" in words:
                    argv = words[words.index("cancernet") + 1 :]
                elif words[:1] == ["cancernet"]:
                    argv = words[1:]
                elif any(w.endswith("train_ddp.py") for w in words):
                    argv = ["train", *words[[w.endswith("train_ddp.py") for w in words].index(True) + 1 :]]
                else:
                    continue
                found.append((f"{page.name}: {line.strip()}", argv))
    return found


def test_the_documented_commands_parse():
    commands = documented_commands()
    assert len(commands) >= 30  # the pages do show the commands (the extraction works)
    parser = build_parser()
    shown = set()
    for where, argv in commands:
        rest, overrides = split_overrides(argv)
        try:
            args = parser.parse_args(rest)
        except SystemExit:
            pytest.fail(f"does not parse: {where}")
        assert not overrides or hasattr(args, "overrides"), where
        shown.add(args.command)
    every = set(build_parser()._subparsers._group_actions[0].choices)
    assert every - shown == set()  # every command is shown somewhere
