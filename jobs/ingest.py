"""Entry point for `ray job submit --working-dir . -- python jobs/ingest.py ARGS`.

Takes exactly the arguments of `mirror ingest`.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir, when not pip-installed

from pipeline.commands.cli import entry  # noqa: E402

if __name__ == "__main__":
    entry(["ingest", *sys.argv[1:]])
