#!/usr/bin/python3
"""The PyTorch side of compare_pytorch.py: time one configuration of the reference models
(tests/pytorch/useg_reference.py, the same architecture as useg's) and print one JSON line with the
fields useg_bench prints. Run it with Debian's /usr/bin/python3 (python3-torch).

A training step is: forward, BCEWithLogits loss, zero_grad, backward, Adam step. Inference runs
under torch.no_grad() in eval mode. --format channels_last uses PyTorch's NHWC path (oneDNN),
which is faster for some models.
"""
import argparse
import json
import os
import resource
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "pytorch"))


def cpu_sample():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    busy = (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / hz
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return busy, ru.ru_utime + ru.ru_stime, time.perf_counter()


def current_rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGESIZE") / (1024.0 * 1024.0)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="unet", choices=["unet", "attention-unet", "r2unet", "ar2unet"])
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--t", type=int, default=2)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--mode", default="train", choices=["infer", "train"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--min-time", type=float, default=0.0, help="keep timing steps until this many seconds have passed")
    ap.add_argument("--format", default="contiguous", choices=["contiguous", "channels_last"])
    ap.add_argument("--up", default="upsample", choices=["upsample", "transpose"])
    a = ap.parse_args()

    import torch
    import useg_reference

    torch.set_num_threads(a.threads)
    torch.manual_seed(1)
    fmt = torch.channels_last if a.format == "channels_last" else torch.contiguous_format
    m = useg_reference.make(a.model, in_ch=3, classes=1, width=a.width, depth=a.depth, t=a.t, up=a.up)
    m = m.to(memory_format=fmt)
    train = a.mode == "train"
    m.train(train)
    x = (torch.rand(a.batch, 3, a.size, a.size) * 2 - 1).contiguous(memory_format=fmt)
    target = (torch.rand(a.batch, 1, a.size, a.size) < 0.2).float()
    opt = torch.optim.Adam(m.parameters(), lr=1e-4)
    lossf = torch.nn.BCEWithLogitsLoss()
    loss = 0.0
    base_rss = current_rss_mb()  # model, optimizer and inputs: before any step

    def step():
        nonlocal loss
        if train:
            y = m(x)
            l = lossf(y, target)
            opt.zero_grad(set_to_none=False)
            l.backward()
            opt.step()
            loss = float(l)
        else:
            with torch.no_grad():
                y = m(x)
            loss = float(y.reshape(-1)[0])

    for _ in range(a.warmup):
        step()
    times = []
    b0, o0, w0 = cpu_sample()
    while len(times) < a.iters or time.perf_counter() - w0 < a.min_time:
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    b1, o1, w1 = cpu_sample()
    wall = w1 - w0
    own = o1 - o0
    others = max(0.0, (b1 - b0) - own)
    mean_ms = wall * 1e3 / len(times)
    times.sort()
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    out = dict(impl="pytorch", torch=torch.__version__, format=a.format, model=a.model, width=a.width, depth=a.depth,
               t=a.t, size=a.size, batch=a.batch, mode=a.mode, device="cpu", threads=torch.get_num_threads(),
               iters=len(times), images_per_s=a.batch * 1e3 / mean_ms, ms_per_step=mean_ms, ms_min=times[0],
               ms_median=times[len(times) // 2], peak_rss_mb=rss_mb, base_rss_mb=base_rss,
               parameters=sum(p.numel() for p in m.parameters()), own_cpu_s=own, wall_s=wall,
               others_cores=others / wall, loss=loss)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
