import contextlib
import os
import socket
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PARITY = Path(os.environ.get("MIRROR_PARITY_FIXTURE", REPO.parent / "shared" / "fixtures" / "official_parity"))

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    if not (PARITY / "checkpoint.pth").is_file():
        raise FileNotFoundError(f"official parity fixture not found at {PARITY} (set MIRROR_PARITY_FIXTURE)")
    return PARITY


@pytest.fixture(scope="session")
def parity_bundle(parity_dir, tmp_path_factory) -> Path:
    """The parity fixture imported once per session through the library."""
    from mirror_core.official import import_official_bundle

    out = tmp_path_factory.mktemp("bundles") / "parity"
    import_official_bundle(parity_dir / "checkpoint.pth", parity_dir / "backbone", str(out),
                           memory=parity_dir / "mirror_phase1.pth")
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 protocol server (moto) on 127.0.0.1; sets AWS_ENDPOINT_URL for everyone."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1")
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server, request):
    import boto3

    name = "mirror-" + request.node.name.lower().replace("_", "-")[:40]
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    return name


@pytest.fixture
def s3_corpus(s3_server, s3_bucket, parity_bundle, tmp_path):
    """A bucket holding 12 labelled JPEGs under images/ (0_real, 1_fake) and the parity bundle under model/."""
    import fsspec

    for i in range(12):
        write_image(tmp_path / "src" / ("0_real" if i % 2 else "1_fake") / f"{i:02d}.jpg", seed=i)
    fs = fsspec.filesystem("s3")
    fs.put(str(tmp_path / "src"), f"{s3_bucket}/images", recursive=True)
    fs.put(str(parity_bundle), f"{s3_bucket}/model", recursive=True)
    return s3_bucket


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray for the session, started after the S3 server so that every
    worker inherits AWS_ENDPOINT_URL; 4 logical CPUs so stages don't starve on 2 cores."""
    import ray

    # web links are served from 127.0.0.1 here (tests/web_server.py): allowed, as a user
    # allows a network of their own
    env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                      "AWS_DEFAULT_REGION")}
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {**env, "MIRROR_WEB_PRIVATE_HOSTS": "allow"}})
    yield
    ray.shutdown()


def inline_unit_batch(store: Path, unit_id: str, records, run: dict | None = None) -> dict:
    """The decode stage's batch of one inline unit of `records` (a table with `uri`), its
    records stored as a scan's plan stores them, its part bound for `store`."""
    from pipeline.scan.run import unit_descriptors
    from pipeline.scan.sources import Unit
    from pipeline.scan.store import PlanRecordsWriter, ScanStore

    out = ScanStore(str(store))
    unit = Unit(unit_id, "inline", records.num_rows)
    with PlanRecordsWriter(out) as sink:
        sink.add(unit, records)
    (item,) = unit_descriptors([unit], out, run or {"model_id": "m", "preprocess": "p", "threshold": 0.5}, None)
    return {k: [v] for k, v in item.items()}


def write_image(path: Path, size=(64, 48), seed=0, fmt=None) -> bytes:
    """A small random image file; returns its bytes."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format=fmt or {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[path.suffix[1:].lower()])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def tampered_copy(bundle: Path, dest: Path) -> Path:
    """A copy of a bundle with one bit of its weights flipped (its sha256 no longer matches)."""
    import shutil

    shutil.copytree(bundle, dest)
    data = bytearray((dest / "mirror.safetensors").read_bytes())
    data[-1] ^= 1
    (dest / "mirror.safetensors").write_bytes(bytes(data))
    return dest


@contextlib.contextmanager
def mirror_log_lines():
    """The messages logged on the `mirror` logger (at INFO) while inside, as a list."""
    import logging

    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logger = logging.getLogger("mirror")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield said
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def own_ray_env(**extra) -> dict:
    """The environment for a CLI run that starts its own local Ray (no RAY_ADDRESS)."""
    return {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **extra}


def kill_group_when(proc, ready, timeout_s: float) -> None:
    """SIGKILL `proc`'s process group (started with start_new_session) once `ready()`, once
    it has ended by itself, or after `timeout_s`; the caller asserts which it was."""
    import signal
    import time

    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
