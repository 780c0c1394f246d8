"""Local attention, forward + backward: the local-attention package, our reference, our flex path,
and dense SDPA (full attention, no window: what ignoring locality costs).

    python benchmarks/local_attention.py [--skip-dense-above N] [--ns 8192,32768,131072]

b=1, 8 heads x 64, bf16. Median ms from triton.testing.do_bench; peak MiB is the allocator's peak
during one fwd+bwd over what the inputs already hold. Every row runs in its own try/except, so an
OOM or a compile failure prints in its cell and the table goes on.
"""

from __future__ import annotations

import argparse
import sys

import torch

try:
    import triton
    from triton.testing import do_bench
except ImportError:  # pragma: no cover
    triton = None

from colt5.local_attention import local_attention

B, H, D = 1, 8, 64
DTYPE = torch.bfloat16
# (window, look_backward, look_forward, causal)
CONFIGS = [(128, 1, 1, False), (64, 1, 1, False), (128, 1, 0, True)]


def _package_fn(w: int, lb: int, lf: int, causal: bool):
    from local_attention import LocalAttention

    mod = LocalAttention(w, causal=causal, look_backward=lb, look_forward=lf, autopad=True, use_rotary_pos_emb=False)
    return lambda q, k, v: mod(q, k, v)


def _ours(backend: str, w: int, lb: int, lf: int, causal: bool):
    return lambda q, k, v: local_attention(
        q, k, v, window_size=w, causal=causal, look_backward=lb, look_forward=lf, backend=backend
    )


def _dense_sdpa(w: int, lb: int, lf: int, causal: bool):
    return lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _measure(fn, q, k, v, do):
    def step():
        fn(q, k, v).backward(do)

    step()  # compile / warm up outside the timing and the memory peak
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    ms = do_bench(step, grad_to_none=[q, k, v], return_mode="median")
    return ms, peak


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ns", default="8192,32768,131072")
    ap.add_argument("--skip-dense-above", type=int, default=1 << 30, help="skip dense SDPA for n above this")
    args = ap.parse_args()
    ns = [int(x) for x in args.ns.split(",")]

    if not torch.cuda.is_available() or triton is None:
        print("needs a CUDA device and triton")
        return 1
    print(
        f"GPU {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
        f"b={B} h={H} d={D} {str(DTYPE).replace('torch.', '')}, forward+backward"
    )
    try:
        import local_attention as _pkg  # noqa: F401

        has_pkg = True
    except ImportError:
        has_pkg = False
        print("local-attention package not importable: its rows are skipped")

    impls = [("package", _package_fn)] if has_pkg else []
    impls += [
        ("ours reference", lambda *c: _ours("reference", *c)),
        ("ours flex", lambda *c: _ours("flex", *c)),
        ("dense SDPA (no window)", _dense_sdpa),
    ]

    for w, lb, lf, causal in CONFIGS:
        print(f"\n## window {w}, look {lb}/{lf}, {'causal' if causal else 'bidirectional'}\n")
        print("| n | implementation | ms | peak MiB | x package |")
        print("|---|---|---|---|---|")
        for n in ns:
            gen = torch.Generator(device="cuda").manual_seed(n)
            q, k, v, do = (
                torch.randn(B, H, n, D, device="cuda", dtype=DTYPE, generator=gen) for _ in range(4)
            )
            for t in (q, k, v):
                t.requires_grad_()
            base_ms = None
            for name, make in impls:
                if name.startswith("dense") and n > args.skip_dense_above:
                    print(f"| {n} | {name} | skipped | | |")
                    continue
                try:
                    ms, peak = _measure(make(w, lb, lf, causal), q, k, v, do)
                    if name == "package":
                        base_ms = ms
                    ratio = f"{base_ms / ms:.2f}x" if base_ms else ""
                    print(f"| {n} | {name} | {ms:.3f} | {peak:.0f} | {ratio} |")
                except Exception as e:  # one failing row must not kill the table
                    msg = f"{type(e).__name__}: {e}".splitlines()[0][:120]
                    print(f"| {n} | {name} | error | | {msg} |")
                finally:
                    q.grad = k.grad = v.grad = None
                    torch.cuda.empty_cache()
                sys.stdout.flush()
            try:
                with torch.no_grad():
                    kw = dict(window_size=w, causal=causal, look_backward=lb, look_forward=lf)
                    diff = (local_attention(q, k, v, backend="flex", **kw).float()
                            - local_attention(q, k, v, backend="reference", **kw).float()).abs().max().item()
                print(f"| {n} | max abs diff flex vs reference (bf16 out) | {diff:.2e} | | |")
            except Exception as e:
                print(f"| {n} | max abs diff flex vs reference | error | | {type(e).__name__}: {str(e)[:100]} |")
            del q, k, v, do
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
