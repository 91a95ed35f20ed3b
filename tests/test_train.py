"""``python -m fused_resnet train``: argument handling, a short real run (digits and a synthetic
CIFAR-10 folder), ``--compare``, ``--init-from`` checkpoints, and the loop's determinism."""

from __future__ import annotations

import json
import re

import pytest
import torch
from test_data import write_cifar

from fused_resnet.__main__ import build_parser, main
from fused_resnet._torchrun import Place
from fused_resnet.cli.train import COMPARE_BAND, curves_agree, make_config
from fused_resnet.data import load_digits
from fused_resnet.modules import FusedBasicBlock
from fused_resnet.small_resnet import small_resnet
from fused_resnet.training import History, TrainConfig, load_checkpoint, prepare_model, train

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

CPU = Place(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
QUICK = ["--epochs", "1", "--image-size", "8", "--batch-size", "256", "--no-progress", "--device", "cpu"]


def parse(*argv):
    return build_parser().parse_args(["train", *argv])


def test_defaults_are_the_documented_ones():
    args = parse()
    config = make_config(args, "cpu")
    assert (config.dataset, config.model, config.epochs, config.batch_size) == ("digits", "small", 5, 64)
    assert (config.lr, config.momentum, config.weight_decay) == (0.1, 0.9, 5e-4)
    assert (config.dtype, config.channels_last, config.augment) == ("fp32", False, False)
    cuda = make_config(args, "cuda")
    assert (cuda.dtype, cuda.channels_last) == ("bf16", True)
    cifar = make_config(parse("--dataset", "/data/cifar", "--no-augment", "--dtype", "fp32"), "cuda")
    assert (cifar.augment, cifar.dtype) == (False, "fp32")
    assert make_config(parse("--dataset", "/data/cifar"), "cpu").augment


@pytest.mark.parametrize("argv", [["--epochs", "0"], ["--batch-size", "-1"], ["--lr", "0"], ["--model", "vgg"],
                                  ["--dtype", "int8"], ["--backend", "cudnn"], ["--epochs", "two"]])
def test_bad_arguments_are_rejected(argv, capsys):
    with pytest.raises(SystemExit) as info:
        parse(*argv)
    assert info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_one_epoch_on_digits_with_compare(tmp_path, capsys):
    """One real run: the fused model trains, writes its curves, history and checkpoint, and
    ``--compare`` trains the nn model beside it and finds the curves in agreement."""
    out = tmp_path / "run"
    argv = ["train", *QUICK, "--compare", "--out", str(out), "--save", str(tmp_path / "model.pt")]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "epoch   1/1" in text and "test accuracy" in text and "loss curves agree" in text
    speed = re.search(r"--compare: speed, .* fused ([\d.]+) ms, unfused ([\d.]+) ms: fused images/s ([\d.]+)x", text)
    assert speed and float(speed[1]) > 0 and float(speed[2]) > 0
    assert abs(float(speed[3]) - float(speed[2]) / float(speed[1])) <= 0.01
    fused, plain = json.loads((out / "history.json").read_text())["histories"]
    assert fused["fused"] and not plain["fused"]
    assert len(fused["epoch_loss"]) == 1 and len(fused["step_loss"]) == -(-1437 // 256)
    assert fused["step_loss"][-1] < fused["step_loss"][0]  # it learns
    assert 0.0 <= fused["test_accuracy"][0] <= 1.0 and fused["images_per_s"][0] > 0
    # Same weights and the same first batch: the first loss agrees to fp32 rounding.
    assert abs(fused["step_loss"][0] - plain["step_loss"][0]) <= 1e-5 * abs(plain["step_loss"][0])
    assert (out / "curves.png").stat().st_size > 10_000
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert set(state) == set(small_resnet(fused=False).state_dict())  # torchvision-style keys, unchanged by fuse


def _history(losses, fused=True):
    return History(fused=fused, epoch_loss=list(losses), step_loss=[losses[0]])


def test_curves_agree_band():
    rtol, _ = COMPARE_BAND
    base = [2.0, 1.0, 0.5]
    ok, account = curves_agree(_history(base), _history([v * (1 + rtol / 2) for v in base], False), "fp32")
    assert not ok  # the first step differs by rtol/2, far beyond fp32 rounding
    close = _history(base)
    close.step_loss = [2.0]
    other = _history([v * (1 + rtol / 2) for v in base], False)
    other.step_loss = [2.0]
    assert curves_agree(close, other, "fp32")[0]
    far = _history([v * (1 + 2 * rtol) for v in base], False)
    far.step_loss = [2.0]
    ok, account = curves_agree(close, far, "fp32")
    assert not ok and "per-epoch" in account


def _quiet(*_):
    pass


def test_training_is_deterministic():
    train_set, test_set = load_digits(image_size=8)
    config = TrainConfig(epochs=1, batch_size=256, image_size=8, progress=False)
    runs = []
    for _ in range(2):
        model = prepare_model(config, 10, True, CPU, log=_quiet)
        assert any(isinstance(m, FusedBasicBlock) for m in model.modules())
        runs.append(train(model, train_set, test_set, config, CPU, fused=True, log=_quiet))
    assert runs[0].step_loss == runs[1].step_loss  # same seed: same weights, batches and losses
    assert runs[0].test_accuracy == runs[1].test_accuracy


def test_synthetic_cifar_folder_trains(tmp_path, capsys):
    write_cifar(tmp_path / "cifar", per_batch=8)
    argv = ["train", "--dataset", str(tmp_path / "cifar"), "--epochs", "1", "--batch-size", "20", "--no-progress",
            "--device", "cpu", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "40 train / 8 test images (3, 32, 32)" in out
    assert (tmp_path / "out" / "curves.png").exists()


def test_malformed_cifar_folder_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "data_batch_1").write_bytes(b"junk")
    assert main(["train", "--dataset", str(tmp_path), *QUICK, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "not a CIFAR-10 python-format folder" in err and "test_batch" in err
    assert not (tmp_path / "o").exists()


def test_init_from_replaces_the_classifier(tmp_path):
    source = small_resnet(fused=False, num_classes=1000)
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "ckpt.pth")
    torch.manual_seed(123)
    target = small_resnet(fused=False, num_classes=10)
    fc_before = target.fc.weight.clone()
    message = load_checkpoint(target, str(tmp_path / "ckpt.pth"))
    assert "classifier replaced (1000 -> 10 classes)" in message
    assert torch.equal(target.conv1.weight, source.conv1.weight)
    assert torch.equal(target.layer3[0].bn2.running_var, source.layer3[0].bn2.running_var)
    assert torch.equal(target.fc.weight, fc_before)


def test_init_from_same_classes_loads_everything(tmp_path):
    source = small_resnet(fused=False)
    with torch.no_grad():
        source.fc.weight.normal_()
    torch.save(source.state_dict(), tmp_path / "ckpt.pth")
    target = small_resnet(fused=False)
    assert "replaced" not in load_checkpoint(target, str(tmp_path / "ckpt.pth"))
    assert torch.equal(target.fc.weight, source.fc.weight)


def test_init_from_a_checkpoint_of_another_model_fails_clearly(tmp_path, capsys):
    from fused_resnet.models import resnet18

    torch.save(resnet18(fused=False).state_dict(), tmp_path / "r18.pth")
    assert main(["train", *QUICK, "--init-from", str(tmp_path / "r18.pth"), "--out", str(tmp_path / "o")]) == 2
    assert "does not fit the model" in capsys.readouterr().err


def test_init_from_runs_end_to_end(tmp_path, capsys):
    torch.save(small_resnet(fused=False, num_classes=100).state_dict(), tmp_path / "pre.pth")
    assert main(["train", *QUICK, "--init-from", str(tmp_path / "pre.pth"), "--out", str(tmp_path / "o")]) == 0
    assert "classifier replaced (100 -> 10 classes)" in capsys.readouterr().out
