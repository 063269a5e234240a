"""The project's PyTorch reference of SmartCLIP fine-tuning (methods.md §3), for parity fixtures.

Implements the formulas clipforge implements (src/train/smartclip.rs), independently in torch:
  * towers: transformers' CLIPModel (f32, CPU); token states = text_model(...).last_hidden_state
    (after the final LayerNorm), text embeddings = text_projection(pooled EOT state);
  * mask network: one pre-LN causal block (text width/heads/activation) over the token states,
    attention pooling over the valid tokens with a learned query (scores q·(W_k h + b_k)/√W),
    projection to D, sigmoid, straight-through binarisation at 0.5 (m = s + (1[s>0.5] − s).detach());
  * S[a, b] = cos(I_a ⊙ m_b, T_b); L = λ_align·(CE(τS) + CE(τSᵀ)) + λ_sparsity·mean_b ‖m_b‖₁,
    τ = exp(logit_scale) (trained, not reset);
  * AdamW (β 0.9/0.999, ε 1e-8, wd 1e-2) with two groups: CLIP at --lr, the mask network at
    --mask-lr, both on the warm-up + cosine schedule; data in file order, micro-batches of --batch.
The captions of the fixture are single sentences, so SmartCLIP's per-step caption sampling has one
choice and needs no shared random generator. The initial mask network is written to
--mask-init-out (clipforge loads it with --mask-init).

usage: python3 scripts/smartclip_reference.py --model DIR --data train.jsonl --steps 12 --batch 8 \
          --lr 1e-3 --mask-lr 1e-2 --warmup 3 --mask-init-out mask_init.safetensors --out expected.json
"""
import argparse, json, math, os
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

BLOCK = ["layer_norm1.weight", "layer_norm1.bias", "self_attn.q_proj.weight", "self_attn.q_proj.bias",
         "self_attn.k_proj.weight", "self_attn.k_proj.bias", "self_attn.v_proj.weight", "self_attn.v_proj.bias",
         "self_attn.out_proj.weight", "self_attn.out_proj.bias", "layer_norm2.weight", "layer_norm2.bias",
         "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]


def init_mask(w, inter, d, gen):
    p = {}
    shapes = [[w], [w], [w, w], [w], [w, w], [w], [w, w], [w], [w, w], [w], [w], [w], [inter, w], [inter], [w, inter], [w]]
    for n, s in zip(BLOCK, shapes):
        if n.endswith("norm1.weight") or n.endswith("norm2.weight"):
            t = torch.ones(s)
        elif len(s) == 2:
            t = torch.randn(s, generator=gen) * 0.02
        else:
            t = torch.zeros(s)
        p[f"mask_net.block.{n}"] = t
    p["mask_net.pool.query"] = torch.randn([w], generator=gen) * 0.02
    for n in ["k", "v"]:
        p[f"mask_net.pool.{n}.weight"] = torch.randn([w, w], generator=gen) * 0.02
        p[f"mask_net.pool.{n}.bias"] = torch.zeros([w])
    p["mask_net.proj.weight"] = torch.randn([d, w], generator=gen) * 0.5  # large enough that masks vary
    p["mask_net.proj.bias"] = torch.zeros([d])
    return p


def block(x, p, heads, eps, act):
    pre = "mask_net.block."
    b, t, w = x.shape
    hd = w // heads
    h = F.layer_norm(x, [w], p[pre + "layer_norm1.weight"], p[pre + "layer_norm1.bias"], eps)
    def proj(n, z):
        return F.linear(z, p[pre + f"self_attn.{n}_proj.weight"], p[pre + f"self_attn.{n}_proj.bias"])
    q, k, v = (proj(n, h).view(b, t, heads, hd).transpose(1, 2) for n in "qkv")
    s = q @ k.transpose(-1, -2) / math.sqrt(hd)
    s = s.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), 1), float("-inf"))
    a = (s.softmax(-1) @ v).transpose(1, 2).reshape(b, t, w)
    x = x + proj("out", a)
    h = F.layer_norm(x, [w], p[pre + "layer_norm2.weight"], p[pre + "layer_norm2.bias"], eps)
    m = F.linear(h, p[pre + "mlp.fc1.weight"], p[pre + "mlp.fc1.bias"])
    m = m * torch.sigmoid(1.702 * m) if act == "quick_gelu" else F.gelu(m)
    return x + F.linear(m, p[pre + "mlp.fc2.weight"], p[pre + "mlp.fc2.bias"])


def masks(states, valid, p, heads, eps, act):
    x = block(states, p, heads, eps, act)
    b, t, w = x.shape
    k = F.linear(x, p["mask_net.pool.k.weight"], p["mask_net.pool.k.bias"])
    v = F.linear(x, p["mask_net.pool.v.weight"], p["mask_net.pool.v.bias"])
    sc = (k @ p["mask_net.pool.query"]) / math.sqrt(w)
    invalid = torch.arange(t)[None, :] >= torch.tensor(valid)[:, None]
    sc = sc.masked_fill(invalid, -1e9)
    pooled = (sc.softmax(-1)[:, :, None] * v).sum(1)
    soft = torch.sigmoid(F.linear(pooled, p["mask_net.proj.weight"], p["mask_net.proj.bias"]))
    hard = (soft > 0.5).float()
    return soft + (hard - soft).detach()


def main():
    ap = argparse.ArgumentParser()
    for n, d in [("--model", None), ("--data", None), ("--out", None), ("--mask-init-out", None)]:
        ap.add_argument(n, default=d)
    ap.add_argument("--steps", type=int, default=12); ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3); ap.add_argument("--mask-lr", type=float, default=1e-2)
    ap.add_argument("--warmup", type=int, default=3); ap.add_argument("--lambda-align", type=float, default=1.0)
    ap.add_argument("--lambda-sparsity", type=float, default=1e-3)
    a = ap.parse_args()
    from transformers import CLIPModel, CLIPTokenizerFast, CLIPImageProcessorPil
    from PIL import Image
    model = CLIPModel.from_pretrained(a.model, torch_dtype=torch.float32)
    cfg = json.load(open(os.path.join(a.model, "config.json")))
    tc = cfg["text_config"]
    tok = CLIPTokenizerFast.from_pretrained(a.model)
    proc = CLIPImageProcessorPil.from_pretrained(a.model)
    w, d = tc["hidden_size"], cfg["projection_dim"]
    mp = init_mask(w, tc["intermediate_size"], d, torch.Generator().manual_seed(0))
    save_file({k: v.contiguous() for k, v in mp.items()}, a.mask_init_out)
    mparams = {k: torch.nn.Parameter(v.clone()) for k, v in mp.items()}
    ddir = os.path.dirname(os.path.abspath(a.data))
    recs = [json.loads(l) for l in open(a.data) if l.strip()]
    opt = torch.optim.AdamW([{"params": list(model.parameters()), "base": a.lr},
                             {"params": list(mparams.values()), "base": a.mask_lr}], lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    per_epoch = len(recs) // a.batch
    eos = tc.get("eos_token_id", 49407)

    def lr_at(step):
        if step < a.warmup:
            return a.lr * (step + 1) / a.warmup
        e, es = step - a.warmup, a.steps - a.warmup
        return 0.5 * (1 + math.cos(math.pi * e / es)) * a.lr if es > 0 else a.lr

    log, idx = [], 0
    for step in range(a.steps):
        lr = lr_at(step)
        for g in opt.param_groups:
            g["lr"] = lr * g["base"] / a.lr
        opt.zero_grad()
        if idx + a.batch > per_epoch * a.batch:
            idx = 0
        chunk = recs[idx:idx + a.batch]
        idx += a.batch
        px = proc([Image.open(os.path.join(ddir, r["image"])) for r in chunk], return_tensors="pt")["pixel_values"]
        enc = tok([r["caption"] for r in chunk], truncation=True, max_length=tc["max_position_embeddings"])["input_ids"]
        n = max(len(e) for e in enc)
        ids = torch.tensor([e + [eos] * (n - len(e)) for e in enc])
        valid = [e.index(eos) + 1 for e in enc]
        img = model.get_image_features(pixel_values=px)
        img = img if isinstance(img, torch.Tensor) else img.pooler_output
        out = model.text_model(input_ids=ids)
        txt = model.text_projection(out.pooler_output)
        m = masks(out.last_hidden_state, valid, mparams, tc["num_attention_heads"], tc.get("layer_norm_eps", 1e-5), tc.get("hidden_act", "quick_gelu"))
        num = img @ (m * txt).T
        den = torch.sqrt((img * img) @ (m * m).T + 1e-12) * txt.norm(dim=-1)[None, :]
        logits = model.logit_scale.exp() * num / den
        y = torch.arange(len(chunk))
        align = F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y)
        l1 = m.sum() / len(chunk)
        loss = a.lambda_align * align + a.lambda_sparsity * l1
        loss.backward()
        opt.step()
        log.append({"step": step + 1, "loss": loss.item(), "loss_align": align.item(), "mask_l1": l1.item(), "lr": lr, "logit_scale": model.logit_scale.item()})
        print(log[-1])
    json.dump({"config": vars(a), "steps": log}, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
