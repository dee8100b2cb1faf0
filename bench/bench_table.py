#!/usr/bin/env python3
"""Builds the benchmark table from Google Benchmark JSON files and the PyTorch
baseline's JSON (bench/torch_layer.py), prints it with the target verdicts and
optionally writes everything as one JSON file. Standard library only.

Naming convention (bench/README.md): benchmark names are
<component>/<impl>/<shape>/<dtype>[/gbench suffixes]; user counters `flops`
(per iteration), optional `bytes` and `extra_memory_bytes`.

    python3 bench/bench_table.py [--torch torch.json] [--json out.json] gbench1.json gbench2.json ...
    python3 bench/bench_table.py --self-test
"""
import argparse
import json
import os
import platform
import re
import statistics
import sys

LAYER_SHAPE = "h1024_a16_f4096_s2048_b1"  # the target layer
MIB = 1024 * 1024
IMPLS_PAIRED = ("reference", "optimized", "bare_gemm")
UNIT_TO_MS = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}
LEGACY_REFERENCE_LAYER = re.compile(r"^BM_ReferenceLayerForwardBackward/(\d+)/(\d+)/(\d+)$")


# ---------------------------------------------------------------- parsing

def strip_suffixes(name):
    """Drops Google Benchmark's own name parts: key:value fields, real_time, manual_time."""
    parts = [p for p in name.split("/") if ":" not in p and p not in ("real_time", "manual_time")]
    return "/".join(parts)


def parse_name(name):
    """(component, impl, shape, dtype, conventional) for a benchmark run name."""
    base = strip_suffixes(name)
    m = LEGACY_REFERENCE_LAYER.match(base)
    if m:
        h, a, s = (int(x) for x in m.groups())
        return ("transformer_layer_fwd_bwd", "reference", f"h{h}_a{a}_f{4 * h}_s{s}_b1", "fp64", True)
    parts = base.split("/")
    if len(parts) == 4 and all(parts):
        return (parts[0], parts[1], parts[2], parts[3], True)
    return (base, "", "", "", False)


def shape_token(shape, key):
    """Integer value of token <key><int> in a shape string like h1024_a16_s2048, or None."""
    for tok in shape.split("_"):
        if tok.startswith(key) and tok[len(key):].isdigit():
            return int(tok[len(key):])
    return None


def collect_rows(gbench_files):
    """One row per (component, impl, shape, dtype); gbench_files: list of (label, parsed JSON)."""
    groups = {}
    order = []
    for label, data in gbench_files:
        for b in data.get("benchmarks", []):
            run_name = b.get("run_name") or b.get("name", "")
            comp, impl, shape, dtype, conv = parse_name(run_name)
            key = (comp, impl, shape, dtype)
            if key not in groups:
                groups[key] = {"binary": label, "conventional": conv, "iter": [], "agg": {}, "errors": []}
                order.append(key)
            g = groups[key]
            if b.get("error_occurred"):
                g["errors"].append(b.get("error_message", "error"))
                continue
            if not isinstance(b.get("real_time"), (int, float)):
                g["errors"].append("no real_time in the JSON")
                continue
            if b.get("run_type") == "aggregate":
                g["agg"][b.get("aggregate_name", "")] = b
            else:
                g["iter"].append(b)
    rows = []
    for key in order:
        g = groups[key]
        comp, impl, shape, dtype = key
        row = {"component": comp, "impl": impl, "shape": shape, "dtype": dtype, "binary": g["binary"],
               "conventional": g["conventional"], "time_ms": None, "time_source": None, "flops": None,
               "gflops": None, "bytes": None, "extra_memory_bytes": None, "pct_peak": None,
               "ratio_vs_reference": None, "ratio_vs_torch": None, "iterations": None, "error": None}
        if "median" in g["agg"]:
            src, how = g["agg"]["median"], "median"
        elif g["iter"]:
            src = min(g["iter"], key=lambda b: b["real_time"] * UNIT_TO_MS.get(b.get("time_unit", "ns"), 1e-6))
            how = "best of %d" % len(g["iter"]) if len(g["iter"]) > 1 else "single"
        else:
            row["error"] = "; ".join(g["errors"]) or "no runs"
            rows.append(row)
            continue
        row["time_ms"] = src["real_time"] * UNIT_TO_MS.get(src.get("time_unit", "ns"), 1e-6)
        row["time_source"] = how
        row["iterations"] = src.get("iterations")
        if isinstance(src.get("flops"), (int, float)) and src["flops"] > 0:
            row["flops"] = float(src["flops"])
        elif isinstance(src.get("GFLOP/s"), (int, float)) and src["GFLOP/s"] > 0:  # legacy rate counter
            row["flops"] = src["GFLOP/s"] * 1e9 * row["time_ms"] * 1e-3
        for c in ("bytes", "extra_memory_bytes"):
            if isinstance(src.get(c), (int, float)):
                row[c] = float(src[c])
        if row["flops"] and row["time_ms"] > 0:
            row["gflops"] = row["flops"] / (row["time_ms"] * 1e6)
        rows.append(row)
    return rows


def torch_rows(torch, stat="median"):
    """Rows for the PyTorch baseline (impl "pytorch"); stat: median or best of its runs."""
    if not torch or torch.get("error"):
        return []
    best = stat == "best"
    rows = []
    base = {"impl": "pytorch", "shape": torch.get("shape", ""), "dtype": torch.get("dtype", "fp32"),
            "binary": "bench/torch_layer.py", "conventional": True, "bytes": None, "extra_memory_bytes": None,
            "pct_peak": None, "ratio_vs_reference": None, "ratio_vs_torch": None, "iterations": None, "error": None}
    for comp, tkey, fkey, pass_name in (("transformer_layer_fwd", "forward_ms", "forward_flops", "forward"),
                                        ("transformer_layer_fwd_bwd", "forward_backward_ms",
                                         "forward_backward_flops", "forward_backward")):
        if best and torch.get(tkey.replace("_ms", "_best_ms")):
            tkey = tkey.replace("_ms", "_best_ms")
        if torch.get(tkey):
            n = next((len(r["ms"]) for r in torch.get("runs", []) if r.get("pass") == pass_name), None)
            rows.append(dict(base, component=comp, time_ms=float(torch[tkey]), flops=torch.get(fkey),
                             time_source=f"{stat} of {n}" if n else stat))
    for lin in torch.get("linear", []):
        rows.append(dict(base, component=lin.get("component", "linear_fwd"), shape=lin["shape"],
                         dtype=lin.get("dtype", base["dtype"]), flops=lin.get("flops"),
                         time_ms=float(lin["best_ms"] if best and lin.get("best_ms") else lin["ms"]),
                         time_source=f"{stat} of {len(lin.get('runs', []))}"))
    for r in rows:
        r["gflops"] = r["flops"] / (r["time_ms"] * 1e6) if r.get("flops") and r["time_ms"] > 0 else None
    return rows


# ---------------------------------------------------------------- pairing

def pair(rows):
    """Fills pct_peak, ratio_vs_reference and ratio_vs_torch; returns the peaks by dtype."""
    peaks = {}
    for r in rows:
        if r["impl"] == "bare_gemm" and r["gflops"]:
            peaks[r["dtype"]] = max(peaks.get(r["dtype"], 0.0), r["gflops"])
    refs = {}
    for r in rows:
        if r["impl"] == "reference" and r["time_ms"]:
            refs.setdefault((r["component"], r["shape"]), []).append(r)
    torch_by_key = {}
    for r in rows:
        if r["impl"] == "pytorch":
            torch_by_key.setdefault((r["component"], r["shape"]), []).append(r)
    for r in rows:
        if r["gflops"] and r["dtype"] in peaks:
            r["pct_peak"] = 100.0 * r["gflops"] / peaks[r["dtype"]]
        if not r["time_ms"] or not r["conventional"]:
            continue
        if r["impl"] != "reference":
            cands = refs.get((r["component"], r["shape"]), [])
            same = [c for c in cands if c["dtype"] == r["dtype"]]
            ref = (same or cands or [None])[0]
            if ref:
                r["ratio_vs_reference"] = ref["time_ms"] / r["time_ms"]
                r["reference_dtype"] = ref["dtype"]
        if r["impl"] != "pytorch":
            cands = torch_by_key.get((r["component"], r["shape"]), [])
            same = [c for c in cands if c["dtype"] == r["dtype"]]
            t = (same or cands or [None])[0]
            if t:
                r["ratio_vs_torch"] = t["time_ms"] / r["time_ms"]
                r["torch_dtype"] = t["dtype"]
    return peaks


def evaluate_targets(rows, torch_note):
    """The issue's targets: list of {target, status (PASS/FAIL/absent), detail}."""
    out = []

    def add(target, status, detail):
        out.append({"target": target, "status": status, "detail": detail})

    for comp, need in (("transformer_layer_fwd", 2.0), ("transformer_layer_fwd_bwd", 1.5)):
        name = f"{comp}/optimized/{LAYER_SHAPE}/fp32 vs PyTorch >= {need}x"
        r = next((r for r in rows if (r["component"], r["impl"], r["shape"], r["dtype"]) ==
                  (comp, "optimized", LAYER_SHAPE, "fp32")), None)
        if r is None or not r["time_ms"]:
            add(name, "absent", "no optimized row of that shape")
        elif r["ratio_vs_torch"] is None:
            add(name, "absent", f"no PyTorch time for that shape ({torch_note or 'torch ran another shape'})")
        else:
            add(name, "PASS" if r["ratio_vs_torch"] >= need else "FAIL", f"{r['ratio_vs_torch']:.2f}x")

    bare = {(r["shape"], r["dtype"]): r for r in rows if r["impl"] == "bare_gemm" and r["gflops"]}
    lin = [r for r in rows if r["component"].startswith("linear") and r["impl"] == "optimized" and r["time_ms"]]
    if not lin:
        add("linear/optimized >= 80% of bare GEMM GFLOP/s (same shape)", "absent", "no optimized linear rows")
    for r in lin:
        name = f"{r['component']}/optimized/{r['shape']}/{r['dtype']} >= 80% of bare GEMM"
        g = bare.get((r["shape"], r["dtype"]))
        if g is None or not r["gflops"]:
            add(name, "absent", "no bare_gemm row of that shape and dtype" if g is None else "no flops counter")
        else:
            frac = r["gflops"] / g["gflops"]
            add(name, "PASS" if frac >= 0.8 else "FAIL",
                f"{100 * frac:.0f}% ({r['gflops']:.1f} vs {g['gflops']:.1f} GFLOP/s)")

    att = [r for r in rows if r["component"] == "attention_fwd" and r["impl"] == "optimized"
           and shape_token(r["shape"], "s") == 16384]
    if not att:
        add("attention_fwd/optimized at seq 16384 extra memory < 64 MiB", "absent", "no row with s16384")
    for r in att:
        name = f"attention_fwd/optimized/{r['shape']}/{r['dtype']} extra memory < 64 MiB"
        if r["extra_memory_bytes"] is None:
            add(name, "absent", "no extra_memory_bytes counter" + (f" ({r['error']})" if r["error"] else ""))
        else:
            mib = r["extra_memory_bytes"] / MIB
            add(name, "PASS" if mib < 64 else "FAIL", f"{mib:.1f} MiB")

    # Memory rows (extra_memory_bytes) measure a size the float64 reference cannot run at
    # (an s x s score matrix of 2 GiB at s16384): they are not speed rows to pair.
    opt = [r for r in rows if r["impl"] == "optimized" and r.get("extra_memory_bytes") is None]
    missing = [f"{r['component']}/{r['shape']}/{r['dtype']}" for r in opt if r["ratio_vs_reference"] is None]
    if not opt:
        add("every optimized component has a ratio vs reference", "absent", "no optimized rows")
    else:
        add("every optimized component has a ratio vs reference", "PASS" if not missing else "FAIL",
            f"{len(opt) - len(missing)}/{len(opt)} paired" + (f"; unpaired: {', '.join(missing)}" if missing else ""))
    return out


# ---------------------------------------------------------------- output

def fmt_time(ms):
    if ms is None:
        return "-"
    if ms < 1e-3:
        return f"{ms * 1e6:.0f} ns"
    if ms < 1.0:
        return f"{ms * 1e3:.1f} us"
    if ms < 1e3:
        return f"{ms:.2f} ms"
    return f"{ms / 1e3:.3f} s"


def fmt_num(x, spec, suffix=""):
    return "-" if x is None else format(x, spec) + suffix


def render(rows, torch_note, show_all):
    cols = ["component", "impl", "shape", "dtype", "time", "GFLOP/s", "% peak", "vs ref", "vs torch"]
    lines = []
    body = []
    hidden = 0
    for r in rows:
        if not r["conventional"] and not show_all:
            hidden += 1
            continue
        vs_torch = fmt_num(r["ratio_vs_torch"], ".2f", "x")
        if r["ratio_vs_torch"] is not None and r.get("torch_dtype") not in (None, r["dtype"]):
            vs_torch += f" ({r['torch_dtype']})"
        if r["ratio_vs_torch"] is None and torch_note and r["component"].startswith("transformer_layer") \
                and r["impl"] != "pytorch":
            vs_torch = "n/a"
        vs_ref = fmt_num(r["ratio_vs_reference"], ".2f", "x")
        if r["ratio_vs_reference"] is not None and r.get("reference_dtype") not in (None, r["dtype"]):
            vs_ref += f" ({r['reference_dtype']})"
        body.append([r["component"], r["impl"] or "-", r["shape"] or "-", r["dtype"] or "-",
                     "ERROR" if r["error"] else fmt_time(r["time_ms"]), fmt_num(r["gflops"], ".1f"),
                     fmt_num(r["pct_peak"], ".0f", "%"), vs_ref, vs_torch])
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(cols)]
    right = set(range(4, len(cols)))

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    lines.append(line(cols))
    lines.append("|" + "|".join(("-" * (w + 1) + ":") if i in right else ("-" * (w + 2))
                                for i, w in enumerate(widths)) + "|")
    lines.extend(line(b) for b in body)
    if hidden:
        lines.append(f"({hidden} benchmark(s) not named <component>/<impl>/<shape>/<dtype> left out; "
                     "--all shows them, --json keeps them)")
    for r in rows:
        if r["error"]:
            lines.append(f"error: {r['component']}/{r['impl']}/{r['shape']}/{r['dtype']}: {r['error']}")
    return "\n".join(lines)


def machine_info(gbench_files, meta):
    m = {"platform": platform.platform(), "node": platform.node(), "cpu_count": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if ln.startswith("model name"):
                    m["cpu"] = ln.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        m["loadavg_at_table"] = [float(x) for x in open("/proc/loadavg").read().split()[:3]]
    except (OSError, ValueError):
        pass
    for _, data in gbench_files:
        ctx = data.get("context")
        if ctx:
            m["gbench_context"] = {k: ctx.get(k) for k in ("date", "host_name", "num_cpus", "mhz_per_cpu",
                                                            "cpu_scaling_enabled", "caches", "load_avg",
                                                            "library_build_type") if k in ctx}
            break
    m.update(meta)
    return m


IMPL_ORDER = {"reference": 0, "bare_gemm": 1, "optimized": 2, "pytorch": 3}


def sort_rows(rows):
    """Groups rows by component, then shape (first appearance order), then impl."""
    known = ["transformer_layer_fwd", "transformer_layer_fwd_bwd", "attention_fwd", "attention_fwd_bwd",
             "gemm", "linear_fwd", "linear_bwd", "linear_fwd_bwd"]
    comp_i, shape_i = {c: i for i, c in enumerate(known)}, {}
    for r in rows:
        comp_i.setdefault(r["component"], len(comp_i))
        shape_i.setdefault((r["component"], r["shape"]), len(shape_i))
    return sorted(rows, key=lambda r: (not r["conventional"], comp_i[r["component"]],
                                       shape_i[(r["component"], r["shape"])], IMPL_ORDER.get(r["impl"], 4)))


def build(gbench_files, torch, torch_note, torch_stat="median"):
    rows = sort_rows(collect_rows(gbench_files) + torch_rows(torch, torch_stat))
    peaks = pair(rows)
    targets = evaluate_targets(rows, torch_note)
    return rows, peaks, targets


def report(rows, peaks, targets, torch, torch_note, show_all):
    out = [render(rows, torch_note, show_all), ""]
    if peaks:
        out.append("measured GEMM peak (best bare_gemm): " +
                   ", ".join(f"{d} {g:.1f} GFLOP/s" for d, g in sorted(peaks.items())))
    else:
        out.append("measured GEMM peak: no bare_gemm rows, % peak not computed")
    if torch_note:
        out.append(f"PyTorch baseline: n/a ({torch_note})")
    elif torch:
        out.append(f"PyTorch baseline: torch {torch.get('torch_version')}, {torch.get('threads')} threads, "
                   f"{torch.get('shape')} {torch.get('dtype')}, attention {torch.get('attention', 'megatron')}, "
                   f"load {torch.get('loadavg_before', '?')} -> {torch.get('loadavg_after', '?')}: forward {fmt_time(torch.get('forward_ms'))} "
                   f"(best {fmt_time(torch.get('forward_best_ms'))}), forward+backward "
                   f"{fmt_time(torch.get('forward_backward_ms'))} (best {fmt_time(torch.get('forward_backward_best_ms'))})")
    out.append("")
    out.append("targets:")
    for t in targets:
        out.append(f"  {t['status']:6} {t['target']}: {t['detail']}")
    return "\n".join(out)


def load_json(path):
    with open(path) as f:
        return json.load(f)


def main(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("gbench", nargs="*", help="Google Benchmark JSON files (--benchmark_format=json output)")
    p.add_argument("--torch", metavar="FILE", help="bench/torch_layer.py's JSON")
    p.add_argument("--torch-note", metavar="TEXT", help="why there is no torch baseline (printed; column n/a)")
    p.add_argument("--json", metavar="FILE", help="write table, torch, benchmarks, machine, targets here")
    p.add_argument("--meta", metavar="KEY=VALUE", action="append", default=[], help="extra machine/run info")
    p.add_argument("--torch-stat", choices=["median", "best"], default="median",
                   help="which torch time the ratios use (default median of its runs)")
    p.add_argument("--all", action="store_true", help="also show benchmarks outside the naming convention")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target FAILs")
    p.add_argument("--self-test", action="store_true", help="run the built-in tests on synthetic JSON")
    a = p.parse_args(argv)
    if a.self_test:
        return self_test()

    gbench_files = []
    torch_from_doc = None
    for path in a.gbench:
        try:
            data = load_json(path)
            if "table" in data:  # a previous --json output: take its Google Benchmark documents
                gbench_files.extend((d.get("file", "?"), d) for d in data.get("benchmarks", []))
                if a.torch is None and data.get("torch") and not data["torch"].get("error"):
                    a.torch = path + "#torch"
                    torch_from_doc = data["torch"]
            else:
                gbench_files.append((os.path.basename(path).removesuffix(".json"), data))
        except (OSError, json.JSONDecodeError) as e:
            print(f"bench_table.py: cannot read {path}: {e}", file=sys.stderr)
            return 2
    torch, torch_note = None, a.torch_note
    if a.torch and a.torch.endswith("#torch"):
        torch = torch_from_doc
    elif a.torch:
        try:
            torch = load_json(a.torch)
        except (OSError, json.JSONDecodeError) as e:
            torch_note = torch_note or f"cannot read {a.torch}: {e}"
    if torch and torch.get("error") and not torch_note:
        torch_note = torch["error"]
    if torch is None and not torch_note:
        torch_note = "not run"

    rows, peaks, targets = build(gbench_files, torch, torch_note, a.torch_stat)
    for label, data in gbench_files:
        load = (data.get("context") or {}).get("load_avg")
        if load and load[0] > 1.0:
            print(f"warning: load average {load} when {label} started (2-core machine: timings are noisy)")
    print(report(rows, peaks, targets, torch, torch_note, a.all))
    if a.json:
        meta = dict(kv.split("=", 1) for kv in a.meta if "=" in kv)
        doc = {"table": rows, "peaks_gflops": peaks, "targets": targets,
               "torch": torch if torch else {"error": torch_note},
               "benchmarks": [dict(data, file=label) for label, data in gbench_files],
               "machine": machine_info(gbench_files, meta)}
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"\nwrote {a.json}")
    if a.strict and any(t["status"] == "FAIL" for t in targets):
        return 1
    return 0


# ---------------------------------------------------------------- self-test

def self_test():
    import tempfile

    def it(name, ms, unit="ms", **counters):
        t = {"ns": 1e6, "us": 1e3, "ms": 1.0, "s": 1e-3}[unit] * ms
        return dict({"name": name, "run_name": name, "run_type": "iteration", "iterations": 1,
                     "real_time": t, "cpu_time": t, "time_unit": unit}, **counters)

    def agg(name, kind, ms, **counters):
        return dict(it(name, ms, **counters), name=f"{name}_{kind}", run_type="aggregate", aggregate_name=kind)

    L = LAYER_SHAPE
    lf = 2 * 2048 * (4 * 1024 ** 2 + 8 * 1024 ** 2) + 4 * 2048 ** 2 * 1024
    g1 = {"context": {"host_name": "test", "num_cpus": 2}, "benchmarks": [
        it("BM_ReferenceLayerForwardBackward/1024/16/2048/iterations:1", 12700, unit="s",
           **{"GFLOP/s": 3 * lf * 1e-9 / 12.7}),
        it(f"transformer_layer_fwd/optimized/{L}/fp32", 700, flops=lf),
        it(f"transformer_layer_fwd_bwd/optimized/{L}/fp32/iterations:1/real_time", 2000, flops=3 * lf),
        it(f"transformer_layer_fwd/reference/{L}/fp64", 4000, flops=lf),
    ]}
    m, n, k = 2048, 3072, 1024
    g2 = {"context": {}, "benchmarks": [
        it(f"gemm/bare_gemm/m{m}_n{n}_k{k}/fp32", 200, unit="us", flops=2 * m * n * k),  # noise, superseded
        it(f"gemm/bare_gemm/m{m}_n{n}_k{k}/fp32", 120, flops=2 * m * n * k),
        it(f"gemm/bare_gemm/m{m}_n{n}_k{k}/fp32", 110, flops=2 * m * n * k),  # best of 3 -> 117 GFLOP/s
        agg(f"linear_fwd/optimized/m{m}_n{n}_k{k}/fp32", "mean", 999, flops=2 * m * n * k),
        agg(f"linear_fwd/optimized/m{m}_n{n}_k{k}/fp32", "median", 125, flops=2 * m * n * k),  # 88%
        it(f"linear_fwd/optimized/m{m}_n{m}_k{k}/fp32", 100, flops=2 * m * m * k),  # no bare gemm -> absent
        it(f"linear_fwd/reference/m{m}_n{n}_k{k}/fp64", 500, flops=2 * m * n * k),
        it("attention_fwd/optimized/b1_a16_s16384_d64_causal/fp32", 9000, flops=1, extra_memory_bytes=80 * MIB),
        it("attention_fwd/optimized/b1_a16_s2048_d64_causal/fp32", 90, flops=1, extra_memory_bytes=1 * MIB),
        it("Philox4x32_10/blocks", 0.01, unit="ns"),
        {"name": "gelu_fwd/optimized/n2048_h4096/fp32", "run_name": "gelu_fwd/optimized/n2048_h4096/fp32",
         "run_type": "iteration", "error_occurred": True, "error_message": "skipped: no kernel"},
    ]}
    torch = {"component": "transformer_layer", "shape": L, "dtype": "fp32", "threads": 2,
             "torch_version": "1.13.1", "forward_ms": 1500.0, "forward_backward_ms": 3600.0,
             "forward_flops": lf, "forward_backward_flops": 3 * lf,
             "runs": [{"pass": "forward", "ms": [1500.0] * 5}, {"pass": "forward_backward", "ms": [3600.0] * 5}],
             "linear": [{"component": "linear_fwd", "shape": f"m{m}_n{n}_k{k}", "dtype": "fp32",
                         "flops": 2 * m * n * k, "ms": 150.0, "runs": [150.0]}]}
    fails = []

    def check(cond, what):
        if not cond:
            fails.append(what)

    def close(x, y, what, tol=1e-6):
        check(x is not None and abs(x - y) <= tol * max(1.0, abs(y)), f"{what}: {x} != {y}")

    assert parse_name("a/b/c/d/iterations:1/real_time") == ("a", "b", "c", "d", True)
    check(parse_name("Philox4x32_10/blocks")[4] is False, "unconventional name")
    check(parse_name("BM_ReferenceLayerForwardBackward/128/4/128/iterations:1")[:4] ==
          ("transformer_layer_fwd_bwd", "reference", "h128_a4_f512_s128_b1", "fp64"), "legacy mapping")
    check(shape_token("b1_a16_s16384_d64_causal", "s") == 16384, "shape_token")

    rows, peaks, targets = build([("g1", g1), ("g2", g2)], torch, None)
    R = {(r["component"], r["impl"], r["shape"], r["dtype"]): r for r in rows}
    gemm = R[("gemm", "bare_gemm", f"m{m}_n{n}_k{k}", "fp32")]
    close(gemm["time_ms"], 110, "best of iteration runs")
    check(gemm["time_source"] == "best of 3", "time source")
    close(peaks["fp32"], 2 * m * n * k / 110e6, "peak")
    lin = R[("linear_fwd", "optimized", f"m{m}_n{n}_k{k}", "fp32")]
    close(lin["time_ms"], 125, "median aggregate preferred")
    close(lin["pct_peak"], 100 * 110 / 125, "% peak")
    close(lin["ratio_vs_reference"], 4.0, "linear vs fp64 reference")
    close(lin["ratio_vs_torch"], 150 / 125, "linear vs torch")
    fwd = R[("transformer_layer_fwd", "optimized", L, "fp32")]
    close(fwd["ratio_vs_torch"], 1500 / 700, "fwd vs torch")
    close(fwd["ratio_vs_reference"], 4000 / 700, "fwd vs reference")
    fb = R[("transformer_layer_fwd_bwd", "optimized", L, "fp32")]
    close(fb["ratio_vs_torch"], 1.8, "fwd_bwd vs torch (suffixes stripped)")
    close(fb["ratio_vs_reference"], 12700 / 2000, "fwd_bwd vs legacy reference")
    ref = R[("transformer_layer_fwd_bwd", "reference", L, "fp64")]
    close(ref["gflops"], 3 * lf * 1e-9 / 12.7, "legacy GFLOP/s counter", tol=1e-9)
    close(R[("transformer_layer_fwd_bwd", "pytorch", L, "fp32")]["gflops"], 3 * lf / 3600e6, "torch GFLOP/s")
    check(R[("gelu_fwd", "optimized", "n2048_h4096", "fp32")]["error"] == "skipped: no kernel", "error row")
    T = {t["target"].split(" ")[0]: t["status"] for t in targets}
    check(T[f"transformer_layer_fwd/optimized/{L}/fp32"] == "PASS", "fwd target PASS")
    check(T[f"transformer_layer_fwd_bwd/optimized/{L}/fp32"] == "PASS", "fwd_bwd target PASS")
    check(T[f"linear_fwd/optimized/m{m}_n{n}_k{k}/fp32"] == "PASS", "linear 88% PASS")
    check(T[f"linear_fwd/optimized/m{m}_n{m}_k{k}/fp32"] == "absent", "linear without bare gemm absent")
    check(T["attention_fwd/optimized/b1_a16_s16384_d64_causal/fp32"] == "FAIL", "attention 80 MiB FAIL")
    check(T["every"] == "FAIL", "unpaired optimized rows reported")
    close(R[("transformer_layer_fwd_bwd", "reference", L, "fp64")]["ratio_vs_torch"], 3600 / 12700,
          "fp64 reference vs fp32 torch")
    check(R[("transformer_layer_fwd", "reference", L, "fp64")]["torch_dtype"] == "fp32", "torch dtype noted")  # attention/gelu have no reference
    text = report(rows, peaks, targets, torch, None, False)
    check("Philox" not in text and "1 benchmark(s) not named" in text, "unconventional rows hidden")

    rows, _, _ = build([("g1", g1)], dict(torch, forward_best_ms=1400.0), None, "best")
    R = {(r["component"], r["impl"], r["shape"], r["dtype"]): r for r in rows}
    close(R[("transformer_layer_fwd", "optimized", L, "fp32")]["ratio_vs_torch"], 2.0, "--torch-stat best")

    # fwd below 2x, no torch at all
    g3 = {"benchmarks": [it(f"transformer_layer_fwd/optimized/{L}/fp32", 1000, flops=lf)]}
    rows, peaks, targets = build([("g3", g3)], {"error": "no torch"}, "no torch")
    check(targets[0]["status"] == "absent" and "no torch" in targets[0]["detail"], "torch missing -> absent")
    check("n/a" in report(rows, peaks, targets, None, "no torch", False), "n/a column")
    rows, peaks, targets = build([("g3", g3)], torch, None)
    check(targets[0]["status"] == "FAIL", "1.5x fwd FAIL")

    # end to end through files and main()
    with tempfile.TemporaryDirectory() as d:
        paths = []
        for name, data in (("g1", g1), ("g2", g2)):
            paths.append(os.path.join(d, name + ".json"))
            with open(paths[-1], "w") as f:
                json.dump(data, f)
        tp = os.path.join(d, "torch.json")
        with open(tp, "w") as f:
            json.dump(torch, f)
        out = os.path.join(d, "out.json")
        import contextlib
        import io
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = main(["--torch", tp, "--json", out, "--meta", "commit=abc", *paths])
            rc_strict = main(["--torch", tp, "--strict", *paths])
        check(rc == 0 and rc_strict == 1, f"exit codes {rc} {rc_strict}")
        doc = load_json(out)
        check(set(doc) >= {"table", "torch", "benchmarks", "machine", "targets"}, "json keys")
        check(doc["machine"].get("commit") == "abc" and len(doc["benchmarks"]) == 2, "json content")

    if fails:
        print("bench_table.py self-test FAILED:\n  " + "\n  ".join(fails))
        return 1
    print("bench_table.py self-test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
