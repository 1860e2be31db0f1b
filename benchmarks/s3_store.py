"""What the S3 harnesses share: a moto server filled with objects, and their log entry."""
from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator

PERF_LOG = Path(__file__).resolve().parent / "results" / "perf-log.md"


@contextmanager
def moto_bucket(bucket: str, keys: list[str], body: Callable[[int], bytes]) -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 holding `keys` in `bucket` (key i holds body(i));
    yields its endpoint. Credentials are set for the clients of this process."""
    import boto3
    from conftest import _free_port
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the server's line per request
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        upstream = f"http://127.0.0.1:{port}"
        os.environ.update(AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="x", AWS_DEFAULT_REGION="us-east-1")
        client = boto3.client("s3", endpoint_url=upstream)
        client.create_bucket(Bucket=bucket)
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda i: client.put_object(Bucket=bucket, Key=keys[i], Body=body(i)), range(len(keys))))
        yield upstream
    finally:
        server.stop()


def stamped(figures: dict) -> dict:
    return {"date": datetime.now().strftime("%Y-%m-%d %H:%M"), "machine": f"{os.cpu_count()} cores", **figures}


def report(figures: dict, title: str, record: bool) -> dict:
    """Stamp a harness's figures, print them and, if `record`, append them to the log."""
    result = stamped(figures)
    print(json.dumps(result, indent=2))
    if record:
        log_figures(title, result)
    return result


def log_figures(title: str, result: dict) -> None:
    """Append the figures to the performance log under `title`."""
    with open(PERF_LOG, "a") as log:
        log.write(f"\n### {result['date']}: {title}\n\n```json\n" + json.dumps(result, indent=2) + "\n```\n")
