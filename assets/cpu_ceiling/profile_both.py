# Profiles 2 interleaved steps of each model (self CPU time by op and matmul shape); NANOGPT=path, MALLOPT=1 as
# in interleaved_fused.py.
import sys, time, torch, importlib.util, ctypes, os
from collections import defaultdict
if os.environ.get("MALLOPT"):
    libc = ctypes.CDLL("libc.so.6"); libc.mallopt(-3, 1 << 30); libc.mallopt(-1, (1 << 31) - 1)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from model import ModelConfig, Transformer
from optim import configure_optimizer
spec = importlib.util.spec_from_file_location("nano", os.path.join(os.environ["NANOGPT"], "model.py")); nano = importlib.util.module_from_spec(spec); spec.loader.exec_module(nano)
torch.manual_seed(0)
model = Transformer(ModelConfig(vocab_size=8192, n_layer=6, n_head=6, n_kv_head=6, n_embd=384, max_seq_len=256, kernels="torch"))
opt = configure_optimizer(model, 3e-3, 0.1, device_type="cpu")
gpt = nano.GPT(nano.GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=8192, bias=False, dropout=0.0))
gopt = gpt.configure_optimizers(0.1, 3e-3, (0.9, 0.95), "cpu")
xy = torch.randint(0, 8192, (16, 257))
def mk(m, o):
    def step():
        _, loss = m(xy[:, :-1].contiguous(), xy[:, 1:].contiguous()); loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); o.step(); o.zero_grad(set_to_none=True)
    return step
steps = {"ours": mk(model, opt), "nano": mk(gpt, gopt)}
for _ in range(2):
    for f in steps.values(): f()
from torch.profiler import profile, ProfilerActivity
agg = {k: defaultdict(lambda: [0.0, 0]) for k in steps}
wall = defaultdict(float)
for _ in range(2):
    for k, f in steps.items():
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            t = time.perf_counter(); f(); wall[k] += time.perf_counter() - t
        for e in prof.key_averages(group_by_input_shape=True):
            if e.key in ("aten::mm", "aten::addmm_", "aten::addmm"):
                a = agg[k][(e.key, e.input_shapes[0][0] if e.input_shapes else None, str(e.input_shapes[:2]))]
                a[0] += e.self_cpu_time_total; a[1] += e.count
            else:
                a = agg[k][("other", e.key, "")]; a[0] += e.self_cpu_time_total; a[1] += e.count
for k in steps:
    print("=====", k, "wall/step %.0f" % (wall[k] / 2 * 1e3), "mm total %.0f" % (sum(v[0] for kk, v in agg[k].items() if kk[0] != "other") / 2e3),
          "other total %.0f" % (sum(v[0] for kk, v in agg[k].items() if kk[0] == "other") / 2e3))
    for kk, v in sorted(agg[k].items(), key=lambda kv: -kv[1][0])[:16]:
        print(f"  {kk[0]:14s} {kk[2][:60]:60s} {kk[1] if kk[0]=='other' else '':40s} {v[0]/2e3:8.1f} ms  n={v[1]//2}")
