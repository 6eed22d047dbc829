"""The command line's own behaviour: help texts."""
import argparse

from DiffusionMICLib.cli import build_parser


def subcommands(parser: argparse.ArgumentParser | None = None, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every subcommand, nested groups (text2image ...) included."""
    parser = parser or build_parser()
    out: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out[prefix + name] = sub
                out.update(subcommands(sub, prefix + name + " "))
    return out


def test_every_option_of_every_subcommand_has_a_help_line_with_its_default():
    commands = subcommands()
    assert {"phantom", "train", "finetune", "run", "evaluate", "models", "demo", "benchmark"} <= set(commands)
    for name, sub in commands.items():
        text = sub.format_help()
        assert sub.description, f"'{name}' has no description"
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            label = action.option_strings[0] if action.option_strings else action.dest
            assert action.help and action.help.strip(), f"{name} {label}: no help"
            if action.default not in (None, False, argparse.SUPPRESS):
                assert f"default: {action.default}" in " ".join(text.split()), f"{name} {label}: default not shown"
