"""The ``ustad`` command: one entry point over the library, ``ustad <command> [flags]``.

Every command parses its own absl flags; the training commands take an ml_collections config
file (``--config=configs/students.py:p65``) whose fields are overridden by
``--config.<field>=<value>``. ``ustad <command> --help`` says what the command reads, what it
writes and how long it takes. Errors a user can fix (missing files, bad settings, a diverged
run) print one ``error:`` line and exit with status 1; ``USTAD_TRACEBACK=1`` shows the
traceback instead. The commands are in the other modules of :mod:`ustad.cli`, one per group;
this one only dispatches (no module of ustad imports it).
"""

from __future__ import annotations

import logging
import os
import sys
import textwrap

from absl import flags

from ustad.cli.common import Command, rewrite_config_args
from ustad.cli.demo import DEMO
from ustad.cli.evaluate import EVALUATE
from ustad.cli.export import EXPORT
from ustad.cli.score import SCORE
from ustad.cli.teachers import TEACHERS
from ustad.cli.train import TRAIN_STUDENTS, TRAIN_TEACHER

COMMANDS: dict[str, Command] = {
    "demo": DEMO,
    "train-teacher": TRAIN_TEACHER,
    "train-students": TRAIN_STUDENTS,
    "score": SCORE,
    "export": EXPORT,
    "evaluate": EVALUATE,
    "teachers": TEACHERS,
}

_HELP = ("-h", "--help", "--helpshort", "--helpfull", "help")


def overview() -> str:
    """The text of ``ustad --help``."""
    width = max(len(name) for name in COMMANDS)
    lines = [
        "usage: ustad <command> [--flag=value ...] [--config.<field>=<value> ...]",
        "",
        "Uninformed Students anomaly detection (Bergmann et al., CVPR 2020) in JAX.",
        "",
        "commands:",
        *(f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()),
        "",
        "`ustad <command> --help` says what a command reads, writes and how long it takes.",
        "Typical run: ustad train-teacher → ustad train-students → ustad score / ustad evaluate.",
    ]
    return "\n".join(lines)


def find_command(name: str) -> Command:
    """The command of ``name``: ``"score"`` or a subcommand, ``"teachers export"``.

    Raises:
      KeyError: no such command.
    """
    first, _, sub = name.partition(" ")
    command = COMMANDS[first]
    return command.subcommands[sub] if sub else command


def command_help(name: str, flag_values: flags.FlagValues) -> str:
    """The text of ``ustad <name> --help``: the command's description, its subcommands (if
    any) and its flags."""
    command = find_command(name)
    flag_lines = []
    for flag_name in sorted(flag_values):
        flag = flag_values[flag_name]
        default = "" if flag.default in (None, "") else f" (default: {flag.default_as_str})"
        required = " (required)" if flag_name in command.required else ""
        text = f"{flag.help}{required}{default}"
        flag_lines.append(f"  --{flag_name}")
        flag_lines.extend(
            textwrap.wrap(text, 96, initial_indent="      ", subsequent_indent="      ")
        )
    usage = f"usage: ustad {name} [flags]"
    sub_lines = []
    if command.subcommands:
        usage = f"usage: ustad {name} [{'|'.join(command.subcommands)}] [flags]"
        width = max(len(sub) for sub in command.subcommands)
        sub_lines = [
            "subcommands (`ustad " + name + " <subcommand> --help`):",
            *(f"  {sub:<{width}}  {c.summary}" for sub, c in command.subcommands.items()),
            "",
        ]
    return "\n".join([usage, "", command.doc.strip(), "", *sub_lines, "flags:", *flag_lines])


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is at each line, not as it was when the handler was made,
    so callers that swap it (``main`` run in-process by tests or notebooks) get the lines."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging() -> None:
    """ustad's own INFO lines on stderr; JAX's and absl's below WARNING stay quiet (Orbax's are
    filtered in :mod:`ustad.checkpointing`)."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    package = logging.getLogger("ustad")
    if not any(getattr(h, "_ustad_cli", False) for h in package.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[ustad] %(message)s"))
        handler._ustad_cli = True
        package.addHandler(handler)
    package.setLevel(logging.INFO)
    package.propagate = False


def _parse(name: str, command: Command, args: list[str]) -> flags.FlagValues:
    """The command's flags parsed from ``args``.

    Raises:
      flags.Error: a bad or missing flag.
      OSError: a config file that cannot be read.
    """
    args = [f"ustad {name}", *rewrite_config_args(args)]
    flag_values = flags.FlagValues()
    command.define(flag_values, args)
    flag_values(args)
    missing = [f for f in command.required if flag_values[f].value in (None, [], "")]
    if missing:
        raise flags.Error(f"missing {', '.join('--' + f for f in missing)}")
    if "config" in flag_values:
        # A config file that failed to load is a stand-in that raises on first use.
        flag_values["config"].value.get("__ustad_probe__")
    return flag_values


def main(argv: list[str] | None = None) -> int:
    """Run ``ustad <command> [subcommand] [flags]``; returns the exit status.

    Args:
      argv: ``["ustad", command, *flags]``; default ``sys.argv``.
    """
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in _HELP:
        print(overview())
        return 0
    name, args = argv[1], argv[2:]
    if name not in COMMANDS:
        print(f"ustad: unknown command {name!r}\n\n{overview()}", file=sys.stderr)
        return 2
    command = COMMANDS[name]
    if command.subcommands and args and not args[0].startswith("-") and args[0] not in _HELP:
        if args[0] not in command.subcommands:
            choices = ", ".join(command.subcommands)
            print(
                f"ustad {name}: unknown subcommand {args[0]!r} (choose {choices})", file=sys.stderr
            )
            return 2
        name, command, args = f"{name} {args[0]}", command.subcommands[args[0]], args[1:]
    if any(arg in _HELP for arg in args):
        flag_values = flags.FlagValues()
        command.define(flag_values, [f"ustad {name}"])
        print(command_help(name, flag_values))
        return 0
    try:
        flag_values = _parse(name, command, args)
    except OSError as error:
        print(f"ustad {name}: --config: {str(error).splitlines()[-1].strip()}", file=sys.stderr)
        return 2
    except flags.Error as error:
        print(f"ustad {name}: {error}\n(see `ustad {name} --help`)", file=sys.stderr)
        return 2
    _setup_logging()
    try:
        command.run(flag_values)
    except (FileNotFoundError, ValueError, FloatingPointError) as error:
        if os.environ.get("USTAD_TRACEBACK") == "1":
            raise
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
