"""The command line's surface is pinned: every command, its help line, and each option's flags,
default, choices, arity and type, as recorded in cli_surface.json (taken before the CLI became a
package).  A change to the surface must change the snapshot on purpose."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flextron.cli import build_parser

SNAPSHOT = Path(__file__).with_name("cli_surface.json")


def surface(parser: argparse.ArgumentParser) -> dict:
    """{command: {"help", "options": [{flags, default, choices, nargs, required, type}]}}."""
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {action.dest: action.help for action in commands._choices_actions}
    return {
        name: {
            "help": helps[name],
            "options": [
                {
                    "flags": list(action.option_strings) or [action.dest],
                    "default": "callable" if callable(action.default) else repr(action.default),
                    "choices": list(action.choices) if action.choices else None,
                    "nargs": action.nargs,
                    "required": action.required,
                    "type": getattr(action.type, "__name__", None) if action.type else None,
                }
                for action in sub._actions
                if action.dest != "help"
            ],
        }
        for name, sub in commands.choices.items()
    }


def test_cli_surface_matches_the_snapshot() -> None:
    assert surface(build_parser()) == json.loads(SNAPSHOT.read_text())


def test_help_lists_every_command_without_building_their_arguments() -> None:
    parser = build_parser([])
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(commands.choices) == set(json.loads(SNAPSHOT.read_text()))
