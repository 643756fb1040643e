"""Cluster definitions (``cluster=``, clusters/aws, clusters/kuberay) and storage rules, without
starting anything: every definition composes, validates against its tool's schema, and names
the resources and storage a job needs."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from timfusion.platform.config import ROOT, compose, group_options
from timfusion.platform.errors import UserError

CLUSTERS = group_options("cluster")
REMOTE = ["aws", "kuberay"]


def test_the_four_documented_clusters_exist():
    assert {"local", "local_multinode", "aws", "kuberay"} <= set(CLUSTERS)


@pytest.mark.parametrize("name", CLUSTERS)
@pytest.mark.parametrize("job", ["train", "search", "meta"])
def test_every_cluster_composes_with_resources_and_storage(name, job):
    cluster = compose(job, [f"cluster={name}"]).cluster
    for key in ("backend", "address", "num_workers", "use_gpu", "cpus_per_worker", "storage_path",
                "max_failures", "max_concurrent_trials", "trial_cpus", "trial_gpus"):
        assert key in cluster, (name, key)
    if name in REMOTE:
        assert cluster.address == "auto" and str(cluster.storage_path).startswith("s3://")
        assert cluster.use_gpu is True and float(cluster.trial_gpus) >= 1


def test_aws_launcher_config_is_valid_for_ray_and_installs_the_project():
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    launcher = yaml.safe_load((ROOT / "clusters" / "aws" / "cluster.yaml").read_text())
    validate_config(fillout_defaults(launcher))  # Ray's own schema (ray-schema.json)
    types = launcher["available_node_types"]
    assert types[launcher["head_node_type"]]["resources"] == {"CPU": 0}
    workers = [t for name, t in types.items() if name != launcher["head_node_type"]]
    assert workers and all(t["node_config"]["InstanceType"].startswith(("g", "p"))
                           for t in workers)  # GPU types
    assert any("make install" in command for command in launcher["setup_commands"])
    for command in launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"]:
        assert "ray stop" in command or "timfusion/.venv/bin/ray start" in command
    assert not re.search(r"(?i)aws_secret|secret_access_key",
                         (ROOT / "clusters" / "aws" / "cluster.yaml").read_text())


def test_kuberay_manifests_have_a_gpu_group_and_a_job_that_composes():
    folder = ROOT / "clusters" / "kuberay"
    cluster = yaml.safe_load((folder / "raycluster.yaml").read_text())
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpu_groups = [g for g in cluster["spec"]["workerGroupSpecs"]
                  if any("nvidia.com/gpu" in c["resources"]["limits"]
                         for c in g["template"]["spec"]["containers"])]
    assert gpu_groups
    from importlib.metadata import version

    assert cluster["spec"]["rayVersion"] == version("ray")
    assert f"rayproject/ray:{version('ray')}-py311" in (folder / "Dockerfile").read_text()
    job = yaml.safe_load((folder / "rayjob.yaml").read_text())
    assert (job["kind"] == "RayJob"
            and job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"])
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:2] == ["timfusion", "search"] and "cluster=kuberay" in words
    compose("search", words[2:])  # the job's overrides are valid keys and values


def test_cluster_admin_on_a_remote_cluster_names_its_tool(cli):
    code, _, err = cli("cluster", "up", "cluster=aws")
    assert code == 2 and "ray up clusters/aws/cluster.yaml" in err and len(err.strip().splitlines()) == 1


def test_local_multinode_without_a_cluster_up_is_one_line(tmp_path):
    from timfusion.platform.jobs.train import init_ray

    cluster = compose("train", ["cluster=local_multinode", f"cluster.state_dir={tmp_path}"]).cluster
    with pytest.raises(UserError, match="no local cluster is up here .*local_multinode.sh up"):
        init_ray(cluster)


def test_local_multinode_script_runs_the_cluster_command():
    script = (ROOT / "clusters" / "local_multinode.sh").read_text()
    assert "cluster \"$action\" cluster=local_multinode" in script
    assert Path(ROOT / "clusters" / "local_multinode.sh").stat().st_mode & 0o111


def test_redact_removes_inline_and_environment_credentials(monkeypatch):
    from timfusion.platform.storage import redact

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    text = ("s3://bucket/p?access_key=AKIAIOSFODNN7EXAMPLE&secret_key=abc123&scheme=http "
            "http://alice:hunter22@mlflow:5000 key wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    cleaned = redact(text)
    for secret in ("AKIAIOSFODNN7EXAMPLE", "abc123", "hunter22", "wJalrXUtnFEMI"):
        assert secret not in cleaned
    assert "scheme=http" in cleaned and "s3://bucket/p" in cleaned and "mlflow:5000" in cleaned


def test_storage_checks_pass_local_paths_and_name_the_key_for_a_dead_endpoint(tmp_path, monkeypatch):
    from helpers import free_port

    from timfusion.platform.storage import check_reachable

    check_reachable(str(tmp_path), "cluster.storage_path")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    with pytest.raises(UserError, match=r"tracking.artifact_root=s3://b/x: "
                                        r"S3 endpoint at http://127.0.0.1:\d+ "
                                        "not reachable"):
        check_reachable("s3://b/x", "tracking.artifact_root")


def test_storage_check_names_a_missing_bucket(s3_endpoint, monkeypatch):
    from timfusion.platform.storage import check_reachable

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    with pytest.raises(UserError, match="bucket 'nowhere' does not exist"):
        check_reachable("s3://nowhere/ray", "cluster.storage_path")


@pytest.mark.parametrize(
    "args, key",
    [
        (["fuse", "a=s3://nowhere/a.png", "b=s3://nowhere/b.png", "out=fused.png"], "a=s3://nowhere/a.png"),
        (["fuse", "data.root=s3://nowhere/pairs", "out=fused"], "data.root=s3://nowhere/pairs"),
        (["evaluate", "data.root=s3://nowhere/pairs", "fused=fused"], "data.root=s3://nowhere/pairs"),
        (["export", "model=s3://nowhere/model.pt", "out=fusion.onnx"], "model=s3://nowhere/model.pt"),
        (["data", "inspect", "data.root=s3://nowhere/pairs"], "data.root=s3://nowhere/pairs"),
    ],
)
def test_file_commands_name_the_key_of_an_s3_place_that_does_not_answer(cli, workdir, s3_endpoint,
                                                                         monkeypatch, args, key):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    code, _, err = cli(*args)
    assert code == 2 and f"{key}: bucket 'nowhere' does not exist" in err.strip().splitlines()[-1], err


def test_the_gcs_probes_answer_is_found_among_rays_own_output():
    from timfusion.platform.local_cluster import ALIVE_MARK, alive_ports

    noisy = (f"{ALIVE_MARK} [58483, 42001]\n"
             "\t(2) raylet has lagging heartbeats due to slow network or busy workload.\n")
    assert alive_ports(noisy) == {58483, 42001}
    assert alive_ports("Ray failed to connect\n") == set()
