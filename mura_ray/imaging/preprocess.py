"""Everything between a decoded gray image and the model's input, in one place. No Ray.

- the cache: each file is decoded once to a (R, R) uint8 square by the
  model's ``fit``: ``pad`` (the default for new models) scales the long side
  to R = S and letterboxes the rest in black, ``stretch`` resizes the whole
  image to (S, S), both keeping all of the anatomy; ``crop`` (models made
  before ``fit`` existed) resizes the short side to R = ``cache_side(S)``
  and crops the centre, as torchvision's classification recipe resizes to
  256 before a 224 crop, which loses the ends of a long bone;
- ``EvalPreset``, the centre (S, S) crop that Ray Data maps over batches of
  cached squares (the training preset and the model input, which need
  torch, are in ``imaging.tensors``: decode tasks import neither torch nor
  torchvision, and start in a fraction of a second);
- ``preprocessing_record``: what a checkpoint stores so that all of this can
  be redone exactly.

Presets take and return ``dict[str, np.ndarray]``; ``pixels`` goes from
(B, R, R) uint8 to (B, S, S) uint8.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from mura_ray.archive import storage
from mura_ray.imaging.decode import (
    DECODE_MEMORY,
    MAX_BYTES,
    READ_ERROR,
    DecodeError,
    NotScored,
    decode_gray,
    memory_bound,
    one_line,
)

RESIZE_RATIO = 256 / 224  # crop: the cache's side over the model input's
FITS = ("pad", "stretch", "crop")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def cache_side(image_size: int, fit: str = "crop") -> int:
    """Side of the square uint8 image kept per file for a model input of ``image_size``: larger than the input
    under ``crop`` (evaluation crops the centre), the input itself under ``pad`` and ``stretch``."""
    return int(round(image_size * RESIZE_RATIO)) if fit == "crop" else image_size


def fit_of(meta: dict[str, Any]) -> str:
    """The fit a model was trained with (its metadata's ``fit``; ``crop`` for models made before it existed)."""
    return str(meta.get("fit", "crop"))


def _crop_geometry(h: int, w: int, side: int) -> tuple[int, int, int, int]:
    """How ``crop`` fits an (h, w) image into (side, side): the size (nh, nw) the whole image would be resized
    to (short side ``side``) and the offset (top, left) of the centre square in it. Nothing is allocated."""
    scale = side / min(h, w)
    nh, nw = max(side, round(h * scale)), max(side, round(w * scale))
    return nh, nw, (nh - side) // 2, (nw - side) // 2


def resize_center_square(gray: np.ndarray, side: int) -> np.ndarray:
    """Resize so the short side is ``side``, then crop the centre square: (side, side) uint8.

    Only the square is ever made: its box is taken back to the source's
    coordinates and resampled from there, so an image however long costs no
    more memory than itself and the square."""
    h, w = gray.shape
    nh, nw, top, left = _crop_geometry(h, w, side)
    sx, sy = nw / w, nh / h
    box = (left / sx, top / sy, (left + side) / sx, (top + side) / sy)
    image = Image.fromarray(gray, mode="L").resize((side, side), Image.BILINEAR, box=box, reducing_gap=2.0)
    return np.asarray(image, dtype=np.uint8)


def _padded_size(h: int, w: int, side: int) -> tuple[int, int]:
    """(height, width) of an (h, w) image scaled so that its long side is ``side``."""
    scale = side / max(h, w)
    return max(1, min(side, round(h * scale))), max(1, min(side, round(w * scale)))


def fit_square(gray: np.ndarray, side: int, fit: str = "crop") -> np.ndarray:
    """(H, W) uint8 -> (side, side) uint8 by ``fit`` (``pad``, ``stretch`` or ``crop``)."""
    if fit == "crop":
        return resize_center_square(gray, side)
    h, w = gray.shape
    image = Image.fromarray(gray, mode="L")
    if fit == "stretch":
        return np.asarray(image.resize((side, side), Image.BILINEAR, reducing_gap=2.0), dtype=np.uint8)
    if fit != "pad":
        raise ValueError(f"fit must be one of {', '.join(FITS)}, got {fit!r}")
    nh, nw = _padded_size(h, w, side)
    square = np.zeros((side, side), dtype=np.uint8)
    top, left = (side - nh) // 2, (side - nw) // 2
    square[top : top + nh, left : left + nw] = np.asarray(
        image.resize((nw, nh), Image.BILINEAR, reducing_gap=2.0), dtype=np.uint8
    )
    return square


def load_square(
    data: bytes,
    side: int,
    modalities: frozenset[str] | None = None,
    fit: str = "crop",
    name: str | None = None,
) -> np.ndarray:
    """Bytes of one image -> (side, side) uint8 gray square (the cached form), by ``fit``. ``name``: the
    file's name or URI, whose extension says which format it may be opened as (``decode.pillow_formats``)."""
    return fit_square(decode_gray(data, target=side, modalities=modalities, name=name), side, fit)


def read_capped(fs: Any, uri: str, max_bytes: int, *, size: int | None = None, tag: str | None = None) -> bytes:
    """The bytes of ``uri``, reading at most ``max_bytes + 1`` of them; ``DecodeError`` when there are more.
    With the listing's ``size`` and change ``tag``: ``storage.SourceChanged`` when the file read is not the
    one listed any more."""
    data = storage.read_listed(fs, storage.path_in(uri), max_bytes + 1, size=size, tag=tag)
    if len(data) > max_bytes:
        raise DecodeError(f"file of more than {max_bytes} bytes is over the limit (MURA_RAY_MAX_BYTES)")
    return data


def read_and_decode(
    batch: dict[str, np.ndarray],
    *,
    side: int,
    fs: Any,
    modalities: tuple[str, ...] | None = None,
    fit: str = "crop",
) -> dict[str, np.ndarray]:
    """Read each ``image_uri`` through ``fs`` and turn it into its cached (side, side) uint8 square.

    Adds ``pixels`` (zeros where unreadable), ``error`` (the reason, or ""
    when fine: an all-empty string column keeps its type through Arrow,
    where an all-null one would not), ``modality`` (a DICOM file's modality
    when it is not one of ``modalities``, which are not decoded; else "")
    and ``read_size`` (bytes read; -1 when the file could not be read).
    Other columns pass through. A bad file never raises: it becomes a row
    with ``error`` set. No file is read past ``MAX_BYTES``. ``fit``: how the
    image becomes a square (``fit_square``). Where the batch carries the
    listing's ``source_size`` and ``source_etag``, a file whose size or tag
    is not those any more when read is a read error ("cannot read file:
    ... changed since it was listed"), so a later run reads it again.
    """
    uris = batch["image_uri"]
    listed_sizes, listed_tags = batch.get("source_size"), batch.get("source_etag")
    pixels = np.zeros((len(uris), side, side), dtype=np.uint8)
    errors = np.full(len(uris), "", dtype=object)
    skipped = np.full(len(uris), "", dtype=object)
    sizes = np.full(len(uris), -1, dtype=np.int64)
    accept = frozenset(modalities) if modalities is not None else None
    for i, uri in enumerate(uris):
        try:
            data = read_capped(fs, uri, MAX_BYTES, size=_listed(listed_sizes, i), tag=_listed(listed_tags, i))
        except DecodeError as exc:
            errors[i] = one_line(str(exc))
            continue
        except Exception as exc:  # missing file, permission, network
            errors[i] = one_line(f"{READ_ERROR}: {type(exc).__name__}: {exc}")
            continue
        sizes[i] = len(data)
        try:
            with memory_bound():
                pixels[i] = load_square(data, side, accept, fit, name=str(uri))
        except DecodeError as exc:
            errors[i] = one_line(str(exc))
        except NotScored as exc:
            skipped[i] = exc.modality
        except MemoryError:
            errors[i] = f"cannot decode image: MemoryError: over the decode memory bound of {DECODE_MEMORY >> 20} MiB"
        except Exception as exc:  # whatever else one file raises fails that file, not the task
            errors[i] = one_line(f"cannot decode image: {type(exc).__name__}: {exc}")
    out = dict(batch)
    out.update(pixels=pixels, error=errors, modality=skipped, read_size=sizes)
    return out


def _listed(values: np.ndarray | None, i: int) -> Any:
    """The listing's value for row ``i``, or None where there is none (no column, a null, a NaN)."""
    if values is None:
        return None
    value = values[i]
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return value.item() if isinstance(value, np.generic) else value


class EvalPreset:
    """Fixed centre crop to ``size`` (the cache already holds the resize)."""

    def __init__(self, *, size: int) -> None:
        self.size = size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels = batch["pixels"]
        off = (pixels.shape[-1] - self.size) // 2
        out = dict(batch)
        out["pixels"] = np.ascontiguousarray(pixels[:, off : off + self.size, off : off + self.size])
        return out


def preprocessing_record(image_size: int, fit: str = "crop") -> dict[str, Any]:
    """What a checkpoint stores to redo this preprocessing: input size, fit, cache side, normalisation."""
    return {
        "image_size": image_size,
        "fit": fit,
        "cache_side": cache_side(image_size, fit),
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "gray_to_rgb": True},
    }
