import torch, triton
from triton.testing import do_bench
import kernels.paged_decode as pd
dev = "cuda"; dt = torch.bfloat16
def graph_time(fn, n=20):
    fn(); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n): fn()
    return do_bench(lambda: g.replay(), warmup=10, rep=50) * 1e3 / n
for B, L, Hq, Hk, bs in [(1, 4096, 32, 32, 16), (1, 32768, 32, 8, 16), (1, 4096, 28, 4, 32), (64, 4096, 32, 8, 16), (32, 700, 32, 32, 16), (8, 2048, 32, 8, 16)]:
    mb = -(-L // bs); nb = B * mb + 1
    kc = torch.randn(nb, bs, Hk, 128, device=dev, dtype=dt); vc = torch.randn_like(kc)
    bt = torch.randperm(nb, device=dev)[: B * mb].view(B, mb).int()
    q = torch.randn(B, Hq, 128, device=dev, dtype=dt); sl = torch.full((B,), L, dtype=torch.int32, device=dev)
    by = 2 * B * L * Hk * 128 * 2
    ns = pd._num_splits(B, Hk, mb * bs, q.device)
    out = torch.empty_like(q); po = torch.empty((B, Hq, ns, 128), device=dev); pl = torch.empty((B, Hq, ns), device=dev)
    cur = graph_time(lambda: pd.paged_decode_attention_triton(q, kc, vc, bt, sl, 0.088))
    res = []
    for BN, W, S in [(64, 4, 2), (32, 4, 2), (128, 4, 2), (64, 4, 3), (128, 8, 2), (64, 8, 2), (128, 4, 3), (16, 4, 2)]:
        def k1():
            pd._paged_decode_kernel[(B, Hk, ns)](q, kc, vc, bt, sl, out, po, pl, 0.1, ns, q.stride(0), q.stride(1), kc.stride(0), bt.stride(0),
                KV_HEADS=Hk, GROUP=Hq // Hk, BLOCK_G=max(16, triton.next_power_of_2(Hq // Hk)), HEAD_DIM=128, BLOCK_D=128, PAGE_SIZE=bs, BLOCK_N=BN,
                MIN_SPLIT_KEYS=128, SPLIT=ns > 1, DOT_PRECISION="tf32", UPCAST_DOT=False, num_warps=W, num_stages=S)
        try:
            res.append(f"{BN}/w{W}/s{S}:{graph_time(k1):.1f}")
        except Exception as e:
            res.append(f"{BN}/w{W}/s{S}:ERR")
    print(f"B={B} L={L} Hq={Hq} Hk={Hk} splits={ns}: {cur:.1f}us {by/cur/1e3:.0f}GB/s | first kernel only:", " ".join(res))
