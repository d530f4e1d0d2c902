# fp32 GEMM throughput of this machine (torch.mm on squares): the ceiling any implementation's step meets
import time, torch
for n in (1024, 2048, 4096):
    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    torch.mm(a, b, out=c)
    k = 5 if n < 4096 else 2
    t = time.perf_counter()
    for _ in range(k):
        torch.mm(a, b, out=c)
    print(f"{n}^3: {2 * n ** 3 / ((time.perf_counter() - t) / k) / 1e9:.0f} GFLOP/s | torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
