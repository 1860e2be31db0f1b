"""Entry point for `ray job submit --working-dir . -- python jobs/export.py ARGS`: a scan's
rows as a few large Parquet files, run on the cluster's head next to the scan that made them.

Takes exactly the arguments of `mirror export`.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir, when not pip-installed

from pipeline.commands.cli import entry  # noqa: E402

if __name__ == "__main__":
    entry(["export", *sys.argv[1:]])
