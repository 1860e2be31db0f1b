"""Joining a Ray cluster, for every command that runs on one (scans, training)."""
from __future__ import annotations

import logging
import os
import uuid
from contextlib import ExitStack, contextmanager, suppress
from typing import Any, Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def _quiet_default_auth(record: logging.LogRecord) -> bool:
    """Drops Ray's warning that a new local cluster got token authentication, its secure
    default (the warning tells how to opt out); its other warnings, such as
    authentication being disabled, pass."""
    return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


# A local Ray started here runs no dashboard, so no state API. Ray Train's placement-group
# cleaner asks that API every second whether the training controller lives; left to find
# the API on its own, it guesses among all Ray instances on the machine and, when there
# are several (two local runs at once), its thread dies with a traceback on the console.
# Port 0 takes no connection: the API is plainly unavailable, the cleaner says so (a line
# the console filter drops), and a local cluster, which ends with the command, needs no
# cleaning.
LOCAL_RUNTIME_ENV = {"env_vars": {"RAY_API_SERVER_ADDRESS": "http://127.0.0.1:0"}}


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
        logging.getLogger(AUTH_LOGGER).addFilter(_quiet_default_auth)
        ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=True,
                 runtime_env=LOCAL_RUNTIME_ENV)


class ResourcesError(ValueError):
    """A task or actor asks for more than any node of a Ray that cannot grow has."""


def _amounts(resources: dict[str, float]) -> str:
    return ", ".join(f"{v / 2**30:.3g} GiB memory" if k == "memory" else f"{v:g} {k}" for k, v in resources.items())


def unplaceable(requests: dict[str, dict[str, float]], counts: dict[str, int] | None = None) -> list[str]:
    """What the alive nodes could never run (by their total resources, busy or not), in
    words: `requests` names each kind of task or actor and the resources one asks for;
    `counts`, how many of a kind must run at once (training's workers; else one)."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    found = []
    for what, need in requests.items():
        need = {k: float(v) for k, v in need.items() if v}
        wanted = (counts or {}).get(what, 1)
        fits = sum(int(min((node.get(k, 0.0) / v for k, v in need.items()), default=wanted)) for node in nodes)
        if fits >= wanted:
            continue
        most = {k: max((node.get(k, 0.0) for node in nodes), default=0.0) for k in need}
        found.append(f"{what} asks for {_amounts(need)}, and no node has as much (the most a node has: "
                     f"{_amounts(most)})" if not fits else
                     f"{what} asks for {_amounts(need)}, {wanted} at once, and the nodes hold {fits}")
    return found


def require_placeable(requests: dict[str, dict[str, float]], address: str | None, hint: str,
                      counts: dict[str, int] | None = None) -> None:
    """Refuses work that could never start: on the local Ray a command starts for itself
    (no `address`, no RAY_ADDRESS), nothing adds a node, and Ray would wait forever. On a
    cluster an autoscaler may add such a node: a warning says what the work waits for."""
    found = unplaceable(requests, counts)
    if not found:
        return
    if address or os.environ.get("RAY_ADDRESS"):
        for line in found:
            logging.getLogger("mirror").warning("%s: it waits for the cluster to add nodes (%s)", line, hint)
        return
    raise ResourcesError("; ".join(found) + f" on this machine's Ray: {hint}")


def task_window(minimum: int = 8) -> int:
    """How many tasks of one CPU to keep submitted at once: twice the cluster's CPUs, so
    every CPU has a task waiting, while the rest of a long list waits as arguments, not as
    thousands of pending tasks and their results in the object store."""
    import ray

    return max(minimum, 2 * int(ray.cluster_resources().get("CPU", 1)))


def completed_tasks(submit: Callable[[T], Any], items: Iterable[T], window: int) -> Iterator[tuple[T, Any]]:
    """(item, ObjectRef) for each item, as its task (`submit(item)`) finishes, with at most
    `window` submitted and unfinished at once. A slow task holds one slot, not the rest."""
    import ray

    running: dict[Any, T] = {}
    pending = iter(items)
    for item in pending:
        running[submit(item)] = item
        if len(running) >= window:
            break
    while running:
        (ready,), _ = ray.wait(list(running), num_returns=1)
        yield running.pop(ready), ready
        for item in pending:  # one finished: one more
            running[submit(item)] = item
            break


def resources_line() -> str:
    """The cluster's nodes and free resources in one line, for a report on a stalled run:
    'nodes: 2 alive, 1 lost; CPU 0 of 4 free; GPU 1 of 2 free'."""
    import ray

    nodes = ray.nodes()
    alive = sum(1 for n in nodes if n.get("Alive"))
    total, free = ray.cluster_resources(), ray.available_resources()
    parts = [f"nodes: {alive} alive" + (f", {len(nodes) - alive} lost" if alive < len(nodes) else "")]
    parts += [f"{name} {free.get(name, 0):g} of {total[name]:g} free" for name in ("CPU", "GPU") if total.get(name)]
    return "; ".join(parts)


# How long the nodes have, together, to say which paths they see: a node's first task may
# wait for its runtime environment (the job's pip install), which the scan's tasks would
# wait for all the same. A node that has not answered by then is left unchecked.
NODE_LOOK_TIMEOUT_S = 120.0


def _visible(paths: list[str]) -> list[bool]:
    return [os.path.exists(p) for p in paths]


def other_nodes() -> list[dict]:
    """The alive nodes of the cluster other than this process's."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    return [n for n in ray.nodes() if n.get("Alive") and n["NodeID"] != here]


def unseen_paths(paths: list[str]) -> dict[str, list[str]]:
    """The local `paths` that some other alive node of the cluster does not see: {path: its
    nodes}. Empty on one node, or where every node mounts them (NFS at the same place). A
    zero-CPU task on each other node looks, all at once."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = other_nodes()
    if not paths or not nodes:
        return {}
    look = ray.remote(num_cpus=0, max_retries=0)(_visible)
    refs = {f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})": look.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(paths) for n in nodes}
    ray.wait(list(refs.values()), num_returns=len(refs), timeout=NODE_LOOK_TIMEOUT_S)
    unseen: dict[str, list[str]] = {}
    for node, ref in refs.items():
        try:
            seen = ray.get(ref, timeout=0)
        except ray.exceptions.RayError as err:  # a node leaving, or too busy to say in time
            logging.getLogger("mirror").warning("could not check the paths node %s sees: %s", node,
                                                type(err).__name__)
            ray.cancel(ref, force=True)
            continue
        for path, ok in zip(paths, seen):
            if not ok:
                unseen.setdefault(path, []).append(node)
    return unseen


@contextmanager
def probe_file(folder: str) -> Iterator[str]:
    """A new empty file in a local folder, for other nodes to look for (the folder itself
    could exist on each node's own disk, left there by an earlier run); removed after."""
    path = os.path.join(folder, f".mirror-node-check-{uuid.uuid4().hex}")
    open(path, "wb").close()
    try:
        yield path
    finally:
        with suppress(FileNotFoundError):
            os.remove(path)


def require_shared_paths(inputs: dict[str, str], outputs: dict[str, str]) -> None:
    """Fails when a local path that a command's tasks read ({path: its option, e.g.
    '--input'}) or write in ({folder: its option}) is not seen by every node of the cluster:
    tasks on those nodes would read nothing, or write parts where no one finds them. Only
    paths this process sees are checked, and only on a cluster of several nodes."""
    if not (inputs or outputs) or not other_nodes():
        return
    with ExitStack() as stack:
        named = {path: f"{what} {path}" for path, what in inputs.items() if os.path.exists(path)}
        for folder, what in outputs.items():
            if os.path.isdir(folder):
                named[stack.enter_context(probe_file(folder))] = f"{what} {folder}"
        for path, nodes in unseen_paths(list(named)).items():
            raise ValueError(f"{named[path]} is a local path that {len(nodes)} node(s) of the cluster do not see "
                             f"({', '.join(sorted(nodes))}): on several nodes use a filesystem every node mounts at "
                             "the same path, or an object store (s3://...)")
