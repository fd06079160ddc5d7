"""The ``ustad`` command line: :func:`ustad.cli.main.main` dispatches to one module per command
group (``demo``, ``train``, ``score``, ``evaluate``, ``export``, ``teachers``), which share
:mod:`ustad.cli.common`."""
