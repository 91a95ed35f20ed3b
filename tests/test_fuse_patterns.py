"""fuse() on conv -> BN (-> activation) chains of containers whose forward it knows (here nn.Sequential,
the project's own small models: no torchvision or timm needed): what it fuses, what it leaves and why,
and that the fused model computes what the plain one does (fp64: outputs, gradients, running stats)."""

import copy
import io

import pytest
import torch
from _parity import FP64_MODEL_TOL, assert_fp64_train_eval_prepared, assert_step_matches, randomize_bns
from torch import nn

import fused_resnet
from fused_resnet import _activation
from fused_resnet.distributed import FusedAwaySyncBatchNorm2d
from fused_resnet.modules import FusedAwayActivation, FusedAwayBatchNorm2d, FusedAwayReLU, FusedConvBN2d

F64 = torch.float64


def conv_bn(cin, cout, stride=1, act=nn.ReLU):
    layers = [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)]
    return layers + ([act()] if act else [])


class SimpleResNet(nn.Module):
    """A ResNet written the simple way: each block an nn.Sequential, the residual add in forward."""

    def __init__(self, width=8, act=nn.ReLU):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, width, 2, act))
        self.blocks = nn.ModuleList(nn.Sequential(*conv_bn(width, width, 1, act), *conv_bn(width, width, 1, None))
                                    for _ in range(2))
        self.down = nn.Sequential(*conv_bn(width, 2 * width, 2, act), nn.Conv2d(2 * width, 2 * width, 1, bias=False),
                                  nn.BatchNorm2d(2 * width))
        self.head = nn.Linear(2 * width, 5)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = torch.relu(x + block(x))
        return self.head(self.down(x).mean((2, 3)))


def _pair(model):
    plain = randomize_bns(model.to(F64))
    return plain, fused_resnet.fuse(copy.deepcopy(plain))


def _x(channels=3, size=16):
    return torch.randn(2, channels, size, size, dtype=F64)


def _fused_bns(model):
    return sum(v.startswith("fused") for v in fused_resnet.fusion_report(model).values())


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_simple_resnet_fuses_every_chain_and_matches(train):
    plain, fused = _pair(SimpleResNet())
    assert list(fused.state_dict()) == list(plain.state_dict())
    assert _fused_bns(fused) == sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules()) == 7
    assert isinstance(fused.stem[0], FusedConvBN2d) and isinstance(fused.stem[2], FusedAwayReLU)
    assert type(fused.blocks[0][0]) is FusedConvBN2d and type(fused.blocks[0][1]) is FusedAwayBatchNorm2d
    # The last conv -> BN of each block goes with the add in the model's forward (_traced_joins).
    assert type(fused.blocks[0][3]) is nn.Conv2d and fused_resnet.fusion_report(fused)["blocks.0.4"].startswith(
        "fused: with the residual add in the forward of SimpleResNet")
    for _ in range(2):  # the second step sees the running statistics the first one updated
        assert_step_matches(plain, fused, _x(), train)


def test_find_fusable_names_the_convs_and_fuse_is_idempotent():
    model = SimpleResNet().to(F64)
    names = fused_resnet.find_fusable(model)
    assert names == ["SimpleResNet", "stem.0", "blocks.0.0", "blocks.1.0", "down.0", "down.3"]
    fused_resnet.fuse(model)
    kinds = [type(m) for m in model.modules()]
    assert fused_resnet.find_fusable(model) == []
    fused_resnet.fuse(model)
    assert [type(m) for m in model.modules()] == kinds


@pytest.mark.parametrize("act", [nn.ReLU6, nn.SiLU, nn.Hardswish])
def test_relu6_and_silu_fused_like_relu(act):
    """ReLU6, SiLU and Hardswish after a fused BN are applied by the conv (issue #13), as ReLU is."""
    plain, fused = _pair(SimpleResNet(act=act))
    assert _fused_bns(fused) == 7
    acts = [m for m in fused.modules() if isinstance(m, act)]
    assert acts and all(isinstance(m, FusedAwayActivation) for m in acts)
    assert any(m.fused_relu for m in fused.modules() if isinstance(m, FusedConvBN2d))
    for train in (True, False):
        assert_step_matches(plain, fused, _x(), train)


@pytest.mark.parametrize("act", [nn.GELU, nn.Hardsigmoid, nn.Identity])
def test_other_activations_run_as_they_are(act):
    plain, fused = _pair(SimpleResNet(act=act))
    assert _fused_bns(fused) == 7
    assert [type(m) for m in fused.modules() if isinstance(m, act)] == [act] * sum(
        isinstance(m, act) for m in plain.modules())
    assert not any(m.fused_relu for m in fused.modules() if isinstance(m, FusedConvBN2d))
    for train in (True, False):
        assert_step_matches(plain, fused, _x(), train)


def test_identity_between_bn_and_relu_is_skipped_a_shared_relu_is_not_fused():
    relu = nn.ReLU()
    plain, fused = _pair(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Identity(), nn.ReLU(),
                                       nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4), relu,
                                       nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4), relu))
    assert [m.fused_relu for m in fused.modules() if isinstance(m, FusedConvBN2d)] == [True, False, False]
    assert type(fused[6]) is nn.ReLU  # used twice: one pass-through module could not serve both uses
    for train in (True, False):
        assert_step_matches(plain, fused, _x(), train)


def test_fusion_report_says_why():
    class Unknown(nn.Module):  # its forward is not one fuse knows, nor one torch.fx can trace
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                x = -x
            return self.bn(self.conv(x))

    hooked = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4))
    hooked[1].register_forward_hook(lambda *a: None)
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(4),
                          nn.ReLU(),
                          nn.MaxPool2d(2), nn.BatchNorm2d(4), Unknown(), hooked, nn.Sequential(nn.GroupNorm(2, 4)))
    report = fused_resnet.fusion_report(model)
    assert report["0"].startswith("not fused: first")
    assert report["2"] == "not fused: its conv (Conv2d, padding_mode='reflect', padding=(1, 1)) is not a plain " \
        "zero-padded nn.Conv2d"
    assert report["5"].startswith("not fused: follows a MaxPool2d")
    assert "in the forward of 6: its forward cannot be traced by torch.fx" in report["6.bn"]
    assert report["7.1"] == "not fused: its conv or BN has hooks"
    assert "8.0" not in report  # not a BatchNorm
    fused_resnet.fuse(model)
    assert fused_resnet.fusion_report(model) == report  # nothing here was fusable


def test_a_replaced_chain_module_is_obeyed_and_fuse_again_refuses():
    plain, fused = _pair(SimpleResNet())
    for model in (plain, fused):
        torch.manual_seed(3)
        model.blocks[0][1] = nn.Identity()  # a fused-away BN replaced
        model.blocks[1][2] = nn.GELU()  # a fused-away ReLU replaced (by one the kernels do not apply)
        model.stem[1] = nn.BatchNorm2d(8, eps=1e-3).to(F64)  # the conv's own BN replaced
    for train in (True, False):
        assert_step_matches(plain, fused, _x(), train)
    report = fused_resnet.fusion_report(fused)
    assert report["blocks.1.1"].startswith("fused")  # its ReLU was replaced: the BN is still the conv's
    assert report["stem.1"].startswith("fusable") and report["blocks.0.4"].startswith("fused")
    assert {"stem.0", "blocks.1.0"} <= set(fused_resnet.find_fusable(fused))
    fused_resnet.fuse(fused)
    assert fused.stem[0].fused_state() == (True, True) and fused.stem[0].fused_bn is fused.stem[1]
    assert fused.blocks[1][0].fused_state() == (True, False)  # GELU: BN fused, activation on its own
    for train in (True, False):
        assert_step_matches(plain, fused, _x(), train)


def test_deepcopy_pickle_and_prepared_eval():
    plain, fused = _pair(SimpleResNet())
    twin = copy.deepcopy(fused)
    assert twin.stem[0].stem_owner is twin.stem and twin.stem[1].fused_into is twin.stem[0]
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    plain.eval()
    x = _x()
    with torch.no_grad():
        expected = plain(x)
        for model in (twin, loaded, fused):
            fused_resnet.prepare_for_inference(model)
            err = fused_resnet._tolerances.relative_error(model(x), expected)
            assert err <= FP64_MODEL_TOL, err
    assert "_prepared" in fused.stem[0].__dict__


def test_sync_batchnorm_chain_is_fused_after_conversion():
    plain, _ = _pair(SimpleResNet())
    fused = fused_resnet.fuse(nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain)))
    assert isinstance(fused.stem[1], FusedAwaySyncBatchNorm2d)
    assert not any(type(m) is nn.SyncBatchNorm for m in fused.modules())
    assert_step_matches(plain, fused, _x(), train=False)  # SyncBatchNorm without a process group: eval


def test_the_chain_check_compiles_without_a_graph_break():
    plain, fused = _pair(SimpleResNet())
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    for train in (True, False):
        assert_step_matches(plain, compiled, _x(), train)


@pytest.mark.parametrize("edit", ["slope_0.2", "slope_0.1_to_0.01", "hardtanh_bounds", "relu6_max"])
def test_activation_parameters_set_after_fuse_are_honoured(edit):
    """A fused chain's activation whose parameters change after ``fuse`` (a LeakyReLU's slope, a
    Hardtanh's / ReLU6's bounds) no longer matches the code the conv applies: the activation module
    does its own work again (fp64, train and eval, prepared too), never the stale function."""
    torch.manual_seed(0)
    plain = randomize_bns(nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.LeakyReLU(0.1)),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.Hardtanh(0.0, 6.0),
        nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU6()).double())
    fused = fused_resnet.fuse(copy.deepcopy(plain))
    assert fused[0][0].fused_act == _activation.LEAKY_RELU_0_1 and fused[1].fused_act == _activation.RELU6
    for model in (plain, fused):
        if edit == "slope_0.2":
            model[0][2].negative_slope = 0.2
        elif edit == "slope_0.1_to_0.01":
            model[0][2].negative_slope = 0.01
        elif edit == "hardtanh_bounds":
            model[3].min_val, model[3].max_val = -1.0, 2.0
        else:
            model[6].max_val = 3.0
    assert_fp64_train_eval_prepared(plain, fused, torch.randn(3, 3, 12, 12, dtype=torch.float64))
