"""``ImageSet``: the one dataset class every adapter returns (in-memory arrays or image files + labels).

Items are either a uint8 array ``[N, H, W]`` (grey) / ``[N, H, W, C]`` held in memory (digits,
Fashion-MNIST, synthetic) or a list of image file paths decoded lazily with PIL and converted to
RGB (CUB, Cars, SOP, In-Shop), optionally cropped to a bounding box ``(x1, y1, x2, y2)``; with a
``DecodedCache`` attached (``with_cache``), file images are read from it instead, already decoded, cropped
and resized (``harness.data.cache``).
``__getitem__`` hands a PIL image to the transform, so the same torchvision transforms serve both.

``to_rgb`` is the one conversion of a decoded file to RGB, used by ``ImageSet``, the decoded-image cache
and the pre-training check (``harness.data.verify``), so what is checked is what trains.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import functional as TF

from harness.errors import DatasetError

if TYPE_CHECKING:
    from harness.data.cache import DecodedCache

Transform = Callable[[Image.Image], Any]

#: Default of ``data.min_side``: an image file with a side shorter than this (in pixels) is refused.
MIN_SIDE = 8

#: What ``to_rgb`` does to each mode that needs more than a plain conversion (``data check`` lists them).
CONVERSIONS = {
    "CMYK": "CMYK converted to RGB",
    "P": "palette (P) converted to RGB (any transparency composited on white)",
    "PA": "palette with alpha (PA) composited on white",
    "LA": "grey with alpha (LA) composited on white",
    "La": "grey with alpha (La) composited on white",
    "RGBA": "alpha (RGBA) composited on white",
    "RGBa": "alpha (RGBa) composited on white",
    "I;16": "16-bit grey (I;16) scaled to 8 bits",
    "I;16L": "16-bit grey (I;16L) scaled to 8 bits",
    "I;16B": "16-bit grey (I;16B) scaled to 8 bits",
    "I;16N": "16-bit grey (I;16N) scaled to 8 bits",
    "I": "32-bit integer grey (I, 16-bit range) scaled to 8 bits",
    "YCbCr": "YCbCr converted to RGB",
}


class UnusableImage(ValueError):
    """A decoded image ``to_rgb`` cannot turn into RGB pixels that mean what the file means."""


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` (a decoded file, any mode) as an RGB image; raises ``UnusableImage`` with the reason.

    RGB comes back unchanged and grey (L, 1) is replicated to three channels. 16-bit grey (``I;16*``, and
    ``I`` holding 0..65535, as 16-bit PNGs and TIFFs decode) is scaled to 8 bits (``round(v / 257)``), not
    clipped (which turns everything above 255 white). Palette images and images with an alpha channel are
    composited on white (a transparent background becomes white, not whatever colour the transparent
    pixels happen to store). CMYK (Adobe-inverted JPEGs included: Pillow undoes the inversion) and YCbCr
    use Pillow's conversion. Float (``F``) images, ``I`` outside 0..65535 and modes Pillow cannot convert
    are refused."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(img)
        if mode == "I" and a.size and (int(a.min()) < 0 or int(a.max()) > 65535):
            raise UnusableImage(
                f"32-bit integer pixels (mode I) outside the 16-bit range ({a.min()}..{a.max()})"
            )
        grey = ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)  # round(v / 257)
        return Image.fromarray(grey).convert("RGB")
    if mode == "F":
        raise UnusableImage("floating-point pixels (mode F) have no defined 8-bit range")
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise UnusableImage(f"mode {mode} cannot be converted to RGB ({e})") from e


def open_rgb(path: str | os.PathLike[str]) -> Image.Image:
    """The image file at ``path`` decoded and converted by ``to_rgb`` (the one way files are read)."""
    with Image.open(path) as f:
        f.load()
        rgb = to_rgb(f)
        return rgb if rgb is not f else f.copy()


class ImageSet(torch.utils.data.Dataset):
    """Images with int64 labels; ``channels`` is 1 for grey arrays, 3 for colour arrays and files."""

    def __init__(
        self,
        items: np.ndarray | Sequence[str | os.PathLike[str]],
        labels: Sequence[int] | np.ndarray,
        *,
        boxes: np.ndarray | None = None,
        transform: Transform | None = None,
    ):
        self.labels = np.asarray(labels, dtype=np.int64)
        if isinstance(items, np.ndarray) and items.dtype.kind not in "OUS":  # pixels, not paths
            if (
                items.dtype != np.uint8
                or items.ndim not in (3, 4)
                or (items.ndim == 4 and items.shape[-1] not in (1, 3))
            ):
                raise ValueError(
                    f"image array must be uint8 [N,H,W] or [N,H,W,1|3], got {items.dtype} {items.shape}"
                )
            self.items: np.ndarray = items[..., 0] if items.ndim == 4 and items.shape[-1] == 1 else items
            self.channels = 1 if self.items.ndim == 3 else 3
        else:
            self.items = np.asarray([os.fspath(p) for p in items], dtype=object)
            self.channels = 3
        if len(self.items) != len(self.labels):
            raise ValueError(f"{len(self.items)} images but {len(self.labels)} labels")
        if boxes is not None:
            boxes = np.asarray(boxes, dtype=np.float64)
            if boxes.shape != (len(self.labels), 4) or self.in_memory:
                raise ValueError(f"boxes must be [N, 4] (x1, y1, x2, y2) for image files, got {boxes.shape}")
        self.boxes = boxes
        self.transform = transform
        self.cache: DecodedCache | None = None
        self.rows: np.ndarray | None = None  # row in ``cache`` of each item

    @property
    def in_memory(self) -> bool:
        return self.items.dtype == np.uint8

    @property
    def num_classes(self) -> int:
        return len(np.unique(self.labels))

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> Image.Image:
        """Image ``i`` as a PIL image (mode L or RGB), before any transform."""
        if self.in_memory:
            return Image.fromarray(self.items[i])
        if self.cache is not None and self.rows is not None:
            return Image.fromarray(self.cache[int(self.rows[i])])
        path = self.items[i]
        try:
            img = open_rgb(path)
        except FileNotFoundError as e:
            raise DatasetError(f"image file {path} is missing (run `dmlh data check` on the dataset)") from e
        except UnusableImage as e:
            raise DatasetError(f"image file {path} cannot be used: {e}") from e
        except (OSError, UnidentifiedImageError) as e:
            raise DatasetError(f"image file {path} cannot be decoded: {e}") from e
        if self.boxes is not None:
            img = img.crop(tuple(self.boxes[i]))
        return img

    def pixels(self, i: int) -> np.ndarray | Image.Image:
        """Image ``i`` as the uint8 array it is stored as (in memory or in the cache), else as a PIL image."""
        if self.in_memory:
            return self.items[i]
        if self.cache is not None and self.rows is not None:
            return self.cache[int(self.rows[i])]
        return self.image(i)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        takes_arrays = getattr(self.transform, "accepts_arrays", False)  # batch_augment.ToCanvas
        if takes_arrays:  # no PIL round trip
            return cast(Callable[[Any], Any], self.transform)(self.pixels(i)), int(self.labels[i])
        img = self.image(i)
        x = self.transform(img) if self.transform is not None else TF.to_tensor(img)
        return x, int(self.labels[i])

    def with_transform(self, transform: Transform | None) -> ImageSet:
        """A shallow copy (shares the image storage) that applies ``transform``."""
        out = copy.copy(self)
        out.transform = transform
        return out

    def with_cache(self, cache: DecodedCache, rows: np.ndarray) -> ImageSet:
        """A shallow copy that reads image ``i`` from row ``rows[i]`` of ``cache``."""
        assert not self.in_memory and len(rows) == len(self), "a cache holds image files, one row each"
        out = copy.copy(self)
        out.cache, out.rows = cache, np.asarray(rows, dtype=np.int64)
        return out

    def subset(self, indices: Sequence[int] | np.ndarray, relabel: bool = False) -> ImageSet:
        """The images at ``indices``; ``relabel`` maps the labels present to 0..C-1 in sorted order
        (what proxies and softmax heads need)."""
        idx = np.asarray(indices, dtype=np.int64)
        out = copy.copy(self)
        out.items = self.items[idx]
        out.labels = self.labels[idx]
        out.boxes = self.boxes[idx] if self.boxes is not None else None
        out.rows = self.rows[idx] if self.rows is not None else None
        if relabel:
            out.labels = np.unique(out.labels, return_inverse=True)[1].astype(np.int64)
        return out

    def missing_files(self) -> list[str]:
        """Paths of image files that do not exist (empty for in-memory images)."""
        return [] if self.in_memory else [p for p in self.items if not os.path.isfile(p)]
