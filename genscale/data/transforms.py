"""Per-sample decoding and augmentation: shard bytes -> float CHW tensors in [-1, 1].

Everything random takes an explicit ``random.Random`` so the stream can seed it from
(seed, epoch, rank, worker) and replay it exactly.
"""
from __future__ import annotations

import io
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from genscale.errors import UserError

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
# The tar members the loader reads; anything else (.txt captions, .pyd pickles...) is never
# even grouped into the sample, let alone decoded.
READ_EXTENSIONS = IMAGE_EXTENSIONS + ("cls", "json")
# Field names of a paired sample (pix2pix): source -> target.
SOURCE_FIELDS = tuple(f"src.{e}" for e in IMAGE_EXTENSIONS)
TARGET_FIELDS = tuple(f"tgt.{e}" for e in IMAGE_EXTENSIONS)
PLAIN_FIELDS = IMAGE_EXTENSIONS


def decode_image(data: bytes) -> Image.Image:
    """Decode PNG/JPEG/WebP bytes fully (so corrupt data fails here) to mode "L" or "RGB".

    Transparent pixels are composited onto white (see ``flatten_alpha``)."""
    with io.BytesIO(data) as stream:
        img = Image.open(stream)
        img.load()
    if _has_alpha(img):
        return flatten_alpha(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float greys: PIL's convert("L") clips instead of rescaling.
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        return Image.fromarray(np.round(np.clip(arr / hi, 0, 1) * 255).astype(np.uint8), "L")
    if img.mode in ("1", "L", "LA", "P") and _is_grey_palette(img):
        return img.convert("L")
    return img.convert("RGB")


def _has_alpha(img: Image.Image) -> bool:
    # An alpha band, or a palette/colour-key transparency (GIF, PNG tRNS).
    return img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or (
        img.mode in ("1", "L", "P", "RGB") and "transparency" in img.info)


def flatten_alpha(img: Image.Image) -> Image.Image:
    """Composite a transparent image onto white; grey stays "L", colour becomes "RGB".

    Dropping the alpha band instead would show whatever RGB a transparent pixel happens to
    store (often black), which is not what the image looks like."""
    grey = img.mode in ("1", "L", "LA", "La") or (img.mode in ("P", "PA") and _is_grey_palette(img))
    rgba = img.convert("RGBA")
    flat = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return flat.convert("L") if grey else flat  # equal R, G, B: the luma is exact


def _is_grey_palette(img: Image.Image) -> bool:
    if img.mode not in ("P", "PA"):
        return True
    palette = np.asarray(img.convert("RGB"))
    return bool((palette[..., 0] == palette[..., 1]).all() and (palette[..., 1] == palette[..., 2]).all())


def image_channels(img: Image.Image) -> int:
    """1 for a grey image as returned by decode_image, 3 for colour."""
    return 1 if img.mode == "L" else 3


def to_channels(img: Image.Image, channels: int) -> Image.Image:
    """Grey <-> RGB as requested (colour -> grey uses PIL's ITU-R 601 luma)."""
    if channels == 1:
        return img if img.mode == "L" else img.convert("L")
    if channels == 3:
        return img if img.mode == "RGB" else img.convert("RGB")
    raise ValueError(f"channels must be 1 or 3, got {channels}")


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    """Scale so the shorter side is ``size``: area averaging down, bicubic up."""
    w, h = img.size
    short = min(w, h)
    if short == size:
        return img
    new = (max(size, round(w * size / short)), max(size, round(h * size / short)))
    method = Image.Resampling.BOX if short > size else Image.Resampling.BICUBIC
    return img.resize(new, method)


def crop_box(width: int, height: int, size: int, rng: random.Random | None) -> tuple[int, int, int, int]:
    """A size x size box: centred when ``rng`` is None, else uniformly placed."""
    if rng is None:
        x, y = (width - size) // 2, (height - size) // 2
    else:
        x, y = rng.randint(0, width - size), rng.randint(0, height - size)
    return x, y, x + size, y + size


def to_tensor(img: Image.Image) -> torch.Tensor:
    """uint8 PIL image -> float32 CHW in [-1, 1]."""
    arr = np.asarray(img, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.transpose(2, 0, 1) / 127.5 - 1.0).contiguous()


def label_value(value) -> int | None:
    """A class index from a ``.cls`` member or a JSON ``label``/``cls`` entry: a non-negative
    integer, also when written as a string of digits ("3", as some writers store it). Anything
    else (None, negative, "cat", 2.5, true) is no label."""
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8", "replace")
    if isinstance(value, str):
        value = value.strip()
        return int(value) if value.isascii() and value.isdigit() else None
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) and value >= 0:
        return int(value)
    return None


def labels_of(cls, meta) -> tuple[int | None, bool]:
    """(label, whether a label entry was there at all) from a sample's ``cls`` and ``json``
    values; ``cls`` wins. The second tells an unreadable label from a sample without one."""
    candidates = [cls] if cls is not None else []
    if isinstance(meta, dict):
        candidates += [meta[k] for k in ("label", "cls") if k in meta]
    for value in candidates:
        label = label_value(value)
        if label is not None:
            return label, True
    return None, bool(candidates)


def sample_label(sample: dict) -> int:
    """The int label from ``cls`` or a JSON ``label``/``cls`` key; -1 when there is none.

    WebDataset decodes ``cls`` to an int, or to None when it is not a number."""
    label, _ = labels_of(sample.get("cls"), sample.get("json"))
    return -1 if label is None else label


def _first(sample: dict, fields: tuple[str, ...]):
    for name in fields:
        if name in sample:
            return sample[name]
    return None


@dataclass(frozen=True)
class ImageTransform:
    """Decoded sample (PIL images, ``cls``/``json``) -> dict of tensors for one training example."""

    image_size: int
    channels: int
    source_channels: int | None = None  # paired data; None = same as ``channels``
    flip: bool = False
    random_crop: bool = False
    class_cond: bool = True
    num_classes: int = 0  # > 0: a label must lie in [0, num_classes) (or be absent)

    def __call__(self, sample: dict, rng: random.Random) -> dict:
        target = _first(sample, PLAIN_FIELDS)
        source = None
        if target is None:
            target, source = _first(sample, TARGET_FIELDS), _first(sample, SOURCE_FIELDS)
            if target is None or source is None:
                raise ValueError(f"sample {sample.get('__key__')!r} holds no image")
        images = [to_channels(target, self.channels)]
        if source is not None:
            images.append(to_channels(source, self.source_channels or self.channels))
        images = [resize_shorter(im, self.image_size) for im in images]
        # One crop box and one coin for both halves of a pair, so they stay aligned.
        w, h = images[0].size
        box = crop_box(w, h, self.image_size, rng if self.random_crop else None)
        flip = self.flip and rng.random() < 0.5
        out_images = []
        for im in images:
            if im.size != (w, h):  # a pair of different shapes: centre each on its own
                im = im.crop(crop_box(*im.size, self.image_size, None))
            else:
                im = im.crop(box)
            if flip:
                im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            out_images.append(to_tensor(im))
        label = sample_label(sample) if self.class_cond else -1
        if self.num_classes and label >= self.num_classes:
            # Past the last class, an embedding lookup fails with an IndexError mid-training, and
            # label == num_classes is diffusion's null label: the sample would silently train as
            # unconditional.
            raise UserError(f"sample {sample.get('__key__')} of {sample.get('__url__', 'the data')} has label "
                            f"{label}, but the data has {self.num_classes} classes (0 to {self.num_classes - 1}); "
                            "fix the label or the num_classes of the data's info.json.", exit_code=1)
        out = {"image": out_images[0], "label": label, "key": sample.get("__key__", "")}
        if source is not None:
            out["source"] = out_images[1]
        return out
