"""The ``ustad`` command: one entry point over the library, ``ustad <command> [flags]``.

Every command parses its own absl flags; the training commands take an ml_collections config
file (``--config=configs/students.py:p65``) whose fields are overridden by
``--config.<field>=<value>``. ``ustad <command> --help`` says what the command reads, what it
writes and how long it takes. Errors a user can fix (missing files, bad settings, a diverged
run) print one ``error:`` line and exit with status 1; ``USTAD_TRACEBACK=1`` shows the
traceback instead. The commands themselves are in :mod:`ustad.commands`.
"""

from __future__ import annotations

import logging
import os
import sys
import textwrap
from pathlib import Path

from absl import flags

import ustad  # noqa: F401  (sets the fast-CPU XLA flags before JAX starts a backend)
from ustad.commands import COMMANDS

_REPO = Path(__file__).resolve().parents[1]
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


def command_help(name: str, flag_values: flags.FlagValues) -> str:
    """The text of ``ustad <name> --help``: the command's description and its flags."""
    command = COMMANDS[name]
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
    return "\n".join(
        [f"usage: ustad {name} [flags]", "", command.doc.strip(), "", "flags:", *flag_lines]
    )


def resolve_config_arg(value: str) -> str:
    """``path[:arg]`` of a config file: as given if it exists, else the same path under this
    checkout's ``configs/`` (so ``--config=configs/students.py:p65`` works from any folder of a
    source checkout). The folder above ``configs/`` goes on ``sys.path`` because configs
    import each other (``from configs import students``)."""
    path, sep, arg = value.partition(":")
    candidate = Path(path)
    if not candidate.is_file():
        for base in (_REPO, _REPO / "configs"):
            if (base / path).is_file():
                candidate = base / path
                break
    if candidate.is_file() and candidate.resolve().parent.name == "configs":
        root = str(candidate.resolve().parents[1])
        if root not in sys.path:
            sys.path.insert(0, root)
    return f"{candidate}{sep}{arg}"


def _rewrite_config_args(args: list[str]) -> list[str]:
    rewritten, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--config="):
            arg = "--config=" + resolve_config_arg(arg[len("--config=") :])
        elif arg == "--config" and i + 1 < len(args):
            arg, i = "--config=" + resolve_config_arg(args[i + 1]), i + 1
        rewritten.append(arg)
        i += 1
    return rewritten


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


def main(argv: list[str] | None = None) -> int:
    """Run ``ustad <command> [flags]``; returns the exit status.

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
    if any(arg in _HELP for arg in args):
        flag_values = flags.FlagValues()
        command.define(flag_values, [f"ustad {name}"])
        print(command_help(name, flag_values))
        return 0
    try:
        args = [f"ustad {name}", *_rewrite_config_args(args)]
        flag_values = flags.FlagValues()
        command.define(flag_values, args)
        flag_values(args)
        missing = [f for f in command.required if flag_values[f].value in (None, [], "")]
        if missing:
            raise flags.Error(f"missing {', '.join('--' + f for f in missing)}")
        if "config" in flag_values:
            # A config file that failed to load is a stand-in that raises on first use.
            flag_values["config"].value.get("__ustad_probe__")
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
