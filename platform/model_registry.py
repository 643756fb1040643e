"""The model registry: fusion networks as MLflow pyfunc models, registered by name and
promoted by alias behind quality gates.

A registered version is a pyfunc model (:class:`FusionPyfunc`) whose artifacts are
``weights.pt`` (the state dict, read back with ``weights_only=True``), ``genotype.json``,
``task.json`` and ``checksums.json`` (their SHA-256). The checksums are version tags too;
loading a version checks every file against both, so a corrupted or swapped artifact
never loads, and a version that does not load is never promoted. Lineage (the training,
search, search-trial and meta-initialization run ids, dataset fingerprints, git commit)
is copied from the producing runs into version tags.

Promotion moves an alias (``champion``, ``candidate``, any name) to a version only when
the version passes a :class:`Gate` against the alias's current holder: every gate metric
within its tolerance of the holder's on the gate's dataset, and within the MACs and
latency budgets. Every decision, passed, failed or forced, is recorded as version tags
and a Markdown report artifact. Promotions of one model are serialised by a file lock
next to a local sqlite store; against a tracking server the holder is re-read after the
evaluation and the evaluation repeated if it changed (no lock across processes there).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import re
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import torch

from timfusion.platform.errors import UserError, check_bounds, check_size
from timfusion.platform.tracking import git_commit, mlflow_client, resolve_run, tracking_uri

PYFUNC_ARTIFACT = "registry/pyfunc"
FILES = {"weights": "weights.pt", "genotype": "genotype.json", "task": "task.json"}
CHECKSUMS = "checksums.json"
MODEL_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))")
LINEAGE_TAGS = ("git_commit", "dataset_fingerprint", "train_fingerprint", "val_fingerprint", "task",
                "genotype")


class GateFailed(UserError):
    """A promotion refused by its gate (exit status 1: the input was fine, the model was not)."""

    exit_code = 1


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- artifacts


def write_artifacts(folder: Path, network: torch.nn.Module, genotype: Any,
                    task_config: Mapping) -> dict[str, str]:
    """The pyfunc artifacts in ``folder``: ``{key: path}``, checksums included."""
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in network.state_dict().items()}, buffer)
    (folder / FILES["weights"]).write_bytes(buffer.getvalue())
    (folder / FILES["genotype"]).write_text(genotype.to_json())
    (folder / FILES["task"]).write_text(json.dumps(dict(task_config), indent=1, sort_keys=True))
    paths = {key: str(folder / name) for key, name in FILES.items()}
    (folder / CHECKSUMS).write_text(json.dumps({key: sha256(p) for key, p in paths.items()}, indent=1))
    return {**paths, "checksums": str(folder / CHECKSUMS)}


def read_artifacts(
    paths: Mapping[str, str], source: str, expected: Mapping[str, str] | None = None
) -> tuple[Any, Any, dict]:
    """``(network in eval mode, genotype, task config)`` from checked artifacts; any checksum
    that differs from ``checksums.json`` or from ``expected`` (the version's tags) is a UserError."""
    from timfusion.search_spaces.genotype import Genotype
    from timfusion.search_spaces.network import network_with_weights

    missing = [key for key in (*FILES, "checksums") if key not in paths or not Path(paths[key]).exists()]
    if missing:
        raise UserError(f"{source}: model artifact {missing[0]} is missing")
    recorded = json.loads(Path(paths["checksums"]).read_text())
    for key in FILES:
        actual = sha256(paths[key])
        for label, table in (("checksums.json", recorded), ("the version's tags", expected or {})):
            want = table.get(key)
            if (want is not None or label == "checksums.json") and want != actual:
                raise UserError(
                    f"{source}: checksum of {FILES[key]} is {actual[:12]}..., {label} says "
                    f"{str(want)[:12]}...: the artifact is corrupted or was replaced"
                )
    genotype = Genotype.from_dict(json.loads(Path(paths["genotype"]).read_text()),
                                  source=f"{source} genotype")
    task_config = json.loads(Path(paths["task"]).read_text())
    state = torch.load(paths["weights"], map_location="cpu", weights_only=True)
    return network_with_weights(genotype, state, source), genotype, task_config


def fuse_arrays(network: torch.nn.Module, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The fused 8-bit image (H x W x C) of two source arrays: H x W or H x W x C (C = 1 or 3);
    integer arrays are 8-bit levels, floating arrays are on 0..1."""
    from timfusion.tasks.base import fuse_pair
    from timfusion.tasks.imageio import to_uint8

    planes = []
    for role, image in (("a", a), ("b", b)):
        array = np.asarray(image)
        if array.dtype == object:
            array = np.asarray(array.tolist())
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3):
            raise UserError(f"input {role}: expected H x W or H x W x 1|3, got shape {array.shape}")
        if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
            raise UserError(f"input {role}: expected integer or float pixels, got {array.dtype}")
        scale = 1.0 if np.issubdtype(array.dtype, np.integer) else 255.0
        planes.append(array.astype(np.float64) * scale)
    fused = to_uint8(fuse_pair(network, planes[0], planes[1]))
    return fused[..., None] if fused.ndim == 2 else fused


class FusionPyfunc(mlflow.pyfunc.PythonModel):
    """The registered model: input ``{"a": array, "b": array}`` (see :func:`fuse_arrays`),
    output the fused 8-bit image, H x W x C."""

    _skip_type_hint_validation = True  # the signature describes the input, not type hints

    def load_context(self, context) -> None:
        self.network, self.genotype, self.task = read_artifacts(context.artifacts, "registered model")

    def predict(self, context, model_input, params=None):
        if not isinstance(model_input, Mapping) or not {"a", "b"} <= set(model_input):
            raise UserError("input: expected a mapping with the two sources 'a' and 'b'")
        return fuse_arrays(self.network, model_input["a"], model_input["b"])


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    # object tensors accept any dtype and rank: 8-bit or float, gray or colour, any size
    sources = Schema([TensorSpec(np.dtype(object), (-1,), "a"), TensorSpec(np.dtype(object), (-1,), "b")])
    return ModelSignature(inputs=sources, outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1))]))


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{package}=={version(package)}"
            for package in ("mlflow", "torch", "numpy", "pillow", "timfusion")]


def _input_example(task_config: Mapping) -> dict[str, np.ndarray]:
    """A small real pair of the task's family, from its synthetic generator (seeded)."""
    from timfusion.platform.config import group_options
    from timfusion.platform.config import task_config as named_task_config
    from timfusion.tasks import build_task
    from timfusion.tasks.datasets import load_pair, load_records
    from timfusion.tasks.synthetic import synthesize

    name = task_config.get("name")
    # a meta-initialization has no task of its own: any family's pair serves as the example
    task = build_task(named_task_config(name if name in group_options("task") else "ir_vis"))
    with tempfile.TemporaryDirectory() as folder:
        synthesize(task.synthetic, Path(folder), n=2, seed=0, size=(32, 32), overwrite=True)
        record = load_records(folder, task)[0]
        a, b = load_pair(record)
    return {"a": a.astype(np.uint8), "b": b.astype(np.uint8)}


# ----------------------------------------------------------------------------- registering


def parse_model_uri(reference: str) -> tuple[str, str | None, int | None]:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> ``(name, alias, version)``."""
    match = MODEL_URI.fullmatch(reference)
    if not match:
        raise UserError(f"model={reference}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    version = match["version"]
    return match["name"], match["alias"], int(version) if version else None


def get_version(client, name: str, version: int | None = None, alias: str | None = None):
    """The model version (by number or alias); unknown ones are UserErrors naming them."""
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, str(version))
    except Exception as err:  # noqa: BLE001 - MlflowException RESOURCE_DOES_NOT_EXIST and kin
        what = f"@{alias}" if alias is not None else f"version {version}"
        raise UserError(f"model {name} {what}: not in the registry ({err.__class__.__name__})") from None


def _lineage(client, run) -> dict[str, str]:
    """Lineage tags of the version a run produces."""
    tags = dict(run.data.tags)
    lineage = {key: tags[key] for key in LINEAGE_TAGS if key in tags}
    lineage["training_run_id"] = run.info.run_id
    job = tags.get("job", "")
    lineage["job"] = job
    if job == "meta":
        lineage["meta_init_run_id"] = run.info.run_id
    if "init_run_id" in tags:
        lineage["meta_init_run_id"] = tags["init_run_id"]
    parent_id = tags.get("parent_run_id")
    if parent_id:
        parent = client.get_run(parent_id)
        if parent.data.tags.get("job") == "search":
            lineage["search_run_id"] = parent_id
            trial = parent.data.tags.get("chosen_trial_run_id")
            if trial:
                lineage["search_trial_run_id"] = trial
    lineage["registered_from_commit"] = git_commit()
    return lineage


def check_model_name(name: str, key: str = "name") -> None:
    """A name MLflow's registry and ``models:/`` URIs both take; else a UserError naming ``key``."""
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", name):
        raise UserError(f"{key}={name}: expected letters, digits, '.', '_' or '-' (e.g. timfusion-ir_vis)")


def register_run(run_id: str, name: str, uri: str | None = None, description: str = "") -> dict[str, Any]:
    """Register run ``run_id``'s model (``model/model.pt``) as a new version of ``name``."""
    from mlflow.exceptions import MlflowException

    from timfusion.platform.models import load_network
    from timfusion.search_spaces.network import count_macs, count_parameters

    check_model_name(name)
    uri = tracking_uri(uri)
    client = mlflow_client(uri)
    run = resolve_run(uri, run_id)
    network, genotype, task_config = load_network(f"runs:/{run_id}", uri)
    with tempfile.TemporaryDirectory(prefix="timfusion-register-") as folder:
        artifacts = write_artifacts(Path(folder) / "files", network, genotype, task_config)
        checksums = json.loads(Path(artifacts["checksums"]).read_text())
        model_dir = Path(folder) / "pyfunc"
        mlflow.pyfunc.save_model(
            path=str(model_dir), python_model=FusionPyfunc(), artifacts=artifacts, signature=_signature(),
            input_example=_input_example(task_config), pip_requirements=_requirements(),
            metadata={"genotype": genotype.name, "task": task_config.get("name")},
        )
        client.log_artifacts(run_id, str(model_dir), PYFUNC_ARTIFACT)
    tags = {
        **_lineage(client, run),
        **{f"checksum.{key}": value for key, value in checksums.items()},
        "task": str(task_config.get("name")),
        "genotype": genotype.name,
        "parameters": str(count_parameters(network)),
        "macs_256": str(count_macs(network, 256, 256, full=False)),
    }
    with contextlib.suppress(MlflowException):  # exists already
        client.create_registered_model(name, description=description or None)
    version = client.create_model_version(name, f"runs:/{run_id}/{PYFUNC_ARTIFACT}", run_id=run_id, tags=tags)
    print(f"registered runs:/{run_id} as {name} version {version.version} "
          f"({genotype.name}, {task_config.get('name')}); fuse with model=models:/{name}/{version.version}")
    return {"name": name, "version": int(version.version), "run_id": run_id, "tags": tags,
            "tracking_uri": uri}


def default_name(task_name: str | None) -> str:
    """``timfusion-<task>``; meta-initializations register as ``timfusion-meta-init``."""
    return f"timfusion-{task_name or 'meta-init'}"


def download_version(version, uri: str, target: Path) -> Path:
    """A copy of a version's pyfunc model folder under ``target``."""
    import mlflow.artifacts

    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(target),
                                                        tracking_uri=uri))
    except Exception as err:  # noqa: BLE001
        raise UserError(f"model {version.name} version {version.version}: artifacts unreadable "
                        f"({err.__class__.__name__}: {err})") from None


def _artifact_paths(folder: Path) -> dict[str, str]:
    from mlflow.models import Model

    flavor = Model.load(str(folder / "MLmodel")).flavors.get("python_function", {})
    return {key: str(folder / entry["path"]) for key, entry in (flavor.get("artifacts") or {}).items()}


def load_version(version, uri: str) -> tuple[Any, Any, dict]:
    """The checked network, genotype and task config of a model version (read into memory)."""
    expected = {key[len("checksum."):]: value for key, value in version.tags.items()
                if key.startswith("checksum.")}
    with tempfile.TemporaryDirectory(prefix="timfusion-registered-") as target:
        folder = download_version(version, uri, Path(target))
        return read_artifacts(_artifact_paths(folder), f"model {version.name} version {version.version}",
                              expected)


def load_registered(reference: str, uri: str | None = None) -> tuple[Any, Any, dict]:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``: the checked network, genotype, task config."""
    name, alias, number = parse_model_uri(reference)
    uri = tracking_uri(uri)
    client = mlflow_client(uri)
    return load_version(get_version(client, name, number, alias), uri)


# ----------------------------------------------------------------------------- gates


@dataclasses.dataclass
class Gate:
    """What a version must show to take an alias (``promote gate=``; platform/conf/gate/)."""

    name: str = "default"
    task: str | None = None  # whose data and loss the gate uses; null: the version's own task
    dataset: str = "synthetic"
    pairs: int = 8
    synthetic: dict[str, Any] = dataclasses.field(
        default_factory=lambda: {"n": 8, "size": [96, 96], "seed": 1})
    metrics: dict[str, float] = dataclasses.field(default_factory=lambda: {"VIF": 0.0, "Qabf": 0.0})
    max_macs: float | None = None
    max_latency_ms: float | None = None
    size: tuple[int, int] = (256, 256)

    @classmethod
    def from_config(cls, data: Mapping[str, Any]) -> Gate:
        valid = sorted(f.name for f in dataclasses.fields(cls))
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise UserError(f"gate: unknown key {unknown[0]!r}; valid keys: {', '.join(valid)}")
        gate = cls(**data)
        gate.size = check_size("gate.size", gate.size)
        from timfusion.tasks.metrics import resolve_metrics

        resolve_metrics("tang", list(gate.metrics), key="gate.metrics")  # unknown metric names fail here
        for metric, tolerance in gate.metrics.items():
            if not float(tolerance) >= 0:
                raise UserError(f"gate.metrics.{metric}: tolerance must be >= 0, got {tolerance}")
        check_bounds("gate", dataclasses.asdict(gate), at_least_one=("pairs",),
                     positive=("max_macs", "max_latency_ms"), optional=("max_macs", "max_latency_ms"))
        return gate


def gate_records(gate: Gate, task: Any, workdir: Path, shared: str | None) -> list[Any]:
    """The gate's pairs: ``synthetic`` (the task family's generator, seeded), a dataset the
    task names (under the shared data root) or a folder; anything else fails here, before
    any model is loaded or evaluated."""
    from timfusion.platform.config import shared_root
    from timfusion.tasks.datasets import load_records
    from timfusion.tasks.synthetic import synthesized_once

    if gate.dataset == "synthetic":
        spec = gate.synthetic
        root = synthesized_once(task.synthetic, workdir, spec["n"], spec["seed"], spec["size"], label="gate",
                                prefix="gate.synthetic.")
        records = load_records(str(root), task)
    elif gate.dataset in task.datasets:
        spec = task.datasets[gate.dataset]
        root = shared_root(shared) / "data" / spec.path
        if not root.exists():
            raise UserError(f"gate.dataset={gate.dataset}: {root} does not exist (set paths.shared or "
                            "$TIMFUSION_SHARED)")
        records = load_records(str(root), task, filters=dict(spec.filter))
    elif Path(gate.dataset).is_dir() or "://" in gate.dataset:
        records = load_records(gate.dataset, task)
    else:
        raise UserError(f"gate.dataset={gate.dataset}: not 'synthetic', a dataset of task {task.name} "
                        f"({', '.join(sorted(task.datasets)) or 'none'}) or an existing folder")
    if not records:
        raise UserError(f"gate.dataset={gate.dataset}: no pairs")
    return sorted(records, key=lambda r: r.name)[: int(gate.pairs)]


def evaluate_network(network: torch.nn.Module, records: list[Any], gate: Gate) -> dict[str, float]:
    """Gate metrics (means over the pairs, on luminance), MACs and median latency of a network."""
    from timfusion.search_spaces.network import count_macs
    from timfusion.tasks.base import split_colour
    from timfusion.tasks.colour import rgb_to_ycbcr
    from timfusion.tasks.datasets import load_pair
    from timfusion.tasks.metrics import resolve_metrics, score_batch

    specs = resolve_metrics("tang", list(gate.metrics), key="gate.metrics")
    values: dict[str, list[float]] = {spec.name: [] for spec in specs}
    for record in records:
        a, b = load_pair(record)
        fused = fuse_arrays(network, a.astype(np.uint8), b.astype(np.uint8)).astype(np.float64)
        ya, yb, _ = split_colour(a, b)
        fy = rgb_to_ycbcr(fused)[..., 0] if fused.shape[-1] == 3 else fused[..., 0]
        for key, value in score_batch([ya], [yb], [fy], specs, key="gate.metrics").items():
            values[key].append(float(value[0]))
    result = {key: float(np.mean(v)) for key, v in values.items()}
    height, width = gate.size
    result["macs"] = float(count_macs(network, height, width, full=False))
    if gate.max_latency_ms is not None:
        a = torch.rand(1, 1, height, width)
        times = []
        with torch.no_grad():
            for _ in range(5):
                started = time.perf_counter()
                network(a, a)
                times.append((time.perf_counter() - started) * 1000)
        result["latency_ms"] = float(np.median(times))
    return result


def judge(gate: Gate, candidate: Mapping[str, float],
          holder: Mapping[str, float] | None) -> list[dict[str, Any]]:
    """One check per gate rule: ``{check, candidate, reference, passed}``."""
    from timfusion.tasks.metrics import resolve_metrics

    checks = []
    for spec in resolve_metrics("tang", list(gate.metrics)):
        tolerance = float(gate.metrics[spec.name])
        value = candidate[spec.name]
        if holder is None:
            checks.append({"check": f"{spec.name} (no current holder)", "candidate": value, "reference": None,
                           "passed": bool(np.isfinite(value))})
            continue
        reference = holder[spec.name]
        passed = value >= reference - tolerance if spec.higher_is_better else value <= reference + tolerance
        sign = ">=" if spec.higher_is_better else "<="
        checks.append({"check": f"{spec.name} {sign} holder "
                                f"{'-' if spec.higher_is_better else '+'} {tolerance:g}",
                       "candidate": value, "reference": reference, "passed": bool(passed)})
    if gate.max_macs is not None:
        checks.append({"check": f"MACs@{gate.size[0]}x{gate.size[1]} <= {gate.max_macs:.4g}",
                       "candidate": candidate["macs"], "reference": float(gate.max_macs),
                       "passed": candidate["macs"] <= float(gate.max_macs)})
    if gate.max_latency_ms is not None:
        checks.append({"check": f"latency ms <= {gate.max_latency_ms:g}",
                       "candidate": candidate["latency_ms"], "reference": float(gate.max_latency_ms),
                       "passed": candidate["latency_ms"] <= float(gate.max_latency_ms)})
    return checks


@contextlib.contextmanager
def promotion_lock(uri: str, name: str) -> Iterator[None]:
    """Serialise promotions of model ``name`` on a local sqlite store (a file lock beside it)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    path = Path(uri[len("sqlite:///"):]).with_name(f".{name}.promote.lock")
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _report(name: str, version: int, alias: str, gate: Gate, decision: str, holder: int | None,
            checks: list[dict[str, Any]], reason: str, records: int) -> str:
    from timfusion.platform.report import markdown_table

    def fmt(value: Any) -> str:
        return "-" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value)

    rows = [{"check": c["check"], "candidate": fmt(c["candidate"]), "holder / budget": fmt(c["reference"]),
             "result": "pass" if c["passed"] else "FAIL"} for c in checks]
    lines = [
        f"# Promotion of {name} version {version} to @{alias}: {decision}",
        "",
        f"- when: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"- gate: {gate.name} (dataset {gate.dataset}, {records} pairs)",
        f"- current holder of @{alias}: {'version ' + str(holder) if holder is not None else 'none'}",
    ]
    if reason:
        lines.append(f"- reason: {reason}")
    lines += ["", markdown_table(rows, ["check", "candidate", "holder / budget", "result"])
              if rows else "(no checks)"]
    return "\n".join(lines) + "\n"


def promote(
    name: str,
    version: int,
    alias: str,
    gate: Gate,
    uri: str | None,
    workdir: Path,
    shared: str | None = None,
    force: bool = False,
    reason: str = "",
) -> dict[str, Any]:
    """Move ``alias`` to ``version`` if it passes ``gate`` against the alias's holder (or
    ``force`` with a ``reason``); the decision and numbers are recorded either way."""
    from timfusion.platform.config import task_config as named_task_config
    from timfusion.platform.tracking import Tracker
    from timfusion.tasks import build_task

    if not re.fullmatch(r"[A-Za-z][\w-]*", alias):
        raise UserError(f"alias={alias}: expected a name of letters, digits, '_' or '-' (e.g. champion)")
    if force and not reason.strip():
        raise UserError('force=true: give reason="..." (it is recorded with the decision)')
    uri = tracking_uri(uri)
    client = mlflow_client(uri)
    target = get_version(client, name, version)
    task_name = gate.task or target.tags.get("task")
    if task_name == "meta-init" or not task_name:
        raise UserError(f"gate.task: {name} version {target.version} is a meta-initialization; name the "
                        "task whose data the gate judges it on (gate.task=ir_vis, ...)")
    task = build_task(named_task_config(task_name, key="gate.task"))
    records = gate_records(gate, task, workdir, shared)  # a bad dataset fails before any evaluation
    with promotion_lock(uri, name):
        candidate, load_error = None, ""
        try:
            network, _, _ = load_version(target, uri)
            candidate = evaluate_network(network, records, gate)
        except UserError as err:
            load_error = str(err)
        while True:
            holder_version = _holder(client, name, alias)
            holder = None
            if holder_version is not None and holder_version.version != target.version:
                try:
                    holder_network, _, _ = load_version(holder_version, uri)
                    holder = evaluate_network(holder_network, records, gate)
                except UserError as err:
                    print(f"current @{alias} (version {holder_version.version}) does not load: {err}; "
                          "the candidate is judged on the budgets alone")
            checks = judge(gate, candidate, holder) if candidate is not None else [
                {"check": "loads with checked artifacts", "candidate": load_error, "reference": None,
                 "passed": False}
            ]
            passed = candidate is not None and all(c["passed"] for c in checks)
            again = _holder(client, name, alias)  # another promotion may have moved it meanwhile
            if (again.version if again else None) == (holder_version.version if holder_version else None):
                break
        if candidate is None:
            decision = "refused (does not load)"  # not even force promotes a model that does not load
        elif passed:
            decision = "promoted"
        elif force:
            decision = "forced"
        else:
            decision = "refused"
        holder_number = int(holder_version.version) if holder_version is not None else None
        if decision in ("promoted", "forced"):
            client.set_registered_model_alias(name, alias, str(target.version))
            if holder_number is not None and holder_number != int(target.version):
                client.set_model_version_tag(name, str(holder_number), f"{alias}.replaced_by",
                                             str(target.version))
    stamp = time.strftime("%Y%m%dT%H%M%S")
    report = _report(name, int(target.version), alias, gate, decision, holder_number, checks, reason,
                     len(records))
    artifact = f"registry/promotions/{alias}-v{target.version}-{stamp}-{int(time.time_ns() % 10**6)}.md"
    if target.run_id:
        Tracker(uri, target.run_id).log_text(report, artifact)
    tags = {
        f"{alias}.decision": decision,
        f"{alias}.decided_at": stamp,
        f"{alias}.gate": gate.name,
        f"{alias}.holder_version": str(holder_number) if holder_number is not None else "none",
        f"{alias}.report": f"runs:/{target.run_id}/{artifact}" if target.run_id else "",
        **{f"{alias}.check.{_tag_key(c['check'])}": f"{c['candidate']} vs {c['reference']}: "
           f"{'pass' if c['passed'] else 'FAIL'}" for c in checks},
    }
    if force:
        tags[f"{alias}.forced_reason"] = reason
    for key, value in tags.items():
        client.set_model_version_tag(name, str(target.version), key, str(value)[:5000])
    print(report)
    result = {"name": name, "version": int(target.version), "alias": alias, "decision": decision,
              "holder_version": holder_number, "checks": checks, "report": report,
              "report_artifact": artifact}
    if decision.startswith("refused"):
        raise GateFailed(f"{name} version {target.version} not promoted to @{alias}: {decision}; "
                         f"report {tags[f'{alias}.report']}")
    return result


def _short(value: str) -> str:
    try:
        return f"{float(value):.4g}"
    except ValueError:
        return value


def _tag_key(check: str) -> str:
    """A check's first word as a tag-key part (MLflow keys: letters, digits, ``_ . -``)."""
    return re.sub(r"[^\w.-]", "_", check.split(" ")[0])


def _holder(client, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except Exception:  # noqa: BLE001 - no such alias yet
        return None


def list_models(uri: str | None = None, name: str | None = None) -> list[dict[str, Any]]:
    """One row per registered version: name, version, aliases, task, genotype, MACs, last decision."""
    uri = tracking_uri(uri)
    client = mlflow_client(uri)
    if name:
        try:
            models = [client.get_registered_model(name)]
        except Exception as err:  # noqa: BLE001 - MlflowException RESOURCE_DOES_NOT_EXIST and kin
            raise UserError(f"name={name}: no registered model of that name ({err.__class__.__name__}); "
                            "timfusion models lists them") from None
    else:
        models, token = [], None
        while True:  # every page: MLflow returns 100 models per page
            page = client.search_registered_models(page_token=token)
            models.extend(page)
            token = page.token
            if not token:
                break
    rows = []
    for model in models:
        aliases: dict[str, list[str]] = {}
        for alias, number in (model.aliases or {}).items():
            aliases.setdefault(str(number), []).append(alias)
        for version in sorted(client.search_model_versions(f"name='{model.name}'"),
                              key=lambda v: int(v.version)):
            tags = version.tags
            decisions = sorted((k, v) for k, v in tags.items() if k.endswith(".decision"))
            checked = [(k[len("champion.check."):], v.split(" ")[0]) for k, v in sorted(tags.items())
                       if k.startswith("champion.check.")]
            gated = [(m, v) for m, v in checked if not m.startswith(("MACs", "latency", "loads"))]
            rows.append({
                "name": model.name, "version": int(version.version),
                "aliases": ",".join(sorted(aliases.get(str(version.version), []))) or "-",
                "task": tags.get("task", "-"), "genotype": tags.get("genotype", "-"),
                "MMACs@256": f"{int(tags['macs_256']) / 1e6:.1f}" if "macs_256" in tags else "-",
                "gate metrics (@champion)": ", ".join(f"{m} {_short(v)}" for m, v in gated) or "-",
                "last decision": "; ".join(f"{k.split('.')[0]}: {v}" for k, v in decisions) or "-",
                "run": version.run_id or "-",
            })
    return rows
