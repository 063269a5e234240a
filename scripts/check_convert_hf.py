#!/usr/bin/env python3
"""Check that directories written by `clipforge convert` load unchanged in Hugging Face
transformers and compute what the PyTorch code computed (tests/fixtures/pt/reference.safetensors).

usage: python3 scripts/check_convert_hf.py [CLIPFORGE_BINARY]   (default target/release/clipforge)

For each of openai_jit.pt, longclip.pt, smartclip.pt: `clipforge convert` into a temp dir, then
CLIPModel.from_pretrained (strict: no missing or unexpected keys), CLIPProcessor/AutoTokenizer
from the same dir, and per element |hf − ref| ≤ 1e-5 + 1e-4·|ref| for the image embeddings and the
text embeddings. The fixtures' 300-token vocabulary ends texts with id 299 rather than CLIP's 49407,
so the text embedding is taken at the end token as OpenAI does (argmax id) from HF's
last_hidden_state. Needs torch, transformers, safetensors, open_clip_torch. Not used by the tests.
"""
import os, subprocess, sys, tempfile
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel
from open_clip.tokenizer import SimpleTokenizer

BIN = sys.argv[1] if len(sys.argv) > 1 else "target/release/clipforge"
FIX = "tests/fixtures/pt"
ref = load_file(os.path.join(FIX, "reference.safetensors"))


def close(what, got, want):
    err = (got - want).abs()
    ok = err <= 1e-5 + 1e-4 * want.abs()
    print(f"  {what}: max |err| {err.max().item():.2e}, {int((~ok).sum())} of {ok.numel()} outside tolerance")
    return bool(ok.all())


good = True
with tempfile.TemporaryDirectory() as tmp:
    for name, prefix, ids in [("openai_jit.pt", "openai", "openai_ids"), ("longclip.pt", "longclip", "longclip_ids"), ("smartclip.pt", "longclip", "longclip_ids")]:
        out = os.path.join(tmp, name)
        subprocess.run([BIN, "convert", "--from", os.path.join(FIX, name), "--out", out], check=True)
        model, info = CLIPModel.from_pretrained(out, output_loading_info=True)
        model.eval()
        print(f"{name}: loading info {info}")
        good &= not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        with torch.no_grad():
            img = model.get_image_features(pixel_values=ref["pixels"])
            img = getattr(img, "pooler_output", img)
            good &= close("image embeds", img, ref[f"{prefix}_image_embeds"])
            if name == "smartclip.pt":
                continue  # same CLIP weights as longclip.pt (the mask net is clipforge's own)
            t = ref[ids].long()
            h = model.text_model(input_ids=t).last_hidden_state
            pooled = h[torch.arange(t.shape[0]), t.argmax(-1)]
            good &= close("text embeds", model.text_projection(pooled), ref[f"{prefix}_text_embeds"])
        tok = AutoTokenizer.from_pretrained(out)
        text = "A photo of a cat, sitting on 2 chairs!"
        a = tok(text)["input_ids"]
        b = [49406] + SimpleTokenizer().encode(text) + [49407]
        print(f"  tokenizer: {a == b} ({len(a)} ids), model_max_length {tok.model_max_length}")
        good &= a == b
        p = CLIPImageProcessor.from_pretrained(out)
        print(f"  image processor: crop {p.crop_size}, mean {p.image_mean}")
print("ALL OK" if good else "MISMATCH")
sys.exit(0 if good else 1)
