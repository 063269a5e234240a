"""PyTorch reference for the PCA reconstruction gradient: tests/fixtures/pca_grad.safetensors.

Long-CLIP's formula (methods.md §2.3): Xc = X - mean; U, S, Vh = torch.linalg.svd(Xc,
full_matrices=False); V = Vh[:k].T; R = Xc @ V @ V.T + mean. For each case the inputs X and G
(f32) and torch's R and dX = autograd of sum(R * G) (computed in float64) are stored as
`{case}.x`, `{case}.g`, `{case}.r`, `{case}.dx`. Well-conditioned spectra only (distinct
singular values), where torch's SVD backward is defined.

usage: python3 scripts/make_pca_fixture.py [OUT]
"""
import sys
import torch
from safetensors.torch import save_file

out = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/pca_grad.safetensors"
torch.manual_seed(0)
tensors = {}
for name, (b, d, k) in {"b64_d48_k32": (64, 48, 32), "b40_d64_k32": (40, 64, 32), "b9_d20_k3": (9, 20, 3)}.items():
    scales = torch.linspace(3.0, 0.2, d)  # a decaying, gapped spectrum
    x = (torch.randn(b, d) * scales).float()
    g = torch.randn(b, d).float()
    xd = x.double().requires_grad_(True)
    mean = xd.mean(0, keepdim=True)
    xc = xd - mean
    _, s, vh = torch.linalg.svd(xc, full_matrices=False)
    v = vh[:k].T
    r = xc @ v @ v.T + mean
    (r * g.double()).sum().backward()
    gap = (s[k - 1] - s[k]).item() if k < len(s) else float("inf")
    print(f"{name}: sigma_k {s[k-1].item():.4f}, gap {gap:.4f}")
    tensors[f"{name}.x"] = x
    tensors[f"{name}.g"] = g
    tensors[f"{name}.r"] = r.detach().float()
    tensors[f"{name}.dx"] = xd.grad.float()
save_file(tensors, out)
print("wrote", out)
