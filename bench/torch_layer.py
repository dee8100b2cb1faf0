#!/usr/bin/python3
"""PyTorch CPU baseline: one GPT transformer layer as Megatron-core's local spec.

pre-LayerNorm (eps 1e-5) -> fused QKV linear (bias) -> core attention written
as Megatron's torch path (baddbmm with 1/sqrt(d), masked_fill(-10000) of the
causal upper triangle, softmax, bmm) -> output projection (bias) ->
bias-dropout-add (p = 0) -> pre-MLP LayerNorm -> fc1 (bias) -> erf GELU ->
fc2 (bias) -> residual.

Measures forward (torch.no_grad) and forward + backward (loss = (out * grad).sum(),
gradients of every parameter and the input): warm-up runs, then the median and
best of --runs. Prints one JSON object on stdout. With --linear also times the
layer's four linears alone (forward, no_grad).

Run with Debian's interpreter (python3-torch 1.13.1):
    /usr/bin/python3 bench/torch_layer.py [--seq 2048 --hidden 1024 ...]
Exit status 2 and {"error": ...} on stdout when torch cannot be imported.
"""
import argparse
import json
import math
import os
import platform
import statistics
import sys
import time


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--ffn", type=int, default=4096)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=["fp32", "fp64", "bf16"], default="fp32")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--runs", type=int, default=5, help="timed runs per pass (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per pass first (default 1)")
    p.add_argument("--no-backward", action="store_true", help="forward only")
    p.add_argument("--linear", action="store_true", help="also time the bare linears of the layer")
    p.add_argument("--attention", choices=["megatron", "additive"], default="megatron",
                   help="megatron: baddbmm(alpha=1/sqrt(d)) + masked_fill(-10000) + softmax + bmm "
                        "(Megatron's torch path, default); additive: bmm, divide by sqrt(d), add a -inf "
                        "triu mask matrix, softmax, bmm (the variant timed in /work/shared/toolchain.md)")
    p.add_argument("--seed", type=int, default=1234)
    a = p.parse_args(argv)
    if a.hidden % a.heads:
        p.error("--hidden must be a multiple of --heads")
    if min(a.hidden, a.heads, a.ffn, a.seq, a.batch, a.threads, a.runs) < 1 or a.warmup < 0:
        p.error("sizes, --threads and --runs must be positive")
    return a


def layer_shape(a):
    return f"h{a.hidden}_a{a.heads}_f{a.ffn}_s{a.seq}_b{a.batch}"


def forward_flops(a):
    """Model FLOPs of one forward: the GEMMs plus the full s x s attention square."""
    s, b, h, f = a.seq, a.batch, a.hidden, a.ffn
    gemms = 2.0 * s * b * (3 * h * h + h * h + 2 * h * f)
    attention = 4.0 * b * s * s * h
    return gemms + attention


def main(argv):
    a = parse_args(argv)
    try:
        import torch
        import torch.nn.functional as F
    except Exception as e:  # ImportError, or a broken install raising something else
        msg = (f"torch is not importable by {sys.executable} ({type(e).__name__}: {e}); "
               "install Debian's python3-torch and run with /usr/bin/python3")
        print(f"torch_layer.py: {msg}", file=sys.stderr)
        print(json.dumps({"component": "transformer_layer", "error": msg}))
        return 2

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    dtype = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16}[a.dtype]
    h, nh, f, s, b = a.hidden, a.heads, a.ffn, a.seq, a.batch
    d = h // nh

    def param(*shape, std=0.02):
        return (torch.randn(*shape, dtype=dtype) * std).requires_grad_()

    P = {
        "ln1_w": torch.ones(h, dtype=dtype).requires_grad_(), "ln1_b": torch.zeros(h, dtype=dtype).requires_grad_(),
        "qkv_w": param(3 * h, h), "qkv_b": param(3 * h),
        "proj_w": param(h, h), "proj_b": param(h),
        "ln2_w": torch.ones(h, dtype=dtype).requires_grad_(), "ln2_b": torch.zeros(h, dtype=dtype).requires_grad_(),
        "fc1_w": param(f, h), "fc1_b": param(f),
        "fc2_w": param(h, f), "fc2_b": param(h),
    }
    # Megatron's causal mask: True above the diagonal = masked.
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)
    additive_mask = torch.zeros(s, s, dtype=dtype).masked_fill(mask, float("-inf"))
    x0 = torch.randn(s, b, h, dtype=dtype)  # Megatron's [s, b, h] layout
    gout = torch.randn(s, b, h, dtype=dtype)
    scale = 1.0 / math.sqrt(d)

    def layer(x):
        # self-attention block
        ln = F.layer_norm(x, (h,), P["ln1_w"], P["ln1_b"], eps=1e-5)
        qkv = F.linear(ln, P["qkv_w"], P["qkv_b"])  # [s, b, 3h]
        q, k, v = qkv.split(h, dim=-1)
        # [s, b, nh, d] -> [b*nh, s, d]
        q = q.reshape(s, b * nh, d).transpose(0, 1)
        k = k.reshape(s, b * nh, d).transpose(0, 1)
        v = v.reshape(s, b * nh, d).transpose(0, 1)
        if a.attention == "megatron":
            scores = torch.baddbmm(torch.empty(b * nh, s, s, dtype=dtype), q, k.transpose(1, 2),
                                   beta=0.0, alpha=scale)
            scores = scores.view(b, nh, s, s).masked_fill(mask, -10000.0)
        else:
            scores = torch.bmm(q, k.transpose(1, 2)) / math.sqrt(d)
            scores = scores.view(b, nh, s, s) + additive_mask
        probs = torch.softmax(scores, dim=-1)  # attention dropout p = 0
        ctx = torch.bmm(probs.view(b * nh, s, s), v)  # [b*nh, s, d]
        ctx = ctx.transpose(0, 1).reshape(s, b, h)
        attn = F.linear(ctx, P["proj_w"])  # bias handed to bias-dropout-add as in Megatron
        x = x + F.dropout(attn + P["proj_b"], p=0.0, training=False)
        # MLP block
        ln = F.layer_norm(x, (h,), P["ln2_w"], P["ln2_b"], eps=1e-5)
        y = F.gelu(F.linear(ln, P["fc1_w"], P["fc1_b"]))  # erf GELU
        y = F.linear(y, P["fc2_w"])
        return x + F.dropout(y + P["fc2_b"], p=0.0, training=False)

    def fwd():
        with torch.no_grad():
            out = layer(x0)
        return float(out[0, 0, 0])

    def fwd_bwd():
        for t in P.values():
            t.grad = None
        x = x0.clone().requires_grad_()
        out = layer(x)
        loss = (out * gout).sum()
        loss.backward()
        return float(x.grad[0, 0, 0])

    def timed(fn, label):
        for _ in range(a.warmup):
            fn()
        ms = []
        for _ in range(a.runs):
            t0 = time.perf_counter()
            fn()
            ms.append((time.perf_counter() - t0) * 1e3)
        print(f"torch_layer.py: {label}: median {statistics.median(ms):.1f} ms, best {min(ms):.1f} ms "
              f"({' '.join(f'{m:.0f}' for m in ms)})", file=sys.stderr)
        return ms

    fl = forward_flops(a)
    result = {
        "component": "transformer_layer",
        "shape": layer_shape(a),
        "dtype": a.dtype,
        "hidden": h, "heads": nh, "ffn": f, "seq": s, "batch": b, "causal": True,
        "threads": a.threads, "warmup": a.warmup, "attention": a.attention,
        "torch_version": torch.__version__,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "forward_flops": fl,
        "forward_backward_flops": 3 * fl,
    }
    if hasattr(os, "getloadavg"):
        result["loadavg_before"] = [round(x, 2) for x in os.getloadavg()]
    runs = []
    f_ms = timed(fwd, "forward")
    runs.append({"pass": "forward", "ms": f_ms})
    result["forward_ms"] = statistics.median(f_ms)
    result["forward_best_ms"] = min(f_ms)
    if not a.no_backward:
        fb_ms = timed(fwd_bwd, "forward+backward")
        runs.append({"pass": "forward_backward", "ms": fb_ms})
        result["forward_backward_ms"] = statistics.median(fb_ms)
        result["forward_backward_best_ms"] = min(fb_ms)
    result["runs"] = runs

    if a.linear:
        linears = []
        m = s * b
        for name, n, k in (("qkv", 3 * h, h), ("proj", h, h), ("fc1", f, h), ("fc2", h, f)):
            x = torch.randn(m, k, dtype=dtype)
            w = torch.randn(n, k, dtype=dtype)
            bias = torch.randn(n, dtype=dtype)

            def lin(x=x, w=w, bias=bias):
                with torch.no_grad():
                    return float(F.linear(x, w, bias)[0, 0])

            ms = timed(lin, f"linear {name} m{m}_n{n}_k{k}")
            linears.append({"name": name, "component": "linear_fwd", "shape": f"m{m}_n{n}_k{k}", "dtype": a.dtype,
                            "flops": 2.0 * m * n * k, "ms": statistics.median(ms), "best_ms": min(ms), "runs": ms})
        result["linear"] = linears

    if hasattr(os, "getloadavg"):
        result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
