# The experiment, not the repo's code: Attention and MLP forwards that compute q/k/v and gate/up each as one
# GEMM over the concatenated weights (the parameters stay separate modules). Training path only (no KV cache).
import torch, torch.nn.functional as F
import model as M, kernels
def attn_forward(self, x, cos, sin, doc_ids=None, cache=None, layer=None, cache_pos=None):
    B, T, _ = x.shape
    H, KV, hd = self.n_head, self.n_kv_head, self.head_dim
    w = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
    qkv = F.linear(x, w)
    q, k, v = qkv.split([H * hd, KV * hd, KV * hd], dim=-1)
    q, k, v = q.view(B, T, H, hd), k.view(B, T, KV, hd), v.view(B, T, KV, hd)
    q = kernels.apply_rope(q, cos, sin, impl=self.impl).transpose(1, 2)
    k = kernels.apply_rope(k, cos, sin, impl=self.impl).transpose(1, 2)
    v = v.transpose(1, 2)
    y = kernels.attention(q, k, v, causal=True, doc_ids=doc_ids, impl=self.impl)
    y = y.transpose(1, 2).reshape(B, T, H * hd)
    return self.o_proj(y)
def mlp_forward(self, x):
    gu = F.linear(x, torch.cat([self.gate_proj.weight, self.up_proj.weight]))
    g, u = gu.chunk(2, dim=-1)
    return self.down_proj(kernels.swiglu(g, u, impl=self.impl))
M.Attention.forward = attn_forward
M.MLP.forward = mlp_forward
