"""What the ``ustad`` commands share: the :class:`Command` record, the ``--config`` flag and its
path resolution, and the scoring flags of ``score``, ``evaluate`` and ``export``.

A command's ``doc`` is its ``--help`` text: what it reads, what it writes, roughly how long it
takes. ``run`` receives the parsed flags; it raises ``FileNotFoundError``/``ValueError`` for
problems the user can fix, which :func:`ustad.cli.main.main` prints as one ``error:`` line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path

from absl import flags
from ml_collections import config_flags

# The source checkout holding this package: ``--config=configs/x.py`` also resolves there.
REPO = Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class Command:
    """One subcommand: one-line summary, ``--help`` text, flag definitions and the action.

    ``subcommands`` (e.g. ``ustad teachers export``) are commands of their own, chosen by the
    word after this one; without one, this command runs.
    """

    summary: str
    doc: str
    define: Callable[[flags.FlagValues, list[str]], None]
    run: Callable[[flags.FlagValues], None]
    required: tuple[str, ...] = ()
    subcommands: Mapping[str, Command] = dataclasses.field(default_factory=dict)


def resolve_config_arg(value: str) -> str:
    """``path[:arg]`` of a config file: as given if it exists, else the same path under this
    checkout's ``configs/`` (so ``--config=configs/students.py:p65`` works from any folder of a
    source checkout). Config files import only from ``ustad``, so nothing goes on
    ``sys.path``."""
    path, sep, arg = value.partition(":")
    candidate = Path(path)
    if not candidate.is_file():
        for base in (REPO, REPO / "configs"):
            if (base / path).is_file():
                candidate = base / path
                break
    return f"{candidate}{sep}{arg}"


def rewrite_config_args(args: list[str]) -> list[str]:
    """``args`` with every ``--config=PATH[:ARG]`` (or ``--config PATH``) resolved by
    :func:`resolve_config_arg` into one ``--config=...`` argument."""
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


def config_flag(fv: flags.FlagValues, argv: list[str], default: str, help_text: str) -> None:
    """Define ``--config`` (an ml_collections config file) in ``fv``.

    Args:
      fv: the command's flags.
      argv: the command line; tells the flag which ``--config.<field>`` overrides to define.
      default: ``path[:arg]`` of the default config, or ``""`` for none.
      help_text: the flag's help.
    """
    default = resolve_config_arg(default) if default else None
    config_flags.DEFINE_config_file(
        "config", default, help_text, flag_values=fv, lock_config=True, sys_argv=argv
    )


def score_option_flags(fv: flags.FlagValues, smooth_help: str) -> None:
    """--reduction, --top_k and --smooth_sigma (:func:`ustad.detector.check_scoring_options`)."""
    flags.DEFINE_enum(
        "reduction", "max", ["max", "mean", "topk"], "image score from the map", flag_values=fv
    )
    flags.DEFINE_integer(
        "top_k",
        100,
        "pixels averaged by --reduction=topk (≥ 1, at most the map's pixels)",
        flag_values=fv,
    )
    flags.DEFINE_float("smooth_sigma", 0.0, smooth_help, flag_values=fv)


def detector_flags(fv: flags.FlagValues) -> None:
    """The flags of a detector over trained workdirs (``ustad score`` and ``ustad evaluate``)."""
    flags.DEFINE_integer(
        "batch_size", 8, "images per jitted call (≥ 1)", lower_bound=1, flag_values=fv
    )
    score_option_flags(
        fv, "Gaussian smoothing of the maps before the image score, σ in pixels (0: none)"
    )
    flags.DEFINE_bool("bf16", False, "run the networks in bfloat16", flag_values=fv)
    flags.DEFINE_bool(
        "tile",
        False,
        "score each image at its own resolution by overlapping tiles of the training size, "
        "maps stitched (images larger than the training size keep their small defects; each "
        "must be at least a tile's size); a calibration holds for tiled or untiled scoring only",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "tile_overlap", 0.25, "least overlap of neighbouring tiles, a fraction of the tile in "
        "[0, 1) (with --tile)", flag_values=fv,
    )  # fmt: skip


def detector_kwargs(fv: flags.FlagValues) -> dict:
    """The keyword arguments of :func:`ustad.families.load_detector` from
    :func:`detector_flags`; bad scoring options fail here, before anything loads."""
    import jax.numpy as jnp

    from ustad.detector import check_scoring_options
    from ustad.tiling import check_overlap

    check_scoring_options(fv["reduction"].value, fv["top_k"].value, fv["smooth_sigma"].value)
    check_overlap(fv["tile_overlap"].value)
    if fv["tile_overlap"].present and not fv["tile"].value:
        raise ValueError("--tile_overlap applies to tiled scoring only: add --tile")
    return dict(
        reduction=fv["reduction"].value,
        top_k=fv["top_k"].value,
        smooth_sigma=fv["smooth_sigma"].value,
        compute_dtype=jnp.bfloat16 if fv["bf16"].value else None,
        batch_size=fv["batch_size"].value,
        tile=fv["tile"].value,
        tile_overlap=fv["tile_overlap"].value,
    )
