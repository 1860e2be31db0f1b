"""Entry point for `ray job submit --working-dir . -- python jobs/train.py memory|detector ARGS`.

`memory` takes the arguments of `mirror train-memory`, `detector` those of
`mirror train-detector`.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir, when not pip-installed

from pipeline.commands.cli import entry  # noqa: E402

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("memory", "detector"):
        sys.exit("usage: python jobs/train.py memory|detector ARGS")
    entry([f"train-{sys.argv[1]}", *sys.argv[2:]])
