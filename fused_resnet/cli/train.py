"""``python -m fused_resnet train``: train a fused ResNet the way the classic tutorial does.

Defaults: the small ResNet (widths 16-32-64, one BasicBlock per stage) on scikit-learn's digits
upscaled to 16x16, 5 epochs, batch 64, SGD (lr 0.1, momentum 0.9, weight decay 5e-4, cosine),
seed 0: 99.4% test accuracy in about a minute on a busy 2-core CPU (less on a quiet one). ``--dataset PATH`` reads CIFAR-10 from a
local folder (python-pickle format). ``--compare`` then trains the ``nn`` model from the same
weights and batches and checks that the loss curves agree. Runs under ``torchrun`` unchanged.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .. import _torchrun
from .._backend import BACKEND_NAMES
from ..data import DatasetError, load_dataset
from ..training import MODELS, TrainConfig, initial_state, interleaved_step_ms, prepare_model, train, unwrap
from . import positive_int

# --compare. Both runs start from the same weights and see the same batches, but the fused kernels
# round differently (other summation orders), and SGD at lr 0.1 amplifies rounding-level
# differences roughly tenfold per step early on: PyTorch's own model started from weights
# perturbed by 1e-7 (relative) ends up with per-epoch mean losses 0.5-9% apart on the default run
# (measured: 0.6, 4.6, 1.3, 7.8, 9.4% over 5 epochs), while the fused run is 0.5-4.6% from it. So
# the check is (1) the very first step, where nothing has diverged yet, agrees to the dtype's
# tolerance from _tolerances.py (fp32: 1e-5), and (2) every epoch's mean training loss lies within
# COMPARE_BAND (relative, plus an absolute floor for near-zero losses): about twice the spread
# PyTorch shows against itself, as the house rule for reductions has it.
COMPARE_BAND = (0.2, 5e-3)
DTYPES = ("fp32", "bf16", "fp16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    parser.add_argument("--dataset", default=d.dataset, metavar="digits|PATH",
                        help="'digits' (bundled with scikit-learn, offline) or a CIFAR-10 folder in the python "
                             "pickle format (cifar-10-batches-py or its parent) (default: %(default)s)")
    parser.add_argument("--model", default=d.model, choices=MODELS,
                        help="'small': widths 16-32-64, one BasicBlock per stage; resnetNN: torchvision's "
                             "(default: %(default)s)")
    parser.add_argument("--epochs", type=positive_int, default=d.epochs, help="(default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                        help="images per step and per process (default: %(default)s)")
    parser.add_argument("--lr", type=_positive_float, default=d.lr, help="peak learning rate (default: %(default)s)")
    parser.add_argument("--momentum", type=float, default=d.momentum, help="(default: %(default)s)")
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay, help="(default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=d.image_size,
                        help="digits are upscaled to this size (default: %(default)s; CIFAR-10 stays 32)")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                        help="random crop (padding 4) + horizontal flip (default: on for CIFAR-10, off for digits)")
    parser.add_argument("--seed", type=int, default=d.seed, help="weights, data order, augmentation (default: 0)")
    parser.add_argument("--backend", default=d.backend, choices=BACKEND_NAMES, help="(default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default: %(default)s)")
    parser.add_argument("--dtype", default=None, choices=DTYPES,
                        help="autocast dtype; fp32 = no autocast (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="channels_last activations and weights (default: on for CUDA, off on CPU)")
    parser.add_argument("--compare", action="store_true",
                        help="also train the unfused nn model from the same weights and data order and check "
                             "that the loss curves agree (exit status 1 if they do not)")
    parser.add_argument("--init-from", metavar="CHECKPOINT",
                        help="fine-tune from a torchvision-format state_dict (.pth); the classifier is replaced "
                             "when the class count differs")
    parser.add_argument("--sync-bn", action="store_true",
                        help="under torchrun: convert BatchNorm to SyncBatchNorm (before fusing)")
    parser.add_argument("--save", metavar="PATH", help="write the trained state_dict (torchvision keys) here")
    parser.add_argument("--out", default="fused_resnet_train", metavar="DIR",
                        help="folder for curves.png and history.json (default: %(default)s)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def make_config(args: argparse.Namespace, device_type: str) -> TrainConfig:
    """The run's settings, with the device-dependent defaults resolved."""
    is_cifar = args.dataset != "digits"
    return TrainConfig(
        dataset=args.dataset, model=args.model, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        momentum=args.momentum, weight_decay=args.weight_decay, image_size=args.image_size,
        augment=is_cifar if args.augment is None else args.augment, seed=args.seed, backend=args.backend,
        dtype=args.dtype or ("bf16" if device_type == "cuda" else "fp32"),
        channels_last=(device_type == "cuda") if args.channels_last is None else args.channels_last,
        sync_bn=args.sync_bn, init_from=args.init_from, progress=args.progress,
    )


def curves_agree(fused, plain, dtype: str) -> tuple[bool, str]:
    """Whether the two runs' loss curves agree (see ``COMPARE_BAND``), and a one-line account."""
    import torch

    from .._tolerances import tolerance

    first_tol = tolerance({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype])
    first = abs(fused.step_loss[0] - plain.step_loss[0]) / max(abs(plain.step_loss[0]), 1e-30)
    rtol, atol = COMPARE_BAND
    worst = 0.0
    ok = first <= first_tol
    for a, b in zip(fused.epoch_loss, plain.epoch_loss):
        worst = max(worst, abs(a - b) / max(abs(a), abs(b), 1e-30))
        ok &= abs(a - b) <= rtol * max(abs(a), abs(b)) + atol
    diverged = next((i for i, (a, b) in enumerate(zip(fused.step_loss, plain.step_loss))
                     if abs(a - b) > 1e-3 * max(abs(a), abs(b))), None)
    account = (f"first-step loss relative difference {first:.1e} (tolerance {first_tol:g}); per-epoch mean train "
               f"losses within {100 * worst:.1f}% of each other (band {100 * rtol:g}% + {atol:g}); per-step losses "
               + ("identical to 1e-3 throughout" if diverged is None else
                  f"identical to 1e-3 until step {diverged}, then apart by SGD's amplification of rounding"))
    return ok, account


def run(args: argparse.Namespace) -> int:
    try:
        place = _torchrun.setup(args.device)
    except RuntimeError as exc:
        print(f"fused_resnet train: {exc}", file=sys.stderr)
        return 2
    try:
        return _run(args, place)
    finally:
        _torchrun.teardown(place)


def _run(args: argparse.Namespace, place: _torchrun.Place) -> int:
    config = make_config(args, place.device.type)
    log = print if place.is_main else (lambda *_: None)
    try:
        train_set, test_set = load_dataset(config.dataset, config.image_size)
    except DatasetError as exc:
        print(f"fused_resnet train: {exc}", file=sys.stderr)
        return 2
    num_classes = len(train_set.classes)
    log(f"dataset {config.dataset}: {len(train_set)} train / {len(test_set)} test images "
        f"{tuple(train_set.images.shape[1:])}, {num_classes} classes; model {config.model}; device {place.device}"
        f" x {place.world_size} process(es); dtype {config.dtype}; backend {config.backend}")
    try:
        model = prepare_model(config, num_classes, fused=True, place=place, log=log)
    except (ValueError, TypeError, RuntimeError, OSError) as exc:
        print(f"fused_resnet train: {exc}", file=sys.stderr)
        return 2
    start_state = initial_state(model) if args.compare else None
    histories = [train(model, train_set, test_set, config, place, fused=True, log=log)]
    fused_model = model
    status = 0
    if args.compare:
        log("--compare: training the unfused nn model from the same weights and data order")
        plain = prepare_model(config, num_classes, fused=False, place=place, log=log)
        unwrap(plain).load_state_dict(start_state)
        histories.append(train(plain, train_set, test_set, config, place, fused=False, log=log))
        ok, account = curves_agree(*histories, config.dtype)
        verdict = "agree" if ok else "DISAGREE"
        log(f"--compare: fused and unfused loss curves {verdict}: {account}; test accuracy fused {100 * histories[0].test_accuracy[-1]:.2f}% vs "
            f"unfused {100 * histories[1].test_accuracy[-1]:.2f}%")
        if place.world_size == 1:
            fused_ms, plain_ms = interleaved_step_ms([fused_model, plain], train_set, config, place)
            log(f"--compare: speed, a training step on {min(config.batch_size, len(train_set))} images with the two "
                f"models taking turns (best of 9 rounds): fused {fused_ms:.1f} ms, unfused {plain_ms:.1f} ms: "
                f"fused images/s {plain_ms / fused_ms:.2f}x the unfused model's")
        status = 0 if ok else 1
    fused = histories[0]
    log(f"test accuracy {100 * fused.test_accuracy[-1]:.2f}% after {config.epochs} epochs in {fused.seconds:.1f} s "
        f"({max(fused.images_per_s):,.0f} img/s at best)")
    if place.is_main:
        _write_outputs(args, config, histories, fused_model)
    return status


def _write_outputs(args, config, histories, model) -> None:
    from .._charts import training_curves

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{config.model} on {Path(config.dataset).name}, {config.epochs} epochs, {config.dtype}"
    png = training_curves(histories, out / "curves.png", title=title)
    record = {"config": vars(config), "histories": [h.as_dict() for h in histories]}
    (out / "history.json").write_text(json.dumps(record, indent=1))
    print(f"wrote {png} and {out / 'history.json'}")
    if args.save:
        import torch

        torch.save(unwrap(model).state_dict(), args.save)
        print(f"wrote {args.save}")
