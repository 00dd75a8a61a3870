"""Dataset adapters, registered as kind ``dataset``: each returns class-disjoint ``DatasetSplits``.

Zero-shot protocol: train and test classes are disjoint (METHODS.md §2). In-Shop searches a query
set against a gallery; every other dataset searches its test split against itself. Real datasets
are read from their official on-disk layouts; a missing or malformed file is a ``DatasetError``
naming the file (and line) and the expected layout. With ``root`` unset a dataset is looked up
under ``$DMLH_DATA/<usual folder name>``.
"""

from __future__ import annotations

import gzip
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io

from harness.data.images import ImageSet
from harness.errors import ConfigError, DatasetError
from harness.registry import register

log = logging.getLogger(__name__)

DATA_ENV = "DMLH_DATA"
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass
class DatasetSplits:
    """What a dataset adapter returns. ``query`` is set only for query→gallery protocols (In-Shop),
    where ``test`` is the gallery; ``source`` says where the data was read from (for reports)."""

    train: ImageSet
    test: ImageSet
    query: ImageSet | None = None
    source: str = ""


# -- helpers ------------------------------------------------------------------------------------


def _data_home() -> Path | None:
    home = os.environ.get(DATA_ENV)
    return Path(home).expanduser() if home else None


def _find_root(root: str | None, dataset: str, folders: tuple[str, ...], marker: str, layout: str) -> Path:
    """``root`` itself, or ``root/<folder>`` when that holds ``marker``; with no root, the first
    ``$DMLH_DATA/<folder>`` that exists."""
    if root is not None:
        base = Path(root).expanduser()
        for sub in folders:
            if not (base / marker).exists() and (base / sub / marker).exists():
                return base / sub
        if not base.is_dir():
            raise DatasetError(f"{dataset}: dataset folder {base} does not exist; expected layout:\n{layout}")
        return base
    home = _data_home()
    tried = [home / f for f in folders] if home else []
    for cand in tried:
        if cand.is_dir():
            return cand
    where = ", ".join(map(str, tried)) if tried else f"${DATA_ENV} is not set"
    raise DatasetError(
        f"{dataset}: no data.dataset.root given and no default folder found ({where}); set "
        f"data.dataset.root=DIR or ${DATA_ENV}; expected layout:\n{layout}"
    )


def _require(base: Path, names: Iterable[str], dataset: str, layout: str) -> None:
    """One DatasetError listing every required file or folder (trailing ``/``) missing under ``base``."""
    missing = [n for n in names if not ((base / n).is_dir() if n.endswith("/") else (base / n).is_file())]
    if missing:
        listed = "\n".join(f"  - {base / n}" for n in missing)
        raise DatasetError(f"{dataset}: missing in {base}:\n{listed}\nexpected layout:\n{layout}")


def _read_table(path: Path, fields: dict[str, Callable[[str], Any]], skip: int = 0) -> list[tuple[Any, ...]]:
    """Whitespace-separated rows after ``skip`` lines, converted per field; a malformed line is a
    DatasetError naming the file and line number. Blank lines are ignored."""
    rows = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, start=1):
            if n <= skip or not line.strip():
                continue
            tokens = line.split()
            try:
                if len(tokens) != len(fields):
                    raise ValueError(f"{len(tokens)} fields instead of {len(fields)}")
                rows.append(tuple(conv(t) for conv, t in zip(fields.values(), tokens, strict=True)))
            except ValueError as e:
                raise DatasetError(
                    f"{path}, line {n}: malformed line {line.rstrip()!r} ({e}); expected `{' '.join(fields)}`"
                ) from e
    return rows


def _check_header(path: Path, line_no: int, expected: list[str]) -> None:
    with path.open(encoding="utf-8", errors="replace") as f:
        lines = [f.readline() for _ in range(line_no)]
    if lines[-1].split() != expected:
        raise DatasetError(
            f"{path}, line {line_no}: expected the header `{' '.join(expected)}`, got {lines[-1].rstrip()!r}"
        )


def _split(
    images: ImageSet, is_train: np.ndarray, dataset: str, param: str, source: object = ""
) -> DatasetSplits:
    """Train = images with ``is_train``, test = the rest; both must be non-empty."""
    if len(images) == 0:
        raise DatasetError(f"{dataset}: no images are listed in {source}")
    train_idx, test_idx = np.flatnonzero(is_train), np.flatnonzero(~is_train)
    if len(train_idx) == 0 or len(test_idx) == 0:
        empty = "train" if len(train_idx) == 0 else "test"
        lo, hi = images.labels.min(), images.labels.max()
        raise ConfigError(
            f"data.dataset.{param}: leaves the {empty} split of {dataset} empty (class ids run {lo}..{hi})"
        )
    return DatasetSplits(train=images.subset(train_idx), test=images.subset(test_idx), source=str(source))


def _check_class_list(classes: tuple[int, ...], valid: range, dataset: str) -> set[int]:
    wanted = set(classes)
    bad = sorted(wanted - set(valid))
    if bad:
        raise ConfigError(
            f"data.dataset.train_classes: {bad} are not {dataset} classes ({valid.start}..{valid.stop - 1})"
        )
    return wanted


# -- small in-memory datasets ------------------------------------------------------------------------


@register("dataset", "synthetic")
def synthetic(
    *,
    num_classes: int = 20,
    per_class: int = 20,
    size: int = 8,
    channels: int = 1,
    train_classes: int | None = None,
    seed: int = 0,
) -> DatasetSplits:
    """Generated images: one random template per class, shifted by ±1 pixel, plus noise (learnable, instant).

    Classes ``0..train_classes-1`` (default: the first half) train, the rest test; deterministic by ``seed``.
    """
    n_train = num_classes // 2 if train_classes is None else train_classes
    if channels not in (1, 3):
        raise ConfigError(f"data.dataset.channels: must be 1 or 3, got {channels}")
    if not 1 <= n_train < num_classes or per_class < 1 or size < 2:
        raise ConfigError(
            f"data.dataset: synthetic needs 1 <= train_classes < num_classes, per_class >= 1, size >= 2 "
            f"(got train_classes={n_train}, num_classes={num_classes}, per_class={per_class}, size={size})"
        )
    rng = np.random.default_rng(seed)
    templates = rng.uniform(0.0, 1.0, (num_classes, channels, size + 2, size + 2))
    windows = np.lib.stride_tricks.sliding_window_view(templates, (size, size), axis=(2, 3))  # [C,ch,3,3,s,s]
    labels = np.repeat(np.arange(num_classes), per_class)
    dy, dx = rng.integers(0, 3, (2, len(labels)))
    pixels = windows[labels, :, dy, dx] + rng.normal(0.0, 0.1, (len(labels), channels, size, size))
    images = (np.clip(pixels, 0.0, 1.0) * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)
    return _split(ImageSet(images, labels), labels < n_train, "synthetic", "train_classes")


@register("dataset", "digits")
def digits(*, train_classes: tuple[int, ...] = (0, 1, 2, 3, 4)) -> DatasetSplits:
    """scikit-learn's embedded handwritten digits (1,797 grey 8×8 images): digits 0–4 train, 5–9 test."""
    from sklearn.datasets import load_digits

    wanted = _check_class_list(train_classes, range(10), "digits")
    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    return _split(ImageSet(images, d.target), np.isin(d.target, list(wanted)), "digits", "train_classes")


FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_HELP = (
    "get it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu, installs into "
    f"{FASHION_SYSTEM_DIR}) or download the four files "
    f"{', '.join(f + '.gz' for f in FASHION_FILES.values())} "
    "from https://github.com/zalandoresearch/fashion-mnist into a folder and set data.dataset.root "
    f"(or ${DATA_ENV}) to it"
)


def fashion_mnist_dirs(root: str | None) -> list[Path]:
    """Folders searched for the Fashion-MNIST files, in order: root, $DMLH_DATA, $DMLH_DATA/fashion-mnist,
    the Debian package's folder."""
    dirs = [Path(root).expanduser()] if root else []
    home = _data_home()
    if home:
        dirs += [home, home / "fashion-mnist"]
    return dirs + [FASHION_SYSTEM_DIR]


def _idx_path(folder: Path, stem: str) -> Path | None:
    """``stem.gz`` or the uncompressed ``stem`` in ``folder``."""
    for p in (folder / f"{stem}.gz", folder / stem):
        if p.is_file():
            return p
    return None


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """A uint8 IDX array (magic 0x08 type, ``ndim`` dimensions), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DatasetError(f"{path}: cannot be read ({e}); {FASHION_HELP}") from e
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:2] != b"\0\0" or raw[2] != 0x08 or raw[3] != ndim:
        raise DatasetError(f"{path}: not a uint8 IDX file with {ndim} dimension(s) (bad magic number)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) - header != int(np.prod(shape)):
        raise DatasetError(
            f"{path}: header declares shape {shape} but holds {len(raw) - header} bytes (truncated?)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


@register("dataset", "fashion_mnist")
def fashion_mnist(
    *,
    root: str | None = None,
    train_classes: tuple[int, ...] = (0, 1, 2, 3, 4, 5),
    max_per_class: int | None = None,
) -> DatasetSplits:
    """Fashion-MNIST (70,000 grey 28×28 images, official train and t10k pooled): classes 0–5 train, 6–9 test.

    Files are looked up in ``root``, ``$DMLH_DATA``, ``$DMLH_DATA/fashion-mnist``, then
    /usr/share/datasets/fashion-mnist (Debian's dataset-fashion-mnist). ``max_per_class`` keeps only the
    first N images of each class (in file order, train before t10k) to keep CPU runs small; None keeps all
    7,000 per class.
    """
    wanted = _check_class_list(train_classes, range(10), "fashion_mnist")
    if max_per_class is not None and max_per_class < 1:
        raise ConfigError(f"data.dataset.max_per_class: must be >= 1 or null, got {max_per_class}")
    searched = []
    for folder in fashion_mnist_dirs(root):
        paths = {k: _idx_path(folder, stem) for k, stem in FASHION_FILES.items()}
        if all(paths.values()):
            break
        absent = [FASHION_FILES[k] + "[.gz]" for k, p in paths.items() if p is None]
        searched.append(
            f"  - {folder}: " + ("no such folder" if not folder.is_dir() else "missing " + ", ".join(absent))
        )
    else:
        raise DatasetError(
            "fashion_mnist: the four IDX files were not found; searched:\n"
            + "\n".join(searched)
            + "\n"
            + FASHION_HELP
        )
    if root and folder != Path(root).expanduser():
        log.warning("fashion_mnist: %s does not hold the four IDX files; using %s", root, folder)
    parts = {k: read_idx(p, 3 if k.endswith("images") else 1) for k, p in paths.items() if p is not None}
    for split in ("train", "test"):
        if len(parts[f"{split}_images"]) != len(parts[f"{split}_labels"]):
            raise DatasetError(
                f"{paths[split + '_images']} and {paths[split + '_labels']}: different numbers of items"
            )
    images = np.concatenate([parts["train_images"], parts["test_images"]])
    labels = np.concatenate([parts["train_labels"], parts["test_labels"]]).astype(np.int64)
    if max_per_class is not None:
        order = np.argsort(labels, kind="stable")
        rank = np.arange(len(labels)) - np.searchsorted(labels[order], labels[order])  # position within class
        keep = np.sort(order[rank < max_per_class])
        images, labels = images[keep], labels[keep]
    return _split(
        ImageSet(images, labels), np.isin(labels, list(wanted)), "fashion_mnist", "train_classes", folder
    )


# -- the four DML benchmarks (METHODS.md §2) ------------------------------------------------------------

CUB_LAYOUT = """CUB_200_2011/
  images/<NNN.Class_Name>/<file>.jpg
  images.txt              <image_id> <path under images/>
  image_class_labels.txt  <image_id> <class_id 1..200>
  bounding_boxes.txt      <image_id> <x> <y> <width> <height>   (needed for bbox_crop only)
  (classes.txt and train_test_split.txt are not used: the DML split is by class id)"""


@register("dataset", "cub200")
def cub200(*, root: str | None = None, train_classes: int = 100, bbox_crop: bool = False) -> DatasetSplits:
    """CUB-200-2011 birds (11,788 images, 200 classes): class ids 1..train_classes train, the rest test."""
    base = _find_root(root, "cub200", ("CUB_200_2011",), "images.txt", CUB_LAYOUT)
    _require(
        base,
        ["images/", "images.txt", "image_class_labels.txt"] + (["bounding_boxes.txt"] if bbox_crop else []),
        "cub200",
        CUB_LAYOUT,
    )
    paths = dict(_read_table(base / "images.txt", {"image_id": int, "path": str}))
    classes = dict(_read_table(base / "image_class_labels.txt", {"image_id": int, "class_id": int}))
    ids = sorted(paths)
    _check_ids(ids, classes, base / "image_class_labels.txt")
    boxes = None
    if bbox_crop:
        table = _read_table(
            base / "bounding_boxes.txt",
            {"image_id": int, "x": float, "y": float, "width": float, "height": float},
        )
        xywh = {row[0]: row[1:] for row in table}
        _check_ids(ids, xywh, base / "bounding_boxes.txt")
        boxes = np.array([xywh[i] for i in ids]).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # (x, y, w, h) -> (x1, y1, x2, y2)
    labels = np.array([classes[i] for i in ids], dtype=np.int64)
    images = ImageSet([base / "images" / paths[i] for i in ids], labels, boxes=boxes)
    return _split(images, labels <= train_classes, "cub200", "train_classes", base)


def _check_ids(ids: list[int], table: dict[int, Any], path: Path) -> None:
    absent = [i for i in ids if i not in table]
    if absent:
        raise DatasetError(f"{path}: no row for {len(absent)} image id(s) of images.txt, e.g. {absent[:5]}")


CARS_LAYOUT = """cars196/
  car_ims/000001.jpg ... 016185.jpg
  cars_annos.mat   MATLAB struct array `annotations` (1×N) with fields
                   relative_im_path ('car_ims/000001.jpg'), bbox_x1, bbox_y1, bbox_x2, bbox_y2,
                   class (1..196), test (ignored)"""
CARS_FIELDS = ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class")


@register("dataset", "cars196")
def cars196(*, root: str | None = None, train_classes: int = 98, bbox_crop: bool = False) -> DatasetSplits:
    """Stanford Cars196 (16,185 images, 196 classes): classes 1..train_classes train, the rest test."""
    base = _find_root(root, "cars196", ("cars196", "Cars196", "stanford_cars"), "cars_annos.mat", CARS_LAYOUT)
    _require(base, ["car_ims/", "cars_annos.mat"], "cars196", CARS_LAYOUT)
    path = base / "cars_annos.mat"
    try:
        ann = scipy.io.loadmat(path)["annotations"]
    except (ValueError, OSError, NotImplementedError, scipy.io.matlab.MatReadError) as e:
        raise DatasetError(f"{path}: cannot be read as a MATLAB file ({e}); expected:\n{CARS_LAYOUT}") from e
    except KeyError as e:
        raise DatasetError(f"{path}: no variable `annotations`; expected:\n{CARS_LAYOUT}") from e
    absent = [f for f in CARS_FIELDS if f not in (ann.dtype.names or ())]
    if absent:
        raise DatasetError(f"{path}: `annotations` lacks the field(s) {absent}; expected:\n{CARS_LAYOUT}")
    records = ann.ravel()
    paths, values = [], []
    for k, rec in enumerate(records, start=1):
        try:
            paths.append(base / str(rec["relative_im_path"].item()))
            values.append([float(rec[f].item()) for f in CARS_FIELDS[1:]])
        except (ValueError, TypeError) as e:
            raise DatasetError(f"{path}: annotations entry {k} is malformed ({e})") from e
    table = np.array(values).reshape(-1, 5)  # x1, y1, x2, y2, class
    labels = table[:, 4].astype(np.int64)
    images = ImageSet(paths, labels, boxes=table[:, :4] if bbox_crop else None)
    return _split(images, labels <= train_classes, "cars196", "train_classes", base)


SOP_LAYOUT = """Stanford_Online_Products/
  Ebay_train.txt, Ebay_test.txt   header `image_id class_id super_class_id path`, then one row per image,
                                  e.g. `1 1 1 bicycle_final/111085122871_0.JPG`
  <super>_final/<file>.JPG"""
SOP_HEADER = ["image_id", "class_id", "super_class_id", "path"]


@register("dataset", "sop")
def sop(*, root: str | None = None) -> DatasetSplits:
    """Stanford Online Products (120,053 images, 22,634 products): Ebay_train.txt / Ebay_test.txt."""
    base = _find_root(root, "sop", ("Stanford_Online_Products",), "Ebay_train.txt", SOP_LAYOUT)
    _require(base, ["Ebay_train.txt", "Ebay_test.txt"], "sop", SOP_LAYOUT)
    splits = {}
    for split in ("train", "test"):
        path = base / f"Ebay_{split}.txt"
        _check_header(path, 1, SOP_HEADER)
        rows = _read_table(
            path, {"image_id": int, "class_id": int, "super_class_id": int, "path": str}, skip=1
        )
        if not rows:
            raise DatasetError(f"{path}: no image rows after the header")
        splits[split] = ImageSet([base / r[3] for r in rows], [r[1] for r in rows])
    return DatasetSplits(train=splits["train"], test=splits["test"], source=str(base))


INSHOP_LAYOUT = """InShop/
  list_eval_partition.txt (or Eval/list_eval_partition.txt): line 1 = number of images, line 2 = header
      `image_name item_id evaluation_status`, then rows like
      `img/WOMEN/Dresses/id_00000002/02_1_front.jpg id_00000002 train` (status train | query | gallery)
  img/...   (or Img/img/...)"""
INSHOP_STATUS = ("train", "query", "gallery")


def _item_id(token: str) -> int:
    if not token.startswith("id_"):
        raise ValueError(f"item id {token!r} does not start with 'id_'")
    return int(token[3:])


def _status(token: str) -> str:
    if token not in INSHOP_STATUS:
        raise ValueError(f"evaluation_status {token!r} is not one of {', '.join(INSHOP_STATUS)}")
    return token


@register("dataset", "inshop")
def inshop(*, root: str | None = None) -> DatasetSplits:
    """DeepFashion In-Shop clothes (52,712 images, 7,982 items): train items; test = query vs gallery."""
    base = _find_root(
        root, "inshop", ("InShop", "inshop", "In-shop"), "list_eval_partition.txt", INSHOP_LAYOUT
    )
    candidates = [base / "list_eval_partition.txt", base / "Eval" / "list_eval_partition.txt"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise DatasetError(
            f"inshop: missing {candidates[0]} (also looked for {candidates[1]}); "
            f"expected layout:\n{INSHOP_LAYOUT}"
        )
    with path.open(encoding="utf-8", errors="replace") as f:
        first = f.readline()
    try:
        declared = int(first)
    except ValueError as e:
        raise DatasetError(f"{path}, line 1: expected the number of images, got {first.rstrip()!r}") from e
    _check_header(path, 2, ["image_name", "item_id", "evaluation_status"])
    rows = _read_table(path, {"image_name": str, "item_id": _item_id, "evaluation_status": _status}, skip=2)
    if declared != len(rows):
        raise DatasetError(f"{path}, line 1: declares {first.strip()} images but {len(rows)} rows follow")
    image_base = base / "Img" if not (base / "img").is_dir() and (base / "Img" / "img").is_dir() else base
    status = np.array([r[2] for r in rows])
    images = ImageSet([image_base / r[0] for r in rows], [r[1] for r in rows])
    train, query, gallery = (images.subset(np.flatnonzero(status == s)) for s in INSHOP_STATUS)
    for name, part in (("train", train), ("query", query), ("gallery", gallery)):
        if len(part) == 0:
            raise DatasetError(f"{path}: no row has evaluation_status {name}")
    return DatasetSplits(train=train, test=gallery, query=query, source=str(base))
