"""A check of a GPU replica's two calls at once, run as a script on a CUDA machine:

    python tests/scorer_overlap_check.py [cpu]  (cpu: the same steps on a CPU replica,
                                                 a check of the script itself)

A GPU replica copies each block to the device on a side stream while its other call's
model scores (Ray runs two calls of it at once). A block the model read before its copy
had landed would score other pixels: blocks scored by two threads at once, many times
over, must give the scores of the same blocks scored one at a time.
"""
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.run import VIT_S  # noqa: E402
from mirror_core.smoke import official_sized, random_mirror  # noqa: E402
from pipeline.scan.schema import DECODED_SCHEMA, PIXELS  # noqa: E402
from pipeline.scan.scorer import Scorer  # noqa: E402


def block(n: int, seed: int) -> dict:
    """A decoded block as the score stage receives it: n crops, every row decodable."""
    rng = np.random.default_rng(seed)
    rows = pa.table({f.name: pa.nulls(n, f.type) for f in DECODED_SCHEMA})
    batch = {name: rows[name].to_numpy(zero_copy_only=False) for name in rows.column_names}
    batch["_unit"] = np.array([f"u{seed}"] * n, dtype=object)
    batch["_index"] = np.arange(n)
    batch[PIXELS] = rng.integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)
    return batch


def check(scorer: Scorer, n: int, attempts: int = 3) -> None:
    """Blocks of n crops scored by two threads at once equal the same blocks scored alone."""
    blocks = [block(n, seed) for seed in range(4)]
    alone = [scorer(b)["prob_fake"].to_numpy() for b in blocks]
    for attempt in range(attempts):
        with ThreadPoolExecutor(2) as pool:  # as Ray runs a replica's two calls: threads
            got = list(pool.map(scorer, blocks * 2))
        for i, out in enumerate(got):
            # pixels read before their copy landed score far off; 1e-4 allows kernels' noise
            bad = np.flatnonzero(~(np.abs(out["prob_fake"].to_numpy() - alone[i % len(blocks)]) <= 1e-4))
            assert not len(bad), f"attempt {attempt}, block {i}: rows {bad[:8]} differ from the block scored alone"


def main(device: str) -> None:
    cfg = official_sized({**VIT_S, "num_hidden_layers": 4})
    _, weights = random_mirror(cfg, seed=3)
    scorer = Scorer(weights.to_numpy(), cfg.to_dict(), "overlap-check", device=device, precision="fp32",
                    batch_size=64)
    n = 512 if device == "cuda" else 48
    check(scorer, n)
    print(f"scorer overlap on {device}: ok (8 blocks of {n} x 3, two calls at once, "
          f"side stream: {scorer._side_stream is not None})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "cuda")
