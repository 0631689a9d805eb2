#!/usr/bin/python3
"""Run the same configurations through useg (useg_bench) and PyTorch (pytorch_bench.py, the
reference models of tests/pytorch/useg_reference.py), alternating in one run, each configuration
and side in its own fresh process, and print a Markdown table with useg/PyTorch ratios for speed
and peak memory.

PyTorch runs in both memory formats (contiguous NCHW and channels_last) and with two memory
allocators: glibc's malloc as installed ("default") and tcmalloc (Debian's libtcmalloc-minimal4,
through LD_PRELOAD; "glibc-tuned", glibc's malloc told never to give memory back, where tcmalloc is
not installed). On machines where page faults are expensive (virtual machines), glibc's malloc
returning and re-faulting PyTorch's large activations every step makes PyTorch several times
slower; a PyTorch user would change the allocator, so the speed ratio is taken against the
fastest PyTorch run and the memory ratio against the PyTorch run with the lowest peak. Both sides report how much CPU other processes used while they
were timed (from /proc/stat minus their own CPU time); a pair where others used more than
--noise-limit of a core is re-run (up to --retries times) and flagged if it stays noisy.

  /usr/bin/python3 benchmarks/compare_pytorch.py --preset quick
  /usr/bin/python3 benchmarks/compare_pytorch.py --preset full --json results.jsonl
"""
import argparse
import glob
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MODELS = ["unet", "attention-unet", "r2unet", "ar2unet"]

# (mode, batch, size)
FULL_SHAPES = [("train", 4, 256), ("train", 8, 128), ("infer", 1, 256), ("infer", 8, 256)]


def preset_configs(name):
    if name == "quick":
        cfg = [dict(model=m, width=16, mode="train", batch=8, size=128) for m in MODELS]
        cfg += [dict(model="ar2unet", width=16, mode="train", batch=4, size=256),
                dict(model="unet", width=32, mode="train", batch=4, size=256),
                dict(model="unet", width=64, mode="infer", batch=1, size=256),
                dict(model="attention-unet", width=32, mode="infer", batch=8, size=256)]
        return cfg
    if name == "full":
        return [dict(model=m, width=w, mode=mode, batch=b, size=s)
                for m, w, (mode, b, s) in itertools.product(MODELS, (16, 32, 64), FULL_SHAPES)]
    raise SystemExit(f"unknown preset {name}")


def find_bench(path):
    cands = [path] if path else [os.path.join(ROOT, d, "benchmarks", "useg_bench")
                                  for d in ("build-bench", "build", "build-release")]
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise SystemExit("compare_pytorch.py: useg_bench not found (build it: cmake --build <dir> --target useg_bench, "
                     "then pass --bench <dir>/benchmarks/useg_bench)")


def run_json(cmd, env, timeout):
    t0 = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(error=f"timeout after {timeout}s")
    if p.returncode != 0:
        return dict(error=(p.stderr.strip() or p.stdout.strip())[-400:])
    for line in reversed(p.stdout.strip().splitlines()):
        if line.startswith("{"):
            r = json.loads(line)
            r["process_s"] = time.time() - t0
            return r
    return dict(error="no JSON line in output: " + p.stdout[-300:])


def machine_info():
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    fl = line.split(":", 1)[1].split()
                    flags = " ".join(x for x in ("avx2", "fma", "avx512f", "avx512_bf16") if x in fl)
                    break
    except OSError:
        pass
    return dict(cpu=cpu, cores=os.cpu_count(), isa=flags, kernel=platform.release())


# glibc's malloc never trimming nor unmapping: what the tcmalloc run buys, without installing anything
GLIBC_TUNED = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736",
               "MALLOC_TOP_PAD_": "1073741824"}


def find_tcmalloc():
    for pat in ("/usr/lib/*/libtcmalloc_minimal.so.4", "/usr/lib/*/libtcmalloc.so.4", "/usr/lib/libtcmalloc_minimal.so.4",
                "/usr/local/lib/libtcmalloc_minimal.so.4"):
        hits = sorted(glob.glob(pat))
        if hits:
            return hits[0]
    return None


def allocator_env(base, name):
    """The environment of a PyTorch run with allocator name (default, tcmalloc, glibc-tuned)."""
    env = dict(base)
    if name == "tcmalloc":
        lib = find_tcmalloc()
        if not lib:
            raise SystemExit("compare_pytorch.py: --allocators tcmalloc: libtcmalloc_minimal.so.4 not found "
                             "(apt-get install libtcmalloc-minimal4), or use glibc-tuned")
        env["LD_PRELOAD"] = lib
    elif name == "glibc-tuned":
        env.update(GLIBC_TUNED)
    elif name != "default":
        raise SystemExit(f"compare_pytorch.py: unknown allocator {name} (default, tcmalloc, glibc-tuned)")
    return env


def variant(r):
    """A PyTorch run's variant label: format, and the allocator when it is not the default."""
    al = r.get("allocator", "default")
    return r["format"] if al == "default" else f"{r['format']}, {al}"


def fmt(x, nd=2):
    return "-" if x is None else f"{x:.{nd}f}"


def round_noise(res):
    """The most CPU that other processes used during any run of a round (cores)."""
    return max((r.get("others_cores", 0.0) for r in res.values() if "error" not in r), default=0.0)


def round_result(res, noise):
    """(ratio, useg, fastest PyTorch run, noise, leanest PyTorch run) of one round: res maps
    (side, format, allocator) to a result."""
    u = res[("useg", None, None)]
    torch_runs = [r for k, r in res.items() if k[0] == "pytorch" and "error" not in r]
    t = max(torch_runs, key=lambda r: r["images_per_s"]) if torch_runs else None
    lean = min(torch_runs, key=lambda r: r["peak_rss_mb"]) if torch_runs else None
    ratio = u["images_per_s"] / t["images_per_s"] if "error" not in u and t else None
    return (ratio, u, t, noise, lean)


def summarize(c, rounds, noise_limit):
    """With --repeat N, the table shows the round with the median speed ratio, and the range."""
    ok = sorted((r for r in rounds if r[0] is not None), key=lambda r: r[0])
    ratio, u, t, noise, lean = ok[(len(ok) - 1) // 2] if ok else rounds[-1]
    spread = (ok[0][0], ok[-1][0]) if len(ok) > 1 else None
    return dict(config=c, useg=u, torch=t, lean=lean, noise=noise, noisy=noise > noise_limit, spread=spread), ok


def rows_from_json(path, noise_limit):
    """The table rows of a --json file (of a run that was cut off, or several runs appended): per
    configuration and round, the last attempt."""
    rounds = {}
    order = []
    for line in open(path):
        line = line.strip()
        if not line:
            continue
        r = json.loads(line)
        c = r.pop("config")
        key = json.dumps(c, sort_keys=True)
        if key not in rounds:
            rounds[key] = (c, {})
            order.append(key)
        rnd, att = r.pop("round"), r.pop("attempt")
        per = rounds[key][1].setdefault(rnd, {})
        if per.get("attempt", -1) != att:
            per.clear()
            per["attempt"] = att
        side = r.get("impl", "useg")
        if side == "pytorch":
            per[(side, r.get("format"), r.setdefault("allocator", "default"))] = r
        else:
            per[(side, None, None)] = r
    rows = []
    for key in order:
        c, per = rounds[key]
        rs = []
        for rnd in sorted(per):
            res = {k: v for k, v in per[rnd].items() if k != "attempt"}
            if ("useg", None, None) not in res:
                continue  # the round was cut off before useg ran
            noise = round_noise(res)
            rs.append(round_result(res, noise))
        if rs:
            rows.append(summarize(c, rs, noise_limit)[0])
    return rows


def print_table(rows, a):
    print()
    print("| model | width | mode | batch | size | useg img/s | PyTorch img/s (fastest run) | speed ×"
          " | useg GFLOP/s | PyTorch GFLOP/s | useg peak MiB | PyTorch peak MiB (leanest run) | memory × | step memory ×"
          " | others (cores) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        c, u, t, lean = r["config"], r["useg"], r["torch"], r.get("lean") or r["torch"]
        ok_u, ok_t = "error" not in u, t is not None
        flops = u.get("flops_per_step") if ok_u else None
        speed = u["images_per_s"] / t["images_per_s"] if ok_u and ok_t else None
        mem = u["peak_rss_mb"] / lean["peak_rss_mb"] if ok_u and ok_t else None
        tg = flops / (t["ms_per_step"] * 1e6) if flops and ok_t else None
        # what the steps add above the process's start (model, optimizer state, inputs, libraries)
        du = u["peak_rss_mb"] - u["base_rss_mb"] if ok_u and "base_rss_mb" in u else None
        dt = lean["peak_rss_mb"] - lean["base_rss_mb"] if ok_t and "base_rss_mb" in lean else None
        smem = du / dt if du is not None and dt else None
        flag = " ⚠ noisy" if r["noisy"] else ""
        sp = f" ({r['spread'][0]:.2f}–{r['spread'][1]:.2f})" if r.get("spread") else ""
        print(f"| {c['model']} | {c['width']} | {c['mode']} | {c['batch']} | {c['size']} | "
              f"{fmt(u.get('images_per_s') if ok_u else None, 3)} | "
              f"{fmt(t['images_per_s'] if ok_t else None, 3)} ({variant(t) if ok_t else '-'}) | "
              f"**{fmt(speed)}**{sp} | {fmt(u.get('gflops_per_s') if ok_u else None, 1)} | {fmt(tg, 1)} | "
              f"{fmt(u.get('peak_rss_mb') if ok_u else None, 0)} | "
              f"{fmt(lean['peak_rss_mb'] if ok_t else None, 0)} ({variant(lean) if ok_t else '-'}) | "
              f"**{fmt(mem)}** | {fmt(smem)} | {r['noise']:.2f}{flag} |")
    print("\nspeed ×: against the fastest PyTorch run (format, allocator); memory ×: peak resident set of the whole "
          "process (useg_bench vs python3 + torch), against the PyTorch run with the lowest peak; step memory ×: "
          "peak minus the resident set before the first step (what the steps themselves add).")
    noisy = sum(r["noisy"] for r in rows)
    print(f"\n{len(rows)} configurations, {noisy} flagged noisy (others > {a.noise_limit} cores after "
          f"{a.retries} re-runs).")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="quick", choices=["quick", "full"])
    ap.add_argument("--models", default=None, help="comma-separated subset of models")
    ap.add_argument("--widths", default=None, help="comma-separated subset of widths")
    ap.add_argument("--modes", default=None, help="comma-separated subset of modes (train, infer)")
    ap.add_argument("--batches", default=None, help="comma-separated subset of batch sizes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3, help="minimum timed steps per run")
    ap.add_argument("--min-time", type=float, default=4.0, help="minimum timed seconds per run")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--formats", default="both", choices=["both", "contiguous", "channels_last"],
                    help="PyTorch memory formats to run (the ratio uses the faster)")
    ap.add_argument("--allocators", default="default,tcmalloc",
                    help="comma-separated PyTorch allocators: default (glibc malloc), tcmalloc (LD_PRELOAD of "
                         "libtcmalloc_minimal), glibc-tuned (glibc malloc that never returns memory); tcmalloc "
                         "falls back to glibc-tuned where it is not installed")
    ap.add_argument("--noise-limit", type=float, default=0.10,
                    help="flag a pair when other processes used more than this many cores while it was timed")
    ap.add_argument("--retries", type=int, default=2, help="re-runs of a noisy pair")
    ap.add_argument("--repeat", type=int, default=1,
                    help="alternate each configuration's useg/PyTorch round this many times and report the round "
                         "with the median speed ratio, with the range (catches slow phases of a shared host that "
                         "the noise check cannot see)")
    ap.add_argument("--bench", default=None, help="path of useg_bench")
    ap.add_argument("--python", default="/usr/bin/python3", help="interpreter with torch")
    ap.add_argument("--json", default=None, help="append every raw result (one JSON per line) to this file")
    ap.add_argument("--from-json", default=None, metavar="FILE",
                    help="run nothing: print the table of the results a --json file holds (a run that was cut off "
                         "keeps what it measured)")
    ap.add_argument("--timeout", type=float, default=1800)
    a = ap.parse_args()
    if a.from_json:
        print_table(rows_from_json(a.from_json, a.noise_limit), a)
        return

    bench = find_bench(a.bench)
    configs = preset_configs(a.preset)
    for key, values, parse in (("model", a.models, str), ("width", a.widths, int), ("mode", a.modes, str),
                               ("batch", a.batches, int)):
        if values:
            keep = [parse(v) for v in values.split(",")]
            configs = [c for c in configs if c[key] in keep]
    if not configs:
        raise SystemExit("no configuration of the preset matches --models/--widths/--modes/--batches")

    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(a.threads)
    env.pop("OMP_PROC_BIND", None)
    formats = ["contiguous", "channels_last"] if a.formats == "both" else [a.formats]
    allocators = []
    for al in a.allocators.split(","):
        if al == "tcmalloc" and not find_tcmalloc():
            print("# tcmalloc not installed (apt-get install libtcmalloc-minimal4): PyTorch runs glibc-tuned instead",
                  file=sys.stderr, flush=True)
            al = "glibc-tuned"
        allocator_env(env, al)  # checks the name
        if al not in allocators:
            allocators.append(al)
    variants = [(f, al) for al in allocators for f in formats]
    info = machine_info()
    jf = open(a.json, "a") if a.json else None
    print(f"# machine: {info['cpu']}, {info['cores']} cores ({info['isa']}), threads={a.threads}", flush=True)
    print(f"# useg_bench: {bench}; PyTorch: {a.python} benchmarks/pytorch_bench.py, "
          f"formats {','.join(formats)}, allocators {','.join(allocators)}", flush=True)

    def common(c):
        return ["--model", c["model"], "--width", str(c["width"]), "--size", str(c["size"]), "--batch",
                str(c["batch"]), "--mode", c["mode"], "--threads", str(a.threads), "--iters", str(a.iters),
                "--min-time", str(a.min_time), "--warmup", str(a.warmup)]

    rows = []
    for i, c in enumerate(configs):
        label = f"{c['model']} w{c['width']} {c['mode']} b{c['batch']} {c['size']}²"
        rounds = []
        for rnd in range(a.repeat):
            attempt = 0
            while True:
                res = {}
                # Alternate: the first PyTorch variant, useg, the other variants; each a fresh process.
                order = [("pytorch",) + variants[0], ("useg", None, None)] + [("pytorch",) + v for v in variants[1:]]
                for side, f, al in order:
                    if side == "useg":
                        r = run_json([bench] + common(c), env, a.timeout)
                    else:
                        r = run_json([a.python, os.path.join(HERE, "pytorch_bench.py")] + common(c) + ["--format", f],
                                     allocator_env(env, al), a.timeout)
                    r.setdefault("impl", side)
                    if f:
                        r["format"] = f
                        r["allocator"] = al
                    res[(side, f, al)] = r
                    if jf:
                        jf.write(json.dumps(dict(config=c, round=rnd, attempt=attempt, **r)) + "\n")
                        jf.flush()
                noise = round_noise(res)
                if noise <= a.noise_limit or attempt >= a.retries:
                    break
                attempt += 1
                print(f"# {label}: other processes used {noise:.2f} cores; re-running ({attempt}/{a.retries})",
                      file=sys.stderr, flush=True)
            rounds.append(round_result(res, noise))
        row, ok = summarize(c, rounds, a.noise_limit)
        u, t, noise, spread = row["useg"], row["torch"], row["noise"], row["spread"]
        if "error" in u:
            print(f"# {label}: useg failed: {u['error']}", file=sys.stderr)
        if t is None:
            print(f"# {label}: PyTorch failed: {[r.get('error') for r in res.values()]}", file=sys.stderr)
        rows.append(row)
        if "error" not in u and t:
            lean = row["lean"]
            print(f"# [{i + 1}/{len(configs)}] {label}: useg {u['images_per_s']:.3f} img/s, "
                  f"PyTorch({variant(t)}) {t['images_per_s']:.3f} img/s, speed x{u['images_per_s'] / t['images_per_s']:.2f}, "
                  f"memory x{u['peak_rss_mb'] / lean['peak_rss_mb']:.2f} (against {variant(lean)}), noise {noise:.2f}"
                  + (f", speed range x{spread[0]:.2f}-{spread[1]:.2f} over {len(ok)} rounds" if spread else ""), flush=True)

    print_table(rows, a)
    if jf:
        jf.close()


if __name__ == "__main__":
    main()
