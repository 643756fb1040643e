"""The CLI and configuration: composition, validation before work, one-line errors."""

from __future__ import annotations

import sys

import pytest
from helpers import run_cli

from timfusion.platform.config import compose, flatten, group_options, to_container
from timfusion.platform.errors import UserError, check_size
from timfusion.platform.jobs import COMMANDS, load_all

load_all()


def test_top_level_help_lists_every_command(cli):
    code, out, _ = cli("--help")
    assert code == 0
    for name in COMMANDS.names():
        assert name in out


MODEL_COMMANDS = {"register", "promote", "models", "export"}


@pytest.mark.parametrize("name", COMMANDS.names())
def test_every_command_composes_and_shows_its_config(name):
    cmd = COMMANDS.get(name)
    cfg = compose(cmd.config, [])
    if name.startswith("cluster "):  # they act on a Ray cluster, no task or store involved
        assert cfg.cluster.name == "local_multinode" and "task" not in cfg
        assert run_cli(*name.split(" "), "--help").returncode == 0
        return
    assert "paths" in cfg
    if name in MODEL_COMMANDS:  # they act on stored models, whose task comes with them
        assert "tracking" in cfg and "task" not in cfg
    else:
        assert "task" in cfg or "tasks" in cfg.meta  # one task, or (meta) a list of them
    args = name.split(" ") + ["--help"]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert "configuration" in result.stdout
    if name not in MODEL_COMMANDS:
        assert "task:" in result.stdout or "tasks:" in result.stdout


def test_task_group_lists_every_registered_task():
    from timfusion.tasks import TASKS

    assert set(TASKS.names()) == set(group_options("task"))


@pytest.mark.parametrize(
    "override, expected",
    [
        ("task=nope", "valid choices: ir_vis, medical"),
        ("bogus=1", "bogus: unknown key; valid keys: a, b, data"),
        ("data.bogus=1", "unknown key under 'data'; valid keys: dataset, filter, root, split"),
        # a group's name where fuse keeps a mapping of that name, and a key under a missing parent
        ("data=task", "data=task: not a config group of this command; set its keys: data.dataset"),
        ("data.source.kind=1", "data.source.kind: unknown key under 'data'; valid keys: dataset, filter"),
        ("resize.x=1", "resize.x: resize is a value, not a mapping of keys"),
        ("model=", None),
    ],
)
def test_bad_overrides_fail_before_work_with_one_line(cli, tmp_path, override, expected):
    code, out, err = cli("fuse", override, f"out={tmp_path / 'x.png'}", "a=missing.png", "b=missing.png")
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    if expected:
        assert expected in err
    assert not (tmp_path / "x.png").exists()


def refused_before_work(cli, workdir, args: list[str], expected: str) -> None:
    """The command exits 2 with one line that holds ``expected``, and starts no run."""
    code, _, err = cli(*args)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert expected in err
    assert not (workdir / "runs").exists()


@pytest.mark.parametrize(
    "command, override, expected",
    [
        ("train", "train.steps=abc", "train.steps=abc: expected an integer (default 600)"),
        ("train", "train.crop=1.5", "train.crop=1.5: expected an integer"),
        ("train", "train.lr=fast", "train.lr=fast: expected a number (default 0.002)"),
        ("adapt", "steps=many", "steps=many: expected an integer (default 200)"),
        ("meta", "meta.cross_losses=maybe", "cross_losses=maybe: expected true or false (default false)"),
        ("search", "tune.asha.enabled=1", "tune.asha.enabled=1: expected true or false"),
        ("meta", "meta.exclude=multi_focus", "meta.exclude=multi_focus: expected a list, such as [a,b]"),
    ],
)
def test_an_override_of_the_wrong_type_is_one_line_before_work(cli, workdir, command, override, expected):
    refused_before_work(cli, workdir, [command, override], expected)


@pytest.mark.parametrize(
    "command, overrides, expected",
    [
        ("train", ["train.lr=-1"], "train.lr must be > 0, got -1"),
        ("train", ["train.batch_size=0"], "train.batch_size must be >= 1, got 0"),
        ("train", ["train.val_every=-1"], "train.val_every must be >= 0, got -1"),
        ("train", ["train.val_max_pairs=0"], "train.val_max_pairs must be >= 1 or null, got 0"),
        ("train", ["train.time_budget_s=0"], "train.time_budget_s must be > 0 or null, got 0"),
        ("train", ["guidance.head_width=0"], "guidance.head_width must be >= 1, got 0"),
        ("adapt", ["steps=0"], "steps must be >= 1, got 0"),
        # before init=multitask's meta-training, which would otherwise run first
        ("adapt", ["init=multitask", "train.grad_clip=0"], "train.grad_clip must be > 0, got 0"),
        # the retraining's config is checked before the trials, not after them
        ("search", ['retrain.overrides=["train.weight_decay=-1"]'], "train.weight_decay must be >= 0"),
        ("search", ["trials=0"], "trials must be >= 1, got 0"),
        ("search", ["search.warmup_steps=-1"], "search.warmup_steps must be >= 0, got -1"),
        ("meta", ["meta.outer_lr=0"], "meta.outer_lr must be > 0, got 0"),
        # seeds: numpy, torch and Optuna each refuse their own way, some in a worker that restarts
        ("train", ["train.seed=-1"], "train.seed must be an integer in 0..4294967295, got -1"),
        ("meta", ["meta.seed=-1"], "meta.seed must be an integer in 0..4294967295, got -1"),
        ("search", ["seed=4294967296"], "seed must be an integer in 0..4294967295, got 4294967296"),
        ("run", ["seed=-1"], "seed must be an integer in 0..4294967295, got -1"),
        # the main job: a late stage's names and counts before the first stage's work
        ("run", ["metrics=[BOGUS]"], "metrics: unknown tang metric(s) BOGUS"),
        ("run", ["baselines=[lp,bogus]"], "baselines: unknown baseline 'bogus'"),
        ("run", ["meta.algorithm=anil"], "meta.algorithm: unknown meta-learning algorithm 'anil'"),
        ("run", ["meta.held_out=ir_vis", "meta.tasks=[mri_ct,multi_focus]"],
         "meta.held_out=ir_vis: not among meta.tasks (mri_ct, multi_focus)"),
        ("run", ["search.trials=0"], "search.trials must be >= 1, got 0"),
        ("train", ["data.val_seed=-1"], "data.val_seed must be an integer in 0..4294967295, got -1"),
        ("train", ["data.val_fraction=1"], "data.val_fraction must be > 0 and < 1, got 1"),
        ("train", ["data=synthetic", "data.synthetic.size=[64]"],
         "data.synthetic.size: expected [height, width] of integers >= 16, got [64]"),
        ("promote", ["name=timfusion-ir_vis", "version=0"], "version must be >= 1, got 0"),
        # the registry name of register=true: before the job's work, not after it
        ("train", ["register=true", "register_name=team/ir"], "register_name=team/ir: expected letters"),
        ("meta", ["register=true", "register_name=team/ir"], "register_name=team/ir: expected letters"),
        ("search", ["register=true", "register_name=team/ir"], "register_name=team/ir: expected letters"),
        ("adapt", ["init=multitask", "register=true", "register_name=team/ir"], "register_name=team/ir"),
        ("cluster", ["up", "cluster.nodes.workers=0"], "cluster.nodes.workers must be >= 1, got 0"),
        ("cluster", ["up", "cluster.nodes.object_store_mb=1"],
         "cluster.nodes.object_store_mb must be >= 75, got 1"),
        # what Optuna may draw: every choice and both ends, before any trial fails on it in a worker
        ("search", ["tune.space.cost_weight.low=-1"],
         "tune.space.cost_weight may draw -1: search.cost_weight must be >= 0, got -1"),
        ("search", ["tune.space.hypergrad.choices=[implicit,bogus]"],
         "tune.space.hypergrad may draw bogus: search.hypergrad=bogus: unknown hypergradient method 'bogus'"),
        ("search", ["search.cost=flops"], "search.cost=flops: unknown; valid choices: params, macs, latency"),
        # options of a method Tune has not drawn yet; the old flat form names its key
        ("search", ["+search.hypergrad_options.tim={bogus: 1}"],
         "search.hypergrad_options.tim: hypergradient tim: bad options {'bogus': 1}"),
        ("search", ["search.hypergrad_options={terms: 2}"],
         "search.hypergrad_options.terms: expected options under a hypergradient method"),
        ("search", ["+tune.space={loss.gradient: {type: float, low: -1, high: 2}}"],
         "tune.space.loss.gradient may draw -1: loss term 'gradient': weight must be finite and >= 0"),
        ("export", ["model=model.pt", "out=fusion.onnx", "tolerance=-1"], "tolerance must be >= 0, got -1"),
    ],
)
def test_a_value_out_of_range_is_one_line_before_work(cli, workdir, command, overrides, expected):
    refused_before_work(cli, workdir, [command, *overrides], expected)
    assert not (workdir / "outputs").exists()


def test_a_search_name_is_refused_as_a_runs_is_before_ray(cli, workdir):
    """resume=true of no search; a new search into a folder of the workdir that is not a search's."""
    searches = workdir / "outputs" / "search"  # search's workdir
    refused_before_work(cli, workdir, ["search", "resume=true", "name=ghost"],
                        f"resume=true: no search 'ghost' under {searches} to resume (pass its name=)")
    (searches / "genotypes").mkdir(parents=True)
    (searches / "genotypes" / "mine.json").write_text("{}")
    refused_before_work(cli, workdir, ["search", "name=genotypes"],
                        f"name=genotypes: a search of that name exists under {searches}; pass resume=true")
    assert [p.name for p in (searches / "genotypes").iterdir()] == ["mine.json"]


@pytest.mark.parametrize(
    "command, overrides, expected",
    [
        ("train", ["val_metrics=[EN,BOGUS]"], "val_metrics: unknown tang metric(s) BOGUS"),
        # VIF's coarsest scale needs 41 px: the run would fail at its first validation
        ("train", ["data=synthetic", "data.synthetic.size=[40,64]"],
         "val_metrics, validation pair synthetic/synth_0002: VIF cannot score 40x64 images: image 2x5 "
         "(padded) is smaller than the 3x3 kernel"),
        # search: the retraining's validation, which comes after every trial
        ("search", ["data=synthetic", "data.synthetic.size=[40,64]"],
         "val_metrics, validation pair synthetic/synth_0002: VIF cannot score 40x64"),
        # adapt init=multitask: before the baseline's meta-training
        ("adapt", ["init=multitask", "data=synthetic", "data.synthetic.size=[40,64]"],
         "val_metrics, validation pair synthetic/synth_0002: VIF cannot score 40x64"),
    ],
)
def test_validation_that_cannot_be_scored_is_refused_before_training(cli, workdir, command, overrides,
                                                                     expected):
    refused_before_work(cli, workdir, [command, *overrides], expected)


def test_models_of_an_unknown_name_is_one_line(cli, workdir):
    code, _, err = cli("models", "name=nosuch")  # MLflow's own lines on creating the store come first
    assert code == 2 and "name=nosuch: no registered model of that name" in err.strip().splitlines()[-1], err


@pytest.mark.parametrize("override", ["data.filter={split: val}", "data.filter.split=val"])
def test_a_free_form_mapping_takes_the_users_keys(cli, tmp_path, override):
    """data.filter (and tags) are empty by default: their keys are the user's, which Hydra's
    struct mode would refuse as unknown."""
    from timfusion.tasks.datasets import read_manifest

    root = tmp_path / "pairs"
    assert cli("data", "synth", f"out={root}", "n=10")[0] == 0
    code, out, err = cli("data", "inspect", f"data.root={root}", override, "check=false")
    assert code == 0, err
    val = [r for r in read_manifest(str(root / "MANIFEST.tsv")) if r.fields.get("split") == "val"]
    assert 0 < len(val) < 10 and f"splits        {{'val': {len(val)}}}" in out


def test_a_free_form_mapping_still_refuses_keys_beside_it():
    cfg = compose("train", ["tags.team=vision", "data.filter={task: mri_pet}"])
    assert cfg.tags.team == "vision" and dict(cfg.data.filter) == {"task": "mri_pet"}
    with pytest.raises(UserError, match="data.bogus: unknown key under 'data'"):
        compose("train", ["data.bogus=1"])
    # tune.space and gate.metrics hold the user's names, though not empty by default
    cfg = compose("search", ["tune.space.width={type: int, low: 8, high: 16}",
                             "tune.space={loss.gradient: {type: float, low: 0, high: 2}}"])
    assert cfg.tune.space.width.high == 16 and {"hypergrad", "loss.gradient"} <= set(cfg.tune.space)
    # hypergradient options are by method, and each method's are its class's keyword arguments
    cfg = compose("search", ["search.hypergrad_options.implicit.epsilon=0.02",
                             "search.hypergrad_options.tim.sign=1.0"])
    options = cfg.search.hypergrad_options
    assert options.implicit.epsilon == 0.02 and dict(options.tim) == {"sign": 1.0}
    cfg = compose("promote", ["gate.metrics.SSIM=0.01"])
    assert dict(cfg.gate.metrics) == {"VIF": 0.0, "Qabf": 0.0, "SSIM": 0.01}
    with pytest.raises(UserError, match="tune.bogus: unknown key under 'tune'"):
        compose("search", ["tune.bogus=1"])
    with pytest.raises(UserError, match="tune.space.alpha_lr.bogus: unknown key under 'tune.space.alpha_lr'"):
        compose("search", ["tune.space.alpha_lr.bogus=1"])


@pytest.mark.parametrize(
    "uri, expected",
    [("bogus://store", "tracking.uri=bogus://store: MLflow has no store for bogus://"),
     ("mlruns", "tracking.uri=mlruns: MLflow 3 opens a folder store only with MLFLOW_ALLOW_FILE_STORE=true")],
)
def test_a_tracking_uri_mlflow_cannot_open_is_one_line(cli, workdir, monkeypatch, uri, expected):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    code, _, err = cli("models", f"tracking.uri={uri}")
    assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err, err
    assert list(workdir.iterdir()) == []


def test_a_folder_store_passes_where_mlflow_is_told_to_allow_it(monkeypatch, tmp_path):
    from timfusion.platform.tracking import tracking_uri

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert tracking_uri(str(tmp_path)) == str(tmp_path)
    assert tracking_uri("postgresql+psycopg2://db/mlflow") == "postgresql+psycopg2://db/mlflow"


@pytest.mark.parametrize(
    "command, overrides, expected",
    [
        ("train", ["cluster.num_workers=64"], "num_workers=64 x cluster.cpus_per_worker=1: the cluster"),
        ("meta", ["cluster.num_workers=64"], "num_workers=64 x cluster.cpus_per_worker=1: the cluster"),
        ("search", ["cluster.trial_cpus=64"], "cluster.trial_cpus=64, cluster.trial_gpus=0: the cluster"),
        ("train", ["cluster.cpus_per_worker=0"], "cluster.cpus_per_worker must be > 0, got 0"),
    ],
)
def test_workers_a_fixed_size_cluster_can_never_hold_are_refused_before_ray(cli, workdir, command, overrides,
                                                                            expected):
    refused_before_work(cli, workdir, [command, *overrides], expected)


def test_placement_counts_what_each_node_holds(monkeypatch, tmp_path):
    from timfusion.platform.jobs.train import check_placeable
    from timfusion.platform.local_cluster import ClusterState, Node

    monkeypatch.delitem(sys.modules, "ray", raising=False)  # not joined yet: what `cluster up` started counts
    nodes = [Node("head", 0, 0), Node("worker-1", 2, 0), Node("worker-2", 2, 0)]
    ClusterState("127.0.0.1:1", 1, str(tmp_path), nodes).write(tmp_path)
    cluster = compose("train", ["cluster=local_multinode", f"cluster.state_dir={tmp_path}"]).cluster
    check_placeable(cluster, 4, 1.0, 0.0, "four 1-CPU workers")
    nodes_shown = r"nodes of 0 CPU\(s\), 2 CPU\(s\), 2 CPU\(s\)\)"
    with pytest.raises(UserError, match=rf"three 2-CPU workers: .*{nodes_shown} holds 2"):
        check_placeable(cluster, 3, 2.0, 0.0, "three 2-CPU workers")
    with pytest.raises(UserError, match="holds 0 at once"):  # no node has 3 CPUs
        check_placeable(cluster, 1, 3.0, 0.0, "one 3-CPU worker")
    joined = compose("train", ["cluster.address=ray://head:10001"]).cluster  # may autoscale: not checked
    check_placeable(joined, 1000, 1.0, 1.0, "a thousand GPU workers")


def test_overrides_keep_the_types_their_defaults_allow():
    # an integer where a float is the default, null, and a value of another option's type
    # (cluster=local's num_workers is "auto", aws's 4) all pass
    cfg = compose("train", ["train.lr=1", "train.val_max_pairs=null", "cluster=aws",
                            "cluster.num_workers=auto"])
    assert (cfg.train.lr, cfg.train.val_max_pairs, cfg.cluster.num_workers) == (1, None, "auto")
    assert compose("train", ["task=medical", "task.loss.intensity=2"]).task.loss.intensity == 2


@pytest.mark.parametrize(
    "override, expected",
    [("cluster.num_workers=abc", "cluster.num_workers=abc: expected auto or an integer >= 1"),
     ("cluster.num_workers=true", "cluster.num_workers=True: expected auto or an integer >= 1"),
     ("cluster.num_workers=0", "cluster.num_workers=0: expected auto or an integer >= 1"),
     ("cluster.use_gpu=maybe", "cluster.use_gpu=maybe: expected auto, true or false")],
)
def test_cluster_values_of_a_string_typed_key_are_checked_before_ray(override, expected):
    from timfusion.platform.jobs.train import resolve_workers

    with pytest.raises(UserError, match=expected):
        resolve_workers(compose("train", [override]).cluster)


@pytest.mark.parametrize("value", [[64], [64, 64, 64], [64.5, 64], [64.0, 64], [True, 64], [0, 64],
                                   ["64", 64], "64x64", 64, None, {"height": 64, "width": 64}])
def test_a_size_is_two_integers_and_never_truncated(value):
    with pytest.raises(UserError, match=r"^gate\.size: expected \[height, width\] of integers >= 1, got "):
        check_size("gate.size", value)


def test_a_size_from_a_config_list_is_height_then_width():
    assert check_size("size", compose("arch_show", ["size=[48,64]"]).size, minimum=16) == (48, 64)
    assert check_size("size", (16, 16), minimum=16) == (16, 16)  # the minimum itself passes


def test_missing_required_key_is_named(cli):
    code, _, err = cli("evaluate", "data.root=somewhere")
    assert code == 2 and "fused: required" in err


def test_unknown_command_and_action(cli):
    assert cli("nope")[0] == 2
    code, _, err = cli("data", "nope")
    assert code == 2 and "synth" in err


def test_flatten_and_container():
    cfg = compose("fuse", ["task=medical"])
    flat = flatten(to_container(cfg))
    assert flat["task.name"] == "medical"
    assert flat["task.loss.intensity"] == 1.0


def test_compose_error_is_user_error():
    with pytest.raises(UserError):
        compose("fuse", ["task=unknown_task"])
