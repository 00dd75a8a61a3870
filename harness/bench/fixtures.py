"""A folder of photo-like JPEGs in the CUB-200-2011 layout, for the pipeline benchmarks
(`dmlh bench fixture DIR`, and `dmlh bench gpu` writes its own)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from harness.bench import bench_parser


def _photo(path: Path, label: int, size: tuple[int, int], seed: int) -> None:
    """Smooth class-coloured gradients plus noise: JPEG-decodes like a photo (flat colour decodes faster)."""
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    colour = np.random.default_rng(label).uniform(40, 215, 3).astype(np.float32)
    ramp = (xx / w - 0.5)[..., None] * 80 + (yy / h - 0.5)[..., None] * 60
    pixels = colour + ramp + rng.normal(0, 18, (h, w, 3)).astype(np.float32)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)


def write_cub_like(root: Path, images: int, size: tuple[int, int], classes: int = 200) -> Path:
    """``images`` JPEGs of ``size`` (width, height) over ``classes`` classes (ids 1..classes, in turn) in
    the CUB layout ``images/<NNN.Class>/<file>.jpg`` + images.txt + image_class_labels.txt; returns root.
    An existing complete folder is reused."""
    root = Path(root)
    if (root / "image_class_labels.txt").is_file():
        return root
    labels = [1 + i % classes for i in range(images)]
    rels = [f"{c:03d}.Class_{c}/img_{i:06d}.jpg" for i, c in enumerate(labels)]
    for c in set(labels):
        (root / "images" / f"{c:03d}.Class_{c}").mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor() as pool:
        list(pool.map(lambda i: _photo(root / "images" / rels[i], labels[i], size, i), range(images)))
    (root / "images.txt").write_text("".join(f"{i + 1} {r}\n" for i, r in enumerate(rels)))
    (root / "image_class_labels.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(labels)))
    return root


def bench_fixture(options: list[str]) -> None:
    """`dmlh bench fixture DIR [--images N] [--size W H]`: write the folder (for `dmlh bench data`)."""
    parser = bench_parser("fixture")
    parser.add_argument("root")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, nargs=2, default=[80, 80], metavar=("W", "H"))
    parser.add_argument("--classes", type=int, default=200)
    args = parser.parse_args(options)
    root = write_cub_like(Path(args.root), args.images, tuple(args.size), args.classes)
    print(f"{args.images} JPEGs {args.size[0]}×{args.size[1]} in the CUB layout: {root}")
