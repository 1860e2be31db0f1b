"""Entry point for `ray job submit --working-dir . -- python jobs/benchmark.py ARGS`.

Takes exactly the arguments of `mirror benchmark` (the official script's flags too);
exits 3 when nightly mode finds a regression.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir, when not pip-installed

from pipeline.commands.cli import entry  # noqa: E402

if __name__ == "__main__":
    entry(["benchmark", *sys.argv[1:]])
