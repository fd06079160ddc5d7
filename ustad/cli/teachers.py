"""``ustad teachers``: list the teachers loadable by name; ``export``, ``install`` and ``ship``
them (:mod:`ustad.uninformed_students.teacher.catalog`)."""

from __future__ import annotations

import json

from absl import flags

from ustad.cli.common import Command

LIST_DOC = """
List the teachers ustad can load by name (--config.teacher_workdir=<name>, load_teacher(name)).

Reads: the teachers shipped with ustad and those installed in $USTAD_TEACHERS (default
~/.cache/ustad/teachers). An installed teacher of a shipped teacher's name is listed beside it;
"loads" says which file the name loads (the installed one only if installed with --force).
Writes nothing. Time: instant.
"""


def define_list(fv: flags.FlagValues, argv: list[str]) -> None:
    flags.DEFINE_bool(
        "json", False, "one JSON object per teacher instead of a table", flag_values=fv
    )


def _size(num_bytes) -> str:
    return f"{num_bytes / 1e6:.1f} MB" if num_bytes >= 1e5 else f"{num_bytes / 1e3:.0f} kB"


def run_list(fv: flags.FlagValues) -> None:
    from ustad.uninformed_students.teacher import catalog

    teachers = catalog.list_teachers()
    if fv["json"].value:
        for teacher in teachers:
            print(json.dumps(teacher, default=str))
        return
    if not teachers:
        print(f"no teachers found (install one into {catalog.teachers_dir()})")
        return
    header = ("name", "p", "d", "widths", "size", "origin", "loads", "path")
    rows = [
        (
            str(t["name"]),
            str(t.get("patch_size", "?")),
            str(t.get("out_dim", "?")),
            str(t.get("widths", "?")),
            _size(t["bytes"]),
            str(t["origin"]),
            "yes" if t.get("active", True) else "no",
            str(t["path"])
            + (f"  (unreadable: {t['error']})" if "error" in t else "")
            + (f"  ({t['status']})" if "status" in t else ""),
        )
        for t in teachers
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


EXPORT_DOC = """
Export a trained teacher to one file, and optionally install it under a name.

    ustad teachers export --workdir=runs/teacher_p33 --out=p33.teacher.npz --install=mine33

Reads: the newest checkpoint of --workdir (a finished `ustad train-teacher` run; an unfinished
one with --allow_unfinished).
Writes: --out (T̂'s parameters and its decoder D, float32 or --dtype=float16, with a JSON
header: p, d, widths, P, the patch source and the training config), atomically; with
--install=NAME also a copy in $USTAD_TEACHERS (default ~/.cache/ustad/teachers), found by
name wherever ustad takes a teacher (--config.teacher_workdir=NAME; a shipped teacher's name
only with --force). Prints the file's path,
size, SHA-256 and parameter count as one JSON line.
Time: seconds.
"""


def define_export(fv: flags.FlagValues, argv: list[str]) -> None:
    flags.DEFINE_string("workdir", None, "a finished teacher workdir", flag_values=fv)
    flags.DEFINE_string("out", None, "the file to write (<name>.teacher.npz)", flag_values=fv)
    flags.DEFINE_enum(
        "dtype", "float32", ["float32", "float16"], "stored parameter type", flag_values=fv
    )
    flags.DEFINE_string("install", "", "also install the file under this name", flag_values=fv)
    _force_flag(fv)
    _allow_unfinished_flag(fv)


def _force_flag(fv: flags.FlagValues) -> None:
    flags.DEFINE_bool(
        "force",
        False,
        "install under the name of a shipped teacher, replacing it wherever the name is loaded",
        flag_values=fv,
    )


def _allow_unfinished_flag(fv: flags.FlagValues) -> None:
    flags.DEFINE_bool(
        "allow_unfinished", False, "export a run that stopped before its last step", flag_values=fv
    )


def run_export(fv: flags.FlagValues) -> None:
    from ustad.uninformed_students.teacher import catalog

    if fv["install"].value:  # a name that cannot be installed fails before the export
        catalog.check_install_name(fv["install"].value, force=fv["force"].value)
    record = catalog.export_teacher(
        fv["workdir"].value,
        fv["out"].value,
        dtype=fv["dtype"].value,
        allow_unfinished=fv["allow_unfinished"].value,
    )
    if fv["install"].value:
        installed = catalog.install_teacher(
            fv["out"].value, fv["install"].value, force=fv["force"].value
        )
        record["installed"] = str(installed)
    print(json.dumps(record))


INSTALL_DOC = """
Install a teacher file under a name, so that ustad finds it by that name.

    ustad teachers install --file=p33.teacher.npz --name=mine33

Reads: --file (a .teacher.npz written by `ustad teachers export`), checked before it is copied.
Writes: $USTAD_TEACHERS/<name>.teacher.npz (default ~/.cache/ustad/teachers), atomically, and
its SHA-256 in INSTALLED.json there (checked whenever it loads). A shipped teacher's name is
refused unless --force, which makes the installed file replace the shipped one. Prints its path.
Time: seconds.
"""


def define_install(fv: flags.FlagValues, argv: list[str]) -> None:
    flags.DEFINE_string("file", None, "the teacher file (<name>.teacher.npz)", flag_values=fv)
    flags.DEFINE_string("name", None, "the name to load it by (a plain file stem)", flag_values=fv)
    _force_flag(fv)


def run_install(fv: flags.FlagValues) -> None:
    from ustad.uninformed_students.teacher import catalog

    print(catalog.install_teacher(fv["file"].value, fv["name"].value, force=fv["force"].value))


SHIP_DOC = """
Maintainers: ship a trained teacher inside the package, in float16, under a name.

    ustad teachers ship --workdir=runs/teachers/p33 --name=p33 \\
        --extra='{"wall_time_min": 52, "device": "cpu: AMD EPYC (2 cores)"}'

Reads: the newest checkpoint of --workdir (a finished `ustad train-teacher` run).
Writes: ustad/teachers/<name>.teacher.npz (float16) and its entry in
ustad/teachers/MANIFEST.json (SHA-256, size, p, d, widths, steps, source, P and the --extra
fields), replacing an entry of the same name. Prints the entry as one JSON line.
Time: seconds.
"""


def define_ship(fv: flags.FlagValues, argv: list[str]) -> None:
    flags.DEFINE_string("workdir", None, "a finished teacher workdir", flag_values=fv)
    flags.DEFINE_string("name", None, "the name users load it by (e.g. p33)", flag_values=fv)
    flags.DEFINE_string("extra", "{}", "JSON object of more manifest fields", flag_values=fv)
    _allow_unfinished_flag(fv)


def run_ship(fv: flags.FlagValues) -> None:
    from ustad.uninformed_students.teacher import shipping

    try:
        extra = json.loads(fv["extra"].value)
    except json.JSONDecodeError as error:
        raise ValueError(f"--extra is not a JSON object: {error}") from error
    if not isinstance(extra, dict):
        raise ValueError(f"--extra must be a JSON object, got {fv['extra'].value!r}")
    entry = shipping.ship_teacher(
        fv["workdir"].value,
        fv["name"].value,
        allow_unfinished=fv["allow_unfinished"].value,
        extra=extra,
    )
    print(json.dumps(entry))


TEACHERS = Command(
    "list the teachers loadable by name; export, install or ship one",
    LIST_DOC,
    define_list,
    run_list,
    subcommands={
        "export": Command(
            "a trained teacher workdir → one teacher file (and --install NAME)",
            EXPORT_DOC,
            define_export,
            run_export,
            ("workdir", "out"),
        ),
        "install": Command(
            "a teacher file → a name ustad loads it by",
            INSTALL_DOC,
            define_install,
            run_install,
            ("file", "name"),
        ),
        "ship": Command(
            "maintainers: a teacher workdir → a teacher shipped in the package",
            SHIP_DOC,
            define_ship,
            run_ship,
            ("workdir", "name"),
        ),
    },
)
