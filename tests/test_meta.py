"""Meta-initialization (learn2learn MAML, first-order MAML, MetaSGD, Reptile, multitask) and adaptation."""

from __future__ import annotations

import io
import re

import pytest
import torch
from helpers import job_metric_history, job_tags

from timfusion.meta.algorithms import META_ALGORITHMS, build_algorithm, fusion_loss
from timfusion.meta.sampler import TaskSampler, included_tasks
from timfusion.platform.config import compose, task_config
from timfusion.platform.errors import UserError
from timfusion.search_spaces.network import FusionNetwork
from timfusion.tasks import build_task

TASKS = ["ir_vis", "mri_ct", "multi_exposure", "multi_focus"]
QUICK = [
    "data.synthetic.n=6", "data.synthetic.size=[48,48]", "meta.crop=32", "meta.support=2", "meta.query=2",
    "meta.inner_steps=1", "meta.log_every=1", "meta.checkpoint_every=2", f"meta.tasks=[{','.join(TASKS)}]",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    """Synthetic pairs of four task families, as the sampler's pools."""
    from timfusion.tasks.datasets import load_records
    from timfusion.tasks.synthetic import synthesize

    out = {}
    for name in TASKS:
        task = build_task(task_config(name))
        root = tmp_path_factory.mktemp(name)
        synthesize(task.synthetic, root, n=4, seed=1, size=(40, 40))
        out[name] = (task, load_records(str(root), task))
    return out


def _losses(pools):
    return fusion_loss({name: task.build_loss() for name, (task, _) in pools.items()})


@pytest.mark.parametrize("name", META_ALGORITHMS.names())
class TestMetaAlgorithmConformance:
    """What every registered meta-learning algorithm must do."""

    def test_an_outer_step_changes_the_weights(self, name, pools):
        network = FusionNetwork("compact")
        algorithm = build_algorithm(name, network, inner_lr=0.01, inner_steps=2)
        params = algorithm.parameters()
        assert {id(p) for p in network.parameters()} <= {id(p) for p in params}
        sampler = TaskSampler(pools, support=2, query=2, crop=32, seed=0)
        before = [p.detach().clone() for p in network.parameters()]
        losses = _losses(pools)
        for _ in range(2):
            task = sampler.sample()
            pre, post = algorithm.accumulate(task, losses(task.task), 0.5)
            assert torch.isfinite(torch.tensor([pre, post])).all()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in network.parameters())
        torch.optim.Adam(params, lr=1e-3).step()
        assert any(not torch.equal(p.detach(), b) for p, b in zip(network.parameters(), before, strict=True))

    def test_its_state_round_trips(self, name):
        algorithm = build_algorithm(name, FusionNetwork("compact"), inner_lr=0.02, inner_steps=1)
        state = algorithm.state_dict()
        other = build_algorithm(name, FusionNetwork("compact"), inner_lr=0.01, inner_steps=1)
        other.load_state_dict(state)
        for key, value in other.state_dict().items():
            for mine, theirs in zip(value, state[key], strict=True):
                torch.testing.assert_close(mine, theirs)

    def test_bad_settings_are_user_errors(self, name):
        with pytest.raises(UserError, match="inner_steps must be >= 1"):
            build_algorithm(name, FusionNetwork("compact"), inner_lr=0.01, inner_steps=0)
        with pytest.raises(UserError, match="inner_lr must be > 0"):
            build_algorithm(name, FusionNetwork("compact"), inner_lr=0.0, inner_steps=1)


def test_maml_lowers_the_mean_query_loss_over_a_few_outer_steps(pools):
    from timfusion.search_spaces.supernet import load_search_space

    torch.manual_seed(0)
    # A regression-head network: the compact default starts as the activity rule, near the
    # optimum of these losses already, so its query loss has little room to fall.
    network = FusionNetwork(load_search_space("compact").genotype({}))
    algorithm = build_algorithm("maml", network, inner_lr=0.01, inner_steps=1)
    sampler = TaskSampler(pools, support=2, query=2, crop=32, seed=0)
    tasks = [sampler.sample() for _ in range(4)]  # the same meta-batch every step: a clean signal
    losses = _losses(pools)
    optimizer = torch.optim.Adam(algorithm.parameters(), lr=3e-3)
    means = []
    for _ in range(8):
        optimizer.zero_grad(set_to_none=True)
        after = [algorithm.accumulate(task, losses(task.task), 1 / len(tasks))[1] for task in tasks]
        means.append(sum(after) / len(after))
        optimizer.step()
    assert sum(means[-3:]) / 3 < 0.97 * means[0]


def test_metasgd_learns_its_per_weight_rates(pools):
    network = FusionNetwork("compact")
    algorithm = build_algorithm("metasgd", network, inner_lr=0.01, inner_steps=1)
    rates = [lr.detach().clone() for lr in algorithm.wrapper.lrs]
    task = TaskSampler(pools, support=2, query=2, crop=32, seed=0).sample()
    algorithm.accumulate(task, _losses(pools)(task.task), 1.0)
    torch.optim.SGD(algorithm.parameters(), lr=1.0).step()
    assert any(not torch.equal(lr.detach(), r) for lr, r in zip(algorithm.wrapper.lrs, rates, strict=True))


def test_excluded_families_are_never_sampled(pools):
    tasks = [task for task, _ in pools.values()]
    kept = included_tasks(tasks, ["multi_focus"])
    assert sorted(t.name for t in kept) == ["ir_vis", "mri_ct", "multi_exposure"]
    sampler = TaskSampler({t.name: pools[t.name] for t in kept}, support=1, query=1, crop=16, seed=0)
    drawn = {sampler.sample().task for _ in range(60)}
    assert drawn == {"ir_vis", "mri_ct", "multi_exposure"}
    medical = [build_task(task_config(n)) for n in ("mri_ct", "mri_pet", "mri_spect", "ir_vis")]
    assert [t.name for t in included_tasks(medical, ["medical"])] == ["ir_vis"]
    with pytest.raises(UserError, match="meta.exclude: multifocus not among"):
        included_tasks(tasks, ["multifocus"])
    with pytest.raises(UserError, match="leaves no task"):
        included_tasks(tasks, TASKS)


def test_families_are_drawn_evenly_not_by_variant_count(pools):
    medical_records = pools["mri_ct"][1]
    three_variants = {
        "ir_vis": pools["ir_vis"],
        **{name: (build_task(task_config(name)), medical_records)
           for name in ("mri_ct", "mri_pet", "mri_spect")},
    }
    sampler = TaskSampler(three_variants, support=1, query=1, crop=16, seed=0)
    drawn = [sampler.sample().task for _ in range(300)]
    assert 110 < drawn.count("ir_vis") < 190  # half, not a quarter
    assert {"mri_ct", "mri_pet", "mri_spect"} <= set(drawn)


def test_cross_losses_draw_the_loss_apart_from_the_patches_from_the_same_families(pools):
    kept = {name: pools[name] for name in ("ir_vis", "mri_ct", "multi_exposure")}
    plain = TaskSampler(kept, support=1, query=1, crop=16, seed=0)
    assert all(task.loss == task.task for task in (plain.sample() for _ in range(30)))
    crossed = TaskSampler(kept, support=1, query=1, crop=16, seed=0, cross_losses=True)
    draws = [crossed.sample() for _ in range(90)]
    assert {task.loss for task in draws} == set(kept)  # never an excluded family's loss
    assert 15 < sum(task.loss != task.task for task in draws) < 80  # about two thirds
    # the first meta-task's patches come from the task they come from without it (the loss draw follows)
    plain = TaskSampler(kept, support=1, query=1, crop=16, seed=0)
    assert plain.sample().task == TaskSampler(kept, support=1, query=1, crop=16, seed=0,
                                              cross_losses=True).sample().task


def test_loss_mixtures_weigh_one_variant_of_every_included_family(pools):
    medical_records = pools["mri_ct"][1]
    kept = {"ir_vis": pools["ir_vis"], "multi_exposure": pools["multi_exposure"],
            **{name: (build_task(task_config(name)), medical_records) for name in ("mri_ct", "mri_pet")}}
    mixed = TaskSampler(kept, support=1, query=1, crop=16, seed=0, loss_mixture=1.0)
    draws = [mixed.sample().loss for _ in range(60)]
    for weights in draws:
        assert len(weights) == 3 and {"ir_vis", "multi_exposure"} < set(weights)  # one medical variant
        assert abs(sum(weights.values()) - 1) < 1e-9 and min(weights.values()) >= 0
    assert {next(n for n in w if n.startswith("mri")) for w in draws} == {"mri_ct", "mri_pet"}
    # small concentrations sit near one family's rule, large ones near the average
    peaked = TaskSampler(kept, support=1, query=1, crop=16, seed=0, loss_mixture=0.05)
    flat = TaskSampler(kept, support=1, query=1, crop=16, seed=0, loss_mixture=100.0)
    assert sum(max(peaked.sample().loss.values()) for _ in range(30)) / 30 > 0.9
    assert max(max(flat.sample().loss.values()) for _ in range(30)) < 0.5


def test_a_mixed_loss_is_the_weighted_sum_of_the_families_losses(pools):
    loss_for = _losses(pools)
    torch.manual_seed(0)
    network = FusionNetwork("compact")
    sampler = TaskSampler(pools, support=2, query=2, crop=16, seed=0)
    batch = sampler.sample().support
    weights = {"ir_vis": 0.25, "multi_focus": 0.75}
    expected = sum(w * loss_for(name)(network, batch) for name, w in weights.items())
    assert torch.allclose(loss_for(weights)(network, batch), expected)


def _meta(*overrides: str) -> dict:
    from timfusion.platform.jobs.meta import meta

    return meta(compose("meta", [*QUICK, *overrides]))


def _adapt(*overrides: str) -> dict:
    from timfusion.platform.jobs.meta import adapt

    return adapt(compose("adapt", [
        "data=synthetic", "data.synthetic.n=6", "data.synthetic.size=[48,48]", "train.crop=32",
        "train.batch_size=2", "train.log_every=1", "train.warmup_steps=1", "guidance.weight=0",
        "cluster=none", "train.val_max_pairs=1", *overrides,
    ]))


def _model_state(result: dict) -> dict:
    from timfusion.platform.models import model_file
    from timfusion.search_spaces.network import load_model

    network, _, _ = load_model(model_file(f"runs:/{result['run_id']}", result["tracking_uri"]))
    return network.state_dict()


def test_meta_run_then_adapt_from_its_run_id_loads_its_weights_and_trains(workdir):
    from mlflow.tracking import MlflowClient

    meta_run = _meta("cluster=none", "meta.steps=3", "meta.meta_batch=2", "meta.exclude=[multi_focus]",
                     "name=m1")
    client = MlflowClient(meta_run["tracking_uri"])
    run = client.get_run(meta_run["run_id"])
    assert run.data.tags["tasks"] == "ir_vis,mri_ct,multi_exposure" and run.data.tags["final_step"] == "3"
    assert "query_loss/after" in run.data.metrics and "query_loss/multi_focus" not in run.data.metrics
    init = _model_state(meta_run)
    assert any(not torch.equal(v, FusionNetwork("compact").state_dict()[k]) for k, v in init.items())

    # lr ~ 0: the adapted weights are the meta-initialization's, so it was loaded (strictly);
    # batch-norm running statistics (buffers) move with any training forward pass.
    frozen = _adapt("task=multi_focus", f"init={meta_run['run_id']}", "steps=1", "train.lr=1e-20", "name=a0")
    weights = {name for name, _ in FusionNetwork("compact").named_parameters()}
    adapted = _model_state(frozen)
    for key in weights:
        torch.testing.assert_close(adapted[key], init[key], rtol=0, atol=1e-6)
    tags = client.get_run(frozen["run_id"]).data.tags
    assert tags["job"] == "adapt" and tags["init_run_id"] == meta_run["run_id"]
    params = client.get_run(frozen["run_id"]).data.params  # a learned init skips training's warm-ups
    assert (params["train.warmup_steps"], params["train.fidelity_warmup_steps"]) == ("0", "0")
    assert not [key for key in params if key.startswith("meta.")]  # meta.* built nothing of this run

    trained = _adapt("task=multi_focus", f"init=runs:/{meta_run['run_id']}", "steps=3", "name=a1")
    assert client.get_run(trained["run_id"]).data.tags["final_step"] == "3"
    assert any(not torch.equal(v, init[k]) for k, v in _model_state(trained).items())


def test_a_meta_run_out_of_memory_is_one_line_naming_the_meta_knobs(workdir, monkeypatch):
    """As training's (tests/test_training.py), but the knobs that size a meta step are meta's."""
    from helpers import STARVED

    from timfusion.meta import loop
    from timfusion.platform.errors import JobFailed

    def starved(config: dict) -> None:
        raise MemoryError(STARVED)

    monkeypatch.setattr(loop, "meta_worker", starved)
    line = r"^run hungry: out of memory \(MemoryError: Unable to allocate 37.3 GiB.*\); lower meta.crop, meta"
    with pytest.raises(JobFailed, match=line + r".support or meta.query$"):
        _meta("cluster=none", "meta.steps=1", "meta.meta_batch=1", "name=hungry")


def test_a_genotype_mismatch_between_init_and_network_is_a_clear_error(workdir):
    meta_run = _meta("cluster=none", "meta.steps=1", "meta.meta_batch=1", "meta.algorithm=fomaml", "name=m2")
    with pytest.raises(UserError, match="genotype 'compact' is not the requested genotype 'tim_light'"):
        _adapt("task=ir_vis", f"init={meta_run['run_id']}", "genotype=tim_light", "steps=1", "name=a2")


def test_an_init_that_names_nothing_is_one_error_naming_init_before_any_run(workdir):
    with pytest.raises(UserError, match="init=nowhere/model.pt: no such run or model file; expected random, "
                                        "multitask, a meta run id, or one of models:/NAME@ALIAS"):
        _adapt("task=ir_vis", "init=nowhere/model.pt", "steps=1", "name=a-missing")
    assert not (workdir / "runs" / "mlflow.db").exists()


def test_a_registered_meta_init_is_timfusion_meta_init_and_adapt_starts_from_its_models_uri(workdir):
    meta_run = _meta("cluster=none", "meta.steps=1", "meta.meta_batch=1", "meta.algorithm=fomaml", "name=m4",
                     "register=true")
    registered = meta_run["registered"]
    assert (registered["name"] == "timfusion-meta-init"
            and registered["tags"]["meta_init_run_id"] == meta_run["run_id"])
    init = _model_state(meta_run)
    frozen = _adapt("task=multi_focus", f"init=models:/timfusion-meta-init/{registered['version']}",
                    "steps=1", "train.lr=1e-20", "name=a4")
    adapted = _model_state(frozen)
    for key, _ in FusionNetwork("compact").named_parameters():
        torch.testing.assert_close(adapted[key], init[key], rtol=0, atol=1e-6)
    from mlflow.tracking import MlflowClient

    tags = MlflowClient(frozen["tracking_uri"]).get_run(frozen["run_id"]).data.tags
    assert tags["init_run_id"] == meta_run["run_id"] and tags["init_model_version"] == "timfusion-meta-init/1"


def test_the_fidelity_warm_up_keeps_only_the_pixel_terms(pools):
    """Meta-training starts as training does: the first outer steps on the pixel-fidelity terms
    (a fresh network otherwise settles in contrast-inverted minima that adaptation cannot leave)."""
    task, _ = pools["multi_focus"]
    module = task.build_loss()
    sampler = TaskSampler({"multi_focus": pools["multi_focus"]}, support=2, query=2, crop=32, seed=0)
    batch = sampler.sample().support
    network = FusionNetwork("compact_regression")
    with torch.no_grad():
        fused = network.fuse(batch["a"], batch["b"])
        full, parts = module(batch["a"], batch["b"], fused)
        pixel = _losses(pools)("multi_focus", pixel_only=True)(network, batch)
        default = _losses(pools)("multi_focus")(network, batch)
    pixel_terms = [n for n in parts if getattr(module.terms[n], "pixel_fidelity", False)]
    assert pixel_terms == ["focus"]
    torch.testing.assert_close(pixel, module.weights["focus"] * parts["focus"])
    torch.testing.assert_close(default, full)
    assert float(pixel) < float(full)


def test_a_meta_run_in_its_fidelity_warm_up_trains_on_the_pixel_terms(workdir):
    def first_query_loss(warmup: int, name: str) -> float:
        result = _meta("cluster=none", "meta.steps=1", "meta.meta_batch=1", "meta.algorithm=fomaml",
                       f"meta.fidelity_warmup_steps={warmup}", f"name={name}")
        return job_metric_history(result, "query_loss/before")[0].value

    # the same seed, so the same first task and initial network: only the loss differs
    assert first_query_loss(1, "w1") < first_query_loss(0, "w0")


def test_a_meta_run_with_pretrain_steps_trains_jointly_first_then_meta_learns(workdir):
    result = _meta("cluster=none", "meta.steps=2", "meta.pretrain_steps=2", "meta.meta_batch=1",
                   "meta.algorithm=reptile", "name=m6")
    before, after = ({m.step: m.value for m in job_metric_history(result, f"query_loss/{key}")}
                     for key in ("before", "after"))
    # a joint step adapts nothing, so its query loss is the same before and after; Reptile's inner
    # loop moves it
    assert sorted(before) == [1, 2, 3, 4]
    assert all(before[s] == after[s] for s in (1, 2)) and all(before[s] != after[s] for s in (3, 4))
    tags = job_tags(result)
    assert (tags["final_step"], tags["pretrain_steps"], tags["cross_losses"]) == ("4", "2", "false")


def test_a_meta_run_with_cross_losses_trains_and_says_so(workdir):
    result = _meta("cluster=none", "meta.steps=2", "meta.meta_batch=2", "meta.algorithm=reptile",
                   "meta.cross_losses=true", "name=m7")
    assert [m.step for m in job_metric_history(result, "query_loss/after")] == [1, 2]
    assert job_tags(result)["cross_losses"] == "true"


def test_a_meta_run_with_loss_mixtures_trains_and_says_so(workdir):
    result = _meta("cluster=none", "meta.steps=2", "meta.meta_batch=2", "meta.algorithm=reptile",
                   "meta.loss_mixture=0.5", "name=m8")
    assert [m.step for m in job_metric_history(result, "query_loss/after")] == [1, 2]
    assert job_tags(result)["loss_mixture"] == "0.5"


def test_adapt_from_multitask_trains_the_baseline_with_matching_compute(workdir):
    from mlflow.tracking import MlflowClient

    result = _adapt("task=multi_focus", "init=multitask", "meta.steps=2", "meta.inner_steps=1",
                    "meta.meta_batch=1", "meta.crop=32", "meta.support=2", "meta.query=2",
                    "meta.exclude=[multi_focus]", "steps=1", "name=a3")
    client = MlflowClient(result["tracking_uri"])
    baseline = client.get_run(client.get_run(result["run_id"]).data.tags["init_run_id"])
    assert baseline.data.tags["algorithm"] == "multitask" and baseline.data.tags["final_step"] == "4"
    assert client.get_run(result["run_id"]).data.params["meta.steps"] == "2"  # what built its init
    # meta.fidelity_warmup_steps (20 by default) scales with the steps: the same share of them
    from timfusion.platform.jobs.meta import multitask_config

    cfg = multitask_config(compose("adapt", ["meta.steps=10", "meta.inner_steps=3",
                                             "meta.fidelity_warmup_steps=2"]))
    assert (cfg.meta.steps, cfg.meta.fidelity_warmup_steps) == (40, 8)
    # joint pre-training steps take one pass per task, the meta steps after them inner_steps + 1
    cfg = multitask_config(compose("adapt", ["meta.steps=10", "meta.inner_steps=3", "meta.pretrain_steps=5",
                                             "meta.fidelity_warmup_steps=7"]))
    assert (cfg.meta.steps, cfg.meta.fidelity_warmup_steps, cfg.meta.pretrain_steps) == (45, 13, 0)
    assert "multi_focus" not in baseline.data.tags["tasks"]
    # Reptile's passes are its inner steps (on support and query patches): the query losses it logs
    # are forward only, as multitask's are
    cfg = multitask_config(compose("adapt", ["meta.algorithm=reptile", "meta.steps=10",
                                             "meta.inner_steps=3"]))
    assert cfg.meta.steps == 30


def test_meta_on_two_ray_train_workers_averages_and_checkpoints(ray_cluster, workdir):
    from mlflow.tracking import MlflowClient

    result = _meta("cluster.num_workers=2", "meta.steps=2", "meta.meta_batch=2", "meta.algorithm=fomaml",
                   "name=m3")
    run = MlflowClient(result["tracking_uri"]).get_run(result["run_id"])
    assert run.data.tags["final_step"] == "2" and run.data.metrics["query_loss/after"] > 0
    assert list((workdir / "runs" / "ray" / "m3").rglob("state.pt"))


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("meta.algorithm=anil", "unknown meta-learning algorithm 'anil'; known: fomaml, maml, metasgd"),
        ("meta.inner_steps=0", "meta.inner_steps must be >= 1"),
        ("meta.exclude=[thermal]", "meta.exclude: thermal not among"),
        ("meta.tasks=[ir_vis,sonar]", "meta.tasks: task 'sonar' unknown; valid choices:"),
        ("meta.genotype=nope", "meta.genotype=nope: unknown genotype"),
        ("meta.meta_batch=1", "meta.meta_batch=1: fewer tasks than the 2 workers"),
        ("meta.fidelity_warmup_steps=-1", "meta.fidelity_warmup_steps must be >= 0, got -1"),
        ("meta.pretrain_steps=-1", "meta.pretrain_steps must be >= 0, got -1"),
        ("meta.cross_losses=sometimes", "cross_losses=sometimes: expected true or false (default false)"),
        ("meta.inner_steps=3.5", "meta.inner_steps=3.5: expected an integer (default 3)"),
        ("meta.loss_mixture=-1", "meta.loss_mixture must be >= 0, got -1"),
        ("meta.loss_mixture=inf", "meta.loss_mixture=inf: expected a finite Dirichlet concentration >= 0"),
    ],
)
def test_bad_meta_configs_fail_before_any_work(workdir, override, expected):
    with pytest.raises(UserError, match=re.escape(expected)):
        _meta("cluster.num_workers=2", override)
    assert not (workdir / "runs").exists()


def test_loss_mixtures_and_crossed_losses_are_one_at_a_time(workdir):
    with pytest.raises(UserError, match=re.escape("meta.loss_mixture=1.0 with meta.cross_losses=true")):
        _meta("meta.loss_mixture=1", "meta.cross_losses=true")
    assert not (workdir / "runs").exists()


def test_initial_weights_state_is_the_files_state_dict(tmp_path):
    from timfusion.platform.jobs.train import initial_weights
    from timfusion.search_spaces.genotype import load_genotype
    from timfusion.search_spaces.network import save_model

    network = FusionNetwork("compact")
    save_model(tmp_path / "model.pt", network, load_genotype("compact"), {"name": "meta-init"})
    state = torch.load(io.BytesIO(initial_weights(str(tmp_path / "model.pt"), load_genotype("compact"),
                                                  None)),
                       weights_only=True)
    assert state.keys() == network.state_dict().keys()


def test_a_resumed_meta_run_continues_from_its_checkpoint(workdir):
    from mlflow.tracking import MlflowClient

    first = _meta("cluster=none", "meta.steps=2", "meta.meta_batch=1", "meta.algorithm=reptile", "name=m4")
    again = _meta("cluster=none", "meta.steps=4", "meta.meta_batch=1", "meta.algorithm=reptile", "name=m4",
                  "resume=true")
    assert again["run_id"] == first["run_id"]
    client = MlflowClient(again["tracking_uri"])
    assert client.get_run(again["run_id"]).data.tags["final_step"] == "4"
    steps = sorted(m.step for m in job_metric_history(again, "query_loss/after"))
    assert steps == [1, 2, 3, 4]  # steps 1-2 from the first run, 3-4 after the resume: none repeated
    with pytest.raises(UserError, match="resume=true: no run 'm5'"):
        _meta("cluster=none", "meta.steps=1", "meta.meta_batch=1", "name=m5", "resume=true")
    with pytest.raises(UserError, match="name=m4: meta.algorithm is metasgd where the run has reptile"):
        _meta("cluster=none", "meta.steps=6", "meta.meta_batch=1", "meta.algorithm=metasgd", "name=m4",
              "resume=true")  # MetaSGD's checkpoint holds learned rates Reptile's has not
