"""The small-scale reproduction of the CYB comparison: ``python -m cyb_lightning experiment`` (reproduce.py)
and the results page (results.py, ``experiment --results-only``); docs/experiments.md."""
