"""The dataset loaders of ``train``: scikit-learn's digits, CIFAR-10 from a folder in its python
pickle format (a small one written here in that exact format), malformed folders, augmentation."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fused_resnet._tolerances import assert_close
from fused_resnet.data import (
    CIFAR10_TEST_FILE,
    CIFAR10_TRAIN_FILES,
    DatasetError,
    ImageDataset,
    collate_batch,
    load_cifar10,
    load_dataset,
    load_digits,
    random_crop_flip,
)

pytest.importorskip("sklearn")

PER_BATCH = 7  # images per synthetic CIFAR batch file


def write_cifar(folder, per_batch: int = PER_BATCH, seed: int = 0, meta: bool = True) -> dict:
    """A CIFAR-10 folder in the real format: pickled dicts with bytes keys, uint8 rows of
    3 x 32 x 32 (channel planes, row-major), labels as a list. Returns the arrays written."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE):
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"img{i}.png".encode() for i in range(per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        written[name] = (data, labels)
    if meta:
        names = [f"class{i}".encode() for i in range(10)]
        (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names, b"num_vis": 3072}, protocol=2))
    return written


def test_digits_split_shapes_and_normalisation():
    train, test = load_digits(image_size=16)
    assert isinstance(train, ImageDataset)
    assert len(train) + len(test) == 1797
    assert abs(len(test) - 0.2 * 1797) <= 1
    x, y = train.__getitems__(list(range(len(train))))
    assert x.shape == (len(train), 3, 16, 16) and x.dtype == torch.float32
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])  # grey repeated to RGB
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-3
    assert y.dtype == torch.long and set(y.tolist()) == set(range(10))
    # Stratified: every class keeps its share of the test set (within one image).
    _, test_labels = test.__getitems__(list(range(len(test))))
    all_labels = torch.cat([y, test_labels])
    for c in range(10):
        expected = (all_labels == c).sum().item() * len(test) / 1797
        assert abs((test_labels == c).sum().item() - expected) <= 1


def test_digits_split_is_fixed_and_size_applies():
    a_train, a_test = load_digits(image_size=8)
    b_train, b_test = load_digits(image_size=8)
    assert torch.equal(a_test.images, b_test.images) and torch.equal(a_train.labels, b_train.labels)
    assert a_train.images.shape[-2:] == (8, 8)
    with pytest.raises(DatasetError, match="at least"):
        load_digits(image_size=4)


def test_digits_upscale_is_bilinear_of_the_originals():
    from sklearn.datasets import load_digits as sk_load

    train8, _ = load_digits(image_size=8)
    train32, _ = load_digits(image_size=32)
    originals = torch.tensor(sk_load().images, dtype=torch.float32) / 16
    # The raw (pre-normalisation) 8x8 images are the scikit-learn ones, as a set.
    known = {tuple(r) for r in originals.flatten(1).tolist()}
    assert {tuple(r) for r in train8.images[:, 0].flatten(1).tolist()} <= known
    expected = F.interpolate(train8.images[:, :1], size=(32, 32), mode="bilinear", align_corners=False)
    assert_close(train32.images[:, :1], expected)


def test_getitem_and_getitems_agree():
    train, _ = load_digits(image_size=8)
    batch_x, batch_y = train.__getitems__([3, 0, 5])
    for row, i in enumerate([3, 0, 5]):
        x, y = train[i]
        assert_close(batch_x[row], x)
        assert batch_y[row] == y


def test_dataloader_uses_batched_fetch():
    train, _ = load_digits(image_size=8)
    loader = torch.utils.data.DataLoader(train, batch_size=10, collate_fn=collate_batch)
    x, y = next(iter(loader))
    assert x.shape == (10, 3, 8, 8) and y.shape == (10,)


@pytest.mark.parametrize("nested", [False, True], ids=["folder", "parent"])
def test_cifar_folder_roundtrip(tmp_path, nested):
    folder = tmp_path / "cifar-10-batches-py" if nested else tmp_path
    written = write_cifar(folder)
    train, test = load_cifar10(tmp_path)
    assert len(train) == 5 * PER_BATCH and len(test) == PER_BATCH
    assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (3, 32, 32)
    data, labels = written[CIFAR10_TRAIN_FILES[1]]
    got = train.images[PER_BATCH : 2 * PER_BATCH]
    assert torch.equal(got, torch.from_numpy(data).view(-1, 3, 32, 32))
    assert train.labels[PER_BATCH : 2 * PER_BATCH].tolist() == labels
    assert test.labels.tolist() == written[CIFAR10_TEST_FILE][1]
    assert train.classes == tuple(f"class{i}" for i in range(10))
    # Items come out normalised with the CIFAR-10 statistics.
    x, _ = test[0]
    raw = torch.from_numpy(written[CIFAR10_TEST_FILE][0][0]).view(3, 32, 32).float() / 255
    mean, std = torch.tensor(test.mean).view(3, 1, 1), torch.tensor(test.std).view(3, 1, 1)
    assert_close(x, (raw - mean) / std)
    assert load_dataset(str(tmp_path))[0].images.shape == train.images.shape


def test_cifar_without_meta_uses_standard_names(tmp_path):
    write_cifar(tmp_path, meta=False)
    train, _ = load_cifar10(tmp_path)
    assert train.classes[0] == "airplane" and len(train.classes) == 10


def test_cifar_missing_files_is_a_clear_error(tmp_path):
    write_cifar(tmp_path)
    os.remove(tmp_path / "data_batch_3")
    os.remove(tmp_path / CIFAR10_TEST_FILE)
    with pytest.raises(DatasetError, match=r"missing data_batch_3, test_batch") as info:
        load_cifar10(tmp_path)
    assert "cifar-10-batches-py" in str(info.value)


def test_cifar_not_a_folder(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_cifar10(tmp_path / "nowhere")


@pytest.mark.parametrize("corruption", ["garbage", "shape", "keys", "labels", "not_dict"])
def test_cifar_malformed_batch_is_a_clear_error(tmp_path, corruption):
    write_cifar(tmp_path)
    target = tmp_path / "data_batch_2"
    if corruption == "garbage":
        target.write_bytes(b"this is not a pickle")
        match = "not a CIFAR-10 python-pickle batch"
    elif corruption == "shape":
        target.write_bytes(pickle.dumps({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, protocol=2))
        match = r"uint8 of shape \(N, 3072\)"
    elif corruption == "keys":
        target.write_bytes(pickle.dumps({b"pixels": np.zeros((4, 3072), np.uint8)}, protocol=2))
        match = "expected keys 'data' and 'labels', found: pixels"
    elif corruption == "labels":
        target.write_bytes(pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 11]}))
        match = "integers in 0..9"
    else:
        target.write_bytes(pickle.dumps([1, 2, 3]))
        match = "expected a dict"
    with pytest.raises(DatasetError, match=match) as info:
        load_cifar10(tmp_path)
    assert "data_batch_2" in str(info.value)


class _Exploit:
    def __reduce__(self):
        return (os.getcwd, ())


def test_cifar_pickle_cannot_run_code(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": _Exploit(), b"labels": []}))
    with pytest.raises(DatasetError, match="refusing to load"):
        load_cifar10(tmp_path)


def _crop_flip_one(image, padding, dy, dx, flip):
    h, w = image.shape[-2:]
    out = F.pad(image, (padding,) * 4)[:, dy : dy + h, dx : dx + w]
    return out.flip(-1) if flip else out


def test_random_crop_flip_matches_per_image_crop():
    x = torch.randn(16, 3, 8, 8)
    out = random_crop_flip(x, 2, torch.Generator().manual_seed(5))
    # The same draws, in the same order, drive the per-image version.
    g = torch.Generator().manual_seed(5)
    dy = torch.randint(0, 5, (16, 1), generator=g)
    dx = torch.randint(0, 5, (16, 1), generator=g)
    flip = torch.rand(16, 1, generator=g) < 0.5
    assert 0 < flip.sum() < 16  # both branches exercised
    for i in range(16):
        expected = _crop_flip_one(x[i], 2, int(dy[i]), int(dx[i]), bool(flip[i]))
        assert torch.equal(out[i], expected)
    again = random_crop_flip(x, 2, torch.Generator().manual_seed(5))
    assert torch.equal(out, again)
