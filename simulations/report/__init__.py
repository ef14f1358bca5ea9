"""A run folder's report (``report.md`` and plots from ``results.json``) and ``ctfed report``."""
