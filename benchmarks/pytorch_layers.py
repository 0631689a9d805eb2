#!/usr/bin/env python3
"""PyTorch's time for single 3x3 convolution layers at the shapes useg_microbench uses (batch 4),
to compare layer by layer with useg_microbench's conv_fwd + conv_bwd_data + conv_bwd_weights.

  /usr/bin/python3 benchmarks/pytorch_layers.py --threads 2
  OMP_NUM_THREADS=2 build/benchmarks/useg_microbench --benchmark_filter='conv_.*/k:3'

Prints, per shape, the faster of NCHW and channels-last: forward alone (no_grad) and
forward + backward (input and weight gradients), with GFLOP/s counted as direct convolution
(2*9*Cin*Cout per output pixel; forward + backward = 3x forward).
"""
import argparse
import time

import torch

# --infer1: batch-1 forward at every level of widths 16 and 64 (useg_microbench's conv_infer1).
INFER1 = [(1, w << l, w << l, 256 >> l) for w in (16, 64) for l in range(5)]
SHAPES = [(4, 16, 16, 256), (4, 32, 32, 128), (4, 64, 64, 64), (4, 128, 128, 32), (4, 256, 256, 16),
          (4, 32, 16, 256), (4, 64, 64, 256), (4, 128, 128, 128),
          (8, 32, 32, 64), (8, 64, 64, 32), (8, 128, 128, 16), (8, 256, 256, 8)]


def bench(f, min_time):
    f()
    t = time.perf_counter()
    k = 0
    while time.perf_counter() - t < min_time or k < 3:
        f()
        k += 1
    return (time.perf_counter() - t) / k


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-time", type=float, default=0.4)
    ap.add_argument("--infer1", action="store_true", help="batch-1 forward shapes, no backward")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    for (n, ci, co, hw) in (INFER1 if a.infer1 else SHAPES):
        flops = 2 * n * hw * hw * ci * co * 9
        best_f = best_fb = float("inf")
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(n, ci, hw, hw).to(memory_format=fmt)
            conv = torch.nn.Conv2d(ci, co, 3, padding=1).to(memory_format=fmt)
            gy = torch.randn(n, co, hw, hw).to(memory_format=fmt)
            with torch.no_grad():
                best_f = min(best_f, bench(lambda: conv(x), a.min_time))
            if a.infer1:
                continue
            xr = x.clone().requires_grad_(True)

            def fb():
                conv(xr).backward(gy)
            best_fb = min(best_fb, bench(fb, a.min_time))
        if a.infer1:
            print(f"n{n} {ci}->{co} {hw}x{hw}: forward {best_f * 1e3:.3f} ms ({flops / best_f / 1e9:.0f} GFLOP/s)")
            continue
        print(f"n{n} {ci}->{co} {hw}x{hw}: forward {best_f * 1e3:.2f} ms ({flops / best_f / 1e9:.0f} GFLOP/s); "
              f"forward+backward {best_fb * 1e3:.2f} ms ({3 * flops / best_fb / 1e9:.0f} GFLOP/s)")


if __name__ == "__main__":
    main()
