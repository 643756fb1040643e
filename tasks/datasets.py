"""Paired datasets: the manifest format of ../shared/data, and a plain folder convention.

Manifest format (``MANIFEST.tsv``, tab-separated, header row): one row per pair with at
least ``pair`` (a name), ``a_path`` and ``b_path`` (the two sources, relative to the
manifest's folder, or absolute / URLs); optional ``label_path`` (segmentation PNG, YOLO
txt or VOC xml), ``split`` (train / val / test) and any other columns (``task``,
``subset``, ...), which ``filters`` can select on.

Folder convention: ``ROOT/<role_a>/NAME`` and ``ROOT/<role_b>/NAME``, the role folder
names being the task's (``ir/`` and ``vi/`` for IR/VIS, ``mri/`` and ``ct/`` ...; see
``FusionTask.role_folders``), pairs matched by file stem, optional ``ROOT/labels/NAME``.

Roots are local folders or any fsspec URL (``s3://bucket/set``). Records are always
sorted by name, so runs are reproducible whatever the file system lists first.
"""

from __future__ import annotations

import csv
import hashlib
import io
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import torch
from torch.utils.data import Dataset

from timfusion.platform.errors import UserError
from timfusion.tasks.base import FusionTask, split_colour
from timfusion.tasks.heads import IGNORE_INDEX
from timfusion.tasks.imageio import IMAGE_SUFFIXES, is_url, read_bytes, read_image

MANIFEST_NAME = "MANIFEST.tsv"
REQUIRED_COLUMNS = ("pair", "a_path", "b_path")


@dataclass(frozen=True)
class PairRecord:
    """One source pair: absolute paths or URLs, an optional label, the manifest's other columns."""

    name: str
    a: str
    b: str
    label: str | None = None
    fields: dict[str, str] = field(default_factory=dict)


def _join(root: str, rel: str) -> str:
    if is_url(rel) or Path(rel).is_absolute():
        return rel
    return posixpath.join(root, rel) if is_url(root) else str(Path(root) / rel)


def _filesystem(root: str) -> tuple[Any, str]:
    fs, path = fsspec.core.url_to_fs(root)
    return fs, path


def read_manifest(path: str) -> list[PairRecord]:
    """Records of a manifest file; a missing column or empty path is an error naming the file and row."""
    text = read_bytes(path).decode("utf-8-sig")
    reader = csv.DictReader(io.StringIO(text), delimiter="\t")
    columns = reader.fieldnames or []
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)}; "
                        f"a manifest needs {', '.join(REQUIRED_COLUMNS)}")
    base = posixpath.dirname(path) if is_url(path) else str(Path(path).parent)
    records = []
    for line, row in enumerate(reader, start=2):
        if not row.get("pair") or not row.get("a_path") or not row.get("b_path"):
            raise UserError(f"{path}:{line}: empty pair, a_path or b_path")
        extras = {k: (v or "") for k, v in row.items()
                  if k not in ("pair", "a_path", "b_path", "label_path") and k}
        label = row.get("label_path") or None
        records.append(
            PairRecord(
                name=row["pair"],
                a=_join(base, row["a_path"]),
                b=_join(base, row["b_path"]),
                label=_join(base, label) if label else None,
                fields=extras,
            )
        )
    return sorted(records, key=lambda r: r.name)


def scan_folders(root: str, task: FusionTask) -> list[PairRecord]:
    """Records of a folder-convention root (see the module docstring)."""
    fs, base = _filesystem(root)
    if not fs.isdir(base):
        raise UserError(f"{root}: no such folder")
    subdirs = {posixpath.basename(p.rstrip("/")) for p in fs.ls(base, detail=False) if fs.isdir(p)}
    folders = [task.folder_for(i, subdirs) for i in (0, 1)]
    if folders[0] is None or folders[1] is None:
        expected = " and ".join("/".join(names) for names in task.role_folders)
        raise UserError(f"{root}: expected {MANIFEST_NAME} or role folders {expected} for task {task.name}")

    def images(folder: str) -> dict[str, str]:
        found = {}
        for entry in fs.ls(posixpath.join(base, folder), detail=False):
            name = posixpath.basename(entry)
            stem, suffix = posixpath.splitext(name)
            if suffix.lower() in IMAGE_SUFFIXES + (".txt", ".xml"):
                found[stem] = name
        return found

    a_files, b_files = images(folders[0]), images(folders[1])
    labels = images("labels") if "labels" in subdirs else {}
    if not a_files:
        raise UserError(f"{root}/{folders[0]}: no images")
    unmatched = sorted(set(a_files) ^ set(b_files))
    if unmatched:
        raise UserError(f"{root}: {len(unmatched)} image(s) without a partner in the other role folder, "
                        f"e.g. {unmatched[0]}")
    return [
        PairRecord(
            name=stem,
            a=_join(root, f"{folders[0]}/{a_files[stem]}"),
            b=_join(root, f"{folders[1]}/{b_files[stem]}"),
            label=_join(root, f"labels/{labels[stem]}") if stem in labels else None,
        )
        for stem in sorted(a_files)
    ]


def load_records(
    root: str,
    task: FusionTask,
    split: str | None = None,
    filters: dict[str, str] | None = None,
) -> list[PairRecord]:
    """The pairs under ``root``: a manifest file, a folder holding one, or the folder convention."""
    root = str(root)
    if root.endswith((".tsv", ".csv")):
        records = read_manifest(root)
    else:
        fs, base = _filesystem(root)
        manifest = posixpath.join(base, MANIFEST_NAME)
        if fs.exists(manifest):
            records = read_manifest(_join(root, MANIFEST_NAME))
        else:
            records = scan_folders(root, task)
    wanted = dict(filters or {})
    if split is not None:
        wanted["split"] = split
    for column, value in wanted.items():
        if records and column not in records[0].fields:
            raise UserError(f"{root}: cannot filter on {column}={value}: "
                            f"the manifest has no column {column!r}")
        records = [r for r in records if r.fields.get(column) == str(value)]
    if not records:
        raise UserError(f"{root}: no pairs" + (f" matching {wanted}" if wanted else ""))
    return records


def fingerprint(records: list[PairRecord]) -> str:
    """A short hash of a record list (names and paths), recorded with every run that uses it."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(f"{record.name}\t{record.a}\t{record.b}\t{record.label or ''}\n".encode())
    return digest.hexdigest()[:16]


def load_pair(record: PairRecord, resize: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Both sources on 0..255 as stored; a size mismatch is an error unless ``resize``."""
    a, b = read_image(record.a), read_image(record.b)
    if a.shape[:2] != b.shape[:2]:
        if not resize:
            raise UserError(
                f"{record.b}: size {b.shape[1]}x{b.shape[0]} differs from {record.a} "
                f"({a.shape[1]}x{a.shape[0]}); pass resize=true to resize it to match"
            )
        b = resize_to(b, a.shape[0], a.shape[1])
    return a, b


def resize_to(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic resize of a 0..255 image to (height, width)."""
    from PIL import Image

    channels = [image] if image.ndim == 2 else [image[..., c] for c in range(image.shape[2])]
    resized = [
        np.asarray(Image.fromarray(c.astype(np.float32), mode="F").resize((width, height), Image.BICUBIC))
        for c in channels
    ]
    out = resized[0] if image.ndim == 2 else np.stack(resized, axis=-1)
    return np.clip(out.astype(np.float64), 0, 255)


class PairedDataset(Dataset):
    """Luminance pairs on [0, 1] for training and evaluation.

    ``crop`` set: a random ``crop`` x ``crop`` patch (images smaller than the crop are
    reflect-padded) and random flips, drawn from a generator seeded by (seed, epoch,
    index), so a run is reproducible and every epoch sees new patches. ``crop`` None:
    the full image, never resized. ``cache`` keeps each decoded pair in memory after its
    first read (float32 luminance), so training epochs over a small real set do not decode
    the same JPEGs again for every patch.
    """

    def __init__(
        self,
        records: list[PairRecord],
        crop: int | None = None,
        flip: bool = True,
        seed: int = 0,
        labels: bool = False,
        num_classes: int | None = None,
        cache: bool = False,
    ) -> None:
        self.records = list(records)
        self.cache: dict[int, list[np.ndarray]] | None = {} if cache else None
        self.crop = crop
        self.flip = flip
        self.seed = seed
        self.labels = labels
        self.num_classes = num_classes
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def _planes(self, index: int) -> list[np.ndarray]:
        """The pair's luminance planes on [0, 1] (and its label map), decoded or cached."""
        from timfusion.tasks.labels import read_label

        if self.cache is not None and index in self.cache:
            return self.cache[index]
        record = self.records[index]
        a, b = load_pair(record)
        ya, yb, _ = split_colour(a, b)
        planes = [(ya / 255.0).astype(np.float32), (yb / 255.0).astype(np.float32)]
        height, width = ya.shape
        if self.labels:
            if record.label is None:  # unlabelled pair: no pixel counts in the task loss
                label = np.full((height, width), IGNORE_INDEX, dtype=np.int64)
            else:
                label = read_label(record.label, width, height).astype(np.int64)
                if self.num_classes is not None:
                    label = np.where((label < self.num_classes) | (label == IGNORE_INDEX), label, 0)
            planes.append(label)
        if self.cache is not None:
            self.cache[index] = planes
        return planes

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        planes = self._planes(index)
        if self.crop is not None:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            planes = _random_patch(planes, self.crop, rng, self.flip)
        item: dict[str, Any] = {
            "name": record.name,
            "a": torch.from_numpy(np.ascontiguousarray(planes[0], dtype=np.float32))[None],
            "b": torch.from_numpy(np.ascontiguousarray(planes[1], dtype=np.float32))[None],
        }
        if self.labels:
            item["label"] = torch.from_numpy(np.ascontiguousarray(planes[2], dtype=np.int64))
        return item


def _random_patch(planes: list[np.ndarray], crop: int, rng: np.random.Generator,
                  flip: bool) -> list[np.ndarray]:
    height, width = planes[0].shape
    pad_h, pad_w = max(0, crop - height), max(0, crop - width)
    if pad_h or pad_w:
        planes = [
            np.pad(p, ((0, pad_h), (0, pad_w)), mode="reflect")
            if p.dtype != np.int64
            else np.pad(p, ((0, pad_h), (0, pad_w)), constant_values=IGNORE_INDEX)
            for p in planes
        ]
        height, width = planes[0].shape
    top = int(rng.integers(0, height - crop + 1))
    left = int(rng.integers(0, width - crop + 1))
    planes = [p[top : top + crop, left : left + crop] for p in planes]
    # copies: a flipped view of a 1-pixel side counts as contiguous with a negative stride,
    # which np.ascontiguousarray keeps and torch.from_numpy refuses
    if flip and rng.random() < 0.5:
        planes = [p[:, ::-1].copy() for p in planes]
    if flip and rng.random() < 0.5:
        planes = [p[::-1, :].copy() for p in planes]
    return planes
