"""`mirror demo`: offline, deterministic, end to end.

Builds SMOKE-TEST weights (a tiny random MIRROR in the official checkpoint
format; not a detector, its scores mean nothing), a small generated image folder
in benchmark layout, imports the weights, scans the folder on local Ray, and
returns the summary.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from mirror_core.official import import_official_bundle
from mirror_core.smoke import write_smoke_test_weights
from pipeline.scan.config import ScanConfig
from pipeline.scan.run import run_scan


def write_demo_images(root: Path, per_class: int = 6, seed: int = 0) -> int:
    """Benchmark layout: root/{portraits,landscapes}/{0_real,1_fake}/ with JPEG and PNG files.
    'Fakes' carry a periodic grid (an upsampling-like trace); 'reals' are smooth noise."""
    rng = np.random.default_rng(seed)
    count = 0
    for subset in ("portraits", "landscapes"):
        for label, folder in ((0, "0_real"), (1, "1_fake")):
            (root / subset / folder).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                h, w = int(rng.integers(180, 700)), int(rng.integers(180, 700))
                base = rng.normal(128, 40, (h // 8 + 1, w // 8 + 1, 3)).clip(0, 255).astype(np.uint8)
                img = np.asarray(Image.fromarray(base).resize((w, h), Image.BICUBIC)).astype(np.int16)
                if label:
                    img[::4, :] += 24
                    img[:, ::4] += 24
                img = Image.fromarray(img.clip(0, 255).astype(np.uint8))
                fmt, ext = ("PNG", "png") if i % 2 else ("JPEG", "jpg")
                buf = io.BytesIO()
                img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
                (root / subset / folder / f"{folder}_{i:03d}.{ext}").write_bytes(buf.getvalue())
                count += 1
    return count


def run_demo(workdir: str | Path, scan_config: ScanConfig | None = None, log=print) -> dict:
    workdir = Path(workdir)
    log("MIRROR demo: SMOKE-TEST weights (tiny, random; NOT a detector, scores are meaningless)")
    checkpoint, memory, backbone = write_smoke_test_weights(workdir / "smoke-test-weights")
    n = write_demo_images(workdir / "images")
    log(f"generated {n} images under {workdir / 'images'} (benchmark layout)")
    model_id, report = import_official_bundle(checkpoint, backbone, str(workdir / "bundle"), memory=memory)
    log(f"imported official-format weights -> {workdir / 'bundle'} (model_id {model_id})")
    cfg = scan_config or ScanConfig(unit_size=8)
    return run_scan(str(workdir / "bundle"), str(workdir / "images"), str(workdir / "scan"), cfg)
