"""Builders of tiny datasets in the exact official on-disk layouts (METHODS.md §2), for tests.

Every builder writes under ``root`` (created if needed) and returns ``root``. Images are small
class-coloured JPEGs (class colour + noise), so a model can tell classes apart.
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image


def _jpeg(path: Path, label: int, size: int, rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = np.random.default_rng(label).integers(0, 256, 3)
    pixels = np.clip(colour + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def _lines(path: Path, rows: Sequence[Sequence[object]], head: Sequence[str] = ()) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{h}\n" for h in head) + "".join(" ".join(map(str, r)) + "\n" for r in rows))


def make_cub200(
    root: str | Path, classes: Sequence[int] = (1, 2, 101, 102), per_class: int = 3, size: int = 40
) -> Path:
    """CUB_200_2011 layout: images/<NNN.Name>/*.jpg, images.txt, image_class_labels.txt, classes.txt,
    train_test_split.txt, bounding_boxes.txt (ids 1..N in class order)."""
    root = Path(root)
    rng = np.random.default_rng(0)
    images, labels, boxes, split = [], [], [], []
    for c in classes:
        folder = f"{c:03d}.Class_{c}"
        for j in range(per_class):
            rel = f"{folder}/Class_{c}_{j:04d}_{c}.jpg"
            _jpeg(root / "images" / rel, c, size, rng)
            i = len(images) + 1
            images.append((i, rel))
            labels.append((i, c))
            boxes.append((i, 2.0, 3.0, float(size - 6), float(size - 8)))
            split.append((i, j % 2))
    _lines(root / "images.txt", images)
    _lines(root / "image_class_labels.txt", labels)
    _lines(root / "classes.txt", [(c, f"{c:03d}.Class_{c}") for c in classes])
    _lines(root / "train_test_split.txt", split)
    _lines(root / "bounding_boxes.txt", boxes)
    return root


CARS_FIELDS = ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test")


def make_cars196(
    root: str | Path, classes: Sequence[int] = (1, 2, 99, 100), per_class: int = 3, size: int = 40
) -> Path:
    """Cars196 layout: car_ims/NNNNNN.jpg and cars_annos.mat (1×N struct array ``annotations`` with fields
    relative_im_path, bbox_x1, bbox_y1, bbox_x2, bbox_y2, class, test; 1×196 cell ``class_names``)."""
    root = Path(root)
    rng = np.random.default_rng(0)
    labels = [c for c in classes for _ in range(per_class)]
    ann = np.empty((1, len(labels)), dtype=[(f, object) for f in CARS_FIELDS])
    for i, c in enumerate(labels):
        rel = f"car_ims/{i + 1:06d}.jpg"
        _jpeg(root / rel, c, size, rng)
        box = [2, 3, size - 4, size - 5]
        ann[0, i] = (
            np.array([rel]),
            *(np.array([[v]], dtype=np.uint16) for v in box),
            np.array([[c]], dtype=np.uint8),
            np.array([[i % 2]], dtype=np.uint8),
        )
    names = np.empty((1, 196), dtype=object)
    names[0, :] = [np.array([f"Make Model {k}"]) for k in range(1, 197)]
    scipy.io.savemat(root / "cars_annos.mat", {"annotations": ann, "class_names": names})
    return root


def make_sop(
    root: str | Path, train_classes: int = 3, test_classes: int = 3, per_class: int = 2, size: int = 32
) -> Path:
    """Stanford_Online_Products layout: Ebay_train.txt / Ebay_test.txt / Ebay_info.txt with the header
    ``image_id class_id super_class_id path``; test class ids continue after the train ids."""
    root = Path(root)
    rng = np.random.default_rng(0)
    supers = ["bicycle", "chair"]
    header = ["image_id class_id super_class_id path"]
    rows: dict[str, list[tuple[int, int, int, str]]] = {"train": [], "test": []}
    image_id = 0
    for c in range(1, train_classes + test_classes + 1):
        s = (c - 1) % len(supers)
        for j in range(per_class):
            image_id += 1
            rel = f"{supers[s]}_final/{111085122870 + c}_{j}.JPG"
            _jpeg(root / rel, c, size, rng)
            rows["train" if c <= train_classes else "test"].append((image_id, c, s + 1, rel))
    _lines(root / "Ebay_train.txt", rows["train"], header)
    _lines(root / "Ebay_test.txt", rows["test"], header)
    _lines(root / "Ebay_info.txt", rows["train"] + rows["test"], header)
    return root


def make_inshop(root: str | Path, eval_dir: bool = False, size: int = 32, train_items: int = 2) -> Path:
    """In-Shop layout: list_eval_partition.txt (line 1 = number of images, line 2 = header) in ``root``
    (or ``root/Eval`` with ``eval_dir``) and img/WOMEN/Dresses/id_XXXXXXXX/*.jpg. Items 1…``train_items``
    train (2 images each); the next 2 items test, each with 1 query and 2 gallery images."""
    root = Path(root)
    rng = np.random.default_rng(0)
    test = ["query", "gallery", "gallery"]
    layout = {item: ["train"] * 2 for item in range(1, train_items + 1)}
    layout |= {train_items + 1: test, train_items + 2: test}
    rows = []
    for item, statuses in layout.items():
        for j, status in enumerate(statuses, start=1):
            rel = f"img/WOMEN/Dresses/id_{item:08d}/{j:02d}_{j}_front.jpg"
            _jpeg(root / rel, item, size, rng)
            rows.append((rel, f"id_{item:08d}", status))
    path = root / "Eval" / "list_eval_partition.txt" if eval_dir else root / "list_eval_partition.txt"
    _lines(path, rows, [str(len(rows)), "image_name item_id evaluation_status"])
    return root


def write_idx(path: Path, array: np.ndarray) -> None:
    """A gzipped uint8 IDX file (magic 0x0000 08 <ndim>, big-endian int32 dims, then the bytes)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def make_fashion_mnist(root: str | Path, n_per_class: int = 3) -> Path:
    """The four Fashion-MNIST IDX .gz files with ``n_per_class`` 28×28 images of each of the 10 classes in
    both the train and the t10k files (class c: a bright horizontal band at rows 2c..2c+5, plus noise)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split in ("train", "t10k"):
        labels = np.tile(np.arange(10, dtype=np.uint8), n_per_class)
        images = rng.integers(0, 60, (len(labels), 28, 28))
        for i, c in enumerate(labels):
            images[i, 2 * c : 2 * c + 6] += 180
        write_idx(root / f"{split}-images-idx3-ubyte.gz", images.astype(np.uint8))
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels)
    return root


def truncate_jpeg(path: Path, keep: float = 0.5) -> Path:
    """Cut the JPEG at ``path`` to its first ``keep`` fraction of bytes (a download that stopped midway:
    the header still parses, the decode fails)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def garbage_jpeg(path: Path, n_bytes: int = 2048) -> Path:
    """Random bytes under a ``.jpg`` name (not an image at all)."""
    path.write_bytes(np.random.default_rng(1).integers(0, 256, n_bytes, dtype=np.uint8).tobytes())
    return path
