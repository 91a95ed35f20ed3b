"""fuse() on residual adds written in a user's own ``forward`` (``_traced_joins`` / ``_traced_forward``):
the project's own small models, each fused copy compared with the plain model (fp64: outputs, every
gradient, running statistics, train and eval; fp32 against the fp64 oracle), prepared eval, inductor,
deepcopy/pickle, hooks, changed attributes, unfuse, and a forward with data-dependent control flow."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from _parity import (
    FP64_MODEL_TOL,
    assert_fp32_within_eager,
    assert_fp64_train_eval_prepared,
    assert_step_matches,
    randomize_bns,
)
from torch import nn

import fused_resnet
from fused_resnet._tolerances import relative_error, tolerance
from fused_resnet._traced_forward import FusedTracedForward

F64 = torch.float64
ACTS = ["functional", "torch", "module", "inplace", "method", "none"]


def _body(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                         nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))


class AddBlock(nn.Module):
    """``act(body(x) + x)``, the activation chosen by ``self.act_kind`` (a Python branch: specialised)."""

    def __init__(self, width, act_kind="functional"):
        super().__init__()
        self.body, self.act_kind, self.relu = _body(width, width), act_kind, nn.ReLU()

    def forward(self, x):
        out = self.body(x) + x
        if self.act_kind == "functional":
            return F.relu(out)
        if self.act_kind == "torch":
            return torch.relu(out)
        if self.act_kind == "module":
            return self.relu(out)
        if self.act_kind == "inplace":
            return F.relu(out, inplace=True)
        if self.act_kind == "method":
            return out.relu_()
        return out


class DownBlock(nn.Module):
    """torchvision's BasicBlock written out under other names: ``out += identity``, a conv -> BN
    downsample behind ``if self.down is not None``."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.act = nn.ReLU(inplace=True)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x
        out = self.act(self.b1(self.c1(x)))
        out = self.b2(self.c2(out))
        if self.down is not None:
            identity = self.down(x)
        out += identity
        return self.act(out)


class PooledShortcut(nn.Module):
    """``relu(body(x) + avg_pool(x))``: a shortcut that is neither the input nor a conv -> BN."""

    def __init__(self, width):
        super().__init__()
        self.body = _body(width, width, stride=2)

    def forward(self, x):
        return torch.relu(self.body(x) + F.avg_pool2d(x, 2))


class AvgDownBlock(nn.Module):
    """A ResNet-D shortcut: ``relu(body(x) + short(x))``, ``short`` a Sequential(avg-pool, conv, BN)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.body = _body(cin, cout, stride=2)
        self.short = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return F.relu(self.body(x) + self.short(x))


class UserNet(nn.Module):
    """A ResNet written the simple way, all adds in the forwards: its own, and its blocks'."""

    def __init__(self, act_kind="functional", width=8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.block = AddBlock(width, act_kind)
        self.down = DownBlock(width, 2 * width, 2)
        self.same = DownBlock(2 * width, 2 * width, 1)
        self.f = _body(2 * width, 2 * width)
        self.pooled = PooledShortcut(2 * width)
        self.head = nn.Linear(2 * width, 5)

    def forward(self, x):
        x = self.same(self.down(self.block(self.stem(x))))
        x = x + self.f(x)  # a linear join: no activation after the add
        return self.head(self.pooled(x).mean((2, 3)))


class DataDependent(nn.Module):
    """Data-dependent control flow: not traceable, left as it is."""

    def __init__(self, width=8):
        super().__init__()
        self.body = _body(width, width)

    def forward(self, x):
        out = self.body(x)
        if out.mean() > 0:
            out = out + x
        return torch.relu(out)


class Counting(nn.Module):
    """A Python side effect in forward, which a traced graph does not record: left as it is."""

    def __init__(self, width=8):
        super().__init__()
        self.body, self.calls = _body(width, width), 0

    def forward(self, x):
        self.calls += 1
        return torch.relu(self.body(x) + x)


JOIN_BNS = {"block.body.4", "down.b2", "down.down.1", "same.b2", "f.4", "pooled.body.4"}


def _pair(model):
    plain = randomize_bns(model.to(F64))
    return plain, fused_resnet.fuse(copy.deepcopy(plain))


def _x(size=12):
    return torch.randn(2, 3, size, size, dtype=F64)


def _with_add(report):
    return {name for name, state in report.items() if "residual add in the forward" in state}


@pytest.mark.parametrize("act_kind", ACTS)
def test_adds_in_user_forwards_are_fused_and_match(act_kind):
    plain, fused = _pair(UserNet(act_kind))
    assert list(fused.state_dict()) == list(plain.state_dict())
    assert all(isinstance(m, FusedTracedForward) for m in (fused, fused.block, fused.down, fused.same, fused.pooled))
    assert isinstance(fused.block, AddBlock) and fused.block.act_kind == act_kind
    report = fused_resnet.fusion_report(fused)
    assert _with_add(report) == JOIN_BNS and all(report[n].startswith("fused") for n in JOIN_BNS)
    assert all(state.startswith("fused") for state in report.values())
    # act(b1(c1(x))) written out in DownBlock's forward: a chain, fused from the same trace
    assert report["down.b1"] == "fused: with its conv and ReLU in the forward of down"
    joins = [fused.block.traced_plan.joins[0], next(j for j in fused.down.traced_plan.joins if j.add)]
    relu = fused_resnet._activation.RELU
    assert joins[0].act == (relu if act_kind != "none" else 0) and joins[1].short is not None and joins[1].act == relu
    assert not fused.traced_plan.joins[0].act  # x + f(x)
    for train in (True, True, False):  # the second step sees the running statistics the first updated
        assert_step_matches(plain, fused, _x(), train)


def test_a_shortcut_sequential_with_a_pool_before_its_conv_and_bn():
    plain, fused = _pair(AvgDownBlock(8, 16))
    join = fused.traced_plan.joins[0]
    assert join.short_seq is fused.short and join.short[1][2] is fused.short[2] and join.act
    assert [s[0] for s in fused.traced_plan.steps] == ["prefix", "prefix", "join", "output"]
    for train in (True, True, False):
        assert_step_matches(plain, fused, torch.randn(2, 8, 8, 8, dtype=F64), train)
    plain.eval(), fused_resnet.prepare_for_inference(fused)
    x = torch.randn(2, 8, 8, 8, dtype=F64)
    with torch.no_grad():
        assert relative_error(fused(x), plain(x)) <= FP64_MODEL_TOL


def test_the_join_applies_the_bns_the_add_and_the_relu_in_one_pass(monkeypatch):
    plain, fused = _pair(UserNet())
    calls = []
    real = fused_resnet.ops.bn_add_relu

    def spy(y, residual=None, *, relu=None, activation="relu", gate=None):
        act = fused_resnet._activation.from_flag(activation, relu)
        calls.append((type(y).__name__, type(residual).__name__, act == fused_resnet._activation.RELU))
        return real(y, residual, relu=relu, activation=activation, gate=gate)

    monkeypatch.setattr(fused_resnet.ops, "bn_add_relu", spy)
    fused.train()(_x())
    joins = [c for c in calls if c[1] != "NoneType"]
    assert joins == [("DeferredBN", "Tensor", True), ("DeferredBN", "DeferredBN", True), ("DeferredBN", "Tensor", True),
                     ("DeferredBN", "Tensor", False), ("DeferredBN", "Tensor", True)]


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "prepared"])
def test_eval_modes_match(mode):
    plain, fused = _pair(UserNet("inplace"))
    plain.eval(), fused.eval()
    if mode == "prepared":
        fused_resnet.prepare_for_inference(fused)
        assert len(fused.down.__dict__["_prepared"]) == 3 and len(fused.__dict__["_prepared"]) == 1
    x = _x()
    context = torch.inference_mode if mode == "inference_mode" else torch.no_grad
    with context():
        err = relative_error(fused(x), plain(x))
    assert err <= FP64_MODEL_TOL, err


def test_fp32_within_eager_error():
    plain = randomize_bns(UserNet("module"))
    fused, gold = fused_resnet.fuse(copy.deepcopy(plain)), copy.deepcopy(plain).to(F64)
    x = _x().float()
    for train in (True, False):
        for m in (plain, fused, gold):
            m.train(train)
        assert_fp32_within_eager(plain, fused, gold, x)
        for m in (plain, fused, gold):
            m.zero_grad()
    for (name, b), c, g in zip(gold.named_buffers(), fused.buffers(), plain.buffers()):
        if b.is_floating_point():
            assert relative_error(c, b) <= 3 * relative_error(g, b) + tolerance(torch.float32), name


def test_inductor_compiles_the_fused_model_in_eval():
    plain, fused = _pair(UserNet())
    plain.eval(), fused.eval()
    x = _x()
    with torch.no_grad():
        err = relative_error(torch.compile(fused)(x), plain(x))
    assert err <= FP64_MODEL_TOL, err


def test_data_dependent_control_flow_falls_back_with_a_reason():
    plain, fused = _pair(DataDependent())
    assert type(fused) is DataDependent
    state = fused_resnet.fusion_report(fused)["body.4"]
    assert state.startswith("fusable") or state.startswith("fused")  # the chain rule still fuses conv -> BN
    assert "cannot be traced by torch.fx" in state and "DataDependent" in state
    for train in (True, False):
        assert_step_matches(plain, fused, torch.randn(2, 8, 6, 6, dtype=F64), train)


def test_a_forward_with_a_side_effect_is_left_as_it_is():
    plain, fused = _pair(Counting())
    assert type(fused) is Counting and fused.calls == 0  # tracing ran its forward; its count is restored
    assert "its forward sets calls" in fused_resnet.fusion_report(fused)["body.4"]
    for train in (True, False):
        assert_step_matches(plain, fused, torch.randn(2, 8, 6, 6, dtype=F64), train)
    assert fused.calls == plain.calls == 2


def test_other_instances_of_the_class_are_unaffected():
    plain = randomize_bns(UserNet().to(F64))
    other = copy.deepcopy(plain.block)
    fused_resnet.fuse(plain.block)
    assert isinstance(plain.block, FusedTracedForward) and type(other) is AddBlock
    assert type(plain.block).forward is not AddBlock.forward and AddBlock.forward is type(other).forward


@pytest.mark.parametrize("change", ["attribute", "child", "hook"])
def test_a_changed_module_runs_its_own_forward(change):
    plain, fused = _pair(UserNet())
    fired = []
    for model in (plain, fused):
        if change == "attribute":
            model.block.act_kind = "none"
        elif change == "child":
            model.same.down = nn.Sequential(nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16)).to(F64)
            model.same.down.load_state_dict(plain.same.down.state_dict())
        else:
            model.down.b2.register_forward_hook(lambda m, i, o: fired.append(1))
    broken = {"attribute": fused.block, "child": fused.same, "hook": fused.down}[change]
    assert not broken.fusable() and fused.pooled.fusable()
    for train in (True, False):
        assert_step_matches(plain, fused, _x(), train)
    assert change != "hook" or len(fired) == 4  # fired in both models, both steps
    if change != "hook":
        fused_resnet.fuse(fused)  # traced anew, as the module is now
        assert broken.fusable() and _with_add(fused_resnet.fusion_report(fused)) >= {"pooled.body.4"}
        for train in (True, False):
            assert_step_matches(plain, fused, _x(), train)


def test_deepcopy_pickle_unfuse():
    plain, fused = _pair(UserNet())
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    for copied in (copy.deepcopy(fused), torch.load(buffer, weights_only=False)):
        assert isinstance(copied.down, FusedTracedForward) and copied.down.fusable()
        join = next(j for j in copied.down.traced_plan.joins if j.add)
        assert join.main[1][2] is copied.down.b2 and join.main[1][2] is not fused.down.b2
        reference = copy.deepcopy(plain)
        for train in (True, False):
            assert_step_matches(reference, copied, _x(), train)
    fused_resnet.unfuse(fused)
    assert [type(m) for m in fused.modules()] == [type(m) for m in plain.modules()]
    assert not any("traced_plan" in m.__dict__ for m in fused.modules())
    for train in (True, False):
        assert_step_matches(plain, fused, _x(), train, tol=0.0)


def test_fx_traces_the_fused_model_through_its_own_forward():
    plain, fused = _pair(UserNet())
    graph_module = fused_resnet.fx.symbolic_trace(fused)
    assert isinstance(fused, FusedTracedForward) and isinstance(graph_module.block, FusedTracedForward)
    for train in (True, False):
        assert_step_matches(plain, graph_module, _x(), train)
    with pytest.raises(RuntimeError, match="fused_resnet.fx.symbolic_trace"):
        torch.fx.symbolic_trace(fused)


_OWN_FORWARDS: dict[int, int] = {}  # runs of _OptionalShortcut's own forward, by instance


class _OptionalShortcut(nn.Module):
    """A block called with one, two or three arguments (as timm's DLA trees call ``DlaBasic``):
    ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut)``, the shortcut ``x`` when not given."""


    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x, shortcut=None, children=None):
        _OWN_FORWARDS[id(self)] = _OWN_FORWARDS.get(id(self), 0) + 1  # not an attribute: the plan does not repeat it
        if shortcut is None:
            shortcut = x
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        out += shortcut
        return F.relu(out)


class _Tree(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU())
        self.proj = nn.Sequential(nn.Conv2d(6, 6, 1, bias=False), nn.BatchNorm2d(6))
        self.a, self.b, self.c = _OptionalShortcut(6), _OptionalShortcut(6), _OptionalShortcut(6)

    def forward(self, x):
        x = self.stem(x)
        y = self.a(x, self.proj(x))
        return self.c(self.b(y), None, None)


def test_calls_with_fewer_arguments_run_fused():
    """A forward called with its trailing arguments left to their defaults (one, two or all three
    given) runs its fused plan for that call (traced with those defaults), not its own forward; fp64
    parity in training and eval, prepared too."""
    plain, fused = _pair(_Tree())
    assert all(isinstance(m, FusedTracedForward) for m in (fused.a, fused.b, fused.c))
    x = _x()
    blocks = [id(m) for m in (fused.a, fused.b, fused.c)]
    own = lambda: [_OWN_FORWARDS.get(b, 0) for b in blocks]
    before = own()
    assert_fp64_train_eval_prepared(plain, fused, x)
    assert own() == before, "a fused block ran its own forward"
