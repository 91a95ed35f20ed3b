"""Survey of ``fuse`` on real torchvision / timm CNNs built small (random init, 10 classes, small
images, batch 2: 64 px where the model's last stage keeps 2x2 pixels, since a training BN over
2 values per channel, batch 2 at 1x1, has a gradient that is rounding noise): for each model the BatchNorms fused / total (``fusion_report``) and the fused
model's relative error vs the unfused deep copy, fp64 on the reference backend, in each mode:

- ``train``: one forward + backward in training mode (the output, every parameter gradient, every
  float buffer, i.e. the running statistics after the step; the same seed for dropout / drop path);
- ``no_grad`` / ``inf_mode``: eval under ``torch.no_grad`` / ``torch.inference_mode``;
- ``prepared``: eval of ``prepare_for_inference(fused)`` under ``no_grad``;
- ``unfuse``: eval of ``unfuse(fused)`` (every module back to its own class: must be bit-exact);
- ``refuse``: eval of ``fuse(fused)`` (fusing a fused model again); ``ch_last``: eval of the fused
  model and input in channels-last memory format;

and ``native32``: eval of the prepared fused model in fp32 on the native backend vs the fp64 unfused
output, beside eager fp32's own error (a loose sanity bound: <= 10x eager + 1e-4). A stage that
raises is reported with its exception; the bar for fp64 is 1e-9 (rows over it are marked ``!!``).

    python benchmarks/scripts/fuse_survey.py [--models tv:resnet18 timm:dla34 ...] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import time
import traceback

import torch
from torch.nn.modules.batchnorm import _BatchNorm

import fused_resnet
from fused_resnet._tolerances import relative_error

F64 = torch.float64
BAR = 1e-9

# (spec, image size, constructor keywords beyond num_classes)
TORCHVISION = [
    ("resnet18", 64, {}), ("resnet50", 64, {}), ("resnext50_32x4d", 64, {}), ("wide_resnet50_2", 64, {}),
    ("mobilenet_v2", 64, {}), ("mobilenet_v3_small", 64, {}), ("mobilenet_v3_large", 64, {}),
    ("regnet_y_400mf", 64, {}), ("regnet_x_400mf", 64, {}), ("efficientnet_b0", 64, {}),
    ("efficientnet_v2_s", 64, {}), ("shufflenet_v2_x0_5", 64, {}), ("mnasnet0_5", 64, {}),
    ("googlenet", 64, {"aux_logits": False, "init_weights": True}),
    ("inception_v3", 128, {"aux_logits": False, "init_weights": True}),
    ("densenet121", 64, {}), ("convnext_tiny", 64, {}), ("squeezenet1_1", 64, {}),
]
TIMM = [
    ("resnet18", 64, {}), ("resnet50d", 64, {}), ("resnet26t", 64, {}), ("seresnext26d_32x4d", 64, {}),
    ("resnetaa50d", 64, {}), ("resnetblur18", 64, {}), ("skresnet18", 64, {}), ("ecaresnet26t", 64, {}),
    ("gcresnext26ts", 64, {}), ("cspresnet50", 64, {}), ("cspdarknet53", 64, {}), ("darknet53", 64, {}),
    ("dpn68", 64, {}), ("repvgg_a0", 64, {}), ("rexnet_100", 64, {}), ("ghostnet_100", 64, {}),
    ("mixnet_s", 64, {}), ("tf_efficientnet_b0", 65, {}), ("efficientnet_b0", 64, {}),
    ("mobilenetv3_small_100", 64, {}), ("mobilenetv4_conv_small", 64, {}), ("fbnetc_100", 64, {}),
    ("hrnet_w18_small", 64, {}), ("dla34", 64, {}), ("res2next50", 64, {}), ("selecsls42b", 64, {}),
    ("ese_vovnet19b_dw", 64, {}), ("regnety_002", 64, {}), ("nf_resnet26", 64, {}), ("resnest14d", 64, {}),
    ("resnetv2_50", 64, {}), ("xception41", 64, {}), ("tresnet_m", 64, {}), ("efficientnet_blur_b0", 64, {}),
    ("repghostnet_050", 64, {}), ("convnext_atto", 64, {}),
]
MODELS = [f"tv:{n}" for n, _, _ in TORCHVISION] + [f"timm:{n}" for n, _, _ in TIMM]
_SIZES = {f"tv:{n}": (s, kw) for n, s, kw in TORCHVISION} | {f"timm:{n}": (s, kw) for n, s, kw in TIMM}


def build(spec: str, timm_kw: dict | None = None) -> torch.nn.Module:
    """The model ``spec`` (``tv:name`` / ``timm:name``) with random weights and 10 classes
    (``timm_kw``: more keywords for timm models, e.g. ``drop_path_rate``)."""
    lib, name = spec.split(":")
    kw = dict(_SIZES.get(spec, (64, {}))[1], num_classes=10)
    if lib == "tv":
        import torchvision

        return getattr(torchvision.models, name)(**kw)
    import timm

    return timm.create_model(name, pretrained=False, **kw, **(timm_kw or {}))


def randomize_bns(model: torch.nn.Module) -> torch.nn.Module:
    """BN affine parameters and running statistics away from their init (as tests/_parity.py does)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm) and m.affine and m.track_running_stats:
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
    return model


def train_error(plain, fused, x) -> float:
    """Max relative error of the output, every parameter gradient and every float buffer after one
    training step (the same seed for both)."""
    plain.train(), fused.train()
    torch.manual_seed(1234)
    out_p = plain(x)
    torch.manual_seed(1234)
    out_f = fused(x)
    out_p.square().sum().backward()
    out_f.square().sum().backward()
    errors = [relative_error(out_f, out_p)]
    floor = 1e-6 * max((p.grad.norm().item() for p in plain.parameters() if p.grad is not None), default=0.0)
    for p, q in zip(plain.parameters(), fused.parameters()):
        if (p.grad is None) != (q.grad is None):
            return float("inf")
        if p.grad is not None:  # a gradient that is zero in exact arithmetic: relative to 1e-6 of the largest
            errors.append((q.grad - p.grad).norm().item() / max(p.grad.norm().item(), floor))
    for b, c in zip(plain.buffers(), fused.buffers()):
        errors.append(relative_error(c, b) if b.is_floating_point() else float(not torch.equal(b, c)))
    plain.zero_grad(), fused.zero_grad()
    return max(errors)


def survey(spec: str, timm_kw: dict | None = None, batch: int = 2) -> dict:
    """One row: counts, errors per stage (None when the stage raised) and the first exception."""
    row, t0 = {"model": spec, "errors": {}, "exc": None}, time.perf_counter()
    size = _SIZES.get(spec, (64, {}))[0]

    def stage(name, fn):
        try:
            row["errors"][name] = fn()
        except Exception as e:  # noqa: BLE001 - a survey row, with the exception
            row["errors"][name] = None
            if row["exc"] is None or row["exc"].startswith("(built"):
                row["exc"] = f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                row["trace"] = traceback.format_exc()
    try:
        try:
            plain = build(spec, timm_kw)
        except TypeError:  # a timm model without drop_path_rate: built without it, and the row says so
            plain, row["exc"] = build(spec), f"(built without {timm_kw})"
        plain = randomize_bns(plain).to(F64)
    except Exception as e:  # noqa: BLE001
        row["exc"] = f"build: {type(e).__name__}: {e}"
        return row
    fused = copy.deepcopy(plain)
    stage("fuse", lambda: fused_resnet.fuse(fused) and None)
    stage("find", lambda: fused_resnet.find_fusable(copy.deepcopy(plain)) and None)
    try:
        report = fused_resnet.fusion_report(fused)
        row["fused"] = sum(v.startswith("fused") for v in report.values())
        row["total"] = len(report)
        row["not_fused"] = {k: v for k, v in report.items() if not v.startswith("fused")}
    except Exception as e:  # noqa: BLE001
        row["exc"] = row["exc"] or f"fusion_report: {type(e).__name__}: {e}"
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size, dtype=F64)
    # Eval first, on the state both models start from (a training step moves the running statistics
    # of each by its own rounding); then one training step.
    with fused_resnet.use_backend("reference"):
        plain.eval(), fused.eval()
        try:
            with torch.no_grad():
                gold = plain(x)
        except Exception as e:  # noqa: BLE001 - the unfused model itself cannot run this input (size)
            row["exc"] = f"unfused model: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            row["seconds"] = time.perf_counter() - t0
            return row
        stage("no_grad", lambda: _eval_error(fused, x, gold, torch.no_grad))
        stage("inf_mode", lambda: _eval_error(fused, x, gold, torch.inference_mode))
        stage("prepared", lambda: _eval_error(fused_resnet.prepare_for_inference(copy.deepcopy(fused)), x, gold,
                                              torch.no_grad))
        stage("unfuse", lambda: _eval_error(fused_resnet.unfuse(copy.deepcopy(fused)), x, gold, torch.no_grad))
        stage("refuse", lambda: _eval_error(fused_resnet.fuse(copy.deepcopy(fused)), x, gold, torch.no_grad))
        stage("ch_last", lambda: _eval_error(copy.deepcopy(fused).to(memory_format=torch.channels_last),
                                             x.contiguous(memory_format=torch.channels_last), gold, torch.no_grad))
    if "native" in fused_resnet.backends():
        stage("native32", lambda: _native32(plain, x, gold))
    with fused_resnet.use_backend("reference"):
        stage("train", lambda: train_error(plain, fused, x))
    row["seconds"] = time.perf_counter() - t0
    return row


def _eval_error(model, x, gold, mode) -> float:
    with mode():
        return relative_error(model.eval()(x), gold)


def _native32(plain, x, gold) -> tuple[float, float]:
    plain32 = copy.deepcopy(plain).float().eval()
    fused32 = fused_resnet.prepare_for_inference(fused_resnet.fuse(copy.deepcopy(plain32)).eval())
    with fused_resnet.use_backend("native"), torch.no_grad():
        return relative_error(fused32(x.float()).double(), gold), relative_error(plain32(x.float()).double(), gold)


def _fmt(err) -> str:
    if err is None:
        return "EXC"
    if isinstance(err, tuple):
        ok = err[0] <= 10 * err[1] + 1e-4
        return f"{err[0]:.1e}/{err[1]:.1e}" + ("" if ok else " !!")
    return f"{err:.1e}" + (" !!" if err > BAR else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="*", default=MODELS)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--drop-path", type=float, default=0.0, help="timm models built with this drop_path_rate (the "
                   "training step draws the same random numbers for both models)")
    p.add_argument("--why", action="store_true", help="print why each BN that is not fused is not")
    p.add_argument("--trace", action="store_true", help="print the traceback of each exception")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    stages = ["train", "no_grad", "inf_mode", "prepared", "unfuse", "refuse", "ch_last", "native32"]
    import timm
    import torchvision

    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}; "
          f"{args.threads} thread(s); batch {args.batch}; drop_path_rate {args.drop_path} (timm); fp64 bar {BAR:g}; "
          "native32: fused/eager fp32 error vs fp64")
    print("| model | BNs fused | " + " | ".join(stages) + " | s | exception |")
    print("|---" * (len(stages) + 4) + "|")
    rows = []
    for spec in args.models:
        row = survey(spec, {"drop_path_rate": args.drop_path} if args.drop_path else None, args.batch)
        rows.append(row)
        counts = f"{row['fused']}/{row['total']}" if "total" in row else "-"
        errs = " | ".join(_fmt(row["errors"].get(s, None)) if s in row["errors"] else "-" for s in stages)
        print(f"| {spec} | {counts} | {errs} | {row.get('seconds', 0):.0f} | {row['exc'] or ''} |", flush=True)
        if args.trace and row.get("trace"):
            print(row["trace"])
    fused, total = sum(r.get("fused", 0) for r in rows), sum(r.get("total", 0) for r in rows)
    print(f"\nall: {fused}/{total} BatchNorms fused; {sum(r['exc'] is not None for r in rows)} model(s) with an exception")
    if args.why:
        for r in rows:
            for name, why in r.get("not_fused", {}).items():
                print(f"{r['model']} {name}: {why}")


if __name__ == "__main__":
    main()
