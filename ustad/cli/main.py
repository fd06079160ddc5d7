"""The ``ustad`` command: one entry point over the library, ``ustad <command> [flags]``.

Every command parses its own absl flags; the training commands take an ml_collections config
file (``--config=configs/students.py:p65``) whose fields are overridden by
``--config.<field>=<value>``. ``ustad <command> --help`` says what the command reads, what it
writes and how long it takes. A bad command line (an unknown flag, config field or preset, a
stray argument) prints one ``ustad <command>: …`` line and exits with status 2; an error while
running (missing files, bad settings, a diverged run) prints one ``ustad: error: …`` line and
exits with status 1. ``--verbose`` (or ``USTAD_TRACEBACK=1``) shows the traceback instead.
The commands are in the other modules of :mod:`ustad.cli`, one per group; this one only
dispatches (no module of ustad imports it).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import textwrap
import traceback

from absl import flags

from ustad.cli.calibrate import CALIBRATE
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
    "calibrate": CALIBRATE,
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
        "Unsupervised anomaly detection in JAX, two method families: Uninformed Students",
        "(Bergmann et al., CVPR 2020; configs/students.py) and STFPM (Wang et al., BMVC 2021;",
        "configs/stfpm.py). Both train with `ustad train-students` and score with `ustad score`",
        "and `ustad evaluate`; `ustad export` takes Uninformed Students workdirs only.",
        "",
        "commands:",
        *(f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()),
        "",
        "`ustad <command> --help` says what a command reads, writes and how long it takes;",
        "--verbose shows the Python traceback of an error.",
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


# The errors a user can fix by changing a flag, a file or a setting: one line, no traceback.
USER_ERRORS = (ValueError, OSError, FloatingPointError, ImportError)
VERBOSE = "--verbose"


def _config_error(error: Exception) -> str:
    """One line for a config file that failed to load or a bad ``--config.<field>``, from
    ml_collections' multi-line message (which holds a traceback or a repr of a ``KeyError``)."""
    text = str(error)
    suggestion = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
    if suggestion:
        good, bad = suggestion.groups()
        return f"--config.{bad}: the config has no field {bad!r}; did you mean --config.{good}?"
    if "Error whilst parsing config file" in text:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        last = re.sub(r"^\w+(Error|Exception): ", "", lines[-1])
        where = re.search(r"flag (--config=\S+): Error whilst", text)
        return f"{where.group(1) if where else '--config'}: {last}"
    field = re.search(r"'([A-Za-z_][\w.]*)'", text)
    if isinstance(error, AttributeError | KeyError) and field:
        return f"--config.{field.group(1)}: the config has no field {field.group(1)!r}"
    return text.strip().splitlines()[-1] if text.strip() else type(error).__name__


def _parse(name: str, command: Command, args: list[str]) -> flags.FlagValues:
    """The command's flags parsed from ``args``.

    Raises:
      flags.Error: a bad or missing flag, a bad config field or preset, or a stray argument.
      OSError: a config file that cannot be read.
    """
    args = [f"ustad {name}", *rewrite_config_args(args)]
    flag_values = flags.FlagValues()
    command.define(flag_values, args)
    try:
        positional = flag_values(args)[1:]
    except flags.Error as error:
        raise flags.Error(_config_error(error) if "--config" in str(error) else error) from error
    except (AttributeError, KeyError, TypeError) as error:  # a --config.<field> override
        raise flags.Error(_config_error(error)) from error
    if positional:
        raise flags.Error(_stray_arguments(positional))
    missing = [f for f in command.required if flag_values[f].value in (None, [], "")]
    if missing:
        raise flags.Error(f"missing {', '.join('--' + f for f in missing)}")
    if "config" in flag_values:
        # A config file that failed to load is a stand-in that raises on first use.
        try:
            flag_values["config"].value.get("__ustad_probe__")
        except (ValueError, AttributeError, KeyError) as error:
            raise flags.Error(_config_error(error)) from error
    return flag_values


def _stray_arguments(positional: list[str]) -> str:
    """The error for arguments that are not flags: absl would drop them silently, so that an
    unquoted ``--images dir/*.png`` (expanded by the shell) scored only the first file."""
    shown = ", ".join(repr(a) for a in positional[:3]) + (" …" if len(positional) > 3 else "")
    return (
        f"unexpected argument{'s' if len(positional) > 1 else ''} {shown} ({len(positional)} "
        f"in all): every value goes in a --flag=value; an unquoted glob such as --images "
        f"dir/*.png is expanded by the shell into many files, so quote it: --images='dir/*.png'"
    )


def main(argv: list[str] | None = None) -> int:
    """Run ``ustad <command> [subcommand] [flags]``; returns the exit status.

    Args:
      argv: ``["ustad", command, *flags]``; default ``sys.argv``. ``--verbose`` anywhere shows
        the traceback of an error instead of its one line.
    """
    argv = list(sys.argv if argv is None else argv)
    verbose = VERBOSE in argv[1:] or os.environ.get("USTAD_TRACEBACK") == "1"
    argv = [argv[0], *(arg for arg in argv[1:] if arg != VERBOSE)] if argv else argv
    try:
        status = _dispatch(argv, verbose)
        sys.stdout.flush()  # a closed pipe (`ustad teachers | head`) fails here, not at exit
        return status
    except BrokenPipeError:
        # The reader stopped reading: say nothing, and keep Python's exit-time flush quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        if verbose:
            raise
        print("ustad: interrupted", file=sys.stderr)
        return 130


def _dispatch(argv: list[str], verbose: bool) -> int:
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
        if verbose:
            raise
        print(f"ustad {name}: --config: {str(error).splitlines()[-1].strip()}", file=sys.stderr)
        return 2
    except flags.Error as error:
        if verbose:
            raise
        print(f"ustad {name}: {error}\n(see `ustad {name} --help`)", file=sys.stderr)
        return 2
    _setup_logging()
    enable_compilation_cache()
    return _run(command, flag_values, verbose)


# Compilations shorter than this are not written to the cache (their reading would cost as much).
CACHE_MIN_COMPILE_SECONDS = 0.5


def enable_compilation_cache() -> str | None:
    """JAX's persistent compilation cache for the commands, so that the second ``ustad score``
    of a model (or a resumed training) compiles nothing: ``$USTAD_COMPILATION_CACHE_DIR``, else
    ``<the ustad cache>/jax`` (``~/.cache/ustad/jax``). ``USTAD_COMPILATION_CACHE=0`` turns it
    off. JAX keys every entry by the program, the compile options, the XLA flags, the JAX and
    backend versions and the device kind, so a changed flag or machine compiles afresh.
    Compilations shorter than :data:`CACHE_MIN_COMPILE_SECONDS` are not written;
    ``USTAD_CACHE_MIN_COMPILE_SECONDS`` sets another bound (0: every program, as the tests do,
    so that what is written does not depend on how loaded the machine was).

    Returns:
      The cache folder, or None when turned off.
    """
    if os.environ.get("USTAD_COMPILATION_CACHE", "1") == "0":
        return None
    import jax

    from ustad.io import default_cache_dir

    path = os.environ.get("USTAD_COMPILATION_CACHE_DIR") or os.path.join(default_cache_dir(), "jax")
    jax.config.update("jax_compilation_cache_dir", path)
    least = os.environ.get("USTAD_CACHE_MIN_COMPILE_SECONDS", "")
    try:
        least_s = float(least) if least else CACHE_MIN_COMPILE_SECONDS
    except ValueError:
        raise ValueError(
            f"USTAD_CACHE_MIN_COMPILE_SECONDS={least!r}: must be a number of seconds"
        ) from None
    jax.config.update("jax_persistent_cache_min_compile_time_secs", least_s)
    return path


def _run(command: Command, flag_values: flags.FlagValues, verbose: bool) -> int:
    """Run the command; an error is one ``ustad: error:`` line (its traceback with --verbose)."""
    try:
        status = command.run(flag_values)
    except BrokenPipeError:
        raise
    except USER_ERRORS as error:
        if verbose:
            raise
        print(f"ustad: error: {_one_line(error)}", file=sys.stderr)
        return 1
    except Exception as error:  # a bug: still one line, with the way to its traceback
        if verbose:
            raise
        where = traceback.extract_tb(error.__traceback__)[-1]
        print(
            f"ustad: internal error: {type(error).__name__}: {_one_line(error)} (at "
            f"{os.path.basename(where.filename)}:{where.lineno}; run again with --verbose for "
            f"the traceback, and please report it)",
            file=sys.stderr,
        )
        return 1
    return int(status or 0)  # a command may return its own status (score: 3 = anomalous)


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines) if lines else type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
