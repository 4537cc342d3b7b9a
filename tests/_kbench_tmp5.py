import torch, triton
import torch.nn.functional as F
from triton.testing import do_bench
import kernels.paged_prefill as pp
import kernels.paged_decode as pd
dev = "cuda"; dt = torch.bfloat16
def graph_time(fn, n=10):
    fn(); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n): fn()
    return do_bench(lambda: g.replay(), warmup=10, rep=50) * 1e3 / n
for lens, Hq, Hk, bs in [([640], 32, 32, 16), ([2048], 32, 32, 16), ([2048], 32, 8, 16), ([512]*8, 32, 32, 16), ([4096], 28, 4, 32)]:
    B = len(lens); L = max(lens); T = sum(lens); mb = -(-L // bs); nb = B * mb + 1
    kc = torch.randn(nb, bs, Hk, 128, device=dev, dtype=dt); vc = torch.randn_like(kc)
    bt = torch.randperm(nb, device=dev)[: B * mb].view(B, mb).int()
    q = torch.randn(T, Hq, 128, device=dev, dtype=dt)
    cu = torch.tensor([0] + lens, dtype=torch.int32, device=dev).cumsum(0, dtype=torch.int32)
    sl = torch.tensor(lens, dtype=torch.int32, device=dev)
    fl = sum(4 * l * l * 128 * Hq / 2 for l in lens)
    t = graph_time(lambda: pp.paged_prefill_attention_triton(q, kc, vc, bt, cu, sl, L, 0.088))
    qd = q.view(B, L, Hq, 128).transpose(1, 2); kd = torch.randn(B, Hk, L, 128, device=dev, dtype=dt)
    ts = graph_time(lambda: F.scaled_dot_product_attention(qd, kd, kd, is_causal=True, enable_gqa=True))
    print(f"prefill {lens[0]}x{B} Hq={Hq} Hk={Hk}: {t:.0f} us ({fl/t/1e6:.0f} TFLOP/s); dense SDPA {ts:.0f} us")
for B, L, Hq, Hk in [(1, 4096, 32, 32), (1, 32768, 32, 8), (64, 4096, 32, 8)]:
    mb = -(-L // 16); nb = B * mb + 1
    kc = torch.randn(nb, 16, Hk, 128, device=dev, dtype=dt); vc = torch.randn_like(kc)
    bt = torch.randperm(nb, device=dev)[: B * mb].view(B, mb).int()
    q = torch.randn(B, Hq, 128, device=dev, dtype=dt); sl = torch.full((B,), L, dtype=torch.int32, device=dev)
    t = graph_time(lambda: pd.paged_decode_attention_triton(q, kc, vc, bt, sl, 0.088))
    print(f"decode B={B} L={L} Hq={Hq} Hk={Hk}: {t:.1f} us, {2*B*L*Hk*128*2/t/1e3:.0f} GB/s")
