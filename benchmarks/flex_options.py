"""flex_attention kernel options for the light branch's sliding window, n = 32768, on one GPU.

    python benchmarks/flex_options.py

8 heads x 64, bf16, window 128 one back and one forward (our block mask). Median us of the
forward and of forward+backward for torch's default tiling and a few explicit ones.
"""
import sys
import torch
sys.path.insert(0, "benchmarks")  # timing.py, when run from the repo root
from timing import us
from colt5.local_attention import _block_mask
from torch.nn.attention.flex_attention import flex_attention

torch.manual_seed(0)
dev = "cuda"
n = 32768
print("GPU", torch.cuda.get_device_name(), torch.__version__)

q, k, v = (torch.randn(1, 8, n, 64, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
g = torch.randn(1, 8, n, 64, device=dev, dtype=torch.bfloat16)
bm = _block_mask(n, 128, 1, 1, False, False, torch.device(dev))
opts_list = [None,
             dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
             dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
             dict(BLOCK_M1=64, BLOCK_N1=128, BLOCK_M2=128, BLOCK_N2=64, num_warps=8, num_stages=2),
             dict(BLOCK_M1=32, BLOCK_N1=128, BLOCK_M2=128, BLOCK_N2=32, num_warps=4, num_stages=3),
             dict(BLOCK_M1=64, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=64, num_warps=4, num_stages=3),
             dict(BLOCK_M1=64, BLOCK_N1=128, BLOCK_M2=128, BLOCK_N2=64, num_warps=4, num_stages=3),
             ]
for opts in opts_list:
    try:
        fn = torch.compile(flex_attention, dynamic=False)
        def fwd():
            with torch.no_grad():
                fn(q, k, v, block_mask=bm, kernel_options=opts)
        def fb():
            out = fn(q, k, v, block_mask=bm, kernel_options=opts)
            torch.autograd.grad(out, (q, k, v), g)
        print(f"flex {opts}: fwd {us(fwd):.1f} us, f+b {us(fb):.1f} us", flush=True)
    except Exception as e:
        print(f"flex {opts}: failed {type(e).__name__}: {str(e)[:200]}", flush=True)
    torch._dynamo.reset()

