"""Joining a Ray cluster, for every command that runs on one (scans, training)."""
from __future__ import annotations

import os


def ensure_ray(address: str | None = None) -> None:
    """Join `address` / RAY_ADDRESS, else start a local Ray (at least 4 logical CPUs so
    decode tasks and scoring actors both get slots on small machines)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=True)
