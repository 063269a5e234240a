#!/usr/bin/env python3
"""Write tests/fixtures/pt/: small PyTorch checkpoints in the structures of the released CLIP
files, from seeded random weights, and what the PyTorch code computes from them.

usage: python3 scripts/make_pt_fixtures.py [OUT_DIR]   (default tests/fixtures/pt)

The model code is open_clip's `CLIP` with QuickGELU and OpenAI's parameter names (open_clip loads
OpenAI's state dicts into it unchanged), at tiny sizes: ViT width 64 (one 64-wide head, as OpenAI
derives heads = width / 64), 2 blocks (1 in the Long-CLIP and SmartCLIP files), 8 px patches, 32 px images; text width 64, 2 blocks, a
300-token vocabulary (the real one would make each file 6 MB); 32-d embeddings.

Files:
  openai_jit.pt        torch.jit.trace_module (encode_image, encode_text) + .half() + torch.jit.save,
                       as OpenAI's ViT-B-32.pt etc.; with OpenAI's extra input_resolution /
                       context_length / vocab_size buffers.
  longclip.pt          torch.save of a Long-CLIP state dict in f16: OpenAI names, 248 positions,
                       positional_embedding and positional_embedding_res (different values).
  smartclip.pt         longclip's layout plus a mask network under mask_net.: one OpenAI residual
                       block (mask_net.resblocks.0.*), pool.query / pool.k / pool.v, proj (the
                       layout src/model/convert.rs documents; SmartCLIP's own code was not readable).
  views.pt             the reader's cases: several tensors viewing one storage with offsets,
                       transposed and strided views, f16/bf16/f64/int64 storages, a scalar.
  views_expected.safetensors   each of views.pt's tensors, contiguous f32.
  reference.safetensors        embeddings the PyTorch code computes (f32 forward of the stored
                       weights): {openai,longclip}_{image,text}_embeds, the pixels and token ids
                       used, and smartclip_{soft,masks} of the mask network on the text states.
  bad_*.pt             a truncated zip, a pickle calling os.system (never loaded here either), a
                       state dict missing CLIP tensors, a zip without data.pkl, a pre-1.6 file.
"""
import io, math, os, pickle, sys, zipfile
import torch
import open_clip
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
import smartclip_reference as scr  # noqa: E402  (the mask network's torch reference)

OUT = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/pt"
VOCAB, W, D = 300, 64, 32


def make_clip(ctx, seed, vision_layers=2):
    torch.manual_seed(seed)
    m = open_clip.model.CLIP(
        embed_dim=D,
        vision_cfg=dict(layers=vision_layers, width=W, patch_size=8, image_size=32, head_width=64),
        text_cfg=dict(context_length=ctx, vocab_size=VOCAB, width=W, heads=W // 64, layers=2),
        quick_gelu=True,
    )
    with torch.no_grad():  # LayerNorm and bias values that are not 1 and 0, so mapping errors show
        for n, p in m.named_parameters():
            if n.endswith("bias") or ".ln_" in n or "ln_" in n.split(".")[0]:
                p.add_(0.1 * torch.randn_like(p))
            if n == "logit_scale":
                p.fill_(math.log(1 / 0.07))
    # round to f16 as the released files are, computing in f32
    return m.half().float().eval()


def ids_batch(ctx, lengths, seed):
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for n in lengths:
        body = torch.randint(1, VOCAB - 2, (n - 2,), generator=g).tolist()
        seqs.append([VOCAB - 2] + body + [VOCAB - 1])  # "start", content, "end" (the largest id, OpenAI's argmax pooling)
    t = torch.zeros(len(seqs), ctx, dtype=torch.long)
    for i, s in enumerate(seqs):
        t[i, : len(s)] = torch.tensor(s)
    return t


def token_states(m, ids):
    got = {}
    h = m.ln_final.register_forward_hook(lambda mod, i, o: got.__setitem__("x", o))
    m.encode_text(ids)
    h.remove()
    return got["x"]


def split_block(sd, pre):
    """OpenAI block names → HF names (the reference's own independent mapping)."""
    w = sd[pre + "attn.in_proj_weight"]
    b = sd[pre + "attn.in_proj_bias"]
    n = w.shape[0] // 3
    out = {}
    for i, q in enumerate("qkv"):
        out[f"self_attn.{q}_proj.weight"] = w[i * n:(i + 1) * n]
        out[f"self_attn.{q}_proj.bias"] = b[i * n:(i + 1) * n]
    ren = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for a, h in ren.items():
        for s in ["weight", "bias"]:
            out[f"{h}.{s}"] = sd[f"{pre}{a}.{s}"]
    return out


def main():
    os.makedirs(OUT, exist_ok=True)
    ref = {}
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    ref["pixels"] = pixels

    # (a) OpenAI: a traced TorchScript module in f16
    m = make_clip(77, 1)
    ids = ids_batch(77, [9, 77], 11)
    with torch.no_grad():
        ref["openai_image_embeds"] = m.encode_image(pixels)
        ref["openai_text_embeds"] = m.encode_text(ids)
    ref["openai_ids"] = ids.float()  # ids < 300: exact in f32
    for k, v in [("input_resolution", 32), ("context_length", 77), ("vocab_size", VOCAB)]:
        if hasattr(m, k):
            delattr(m, k)  # open_clip keeps them as ints; OpenAI's archives hold them as tensors
        m.register_buffer(k, torch.tensor(v))
    traced = torch.jit.trace_module(m, {"encode_image": (pixels,), "encode_text": (ids,)})
    torch.jit.save(traced.half(), os.path.join(OUT, "openai_jit.pt"))

    # (b) Long-CLIP: 248 positions, two tables, f16 state dict
    m = make_clip(248, 2, vision_layers=1)
    sd = {k: v.clone() for k, v in m.state_dict().items() if k != "attn_mask"}
    pe = sd["positional_embedding"]
    res = (pe + 0.05 * torch.randn_like(pe)).half().float()  # trained table: rows < 20 differ too
    sd["positional_embedding_res"] = res
    mask1 = torch.zeros(248, 1); mask1[:20] = 1
    mask2 = 1 - mask1
    with torch.no_grad():  # Long-CLIP's text input: tok + pe ⊙ mask1 + pe_res ⊙ mask2
        m.positional_embedding.copy_(pe * mask1 + res * mask2)
        lids = ids_batch(248, [12, 200, 248], 12)
        ref["longclip_image_embeds"] = m.encode_image(pixels)
        ref["longclip_text_embeds"] = m.encode_text(lids)
    ref["longclip_ids"] = lids.float()
    torch.save({k: v.half() for k, v in sd.items()}, os.path.join(OUT, "longclip.pt"))

    # (c) SmartCLIP: Long-CLIP plus a mask network
    g = torch.Generator().manual_seed(3)
    mk = {}
    mk["mask_net.resblocks.0.ln_1.weight"] = 1 + 0.1 * torch.randn(W, generator=g)
    mk["mask_net.resblocks.0.ln_1.bias"] = 0.1 * torch.randn(W, generator=g)
    mk["mask_net.resblocks.0.attn.in_proj_weight"] = torch.randn(3 * W, W, generator=g) / math.sqrt(W)
    mk["mask_net.resblocks.0.attn.in_proj_bias"] = 0.1 * torch.randn(3 * W, generator=g)
    mk["mask_net.resblocks.0.attn.out_proj.weight"] = torch.randn(W, W, generator=g) / math.sqrt(W)
    mk["mask_net.resblocks.0.attn.out_proj.bias"] = 0.1 * torch.randn(W, generator=g)
    mk["mask_net.resblocks.0.ln_2.weight"] = 1 + 0.1 * torch.randn(W, generator=g)
    mk["mask_net.resblocks.0.ln_2.bias"] = 0.1 * torch.randn(W, generator=g)
    mk["mask_net.resblocks.0.mlp.c_fc.weight"] = torch.randn(4 * W, W, generator=g) / math.sqrt(W)
    mk["mask_net.resblocks.0.mlp.c_fc.bias"] = 0.1 * torch.randn(4 * W, generator=g)
    mk["mask_net.resblocks.0.mlp.c_proj.weight"] = torch.randn(W, 4 * W, generator=g) / math.sqrt(4 * W)
    mk["mask_net.resblocks.0.mlp.c_proj.bias"] = 0.1 * torch.randn(W, generator=g)
    mk["mask_net.pool.query"] = torch.randn(W, generator=g)
    for n in "kv":
        mk[f"mask_net.pool.{n}.weight"] = torch.randn(W, W, generator=g) / math.sqrt(W)
        mk[f"mask_net.pool.{n}.bias"] = 0.1 * torch.randn(W, generator=g)
    mk["mask_net.proj.weight"] = torch.randn(D, W, generator=g)
    mk["mask_net.proj.bias"] = 0.1 * torch.randn(D, generator=g)
    mk = {k: v.half().float() for k, v in mk.items()}
    p = {f"mask_net.block.{k}": v for k, v in split_block(mk, "mask_net.resblocks.0.").items()}
    p.update({k: v for k, v in mk.items() if not k.startswith("mask_net.resblocks.")})
    with torch.no_grad():
        states = token_states(m, lids)  # [B, 248, W] after ln_final
        valid = (lids.argmax(-1) + 1).tolist()
        x = scr.block(states, p, 1, 1e-5, "quick_gelu")
        k = torch.nn.functional.linear(x, p["mask_net.pool.k.weight"], p["mask_net.pool.k.bias"])
        v = torch.nn.functional.linear(x, p["mask_net.pool.v.weight"], p["mask_net.pool.v.bias"])
        sc = (k @ p["mask_net.pool.query"]) / math.sqrt(W)
        sc = sc.masked_fill(torch.arange(248)[None, :] >= torch.tensor(valid)[:, None], -1e9)
        soft = torch.sigmoid(torch.nn.functional.linear((sc.softmax(-1)[:, :, None] * v).sum(1), p["mask_net.proj.weight"], p["mask_net.proj.bias"]))
        ref["smartclip_soft"] = soft
        ref["smartclip_masks"] = scr.masks(states, valid, p, 1, 1e-5, "quick_gelu")
    smart = {k: v.half() for k, v in sd.items()}
    smart.update({k: v.half() for k, v in mk.items()})
    torch.save(smart, os.path.join(OUT, "smartclip.pt"))

    # (d) the reader's cases
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 8
    hb = (torch.arange(12, dtype=torch.float32).reshape(3, 4) - 5.5) / 3
    views = {
        "base": base, "base_t": base.t(), "row2": base[2], "col1": base[:, 1], "block": base[1:3, 2:5],
        "half": hb.half(), "half_t": hb.half().t(), "bf16": hb.bfloat16(), "f64": hb.double()[::2, ::3],
        "i64": torch.arange(5), "scalar": torch.tensor(3.5),
    }
    torch.save(views, os.path.join(OUT, "views.pt"))
    save_file({k: v.float().contiguous().clone() for k, v in views.items()}, os.path.join(OUT, "views_expected.safetensors"))

    save_file({k: v.float().contiguous() if v.is_floating_point() else v.contiguous() for k, v in ref.items()}, os.path.join(OUT, "reference.safetensors"))

    # bad files
    good = open(os.path.join(OUT, "views.pt"), "rb").read()
    open(os.path.join(OUT, "bad_truncated.pt"), "wb").write(good[: len(good) // 2])

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo this must never run",))
    bio = io.BytesIO()
    with zipfile.ZipFile(bio, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"w": Evil()}, protocol=2))
        z.writestr("archive/version", "3\n")
    open(os.path.join(OUT, "bad_foreign.pt"), "wb").write(bio.getvalue())
    torch.save({"visual.class_embedding": torch.zeros(64)}, os.path.join(OUT, "bad_missing.pt"))
    bio = io.BytesIO()
    with zipfile.ZipFile(bio, "w") as z:
        z.writestr("archive/version", "3\n")
    open(os.path.join(OUT, "bad_nopkl.pt"), "wb").write(bio.getvalue())
    torch.save({"w": torch.zeros(2)}, os.path.join(OUT, "bad_legacy.pt"), _use_new_zipfile_serialization=False)
    for f in sorted(os.listdir(OUT)):
        print(f"{os.path.getsize(os.path.join(OUT, f)):>8}  {f}")


if __name__ == "__main__":
    main()
