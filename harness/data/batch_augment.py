"""Batched training augmentation on uint8 tensors (``data.batch_augment``), on the training device.

With the decoded-image cache a DataLoader worker would still crop, resize, flip and normalise every image
with PIL, one at a time: most of the input pipeline's cost at small image sizes. Here a worker only copies
the image into a fixed-size uint8 *canvas* (``ToCanvas``: the image at the top-left, stored transposed when
it is taller than wide, so that one landscape canvas holds both orientations) and the training process
augments the whole batch at once (``BatchAugment``):

- per-sample crop boxes drawn as the recipe's PIL transforms draw them (``resized_crop_boxes`` is
  ``RandomResizedCrop.get_params`` vectorised: 10 tries of log-uniform ratio and uniform area, then its
  centre-crop fallback; the symmetrical-synthesis border crop + squash + random crop composed into one
  box; ABE's random crop of the padded square);
- two batched matrix products crop and resize every box to the input size with PIL's own filter
  (``resample_weights``: antialiased bilinear, the same pixels as ``TF.resized_crop`` to within a grey
  level; torchvision's v2 transforms draw one parameter set per call, so they cannot do this per sample);
- a per-sample horizontal flip (p = 0.5), then the backbone's convention (scale, BGR) and normalisation.

Batching pays on a GPU only: on the CPU the batched products run in the training process and take their
time from the step (at 500 × 375 → 224 px, 20 % of it). ``auto`` therefore batches on CUDA only; on the CPU
the DataLoader workers augment each cached image themselves with ``CachedCrop``: the recipe's PIL draws
(torchvision's own ``get_params``, from the worker's global generator, so the boxes are those of the PIL
transforms for a given seed), a crop of the stored uint8 array, ONE antialiased bilinear resize of it with
torch's uint8 kernel (PIL's filter: its pixels to within a grey level) and the flip, handed over as uint8;
the training process only normalises the batch (``CachedCrop.normalise``, about 1 % of a step).

The random draws come from a generator of its own on the device, seeded by the run's seed, so a run stays
reproducible. Recipes: ``imagenet`` (the default for photos), ``symm_official``, ``mdr_official`` and
``abe_official``; their deterministic steps (MDR's Lanczos squash, ABE's resize-and-pad, the shorter-side
resize of an uncached photo) run in the worker. ``grey`` (padded random crops of small in-memory images) is
not batched. ``auto`` batches on CUDA when the training images come from the cache and the recipe is batched.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from harness.data.images import ImageSet
from harness.data.transforms import (
    BORDER_CROP,
    CROP_RATIO,
    CROP_SCALE,
    RandomBorderCrop,
    ResizePad,
    normalisation,
    recipe_kind,
    recipe_sizes,
)
from harness.errors import ConfigError
from harness.types import DataConfig

if TYPE_CHECKING:
    from harness.config import DataSection

log = logging.getLogger(__name__)

#: Recipes whose random geometry ``BatchAugment`` draws.
BATCHED = ("imagenet", "symm_official", "mdr_official", "abe_official")
#: Longer / shorter side of the canvas: a more elongated photo is shrunk to fit (CUB's 500×333 fits).
CANVAS_ASPECT = 1.5
#: Tries of RandomResizedCrop before its centre-crop fallback (torchvision's).
CROP_TRIES = 10


class Canvas(NamedTuple):
    """uint8 ``pixels`` ``[..., Hc, Wc, C]`` (the image at the top-left, transposed when taller than wide,
    its last row and column repeated once so that bilinear sampling at its border sees no padding) and
    ``sizes`` ``[..., 3]``: the image's height, width (upright) and whether it is stored transposed.

    The DataLoader's default collation stacks a NamedTuple field by field, and pins it field by field."""

    pixels: torch.Tensor
    sizes: torch.Tensor

    def to(self, device: torch.device, non_blocking: bool = False) -> Canvas:
        return Canvas(
            self.pixels.to(device, non_blocking=non_blocking),
            self.sizes.to(device, non_blocking=non_blocking),
        )


class ToCanvas:
    """The worker's part: a PIL image or uint8 array → ``Canvas`` of ``shape`` (Hc, Wc). ``fit`` resizes
    (bilinear) so that the shorter side is ``shape[0]`` and the longer at most ``shape[1]`` (a no-op for
    cached images); the other recipes' deterministic steps are passed as ``steps``."""

    #: ``ImageSet`` hands it its stored uint8 arrays as they are (no PIL round trip).
    accepts_arrays = True

    def __init__(self, shape: tuple[int, int], steps: list[Callable], fit: bool):
        self.shape, self.steps, self.fit = shape, steps, fit

    def _scale(self, h: int, w: int) -> float:
        """The ``fit`` resize factor of an ``h`` × ``w`` image (1: none)."""
        hc, wc = self.shape
        return min(hc / min(w, h), wc / max(w, h)) if self.fit else 1.0

    def __call__(self, img: Image.Image | np.ndarray) -> Canvas:
        hc, wc = self.shape
        if isinstance(img, np.ndarray) and (self.steps or self._scale(*img.shape[:2]) != 1.0):
            img = Image.fromarray(img)
        for step in self.steps:
            img = step(img)
        if isinstance(img, Image.Image) and (scale := self._scale(img.height, img.width)) != 1.0:
            size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
            img = img.resize(size, Image.Resampling.BILINEAR)
        a = np.asarray(img)
        a = a[..., None] if a.ndim == 2 else a
        h, w = a.shape[:2]
        transposed = h > w
        if transposed:
            a = a.transpose(1, 0, 2)
        sh, sw = a.shape[:2]
        if sh > hc or sw > wc:
            raise ValueError(f"image of {h}×{w} does not fit the canvas {hc}×{wc}")
        out = np.zeros((hc, wc, a.shape[2]), dtype=np.uint8)
        out[:sh, :sw] = a
        out[:sh, sw : sw + 1] = a[:, -1:]
        out[sh : sh + 1, : sw + 1] = out[sh - 1 : sh, : sw + 1]
        return Canvas(torch.from_numpy(out), torch.tensor([h, w, int(transposed)], dtype=torch.int64))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, steps={self.steps}, fit={self.fit})"


def _uniform(g: torch.Generator, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
    return torch.rand(shape, generator=g, device=g.device, dtype=torch.float64) * (high - low) + low


def _offset(g: torch.Generator, room: torch.Tensor) -> torch.Tensor:
    """Uniform integers 0..room (inclusive), elementwise (``torch.randint(0, room + 1)``)."""
    return torch.floor(_uniform(g, tuple(room.shape), 0.0, 1.0) * (room + 1)).clamp(max=room)


def resized_crop_boxes(
    hw: torch.Tensor, scale: tuple[float, float], ratio: tuple[float, float], g: torch.Generator
) -> torch.Tensor:
    """``[B, 4]`` (top, left, height, width) of ``RandomResizedCrop.get_params`` for images of
    heights/widths ``hw`` ``[B, 2]``: the first of ``CROP_TRIES`` (area, log-ratio) draws that fits, else
    the centre crop with the ratio clamped to ``ratio``; integer sizes and offsets as torchvision's."""
    h, w = hw[:, 0].double(), hw[:, 1].double()
    n = len(hw)
    area = (h * w)[:, None] * _uniform(g, (n, CROP_TRIES), *scale)
    r = torch.exp(_uniform(g, (n, CROP_TRIES), math.log(ratio[0]), math.log(ratio[1])))
    cw, ch = torch.round(torch.sqrt(area * r)), torch.round(torch.sqrt(area / r))
    fits = (cw > 0) & (cw <= w[:, None]) & (ch > 0) & (ch <= h[:, None])
    first = fits.int().argmax(1, keepdim=True)
    cw, ch, found = cw.gather(1, first)[:, 0], ch.gather(1, first)[:, 0], fits.any(1)
    aspect = w / h
    cw = torch.where(found, cw, torch.where(aspect > ratio[1], torch.round(h * ratio[1]), w))
    ch = torch.where(found, ch, torch.where(aspect < ratio[0], torch.round(w / ratio[0]), h))
    top = torch.where(found, _offset(g, h - ch), torch.div(h - ch, 2, rounding_mode="floor"))
    left = torch.where(found, _offset(g, w - cw), torch.div(w - cw, 2, rounding_mode="floor"))
    return torch.stack([top, left, ch, cw], dim=1)


def border_crop_boxes(hw: torch.Tensor, low: float, high: float, g: torch.Generator) -> torch.Tensor:
    """``[B, 4]`` (top, left, height, width) of ``RandomBorderCrop(low, high)``: each border trimmed by a
    rounded uniform ``low``–``high`` fraction of the short side."""
    h, w = hw[:, 0].double(), hw[:, 1].double()
    trim = torch.round(_uniform(g, (len(hw), 4), low, high) * torch.minimum(h, w)[:, None])
    left, top, right, bottom = trim.unbind(1)  # RandomBorderCrop's order
    return torch.stack([top, left, h - top - bottom, w - left - right], dim=1)


def crop_offsets(hw: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """``[B, 2]`` (top, left) of ``RandomCrop(size).get_params``: uniform integers 0..(side - size)."""
    return _offset(g, hw.double() - size)


def resample_weights(axis: torch.Tensor, count: int, length: int) -> torch.Tensor:
    """``[B, count, length]`` weights of PIL's antialiased bilinear resize along one axis.

    ``axis`` ``[B, 4]`` = (start, stop, n, offset): the source pixels ``start..stop-1`` are resized to ``n``
    pixels, of which ``offset..offset+count-1`` are kept (a crop after the resize). A triangle filter
    widened by the shrink factor, restricted to the source range and normalised, as ``Image.resize`` of
    the cropped image computes it (PIL then rounds to uint8 between its two passes; this does not)."""
    start, stop, n, offset = axis.float().unbind(1)
    scale = (stop - start) / n
    centre = (
        start[:, None] + (offset[:, None] + torch.arange(count, device=axis.device) + 0.5) * scale[:, None]
    )
    x = torch.arange(length, device=axis.device, dtype=torch.float32) + 0.5
    w = (x - centre[..., None]).abs_().div_(-scale.clamp(min=1)[:, None, None]).add_(1).clamp_(min=0)
    w.mul_((x >= start[:, None, None]) & (x < stop[:, None, None]))
    return w.div_(w.sum(-1, keepdim=True))


def deterministic_steps(kind: str, resize: int, dc: DataConfig, channels: int) -> list[Callable]:
    """The PIL steps of recipe ``kind`` before its random crop (a worker's part): the conversion to the
    backbone's channels, MDR's Lanczos squash, ABE's resize-and-pad."""
    steps: list[Callable] = [T.Grayscale(dc.in_channels)] if channels != dc.in_channels else []
    if kind == "mdr_official":
        steps.append(T.Resize((resize, resize), interpolation=T.InterpolationMode.LANCZOS))
    elif kind == "abe_official":
        steps.append(ResizePad(resize))
    return steps


class BatchAugment:
    """The training process's part: a ``Canvas`` batch on ``device`` → normalised float ``[B, C, S, S]``.

    ``canvas`` is the transform the training dataset applies in its workers."""

    def __init__(
        self,
        kind: str,
        size: int,
        resize: int,
        data_config: DataConfig,
        channels: int,
        device: torch.device,
        seed: int,
    ):
        if kind not in BATCHED:
            raise ConfigError(
                f"data.batch_augment: the {kind!r} transform is not batched (batched: {', '.join(BATCHED)}); "
                "set data.batch_augment: auto or false"
            )
        dc = data_config
        self.kind, self.size, self.resize = kind, size, resize
        steps = deterministic_steps(kind, resize, dc, channels)
        square = kind in ("mdr_official", "abe_official")
        # the cache stores the shorter side at ``resize`` (harness.data.cache.cached_splits)
        shape = (resize, resize) if square else (resize, math.ceil(resize * CANVAS_ASPECT))
        self.canvas = ToCanvas(shape, steps, fit=not square)
        self.bgr = dc.channel_order == "BGR"
        mean_t, std_t = (  # the one rule of build_transforms
            torch.tensor(v, dtype=torch.float32, device=device).view(1, -1, 1, 1) for v in normalisation(dc)
        )
        self.gain, self.shift = dc.scale / 255.0 / std_t, mean_t / std_t
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def geometry(self, hw: torch.Tensor) -> torch.Tensor:
        """``[B, 2, 4]`` float64 (start, stop, n, offset) along y and x (upright) of each image's random
        crop: the source range resized to ``n`` pixels, of which ``offset..offset+S-1`` are kept."""
        g, s = self.generator, self.size
        hw = hw.double()
        if self.kind in ("imagenet", "mdr_official"):
            box = resized_crop_boxes(hw, CROP_SCALE, CROP_RATIO, g)
            start, length, n, offset = box[:, :2], box[:, 2:], torch.full_like(hw, s), torch.zeros_like(hw)
        elif self.kind == "abe_official":
            start, length, n, offset = torch.zeros_like(hw), hw, hw, crop_offsets(hw, s, g)
        else:  # symm_official: border crop, squash to resize × resize, random crop
            box = border_crop_boxes(hw, *BORDER_CROP, g)
            n = torch.full_like(hw, self.resize)
            start, length, offset = box[:, :2], box[:, 2:], crop_offsets(n, s, g)
        return torch.stack([start, start + length, n, offset], dim=2)

    def crop(self, batch: Canvas, geometry: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
        """Float ``[B, C, S, S]`` (0–255) of each image's crop ``geometry`` (see ``geometry``), mirrored
        where ``flip``: two batched matrix products per image (rows, then columns of its canvas)."""
        pixels, info = batch
        if pixels.device.type == "cpu":  # contract over the rows/columns some image uses (a free host read)
            pixels = pixels[:, : self._used(info, 0, pixels.shape[1]), : self._used(info, 1, pixels.shape[2])]
        n, hc, wc, c = pixels.shape
        s = self.size
        transposed = info[:, 2].bool()[:, None, None]
        wy = resample_weights(geometry[:, 0], s, max(hc, wc))
        wx = resample_weights(geometry[:, 1], s, max(hc, wc))
        if flip is not None:
            wx = torch.where(flip[:, None, None], wx.flip(1), wx)
        rows = torch.where(transposed, wx, wy)[:, :, :hc]  # a transposed canvas's rows are x
        cols = torch.where(transposed, wy, wx)[:, :, :wc]
        # channels-last canvases, each product transposed so that the next reads its result in place (no
        # copy): [B, Wc·C, Hc] @ rows^T [B, Hc, S] = [B, Wc, C·S], then [B, C·S, Wc] @ cols^T = [B, C, S, S]
        y = torch.bmm(pixels.float().reshape(n, hc, wc * c).transpose(1, 2), rows.transpose(1, 2))
        out = torch.bmm(y.view(n, wc, c * s).transpose(1, 2), cols.transpose(1, 2)).view(n, c, s, s)
        if transposed.device.type != "cpu" or bool(transposed.any()):  # a host check only where it is free
            out = torch.where(transposed[..., None], out.transpose(2, 3), out)
        return out

    @staticmethod
    def _used(info: torch.Tensor, axis: int, length: int) -> int:
        """Canvas rows (``axis`` 0) or columns (1) any image of the batch covers, its repeated edge
        included: the resampling weights of the rest are zero, so leaving them out changes no pixel."""
        h, w, transposed = info.unbind(1)
        stored = torch.where(transposed.bool(), w, h) if axis == 0 else torch.where(transposed.bool(), h, w)
        return min(length, int(stored.max()) + 1)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (0–255, RGB) in the backbone's convention (scale, channel order), normalised: what
        ToTensor + ``ChannelConvention`` + Normalize give."""
        return torch.addcmul(-self.shift, x.flip(1) if self.bgr else x, self.gain)  # one pass

    def __call__(self, batch: Canvas) -> torch.Tensor:
        geometry = self.geometry(batch.sizes[:, :2])
        flip = torch.rand(len(geometry), generator=self.generator, device=self.generator.device) < 0.5
        return self.normalise(self.crop(batch, geometry, flip))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.kind}, size={self.size}, resize={self.resize}, {self.canvas})"


class CachedCrop:
    """The training transform of cached images in a DataLoader worker (the CPU's, ``data.batch_augment``
    off): a uint8 ``[H, W, C]`` array (or PIL image) → its random crop, uint8 ``[C, S, S]``; the training
    process turns a batch of them into the float input the recipe's PIL transform gives (``normalise``).

    The random draws are the PIL transforms' own (torchvision's ``get_params``, ``RandomBorderCrop.box``
    and the flip's ``torch.rand(1)``, in their order, from torch's global generator), so for a given seed
    the boxes are the same as the PIL pipeline's. The box is cut from the stored array first, then resized
    ONCE with torch's antialiased bilinear kernel on uint8 (PIL's filter and rounding: the same pixels to
    within a grey level) and flipped. Handing uint8 over instead of floats matters as much: collating a
    batch of 64 float 224-px images into shared memory cost a worker more (~0.5 ms per image here) than the
    crop and resize; the normalisation of the batch then costs the training step about 1 %."""

    #: ``ImageSet`` hands it its stored uint8 arrays as they are (no PIL round trip).
    accepts_arrays = True

    def __init__(self, kind: str, size: int, resize: int, data_config: DataConfig, channels: int):
        if kind not in BATCHED:
            raise ValueError(f"CachedCrop: the {kind!r} transform has no uint8 path")
        dc = data_config
        self.kind, self.size, self.resize = kind, size, resize
        self.steps = deterministic_steps(kind, resize, dc, channels)
        self.border = RandomBorderCrop(*BORDER_CROP)
        self.bgr = dc.channel_order == "BGR"
        mean, std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in normalisation(dc))
        self.gain, self.shift = dc.scale / 255.0 / std, mean / std

    def geometry(self, h: int, w: int) -> tuple[tuple[int, int, int, int], tuple[int, int], tuple[int, int]]:
        """((top, left, height, width) of the box, (height, width) it is resized to, (top, left) of the
        ``S`` × ``S`` window kept) of one ``h`` × ``w`` image, drawn as the recipe's PIL transforms draw."""
        s, r = self.size, self.resize
        if self.kind in ("imagenet", "mdr_official"):
            box = T.RandomResizedCrop.get_params(_shaped(h, w), list(CROP_SCALE), list(CROP_RATIO))
            return box, (s, s), (0, 0)
        if self.kind == "abe_official":
            top, left, _, _ = T.RandomCrop.get_params(_shaped(h, w), (s, s))
            return (top, left, s, s), (s, s), (0, 0)
        x0, y0, x1, y1 = self.border.box(w, h)  # symm_official: border crop, squash to r × r, random crop
        top, left, _, _ = T.RandomCrop.get_params(_shaped(r, r), (s, s))
        return (y0, x0, y1 - y0, x1 - x0), (r, r), (top, left)

    def __call__(self, img: np.ndarray | Image.Image) -> torch.Tensor:
        if self.steps:
            img = img if isinstance(img, Image.Image) else Image.fromarray(img)
            for step in self.steps:
                img = step(img)
        a = np.asarray(img)
        a = a[..., None] if a.ndim == 2 else a
        (top, left, ch, cw), (nh, nw), (oy, ox) = self.geometry(*a.shape[:2])
        # a copy of the box only (the cache's memory map is read-only), channels-last as the kernel likes
        x = torch.from_numpy(np.array(a[top : top + ch, left : left + cw])).permute(2, 0, 1)
        if (ch, cw) != (nh, nw):
            x = F.interpolate(x[None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
        s = self.size
        x = x[:, oy : oy + s, ox : ox + s]
        if torch.rand(1) < 0.5:  # RandomHorizontalFlip's draw
            x = x.flip(2)
        return x.contiguous()  # [C, S, S]: collated by one contiguous copy per image

    def normalise(self, crops: torch.Tensor) -> torch.Tensor:
        """A batch of crops, uint8 ``[B, C, S, S]`` (on any device), in the backbone's convention (scale,
        channel order), normalised: what ToTensor + ``ChannelConvention`` + Normalize give."""
        x = (crops.flip(1) if self.bgr else crops).to(torch.float32)
        return x.mul_(self.gain.to(x.device)).sub_(self.shift.to(x.device))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.kind}, size={self.size}, resize={self.resize}, {self.steps})"


def _shaped(h: int, w: int) -> torch.Tensor:
    """A ``[1, h, w]`` tensor with a storage of one float: what torchvision's ``get_params`` read."""
    return torch.empty(1, 1, 1).expand(1, h, w)


def batch_augment_wanted(data: DataSection, kind: str, cached: bool, device: torch.device) -> bool:
    """``data.batch_augment`` resolved: ``auto`` batches only where it never slows the step, on CUDA (the
    augmentation then runs on the device), for cached images and a batched recipe. On the CPU the batched
    crop would run in the training process, so ``auto`` leaves it to the DataLoader workers
    (``CachedCrop``); ``true`` still batches there."""
    if data.batch_augment != "auto":
        return bool(data.batch_augment)
    return cached and kind in BATCHED and device.type == "cuda"


def build_cached_crop(data: DataSection, data_config: DataConfig, train: ImageSet) -> CachedCrop | None:
    """The workers' fast training transform of ``train`` (``CachedCrop``) when it reads the decoded-image
    cache and its recipe is batched; None: the PIL transforms (files, in-memory arrays, ``grey``)."""
    kind = recipe_kind(data, train.channels)
    if train.cache is None or kind not in BATCHED:
        return None
    size, resize = recipe_sizes(data, data_config, kind)
    return CachedCrop(kind, size, resize, data_config, train.channels)


def build_batch_augment(
    data: DataSection, data_config: DataConfig, train: ImageSet, device: torch.device, seed: int
) -> BatchAugment | None:
    """The batched augmentation ``data.batch_augment`` asks for (None: the PIL transforms augment);
    ``auto``: batched on CUDA when ``train`` reads from the decoded-image cache and the recipe is batched
    (``batch_augment_wanted``)."""
    kind = recipe_kind(data, train.channels)
    if not batch_augment_wanted(data, kind, train.cache is not None, device):
        return None
    size, resize = recipe_sizes(data, data_config, kind)
    augment = BatchAugment(kind, size, resize, data_config, train.channels, device, seed)
    log.info("batched augmentation on %s: %s", device, augment)
    return augment
