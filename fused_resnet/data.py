"""Datasets for ``python -m fused_resnet train``, held in memory as tensors.

* ``digits``: scikit-learn's bundled handwritten digits (1,797 8x8 grey images, 10 classes), so
  the default run works offline on a fresh machine. Images are upscaled bilinearly to
  ``image_size`` (16 by default: stride-2 stages need room to halve) and repeated to 3 channels
  so that RGB models and torchvision checkpoints take them unchanged. The 80/20 split is
  stratified with a fixed seed, independent of the training seed.
* CIFAR-10 from a local folder in its standard python-pickle format (``cifar-10-batches-py``:
  ``data_batch_1`` .. ``data_batch_5``, ``test_batch``, optional ``batches.meta``). The files are
  unpickled with an allow-list that admits only numpy arrays, since pickle can run code.

Batches are normalised per channel on the fly (``(x - mean) / std``); uint8 images stay uint8 in
memory (CIFAR-10: 150 MB instead of 600 MB in fp32). :meth:`ImageDataset.__getitems__` lets a
``DataLoader`` fetch a whole batch by one indexing op instead of one image at a time.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
# Per-channel mean/std of the CIFAR-10 training images (on the 0..1 scale), as the classic tutorials use.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class DatasetError(ValueError):
    """A dataset could not be read; the message says what was expected and what was found."""


@dataclass
class ImageDataset(torch.utils.data.Dataset):
    """Images ``(N, C, H, W)`` (uint8 on the 0..255 scale, or float) with int64 ``labels``;
    items and batches come out as normalised fp32 ``(x - mean) / std``."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.labels.shape != (self.images.shape[0],):
            raise DatasetError(f"images {tuple(self.images.shape)} and labels {tuple(self.labels.shape)} disagree")
        channels = self.images.shape[1]
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(1, channels, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(1, channels, 1, 1)

    def __len__(self) -> int:
        return self.images.shape[0]

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        return (x - self._mean) / self._std

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._normalise(self.images[index : index + 1])[0], self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return self._normalise(self.images[index]), self.labels[index]


def collate_batch(batch):
    """``DataLoader`` ``collate_fn`` for :meth:`ImageDataset.__getitems__`: the batch is already built."""
    return batch


def random_crop_flip(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """The classic CIFAR augmentation, batched: a random ``H x W`` crop of the image padded by
    ``padding`` zeros (the mean colour, as ``x`` is normalised) and a horizontal flip with
    probability 1/2, drawn per image from ``generator`` so that two runs with one seed see the
    same images."""
    n, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator)
    flip = torch.rand(n, 1, generator=generator) < 0.5
    rows = dy + torch.arange(h)
    cols = dx + torch.arange(w)
    cols = torch.where(flip, cols.flip(1), cols)
    batch = torch.arange(n).view(n, 1, 1, 1)
    channel = torch.arange(c).view(1, c, 1, 1)
    return padded[batch, channel, rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]


def load_digits(image_size: int = 16, test_fraction: float = 0.2, split_seed: int = 0) -> tuple[ImageDataset,
                                                                                                ImageDataset]:
    """scikit-learn's handwritten digits as (train, test) :class:`ImageDataset` s of 3 x
    ``image_size`` x ``image_size`` images, normalised with the training split's mean and std."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise DatasetError("the digits dataset ships with scikit-learn: pip install scikit-learn") from exc
    if image_size < 8:
        raise DatasetError(f"image_size must be at least the digits' own 8 pixels, got {image_size}")
    digits = sk_load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = images.expand(-1, 3, -1, -1).contiguous()
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        list(range(len(labels))), test_size=test_fraction, random_state=split_seed, stratify=digits.target
    )
    train_idx, test_idx = torch.tensor(train_idx), torch.tensor(test_idx)
    mean, std = images[train_idx].mean().item(), images[train_idx].std().item()
    classes = tuple(str(d) for d in range(10))
    stats = {"classes": classes, "mean": (mean,) * 3, "std": (std,) * 3}
    return (ImageDataset(images[train_idx], labels[train_idx], **stats),
            ImageDataset(images[test_idx], labels[test_idx], **stats))


class _ArrayUnpickler(pickle.Unpickler):
    """Admits only what a CIFAR batch holds: dicts, lists, strings and numpy arrays."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 pickles (protocol < 3) store an array's raw bytes
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a CIFAR-10 batch")
        return super().find_class(module, name)


def _get(batch: dict, key: str):
    for k in (key, key.encode()):
        if k in batch:
            return batch[k]
    return None


def _read_cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np

    try:
        batch = _ArrayUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except Exception as exc:
        raise DatasetError(f"{path} is not a CIFAR-10 python-pickle batch ({type(exc).__name__}: {exc})") from exc
    if not isinstance(batch, dict):
        raise DatasetError(f"{path}: expected a dict with 'data' and 'labels', found a {type(batch).__name__}")
    data, labels = _get(batch, "data"), _get(batch, "labels")
    if data is None or labels is None:
        keys = ", ".join(k.decode() if isinstance(k, bytes) else str(k) for k in batch)
        raise DatasetError(f"{path}: expected keys 'data' and 'labels', found: {keys}")
    data, labels = np.asarray(data), np.asarray(labels)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(f"{path}: 'data' must be uint8 of shape (N, 3072), found {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],) or (labels.size and (labels.min() < 0 or labels.max() > 9)):
        raise DatasetError(f"{path}: 'labels' must be {data.shape[0]} integers in 0..9, found shape {labels.shape}")
    images = torch.from_numpy(data.copy()).view(-1, 3, 32, 32)
    return images, torch.from_numpy(labels.astype(np.int64))


def find_cifar10_folder(root: str | Path) -> Path:
    """``root`` itself or its ``cifar-10-batches-py`` subfolder, whichever holds the batch files."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"CIFAR-10 folder {root} does not exist (or is not a folder)")
    for candidate in (root, root / "cifar-10-batches-py"):
        if (candidate / CIFAR10_TEST_FILE).exists() or (candidate / CIFAR10_TRAIN_FILES[0]).exists():
            return candidate
    return root


def load_cifar10(root: str | Path) -> tuple[ImageDataset, ImageDataset]:
    """CIFAR-10 (train, test) from ``root`` (the extracted ``cifar-10-python.tar.gz``: the folder
    ``cifar-10-batches-py`` or its parent). Raises :class:`DatasetError` naming what is missing or
    malformed."""
    folder = find_cifar10_folder(root)
    missing = [name for name in (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE) if not (folder / name).is_file()]
    if missing:
        raise DatasetError(
            f"{folder} is not a CIFAR-10 python-format folder: missing {', '.join(missing)}. Expected the "
            f"extracted cifar-10-python.tar.gz (cifar-10-batches-py/ with {', '.join(CIFAR10_TRAIN_FILES)}, "
            f"{CIFAR10_TEST_FILE} and batches.meta)"
        )
    train = [_read_cifar_batch(folder / name) for name in CIFAR10_TRAIN_FILES]
    test_images, test_labels = _read_cifar_batch(folder / CIFAR10_TEST_FILE)
    classes = CIFAR10_CLASSES
    meta = folder / "batches.meta"
    if meta.is_file():
        try:
            names = _get(_ArrayUnpickler(io.BytesIO(meta.read_bytes()), encoding="bytes").load(), "label_names")
        except Exception as exc:
            raise DatasetError(f"{meta} is not a CIFAR-10 python-pickle meta file ({exc})") from exc
        if names is not None and len(names) == 10:
            classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    stats = {"classes": classes, "mean": CIFAR10_MEAN, "std": CIFAR10_STD}
    return (ImageDataset(torch.cat([t[0] for t in train]), torch.cat([t[1] for t in train]), **stats),
            ImageDataset(test_images, test_labels, **stats))


def load_dataset(name: str, image_size: int = 16) -> tuple[ImageDataset, ImageDataset]:
    """``"digits"``, or a path to a CIFAR-10 folder (``image_size`` applies to the digits only)."""
    if name == "digits":
        return load_digits(image_size)
    return load_cifar10(name)
