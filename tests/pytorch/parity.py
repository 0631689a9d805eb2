#!/usr/bin/env python3
"""Numerical parity of useg with the PyTorch reference models (tests/pytorch/useg_reference.py).

    /usr/bin/python3 tests/pytorch/parity.py BUILD/tests/useg_parity [--seed N] [--precision f32|f64|both]
                     [--only I] [--config model,width,depth,t,up,HxW,bce|dot] [--keep DIR]

For each configuration below (the four models, two input sizes each, widths 4 and 8, depths 2-4,
t = 2 or 3, both up-convolution kinds, batch 4; and a width-64 U-Net, whose 64+-channel weight
gradients run through the Winograd kernel in several tile chunks) and each precision, this draws FRESH random
weights, BN affine parameters, running statistics, num_batches_tracked and inputs (the seed is
printed; --seed repeats a run), writes the state_dict with the pure-Python safetensors writer,
runs useg_parity on it (which loads it with useg::io::load_weights) and compares, per tensor,
err = max|useg - ref| / max|ref|:

                                                      float32 (useg::cpu)    float64 (useg::cpu_f64)
  eval     eval-mode forward of the loaded weights    1e-4  (+)              1e-10
  train    train-mode forward and loss, 3 steps       1e-3  (+)              1e-10
  bn       running_mean/var after each train forward  1e-3  (+)              1e-10
           num_batches_tracked                        exact                  exact
  grad     dL/dparam for every parameter, and dL/dx   reported only (*)      1e-8
  adam     params after each of 3 Adam steps (L2      max|u-t| <= 1e-2 * lr  1e-9 * lr
           weight decay 1e-3), PyTorch's Adam fed
           useg's gradients (so only the update is compared)
           exp_avg_sq; exp_avg against sqrt(exp_avg_sq) 1e-4                 1e-9
  ckpt     useg's checkpoint after the steps loads into the PyTorch model with strict=True and
           holds exactly the parameters/buffers/counters useg reported
  e2e      (printed only) PyTorch's own 3-step chain vs useg's: max|u-t| / lr

(+) In float32 the reference is PyTorch run in float64 on the same weights and inputs, and useg
passes when its error is under the tolerance or under 4x PyTorch float32's own error on the same
quantity: some quantities are ill-conditioned for any float32 implementation (train-mode BN over
the 8 values per channel at the bottom of a depth-4 network, a psi gate BN over one channel).
In float64, useg is compared with PyTorch directly.

At step k both frameworks start from useg's parameters after step k-1, so each comparison is one
step deep and errors do not compound.

(*) Gradients are discontinuous at ReLU and max-pool kinks. In float32 a pre-activation within
rounding noise (~1e-6) of zero can land on different sides in two correct implementations; the
gradient then differs at that element, which shows up as a relative error of 1e-2 or more in
the tensors below it (up to O(1) for a one-element tensor such as a psi gate's BN weight). With tens of thousands of activations per network this happens in a fair share
of float32 runs, for PyTorch's own float32 against its float64 as much as for useg, so float32
gradients are printed, and the gradients are checked in float64, where that cannot happen.

Conv biases directly followed by BatchNorm have a gradient that is exactly zero in exact
arithmetic (train-mode BN removes any per-channel shift); for them useg must report |grad| below
1e-5 (float32) or 1e-10 (float64) of the largest gradient, instead of a relative error between two
float noises. PyTorch's own float32 residue is not checked: it reaches ~1e-5 of the largest
gradient (seed 60: 9.2e-6 in AR2U-Net's first conv bias, where useg's was 1.6e-7), and an earlier
version of this check, on the larger of the two, failed now and then for that reason.

Input sizes: 16x16 (a multiple of 2^depth) and 20x12, which is not a multiple for depth >= 3.
The reference network crashes on those (torch.cat of mismatched sizes), so here the input is
zero-padded exactly as useg documents (centered: top = (H'-H)//2, left = (W'-W)//2, H' and W' the
next multiples of 2^depth) before the PyTorch forward, and the logits are cropped back.

Exit status: 0 all comparisons pass, 1 a comparison failed, 77 torch is not importable (skipped).
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    print("SKIPPED: torch is not importable by", sys.executable)
    sys.exit(77)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import safetensors_py as st  # noqa: E402
import useg_reference as R  # noqa: E402

# model, width, depth, t, up, (H, W), loss
CONFIGS = [
    ("unet", 8, 3, 2, "upsample", (16, 16), "bce"),
    ("unet", 4, 4, 2, "transpose", (20, 12), "dot"),
    ("attention-unet", 8, 2, 2, "transpose", (16, 16), "dot"),
    ("attention-unet", 4, 3, 2, "upsample", (20, 12), "bce"),
    ("r2unet", 4, 2, 2, "upsample", (16, 16), "dot"),
    ("r2unet", 8, 3, 3, "transpose", (20, 12), "bce"),
    ("ar2unet", 8, 2, 2, "transpose", (16, 16), "bce"),
    ("ar2unet", 4, 4, 2, "upsample", (20, 12), "dot"),
    # 64 -> 64 and 128 -> 64 channels at 40x24, batch 4: 1088 tiles of F(2x2,3x3), more than one
    # chunk of the Winograd weight gradient (1008 and 672 tiles), the last one partial.
    ("unet", 64, 1, 2, "upsample", (40, 24), "bce"),
]
BATCH, STEPS, LR, WD = 4, 3, 1e-2, 1e-3
TOL = {
    "f32": {"eval": 1e-4, "train": 1e-3, "bn": 1e-3, "grad": None, "zero_grad": 1e-5, "adam": 1e-2, "moment": 1e-4},
    "f64": {"eval": 1e-10, "train": 1e-10, "bn": 1e-10, "grad": 1e-8, "zero_grad": 1e-10, "adam": 1e-9, "moment": 1e-9},
}
DTYPE = {"f32": torch.float32, "f64": torch.float64}


def rel(u, t):
    """max|u - t| / max|t| (absolute error where t is all zero)."""
    u, t = u.double(), t.double()
    if t.numel() == 0:
        return 0.0
    scale = t.abs().max().item()
    err = (u - t).abs().max().item()
    return err / scale if scale > 0 else err


def randomize(model, gen):
    """Fresh BN affine parameters, running statistics and counters (conv weights: PyTorch's init)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0.0, 0.1, generator=gen)
                m.running_mean.normal_(0.0, 0.2, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                m.num_batches_tracked.fill_(int(torch.randint(0, 1000, (1,), generator=gen)))


def padded_forward(model, x, depth):
    """useg's documented behaviour for sizes that are not multiples of 2^depth."""
    m = 2 ** depth
    H, W = x.shape[2], x.shape[3]
    Hp, Wp = -(-H // m) * m, -(-W // m) * m
    top, left = (Hp - H) // 2, (Wp - W) // 2
    if (Hp, Wp) == (H, W):
        return model(x)
    xp = F.pad(x, (left, Wp - W - left, top, Hp - H - top))
    return model(xp)[:, :, top:top + H, left:left + W]


def loss_of(out, kind, target):
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(out, target)
    return (out * target).sum()


def loss_scale(out, kind, target, loss):
    """The scale a loss error is measured against (sum(out*R) may cancel to near zero)."""
    return abs(loss.item()) if kind == "bce" else (out.detach().abs() * target.abs()).sum().item()


def zero_grad_biases(sd):
    """Conv biases directly followed by BatchNorm: '<m>.<i>.bias' with '<m>.<i+1>.running_mean'."""
    out = set()
    for k in sd:
        if not k.endswith(".bias"):
            continue
        head, _, idx = k[: -len(".bias")].rpartition(".")
        if idx.isdigit() and f"{head}.{int(idx) + 1}.running_mean" in sd:
            out.add(k)
    return out


class Checker:
    def __init__(self):
        self.failures = []
        self.worst = {}
        self.notes = []

    def note(self, kind, label, what, useg_err, torch_err):
        """float32 errors of useg and of PyTorch against PyTorch in float64."""
        self.notes.append((kind, label, what, useg_err, torch_err))

    def check(self, label, kind, err, tol, what):
        if err > self.worst.get(kind, (-1.0, "", None))[0] or err != err:
            self.worst[kind] = (err, f"{label}: {what}", tol)
        if tol is not None and not (err <= tol):  # NaN fails too
            self.failures.append(f"{label}: {kind} {what}: error {err:.3g} > {tol:g}")


def run_config(i, cfg, prec, seed, exe, workdir, chk, f64_file=False):
    model_name, width, depth, t, up, (H, W), loss_kind = cfg
    label = f"{prec} {model_name} w={width} d={depth} t={t} up={up} {H}x{W} loss={loss_kind}"
    tol, dt = TOL[prec], DTYPE[prec]
    gen = torch.Generator().manual_seed(seed + 1000 * i + (0 if prec == "f32" else 500))
    torch.manual_seed(seed + 1000 * i + (0 if prec == "f32" else 500))
    net = R.make(model_name, in_ch=3, classes=1, width=width, depth=depth, t=t, up=up)
    randomize(net, gen)
    net = net.to(dt)
    sd0 = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(BATCH, 3, H, W, generator=gen, dtype=torch.float64).to(dt)
    if loss_kind == "bce":
        target = (torch.rand(BATCH, 1, H, W, generator=gen) < 0.3).to(dt)
    else:
        target = torch.randn(BATCH, 1, H, W, generator=gen, dtype=torch.float64).to(dt)

    tag = f"{prec}_{i}"
    wpath, ipath = os.path.join(workdir, f"w_{tag}.safetensors"), os.path.join(workdir, f"in_{tag}.safetensors")
    rpath, cpath = os.path.join(workdir, f"res_{tag}.safetensors"), os.path.join(workdir, f"ckpt_{tag}.safetensors")
    # f64_file: a float32 state_dict stored as F64, to exercise useg's conversion on load.
    st.save_file({k: (v.double() if (f64_file and v.is_floating_point()) else v) for k, v in sd0.items()}, wpath,
                 metadata={"written_by": "parity.py"})
    meta = {"model": model_name, "width": width, "depth": depth, "t": t, "up": up, "loss": loss_kind, "steps": STEPS,
            "lr": repr(LR), "weight_decay": repr(WD), "precision": prec}
    st.save_file({"x": x, ("target" if loss_kind == "bce" else "R"): target}, ipath, metadata=meta)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.time()
    p = subprocess.run([exe, wpath, ipath, rpath, cpath], capture_output=True, text=True, env=env, timeout=300)
    t_useg = time.time() - t0
    if p.returncode != 0:
        chk.failures.append(f"{label}: useg_parity failed ({p.returncode}): {p.stderr.strip()}")
        return
    res, _ = st.load_file(rpath)

    # In float32 the reference is PyTorch in float64 (same weights, same inputs): useg's float32
    # error against it must stay under the tolerance or within 4x PyTorch's own float32 error
    # (some quantities, e.g. train-mode BN over 4 values per channel, are ill-conditioned for any
    # float32 implementation). In float64, useg is compared with PyTorch directly.
    net64 = x64 = None
    if prec == "f32":
        net64 = R.make(model_name, in_ch=3, classes=1, width=width, depth=depth, t=t, up=up).double()
        net64.load_state_dict(sd0)
        x64 = x.double()

    def compare(kind, what, u, t32, t64=None, scale=None):
        if t64 is None:  # float64 run: direct comparison
            err = abs(u - t32) / scale if scale is not None else rel(u, t32)
            chk.check(label, f"{prec} {kind}", err, tol[kind], what)
            return err
        e_u = abs(u - t64) / scale if scale is not None else rel(u, t64)
        e_t = abs(t32 - t64) / scale if scale is not None else rel(t32, t64)
        chk.note(kind, label, what, e_u, e_t)
        chk.check(label, f"{prec} {kind}", e_u, None if tol[kind] is None else max(tol[kind], 4 * e_t), what)
        return e_u

    # (a) eval-mode forward
    net.eval()
    with torch.no_grad():
        out_eval = padded_forward(net, x, depth)
        ref_eval = None
        if net64 is not None:
            net64.eval()
            ref_eval = padded_forward(net64, x64, depth)
    eval_err = compare("eval", "eval_out", res["eval_out"], out_eval, ref_eval)

    # (b) train mode, one step deep each time; (c) Adam fed with useg's gradients
    zero_keys = zero_grad_biases(sd0)
    params = dict(net.named_parameters())
    names = list(params)
    shadow = {n: params[n].detach().clone().requires_grad_(True) for n in names}
    opt = torch.optim.Adam([shadow[n] for n in names], lr=LR, weight_decay=WD)
    net.train()
    if net64 is not None:
        net64.train()
        params64 = dict(net64.named_parameters())
    grad1 = []
    for k in range(1, STEPS + 1):
        with torch.no_grad():
            for n in names:
                params[n].copy_(sd0[n] if k == 1 else res[f"param_{k - 1}.{n}"])
                if net64 is not None:
                    params64[n].copy_(params[n])
        net.zero_grad()
        xk = x.clone().requires_grad_(k == 1)
        out = padded_forward(net, xk, depth)
        loss = loss_of(out, loss_kind, target)
        loss.backward()
        out64 = loss64 = xk64 = None
        if net64 is not None:
            net64.zero_grad()
            xk64 = x64.clone().requires_grad_(k == 1)
            out64 = padded_forward(net64, xk64, depth)
            loss64 = loss_of(out64, loss_kind, target.double())
            loss64.backward()
            out64 = out64.detach()
        compare("train", f"out_{k}", res[f"out_{k}"], out.detach(), out64)
        compare("train", f"loss_{k}", res[f"loss_{k}"].item(), loss.item(), None if loss64 is None else loss64.item(),
                scale=max(loss_scale(out, loss_kind, target, loss), 1e-300))
        if k == 1:
            compare("grad", "dL/dx", res["grad_x_1"], xk.grad, None if xk64 is None else xk64.grad)
        sd32 = net.state_dict()
        sd64 = net64.state_dict() if net64 is not None else {}
        for n, v in sd32.items():
            if n.endswith("running_mean") or n.endswith("running_var"):
                compare("bn", f"step {k} {n}", res[f"buffer_{k}.{n}"], v, sd64.get(n))
            elif n.endswith("num_batches_tracked"):
                same = int(res[f"counter_{k}.{n}"]) == int(v)
                chk.check(label, "counter", 0.0 if same else 1.0, 0.0, f"step {k} {n}")
        gscale = max(params[n].grad.abs().max().item() for n in names)
        for n in names:
            gu, gt = res[f"grad_{k}.{n}"], params[n].grad
            if n in zero_keys:
                err = gu.abs().max().item() / gscale  # useg's residue (PyTorch's: see the docstring)
                chk.check(label, f"{prec} zero_grad", err, tol["zero_grad"], f"step {k} {n}")
            else:
                e = compare("grad", f"step {k} {n}", gu, gt, None if net64 is None else params64[n].grad)
                if k == 1:
                    grad1.append(e)
        for n in names:
            shadow[n].grad = res[f"grad_{k}.{n}"].clone()
        opt.step()
        for n in names:
            err = (res[f"param_{k}.{n}"].double() - shadow[n].detach().double()).abs().max().item() / LR
            chk.check(label, f"{prec} adam", err, tol["adam"], f"step {k} {n}")
    # Moments: exp_avg_sq per tensor; exp_avg (a sum of gradients of either sign, which may cancel)
    # against the scale of sqrt(exp_avg_sq), which does not cancel.
    off = 0
    for n in names:
        cnt = shadow[n].numel()
        m_t, v_t = opt.state[shadow[n]]["exp_avg"].reshape(-1), opt.state[shadow[n]]["exp_avg_sq"].reshape(-1)
        m_u, v_u = res["exp_avg"][off:off + cnt], res["exp_avg_sq"][off:off + cnt]
        chk.check(label, f"{prec} moment", rel(v_u, v_t), tol["moment"], f"exp_avg_sq {n}")
        scale = v_t.double().sqrt().max().item()
        m_err = (m_u.double() - m_t.double()).abs().max().item()
        chk.check(label, f"{prec} moment", m_err / scale if scale > 0 else m_err, tol["moment"], f"exp_avg {n}")
        off += cnt
    for which in ("exp_avg", "exp_avg_sq"):
        chk.check(label, "counter", 0.0 if off == res[which].numel() else 1.0, 0.0, f"{which} size")

    # (d) useg's checkpoint loads into the reference model with strict=True and holds what useg reported
    ck, _ = st.load_file(cpath)
    fresh = R.make(model_name, in_ch=3, classes=1, width=width, depth=depth, t=t, up=up).to(dt)
    try:
        fresh.load_state_dict(ck, strict=True)
    except RuntimeError as e:
        chk.failures.append(f"{label}: useg checkpoint does not load with strict=True: {e}")
        return
    for n, v in fresh.state_dict().items():
        if n in params:
            same = ck[n].dtype == dt and torch.equal(v, res[f"param_{STEPS}.{n}"])
        elif n.endswith("num_batches_tracked"):
            same = ck[n].dtype == torch.int64 and ck[n].shape == torch.Size([]) and int(v) == int(res[f"counter_{STEPS}.{n}"])
        else:
            same = ck[n].dtype == dt and torch.equal(v, res[f"buffer_{STEPS}.{n}"])
        chk.check(label, "ckpt", 0.0 if same else 1.0, 0.0, n)

    # (e) informational: PyTorch's own chain of STEPS Adam steps from the same start
    net.load_state_dict(sd0)
    opt2 = torch.optim.Adam(net.parameters(), lr=LR, weight_decay=WD)
    for _ in range(STEPS):
        opt2.zero_grad()
        loss_of(padded_forward(net, x, depth), loss_kind, target).backward()
        opt2.step()
    e2e = max((res[f"param_{STEPS}.{n}"].double() - params[n].detach().double()).abs().max().item() for n in names) / LR
    print(f"  {label:64s} useg {t_useg:5.2f}s  eval {eval_err:.1e}  "
          f"grad(step 1) {max(grad1):.1e}  e2e {e2e:.1e}·lr", flush=True)


def check_wrong_model(exe, workdir, chk):
    """useg refuses a PyTorch file that does not fit, listing the problems."""
    torch.manual_seed(0)
    sd = R.make("unet", width=4, depth=2).state_dict()
    wpath, ipath = os.path.join(workdir, "wrong_w.safetensors"), os.path.join(workdir, "wrong_in.safetensors")
    st.save_file(sd, wpath)
    cases = [
        ({"model": "unet", "width": 8, "depth": 2},
         ["does not match the model: 73 problems", "wrong shape: Conv1.conv.0.weight (file: [4, 3, 3, 3], model: [8, 3, 3, 3])"]),
        ({"model": "attention-unet", "width": 4, "depth": 2},
         ["does not match the model: 42 problems", "missing: Att3.W_g.0.weight", "missing: Att2.psi.1.num_batches_tracked"]),
        ({"model": "unet", "width": 4, "depth": 3},
         ["does not match the model: 35 problems", "missing: Conv4.conv.0.weight", "missing: Up_conv4.conv.4.running_var"]),
        ({"model": "r2unet", "width": 4, "depth": 2}, ["unexpected: Conv1.conv.0.weight", "missing: RRCNN1.RCNN.0.conv.0.weight"]),
    ]
    for spec, expected in cases:
        meta = {"t": 2, "up": "upsample", "loss": "bce", "steps": 1, "lr": "0.01", "weight_decay": "0", **spec}
        st.save_file({"x": torch.zeros(1, 3, 8, 8), "target": torch.zeros(1, 1, 8, 8)}, ipath, metadata=meta)
        p = subprocess.run([exe, wpath, ipath, os.path.join(workdir, "wr.safetensors"), os.path.join(workdir, "wc.safetensors")],
                           capture_output=True, text=True, timeout=60)
        ok = p.returncode == 1 and wpath in p.stderr and all(e in p.stderr for e in expected)
        chk.check(f"wrong model {spec}", "refusal", 0.0 if ok else 1.0, 0.0, f"exit {p.returncode}: {p.stderr[:300]!r}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("useg_parity", help="path of the useg_parity program")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--keep", default=None, help="keep the files in this directory")
    ap.add_argument("--precision", choices=["f32", "f64", "both"], default="both")
    ap.add_argument("--only", type=int, action="append", default=None, help="run only CONFIGS[i] (repeatable)")
    ap.add_argument("--config", action="append", default=None,
                    help="run only this configuration: model,width,depth,t,up,HxW,loss (repeatable)")
    args = ap.parse_args()
    configs = CONFIGS
    if args.config:
        configs = []
        for c in args.config:
            m, w, d, t, up, hw, loss = c.split(",")
            h, wd = hw.lower().split("x")
            configs.append((m, int(w), int(d), int(t), up, (int(h), int(wd)), loss))
    selected = [(i, c) for i, c in enumerate(configs) if args.only is None or i in args.only]
    precs = ["f32", "f64"] if args.precision == "both" else [args.precision]
    seed = args.seed if args.seed is not None else time.time_ns() % (2 ** 31)
    print(f"parity seed = {seed}   (repeat with --seed {seed});  torch {torch.__version__}", flush=True)
    torch.set_num_threads(1)
    chk = Checker()
    t0 = time.time()
    tmp = tempfile.TemporaryDirectory() if args.keep is None else None
    workdir = tmp.name if tmp else args.keep
    os.makedirs(workdir, exist_ok=True)
    try:
        for prec in precs:
            for i, cfg in selected:
                run_config(i, cfg, prec, seed, args.useg_parity, workdir, chk, f64_file=(prec == "f32" and i == 0))
        check_wrong_model(args.useg_parity, workdir, chk)
    finally:
        if tmp:
            tmp.cleanup()
    print("worst errors (error, tolerance, where):")
    for k, (err, what, tol) in sorted(chk.worst.items()):
        print(f"  {k:14s} {err:.2e}  {'reported' if tol is None else f'<= {tol:g}':>10s}  {what}")
    if chk.notes:
        print("float32 errors against PyTorch float64 (useg float32 | PyTorch float32), worst over the run:")
        for kind in ("eval", "train", "bn", "grad"):
            ns = [n for n in chk.notes if n[0] == kind]
            if ns:
                wu, wt = max(ns, key=lambda n: n[3]), max(ns, key=lambda n: n[4])
                print(f"  {kind:6s} useg {wu[3]:.2e} ({wu[1]}: {wu[2]})\n         torch {wt[4]:.2e} ({wt[1]}: {wt[2]})")
    print(f"time {time.time() - t0:.1f}s")
    if chk.failures:
        print(f"FAILED ({len(chk.failures)} comparisons), seed {seed}:")
        for f in chk.failures[:60]:
            print("  " + f)
        return 1
    print("all parity checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
