"""The project's PyTorch reference of Long-CLIP fine-tuning (methods.md §2), for parity fixtures.

It implements the official loss and optimiser on an HF CLIP directory stretched to 248 text
positions (clipforge stretch, or --stretch here from a 77-position model):
  * towers: transformers' CLIPModel (f32, CPU); captions tokenised with the model's tokenizer,
    truncated at 248 (SOT + content + EOT), padded with EOT to the batch's longest (causal mask:
    padding cannot change the pooled EOT state);
  * images: CLIPImageProcessorPil with the model's preprocessor_config.json;
  * L = L_long + L_short, each ½[CE(τ·I·Tᵀ) + CE(τ·T·Iᵀ)] with label smoothing 0.1, I and T
    L2-normalised, I for L_short = the PCA reconstruction (torch.linalg.svd, top --pca-dim right
    singular vectors, mean added back, not re-normalised); τ = exp(logit_scale), logit_scale reset
    to ln 100 at the start and trained;
  * torch.optim.AdamW over all parameters (β 0.9/0.999, ε 1e-8, weight decay 1e-2);
    lr(step) = lr·(step+1)/warmup for step < warmup, else 0.5·(1+cos(π·(step−warmup)/(total−warmup)))·lr;
  * frozen position rows: rows < keep (config clipforge_frozen_positions) are restored after every
    step — the official two-table form (frozen table for rows < keep, trained one for the rest)
    computes the same;
  * data: JSONL in file order (no shuffle), micro-batches of --batch, the last partial one of an
    epoch dropped, --accum micro-batches per step (loss/accum back-propagated, one step).

usage:
  python3 scripts/longclip_reference.py --model STRETCHED_DIR --data train.jsonl --steps 12 \
      --batch 8 --accum 1 --lr 1e-3 --warmup 3 --pca-dim 4 --out expected.json
  python3 scripts/longclip_reference.py --make-data DIR     # the synthetic image–caption set
  python3 scripts/longclip_reference.py --bench --model DIR --data train.jsonl --batch 8
"""
import argparse, json, math, os, time
import numpy as np
import torch
import torch.nn.functional as F


def make_data(d, n=16, size=32):
    from PIL import Image, ImageDraw
    os.makedirs(d, exist_ok=True)
    colors = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
    shapes = ["square", "circle", "triangle", "stripe"]
    rng = np.random.RandomState(0)
    lines = []
    for i in range(n):
        c, s = colors[i % len(colors)], shapes[(i // 2) % len(shapes)]
        bg = tuple(int(v) for v in rng.randint(0, 255, 3))
        im = Image.new("RGB", (size, size), bg)
        dr = ImageDraw.Draw(im)
        a, b = 4 + i % 5, 20 + i % 9
        if s == "circle":
            dr.ellipse([a, a, b, b], fill=c)
        elif s == "triangle":
            dr.polygon([(a, b), (b, b), ((a + b) // 2, a)], fill=c)
        elif s == "stripe":
            dr.rectangle([0, a, size, a + 6], fill=c)
        else:
            dr.rectangle([a, a, b, b], fill=c)
        name = f"img_{i:03d}.png"
        im.save(os.path.join(d, name))
        extra = " ".join(f"The {s} has detail number {k} near the {['top', 'left', 'edge', 'middle'][k % 4]}." for k in range(3 + 11 * (i % 3)))
        cap = f"A {c} {s} on a plain background. The {s} is drawn with flat {c} paint. {extra}"
        rec = {"image": name, "caption": cap}
        if i == 5:
            rec["short_caption"] = f"a small {c} {s}"
        lines.append(json.dumps(rec))
    with open(os.path.join(d, "train.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")


def pca(x, k):
    mean = x.mean(0, keepdim=True)
    xc = x - mean
    _, _, vh = torch.linalg.svd(xc, full_matrices=False)
    v = vh[:k].T
    return xc @ v @ v.T + mean


def sym_infonce(a, b, tau):
    logits = tau * a @ b.T
    y = torch.arange(a.shape[0])
    return 0.5 * (F.cross_entropy(logits, y, label_smoothing=0.1) + F.cross_entropy(logits.T, y, label_smoothing=0.1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model"); ap.add_argument("--data"); ap.add_argument("--out")
    ap.add_argument("--steps", type=int, default=12); ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--accum", type=int, default=1); ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=3); ap.add_argument("--pca-dim", type=int, default=32)
    ap.add_argument("--make-data"); ap.add_argument("--bench", action="store_true")
    # --bf16: the towers under torch.autocast("cpu", bfloat16) (PyTorch's mixed precision: bf16 GEMMs,
    # f32 weights and optimizer); the loss head (normalise, InfoNCE, PCA) in f32
    ap.add_argument("--bf16", action="store_true")
    a = ap.parse_args()
    if a.make_data:
        make_data(a.make_data)
        return
    from transformers import CLIPModel, CLIPTokenizerFast
    from transformers import CLIPImageProcessorPil
    from PIL import Image
    torch.manual_seed(0)
    model = CLIPModel.from_pretrained(a.model, torch_dtype=torch.float32)
    model.train()
    cfg = json.load(open(os.path.join(a.model, "config.json")))
    keep = cfg["text_config"].get("clipforge_frozen_positions", 0)
    tok = CLIPTokenizerFast.from_pretrained(a.model)
    proc = CLIPImageProcessorPil.from_pretrained(a.model)
    ddir = os.path.dirname(os.path.abspath(a.data))
    recs = [json.loads(l) for l in open(a.data) if l.strip()]
    samples = [(os.path.join(ddir, r["image"]), r["caption"], r.get("short_caption", r["caption"].split(". ")[0])) for r in recs]
    pos = model.text_model.embeddings.position_embedding.weight
    frozen = pos.detach()[:keep].clone()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    per_epoch = len(samples) // a.batch
    cursor = [0, 0]  # epoch, index

    def next_batch():
        if cursor[1] + a.batch > per_epoch * a.batch:
            cursor[0] += 1; cursor[1] = 0
        chunk = samples[cursor[1]:cursor[1] + a.batch]
        cursor[1] += a.batch
        px = proc([Image.open(p) for p, _, _ in chunk], return_tensors="pt")["pixel_values"]

        def ids(texts):
            enc = tok(texts, truncation=True, max_length=cfg["text_config"]["max_position_embeddings"])["input_ids"]
            n = max(len(e) for e in enc)
            return torch.tensor([e + [cfg["text_config"].get("eos_token_id", 49407)] * (n - len(e)) for e in enc])
        return px, ids([c for _, c, _ in chunk]), ids([s for _, _, s in chunk])

    def lr_at(step):
        if step < a.warmup:
            return a.lr * (step + 1) / a.warmup
        e, es = step - a.warmup, a.steps - a.warmup
        return 0.5 * (1 + math.cos(math.pi * e / es)) * a.lr if es > 0 else a.lr

    def proj(o):  # transformers 5 returns an output object whose pooler_output is the projection
        return o if isinstance(o, torch.Tensor) else o.pooler_output

    def feats(px, lid, sid):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16):
            e = (proj(model.get_image_features(pixel_values=px)), proj(model.get_text_features(input_ids=lid)),
                 proj(model.get_text_features(input_ids=sid)))
        return tuple(F.normalize(x.float(), dim=-1) for x in e)

    log, first_grads, times = [], None, []
    for step in range(a.steps):
        t0 = time.time()
        lr = lr_at(step)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad()
        tot = [0.0, 0.0, 0.0]
        for _ in range(a.accum):
            px, lid, sid = next_batch()
            img, lt, st = feats(px, lid, sid)
            tau = model.logit_scale.exp()
            l_long = sym_infonce(img, lt, tau)
            l_short = sym_infonce(pca(img, a.pca_dim), st, tau)
            loss = l_long + l_short
            (loss / a.accum).backward()
            for j, v in enumerate((loss, l_long, l_short)):
                tot[j] += v.item() / a.accum
        if step == 0:
            first_grads = {"logit_scale": model.logit_scale.grad.item(), "position_abs_sum": pos.grad[keep:].abs().sum().item(),
                           "text_projection[0,0]": model.text_projection.weight.grad[0, 0].item()}
        opt.step()
        with torch.no_grad():
            pos[:keep] = frozen
        log.append({"step": step + 1, "loss": tot[0], "loss_long": tot[1], "loss_short": tot[2], "lr": lr, "logit_scale": model.logit_scale.item()})
        times.append(time.time() - t0)
    if a.bench:  # the median step after the first (warm-up)
        dt = float(np.median(times[1:] if len(times) > 1 else times))
        print(json.dumps({"torch_step_s": dt, "samples_per_s": a.batch * a.accum / dt, "threads": torch.get_num_threads(), "steps": a.steps, "bf16": a.bf16}))
        return
    final = {"logit_scale": model.logit_scale.item(), "text_projection[0,:4]": model.text_projection.weight[0, :4].tolist(),
             "position[30,:4]": pos[30, :4].tolist(), "position[5,:4]": pos[5, :4].tolist()}
    out = {"config": {"steps": a.steps, "batch": a.batch, "accum": a.accum, "lr": a.lr, "warmup": a.warmup, "pca_dim": a.pca_dim},
           "steps": log, "first_step_grads": first_grads, "final_params": final}
    json.dump(out, open(a.out, "w"), indent=1)
    for r in log:
        print(r)


if __name__ == "__main__":
    main()
