"""Checks a `clipforge stretch` output against HF transformers and records the expected values.

usage: python3 scripts/check_stretch_hf.py STRETCHED_DIR ORIGINAL_DIR [--write FIXTURE.json]

1. transformers.CLIPModel.from_pretrained(STRETCHED_DIR) loads with no missing/unexpected keys;
2. its position table equals the official Long-CLIP stretch of ORIGINAL_DIR's table
   (methods.md §2.1, computed here in torch independently);
3. HF text embeddings for three texts (one of ~200 tokens, truncated at 248 like Long-CLIP);
   with --write they are stored with their token ids for tests/stretch.rs (no Python in tests).
"""
import json, sys
import torch
from transformers import CLIPModel, CLIPTokenizerFast

out, orig = sys.argv[1], sys.argv[2]
model, info = CLIPModel.from_pretrained(out, output_loading_info=True)
assert not info["missing_keys"] and not info["unexpected_keys"], info
base = CLIPModel.from_pretrained(orig).text_model.embeddings.position_embedding.weight.detach()
keep, ratio, L = 20, 4, base.shape[0]
rows = [base[j] for j in range(keep)]
for i in range(keep, L - 1):
    for k in range(ratio):
        rows.append((1 - k / ratio) * base[i] + (k / ratio) * base[i + 1])
for k in range(ratio):
    rows.append(base[L - 1] + (k / ratio) * (base[L - 1] - base[L - 2]))
want = torch.stack(rows)
got = model.text_model.embeddings.position_embedding.weight.detach()
assert got.shape == want.shape, (got.shape, want.shape)
err = (got - want).abs().max().item()
assert err <= 1e-6 * (1 + want.abs().max().item()), err
tok = CLIPTokenizerFast.from_pretrained(out)
texts = ["a photo of a cat", "a red square on a blue background. " * 3,
         " ".join(f"word{i % 37} and a small detail number {i}." for i in range(40))]
enc = tok(texts, padding="max_length", max_length=248, truncation=True, return_tensors="pt")
with torch.no_grad():
    e = model.get_text_features(**enc)
    e = e if isinstance(e, torch.Tensor) else e.pooler_output
ids = [[int(t) for t in row[: int(m.sum())]] for row, m in zip(enc["input_ids"], enc["attention_mask"])]
print("ok: loads unchanged; table max |err|", err, "; token counts", [len(i) for i in ids])
if "--write" in sys.argv:
    path = sys.argv[sys.argv.index("--write") + 1]
    json.dump({"texts": texts, "ids": ids, "text_embeds": e.tolist()}, open(path, "w"))
    print("wrote", path)
