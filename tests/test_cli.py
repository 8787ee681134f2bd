"""The command line: one rule for config overrides, and every command the README and docs show
parses with the real parser (a renamed command or flag fails here, not in a user's shell)."""

import dataclasses
import re
import shlex

import pytest

from cancernet.cli import build_parser, main
from cancernet.cli.options import merge_aliases, split_overrides

from conftest import ROOT


def test_overrides_may_stand_anywhere_and_keep_their_order():
    line = ["evaluate", "train.device=cpu", "r", "data.limit=5", "--split", "val", "train.device=auto"]
    rest, overrides = split_overrides(line)
    assert rest == ["evaluate", "r", "--split", "val"]
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
            merge_aliases(parser, args)
        except SystemExit:
            pytest.fail(f"does not parse: {where}")
        assert not overrides or hasattr(args, "overrides"), where
        shown.add(args.command)
    every = set(build_parser()._subparsers._group_actions[0].choices)
    assert every - shown == set()  # every command is shown somewhere


def test_every_argument_has_help_and_each_noun_one_spelling_across_commands(capsys):
    """Every command has a description and every argument help; what a command works on (slides,
    images, a run) is positional wherever it appears, and an option is spelled the same in every
    command that takes it (`--out` everywhere, `--slides` accepted wherever slides are)."""
    import argparse
    from collections import defaultdict

    from cancernet.cli import build_parser
    from cancernet.cli.options import ALIAS

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    spellings = defaultdict(dict)  # noun -> command -> how the command takes it
    for name, command in commands.items():
        assert command.description, name
        for action in command._actions:
            if action.dest == "help":
                continue
            noun = action.dest.removesuffix(ALIAS)
            if not action.dest.endswith(ALIAS):  # the unlisted alias of a positional needs no help of its own
                assert action.help, f"cancernet {name}: {action.option_strings or action.dest} has no help"
            spellings[noun].setdefault(name, set()).update(action.option_strings or {"positional"})
    assert {"slides", "images", "run", "runs", "out"} <= set(spellings)
    for noun in ("slides", "images", "run", "runs"):
        assert all("positional" in s for s in spellings[noun].values()), (noun, spellings[noun])
    for noun, by_command in spellings.items():
        options = {o for s in by_command.values() for o in s if o.startswith("--")}
        for command, spelled in by_command.items():
            assert options <= spelled, f"{noun}: cancernet {command} takes {spelled}, others {options}"
    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out.startswith("cancernet ")


def test_a_config_key_without_its_section_is_answered_with_its_section(capsys):
    from cancernet.cli import main

    with pytest.raises(SystemExit) as exit:
        main(["train", "--config", "demo", "epochs=3"])
    assert exit.value.code == 2
    assert "epochs=3: a config override names its section: train.epochs=3" in capsys.readouterr().err
    # a file whose name holds an '=' is not taken for a key
    from cancernet.cli.options import bare_key_hint

    assert bare_key_hint(["a=b.svs", "slides/x=1.tif"]) is None


def test_cancernet_config_prints_every_key_with_its_value_and_meaning_as_loadable_yaml(capsys, tmp_path):
    import yaml

    from cancernet.cli import main
    from cancernet.config import Config, load_config

    assert main(["config", "--config", "mil", "train.seed=7"]) == 0
    text = capsys.readouterr().out
    values = yaml.safe_load(text)
    assert values["train"]["seed"] == 7 and values["model"]["mil"] == "abmil"
    lines = [line for line in text.splitlines() if line.startswith("  ")]
    assert len(lines) == sum(len(dataclasses.fields(getattr(Config(), s))) for s in values)
    assert all("  # " in line for line in lines), [line for line in lines if "  # " not in line]
    assert "  lr: 0.001  # the peak learning rate" in text and "(patch runs only)" in text
    (tmp_path / "c.yaml").write_text(text)
    assert load_config(tmp_path / "c.yaml").to_dict() == load_config("mil", ["train.seed=7"]).to_dict()


def test_the_old_option_spellings_of_positionals_still_work():
    """DESIGN.md's contract spells `evaluate --run RUN` and `predict --images DIR`."""
    from cancernet.cli import build_parser
    from cancernet.cli.options import merge_aliases

    parser = build_parser()
    for line, noun, value in (
        (["evaluate", "--run", "r"], "run", "r"),
        (["evaluate", "r"], "run", "r"),
        (["predict", "--checkpoint", "c", "--images", "d", "--out", "o"], "images", "d"),
        (
            ["evaluate-slides", "s1", "--slides", "s2", "--checkpoint", "c", "--labels", "l", "--out", "o"],
            "slides",
            ["s1", "s2"],
        ),
        (["synth", "--out", "x"], "out", "x"),
    ):
        args = parser.parse_args(line)
        merge_aliases(parser, args)
        assert getattr(args, noun) == value, line
    with pytest.raises(SystemExit):
        merge_aliases(parser, parser.parse_args(["evaluate"]))
