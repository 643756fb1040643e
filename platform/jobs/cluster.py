"""``timfusion cluster up|down|status|kill``: the local multi-node Ray cluster
(``cluster=local_multinode``)."""

from __future__ import annotations

import json
from typing import Any

from omegaconf import DictConfig

from timfusion.platform import local_cluster
from timfusion.platform.errors import UserError, check_bounds
from timfusion.platform.jobs import command

MIN_OBJECT_STORE_MB = 75  # Ray refuses an object store under 78,643,200 bytes
REMOTE_START = {
    "aws": "ray up clusters/aws/cluster.yaml",
    "kuberay": "kubectl apply -f clusters/kuberay/raycluster.yaml",
}


def _state_dir(cfg: DictConfig) -> str:
    if "state_dir" not in cfg.cluster:
        how = REMOTE_START.get(str(cfg.cluster.name))
        hint = f"start it with `{how}`" if how else "it is embedded: jobs start it themselves"
        raise UserError(f"cluster={cfg.cluster.name}: not a local multi-node cluster; {hint}")
    return str(cfg.cluster.state_dir)


@command("cluster up", config="cluster_admin",
         summary="start the local multi-node Ray cluster (a head, N worker nodes)")
def cluster_up(cfg: DictConfig) -> dict[str, Any]:
    state_dir = _state_dir(cfg)
    nodes = cfg.cluster.nodes
    check_bounds("cluster.nodes", nodes, at_least_one=("workers", "cpus_per_node"),
                 non_negative=("gpus_per_node", "head_cpus"))
    if not nodes.object_store_mb >= MIN_OBJECT_STORE_MB:  # ray start's own minimum, said before it starts
        raise UserError(f"cluster.nodes.object_store_mb must be >= {MIN_OBJECT_STORE_MB}, "
                        f"got {nodes.object_store_mb}")
    state = local_cluster.up(state_dir, workers=int(nodes.workers), cpus_per_worker=int(nodes.cpus_per_node),
                             gpus_per_worker=int(nodes.gpus_per_node), head_cpus=int(nodes.head_cpus),
                             object_store_mb=int(nodes.object_store_mb))
    print(f"cluster up at {state.address}: head + {len(state.nodes) - 1} worker node(s); "
          f"run jobs with cluster={cfg.cluster.name}")
    return local_cluster.status(state_dir)


@command("cluster status", config="cluster_admin", summary="the local cluster's address and nodes")
def cluster_status(cfg: DictConfig) -> dict[str, Any]:
    report = local_cluster.status(_state_dir(cfg))
    print(json.dumps(report, indent=1))
    return report


@command("cluster kill", config="cluster_admin", summary="kill one node of the local cluster (a fault drill)")
def cluster_kill(cfg: DictConfig) -> list[int]:
    if not cfg.node:
        raise UserError("node: required (pass node=worker-1, ...)")
    pids = local_cluster.kill_node(_state_dir(cfg), str(cfg.node))
    print(f"killed node {cfg.node}: {len(pids)} process(es)")
    return pids


@command("cluster down", config="cluster_admin", summary="stop every process of the local cluster")
def cluster_down(cfg: DictConfig) -> int:
    stopped = local_cluster.down(_state_dir(cfg))
    print(f"cluster down: {stopped} process(es) stopped")
    return stopped
