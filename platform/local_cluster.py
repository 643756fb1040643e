"""A real multi-node Ray cluster on this machine: a head and N worker nodes, each its own
``ray start`` (its own raylet, object store and worker processes), for fault drills and
scale measurements without a cloud.

The cluster is described by a state file (``cluster.json`` in the state folder): the GCS
address and, per node, the ports that identify its processes. ``down`` and
``kill_node`` act on exactly those processes, never on another Ray on the machine (which
``ray stop`` would kill too).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from timfusion.platform.errors import UserError

STATE_FILE = "cluster.json"
ALIVE_MARK = "timfusion-alive-ports:"  # marks the GCS probe's answer among Ray's own output
PORT_KEYS = ("node_manager_port", "object_manager_port", "dashboard_agent_listen_port",
             "dashboard_agent_grpc_port", "runtime_env_agent_port", "metrics_export_port")


@dataclass
class Node:
    """One ``ray start`` of the cluster: ``head`` or ``worker-N``, its resources and ports."""

    name: str
    cpus: int
    gpus: int
    ports: dict[str, int] = field(default_factory=dict)


@dataclass
class ClusterState:
    """What ``up`` started: the address drivers join and the nodes."""

    address: str
    gcs_port: int
    temp_dir: str
    nodes: list[Node]

    @classmethod
    def read(cls, state_dir: str | os.PathLike) -> ClusterState | None:
        path = Path(state_dir) / STATE_FILE
        if not path.exists():
            return None
        try:
            raw = json.loads(path.read_text())
            return cls(raw["address"], int(raw["gcs_port"]), raw["temp_dir"],
                       [Node(**n) for n in raw["nodes"]])
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(f"{path}: not a cluster state file ({err}); remove it and run up again") from None

    def write(self, state_dir: Path) -> None:
        from timfusion.tasks.imageio import atomic_write_text

        atomic_write_text(state_dir / STATE_FILE, json.dumps(asdict(self), indent=1))

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise UserError(f"node={name}: not a node of this cluster; "
                        f"valid: {', '.join(n.name for n in self.nodes)}")


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 now."""
    sockets, ports = [], []
    try:
        for _ in range(count):
            handle = socket.socket()
            handle.bind(("127.0.0.1", 0))
            sockets.append(handle)
            ports.append(handle.getsockname()[1])
    finally:
        for handle in sockets:
            handle.close()
    return ports


def _ray_executable() -> str:
    candidate = Path(sys.executable).parent / "ray"
    return str(candidate) if candidate.exists() else "ray"


def _environment() -> dict[str, str]:
    return {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
            "RAY_USAGE_STATS_ENABLED": "0"}


def _start_node(node: Node, state: ClusterState, head: bool, object_store_mb: int, log: Path) -> None:
    args = [_ray_executable(), "start", "--node-ip-address=127.0.0.1", f"--num-cpus={node.cpus}",
            f"--num-gpus={node.gpus}", f"--object-store-memory={object_store_mb * 1024 * 1024}",
            "--disable-usage-stats", f"--resources={json.dumps({node.name: 1})}"]
    args += [f"--{key.replace('_', '-')}={port}" for key, port in node.ports.items()]
    if head:
        args += ["--head", f"--port={state.gcs_port}", "--include-dashboard=false",
                 f"--temp-dir={state.temp_dir}"]
    else:
        args += [f"--address={state.address}"]
    with open(log, "a") as handle:
        handle.write(f"$ {' '.join(args)}\n")
        handle.flush()
        done = subprocess.run(args, stdout=handle, stderr=subprocess.STDOUT, env=_environment(), timeout=180)
    if done.returncode != 0:
        tail = log.read_text().strip().splitlines()[-1:] or [""]
        raise UserError(f"ray start of {node.name} failed (exit {done.returncode}; log {log}): {tail[0]}")


def up(state_dir: str | os.PathLike, workers: int, cpus_per_worker: int, gpus_per_worker: int = 0,
       head_cpus: int = 0, object_store_mb: int = 256, timeout_s: float = 120.0) -> ClusterState:
    """Start a head and ``workers`` worker nodes; returns once every node is alive in the GCS."""
    folder = Path(state_dir).resolve()
    existing = ClusterState.read(folder)
    if existing is not None and alive_nodes(existing):
        raise UserError(f"{folder / STATE_FILE}: a cluster is already up at {existing.address}; "
                        "run down first")
    if workers < 1 or cpus_per_worker < 1 or head_cpus < 0:
        raise UserError("workers and cpus_per_worker must be >= 1, head_cpus >= 0")
    folder.mkdir(parents=True, exist_ok=True)
    ports = iter(free_ports(len(PORT_KEYS) * (workers + 1) + 1))
    gcs_port = next(ports)
    temp_dir = Path(f"/tmp/timfusion-ray-{gcs_port}")  # short: Ray's socket paths must stay under 108 bytes
    nodes = [Node("head", head_cpus, 0, {k: next(ports) for k in PORT_KEYS})]
    nodes += [Node(f"worker-{i}", cpus_per_worker, gpus_per_worker, {k: next(ports) for k in PORT_KEYS})
              for i in range(1, workers + 1)]
    state = ClusterState(f"127.0.0.1:{gcs_port}", gcs_port, str(temp_dir), nodes)
    state.write(folder)  # written first: down can clean up after a half-started cluster
    log = folder / "cluster.log"
    try:
        for node in nodes:
            _start_node(node, state, node.name == "head", object_store_mb, log)
        deadline = time.time() + timeout_s
        while len(alive_nodes(state)) < len(nodes):
            if time.time() > deadline:
                raise UserError(f"cluster at {state.address}: {len(alive_nodes(state))} of {len(nodes)} "
                                f"nodes alive after {timeout_s:.0f} s (log {log})")
            time.sleep(0.5)
    except BaseException:
        down(folder)
        raise
    return state


def _processes_of(state: ClusterState) -> list[Any]:
    """Every process of the cluster (found by its ports, address or session folder) and their
    descendants (workers, agents)."""
    import psutil

    marks = [f"={port}" for node in state.nodes for port in node.ports.values()]
    marks += [state.address, state.temp_dir]
    roots = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info.get("cmdline") or []
        if (any(mark in arg for arg in cmdline for mark in marks)
                and not any("ray start" in a for a in cmdline)):
            roots.append(process)
    found = {p.pid: p for p in roots}
    for process in roots:
        try:
            found.update({child.pid: child for child in process.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    return list(found.values())


def _raylet(node: Node) -> Any | None:
    import psutil

    mark = f"--node_manager_port={node.ports['node_manager_port']}"
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info.get("cmdline") or []
        if cmdline and Path(cmdline[0]).name == "raylet" and mark in cmdline:
            return process
    return None


def alive_nodes(state: ClusterState) -> list[str]:
    """The names of the nodes whose raylet runs and is registered alive in the GCS."""
    running = [node for node in state.nodes if _raylet(node) is not None]
    if not running:
        return []
    ports = _gcs_alive_ports(state)
    return [node.name for node in running if node.ports["node_manager_port"] in ports]


def _gcs_alive_ports(state: ClusterState) -> set[int]:
    """Node-manager ports of the nodes the GCS reports alive (empty when it does not answer)."""
    script = (
        "import json, ray\n"
        f"ray.init(address={state.address!r}, log_to_driver=False, logging_level='ERROR')\n"
        f"print({ALIVE_MARK!r}, json.dumps([n['NodeManagerPort'] for n in ray.nodes() if n['Alive']]))\n"
    )
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                              env=_environment())
    except subprocess.TimeoutExpired:
        return set()
    return alive_ports(done.stdout) if done.returncode == 0 else set()


def alive_ports(output: str) -> set[int]:
    """The ports in the GCS probe's output; Ray may print its own warnings to stdout around
    them (lagging heartbeats after a node is lost), so the answer is found by its mark."""
    answers = [line[len(ALIVE_MARK):] for line in output.splitlines() if line.startswith(ALIVE_MARK)]
    return set(json.loads(answers[-1])) if answers else set()


def kill_node(state_dir: str | os.PathLike, name: str, sig: int = signal.SIGKILL) -> list[int]:
    """Kill one node's raylet and everything under it (its workers, agents): a lost machine."""
    state = _required(state_dir)
    node = state.node(name)
    raylet = _raylet(node)
    if raylet is None:
        raise UserError(f"node {name}: its raylet is not running")
    victims = [raylet, *raylet.children(recursive=True)]
    for process in victims:
        try:
            process.send_signal(sig)
        except Exception:  # already gone
            pass
    return [p.pid for p in victims]


def down(state_dir: str | os.PathLike, timeout_s: float = 10.0) -> int:
    """Stop every process of the cluster (SIGTERM, then SIGKILL) and remove its session folder;
    the number of processes stopped."""
    import psutil

    folder = Path(state_dir).resolve()
    state = ClusterState.read(folder)
    if state is None:
        return 0
    processes = _processes_of(state)
    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=timeout_s / 2)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout_s / 2)
    # this cluster's own session folder (its logs: cluster.log stays)
    shutil.rmtree(state.temp_dir, ignore_errors=True)
    (folder / STATE_FILE).unlink(missing_ok=True)
    return len(processes)


def status(state_dir: str | os.PathLike) -> dict[str, Any]:
    """The address and, per node, its resources and whether it is alive."""
    state = _required(state_dir)
    alive = set(alive_nodes(state))
    return {"address": state.address,
            "nodes": [{"name": n.name, "cpus": n.cpus, "gpus": n.gpus, "alive": n.name in alive}
                      for n in state.nodes]}


def _required(state_dir: str | os.PathLike) -> ClusterState:
    state = ClusterState.read(Path(state_dir).resolve())
    if state is None:
        raise UserError(f"{Path(state_dir).resolve() / STATE_FILE}: no local cluster is up here "
                        "(start one: clusters/local_multinode.sh up)")
    return state


def address_of(state_dir: str | os.PathLike) -> str:
    """The GCS address a driver joins (``cluster=local_multinode``); an error when none is up."""
    import psutil

    state = _required(state_dir)
    mark = f"--gcs_server_port={state.gcs_port}"
    if not any(mark in (p.info.get("cmdline") or []) for p in psutil.process_iter(["cmdline"])):
        raise UserError(f"{Path(state_dir).resolve() / STATE_FILE}: the cluster at {state.address} is not "
                        "running (start it: clusters/local_multinode.sh up)")
    return state.address
