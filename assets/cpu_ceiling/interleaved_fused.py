# Steps interleaved in one process: this repo's model, the same with q/k/v and gate/up each as one GEMM
# (fused_projections_patch.py), nanoGPT's GPT (NANOGPT=path of a checkout). MALLOPT=1: glibc keeps freed memory.
#   NANOGPT=../nanoGPT N=16 MALLOPT=1 python assets/cpu_ceiling/interleaved_fused.py
import sys, time, torch, importlib.util, ctypes, os, statistics as st
if os.environ.get("MALLOPT"):
    libc = ctypes.CDLL("libc.so.6"); libc.mallopt(-3, 1 << 30); libc.mallopt(-1, (1 << 31) - 1)
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE))); sys.path.insert(0, HERE)
import model as M
from optim import configure_optimizer
spec = importlib.util.spec_from_file_location("nano", os.path.join(os.environ["NANOGPT"], "model.py")); nano = importlib.util.module_from_spec(spec); spec.loader.exec_module(nano)
orig = (M.Attention.forward, M.MLP.forward)
import fused_projections_patch  # noqa: F401,E402  (swaps the forwards; the originals are kept above)
fused = (M.Attention.forward, M.MLP.forward)
def build():
    torch.manual_seed(0)
    m = M.Transformer(M.ModelConfig(vocab_size=8192, n_layer=6, n_head=6, n_kv_head=6, n_embd=384, max_seq_len=256, kernels="torch"))
    return m, configure_optimizer(m, 3e-3, 0.1, device_type="cpu")
m1, o1 = build(); m2, o2 = build()
gpt = nano.GPT(nano.GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=8192, bias=False, dropout=0.0))
gopt = gpt.configure_optimizers(0.1, 3e-3, (0.9, 0.95), "cpu")
g = torch.Generator().manual_seed(0)
batches = [torch.randint(0, 8192, (16, 257), generator=g) for _ in range(4)]
def mk(m, o, fw=None):
    def step(i):
        if fw: M.Attention.forward, M.MLP.forward = fw
        xy = batches[i % 4]
        _, loss = m(xy[:, :-1].contiguous(), xy[:, 1:].contiguous()); loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); o.step(); o.zero_grad(set_to_none=True)
        return loss.item()
    return step
steps = {"ours": mk(m1, o1, orig), "ours_fused": mk(m2, o2, fused), "nano": mk(gpt, gopt)}
for i in range(2):
    ls = {k: f(i) for k, f in steps.items()}
print("losses step1", ls)
N = int(os.environ.get("N", 8)); ts = {k: [] for k in steps}
for i in range(N):
    for k, f in steps.items():
        t = time.perf_counter(); f(i); ts[k].append(time.perf_counter() - t)
med = {k: st.median(v) for k, v in ts.items()}
print(" ".join(f"{k} {v*1e3:.0f}ms" for k, v in med.items()), "| ratio nano/ours %.3f nano/fused %.3f" % (med["nano"] / med["ours"], med["nano"] / med["ours_fused"]), "mallopt", bool(os.environ.get("MALLOPT")))
