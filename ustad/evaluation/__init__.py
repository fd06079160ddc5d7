"""Evaluation on plain arrays: exact metrics (``metrics``), reports and tables (``reports``,
``image_report``) and figures (``figures``). Knows no method family."""
