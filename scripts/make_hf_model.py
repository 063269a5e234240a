#!/usr/bin/env python3
"""Write a random-weight CLIP model in Hugging Face format.

Usage:
    python scripts/make_hf_model.py DIR {b32,b16,l14,tiny,odd} [--dtype f32|f16|bf16] [--shards N] [--seed S]

The output directory holds:
    config.json                      transformers CLIPConfig
    model.safetensors                (one shard), or
    model-0000i-of-0000N.safetensors + model.safetensors.index.json  (N > 1 shards)
    tokenizer.json                   the real OpenAI CLIP BPE (49408 tokens), HF `tokenizers` format
    tokenizer_config.json            special tokens / model_max_length, so AutoTokenizer works
    preprocessor_config.json         CLIPImageProcessor settings (OpenAI mean/std, bicubic)

The presets b32/b16/l14 have the real OpenAI CLIP shapes (ViT-B/32, ViT-B/16, ViT-L/14, all at 224 px).
`tiny` and `odd` are the small test models used by tests/fixtures (see scripts/make_fixtures.py).
The weights are random (seeded, so the output is reproducible on one machine/library version) but not
trivial: besides transformers' own initialisation every LayerNorm weight is 1 + 0.1*N(0,1) and every
LayerNorm and Linear bias is 0.02*N(0,1), so that parity tests exercise them.

Requirements (pip): torch transformers safetensors tokenizers open_clip_torch
(open_clip_torch is only used for its copy of the OpenAI BPE merges file, bpe_simple_vocab_16e6.txt.gz).

This module is also imported by scripts/make_fixtures.py (make_config, make_model, save_model,
write_clip_tokenizer, write_preprocessor_config, write_model_dir).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import sys

import torch

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

SOT_ID = 49406  # <|startoftext|>
EOT_ID = 49407  # <|endoftext|>, also used as the pad token by HF
VOCAB_SIZE = 49408

# vision: (hidden, layers, heads, intermediate, image_size, patch)
# text:   (hidden, layers, heads, intermediate, max_positions)
PRESETS = {
    "b32": dict(vision=(768, 12, 12, 3072, 224, 32), text=(512, 12, 8, 2048, 77), proj=512,
                dtype="f32", shards=1, crop=224),
    "b16": dict(vision=(768, 12, 12, 3072, 224, 16), text=(512, 12, 8, 2048, 77), proj=512,
                dtype="f32", shards=1, crop=224),
    "l14": dict(vision=(1024, 24, 16, 4096, 224, 14), text=(768, 12, 12, 3072, 77), proj=768,
                dtype="f32", shards=1, crop=224),
    "tiny": dict(vision=(64, 2, 2, 256, 32, 8), text=(32, 2, 2, 128, 77), proj=24,
                 dtype="f32", shards=1, crop=32),
    # head dims 59 (vision) and 20 (text); 98/14 = 7x7 patches; nothing is a power of two
    "odd": dict(vision=(295, 2, 5, 601, 98, 14), text=(60, 2, 3, 257, 77), proj=72,
                dtype="f16", shards=2, crop=98),
}

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


# --------------------------------------------------------------------------------------------
# config / model
# --------------------------------------------------------------------------------------------
def make_config(preset: str):
    from transformers import CLIPConfig

    p = PRESETS[preset]
    vw, vl, vh, vi, img, patch = p["vision"]
    tw, tl, th, ti, tpos = p["text"]
    common = dict(hidden_act="quick_gelu", layer_norm_eps=1e-5, attention_dropout=0.0)
    text_config = dict(
        vocab_size=VOCAB_SIZE, hidden_size=tw, intermediate_size=ti, num_hidden_layers=tl,
        num_attention_heads=th, max_position_embeddings=tpos, projection_dim=p["proj"],
        bos_token_id=SOT_ID, eos_token_id=EOT_ID, pad_token_id=EOT_ID, **common,
    )
    vision_config = dict(
        hidden_size=vw, intermediate_size=vi, num_hidden_layers=vl, num_attention_heads=vh,
        image_size=img, patch_size=patch, num_channels=3, projection_dim=p["proj"], **common,
    )
    cfg = CLIPConfig(text_config=text_config, vision_config=vision_config,
                     projection_dim=p["proj"], logit_scale_init_value=2.6592)
    # sanity: the HF text pooling rule depends on eos_token_id (2 = legacy argmax rule)
    assert cfg.text_config.eos_token_id == EOT_ID
    return cfg


@torch.no_grad()
def make_model(cfg, seed: int = 0):
    """CLIPModel (float32, eager attention) with seeded, non-trivial random weights."""
    from transformers import CLIPModel

    torch.manual_seed(seed)
    cfg._attn_implementation = "eager"
    model = CLIPModel(cfg).to(torch.float32).eval()
    g = torch.Generator().manual_seed(seed + 1)
    for mod in model.modules():
        if isinstance(mod, torch.nn.LayerNorm):
            mod.weight.copy_(1.0 + 0.1 * torch.randn(mod.weight.shape, generator=g))
            mod.bias.copy_(0.02 * torch.randn(mod.bias.shape, generator=g))
        elif isinstance(mod, torch.nn.Linear) and mod.bias is not None:
            mod.bias.copy_(0.02 * torch.randn(mod.bias.shape, generator=g))
    # every parameter must be finite and not constant
    for name, prm in model.named_parameters():
        assert torch.isfinite(prm).all(), name
        if prm.numel() > 1:
            assert prm.std() > 0, f"{name} is constant"
    return model


def _shard_groups(items, n):
    """Split [(name, tensor)] into n contiguous groups of roughly equal byte size."""
    total = sum(t.numel() * t.element_size() for _, t in items)
    groups, cur, acc = [], [], 0
    for name, t in items:
        cur.append((name, t))
        acc += t.numel() * t.element_size()
        if len(groups) < n - 1 and acc >= total * (len(groups) + 1) / n:
            groups.append(cur)
            cur = []
    groups.append(cur)
    while len(groups) < n:  # degenerate (tiny) models
        groups.append([])
    assert all(groups), "too many shards for this model"
    return groups


def save_model(model, out_dir: str, dtype: str = "f32", shards: int = 1):
    """Write the weights (and config.json) like save_pretrained does, with an exact shard count."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    tdt = DTYPES[dtype]
    sd = model.state_dict()
    items = [(k, v.detach().to(tdt).contiguous().clone()) for k, v in sd.items()]
    meta = {"format": "pt"}
    if shards <= 1:
        save_file(dict(items), os.path.join(out_dir, "model.safetensors"), metadata=meta)
        os.chmod(os.path.join(out_dir, "model.safetensors"), 0o644)
    else:
        weight_map, total = {}, 0
        for i, group in enumerate(_shard_groups(items, shards)):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file(dict(group), os.path.join(out_dir, fname), metadata=meta)
            os.chmod(os.path.join(out_dir, fname), 0o644)
            for k, t in group:
                weight_map[k] = fname
                total += t.numel() * t.element_size()
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
    cfg = model.config
    cfg.dtype = DTYPE_NAMES[dtype]
    cfg.architectures = ["CLIPModel"]
    cfg.to_json_file(os.path.join(out_dir, "config.json"))


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------
def _byte_to_unicode():
    """GPT-2/CLIP reversible byte -> printable unicode char table, in CLIP's vocabulary order."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    keys, vals, extra = printable[:], printable[:], 0
    for b in range(256):
        if b not in printable:
            keys.append(b)
            vals.append(256 + extra)
            extra += 1
    return keys, [chr(v) for v in vals]


def clip_bpe_path() -> str:
    import open_clip

    path = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    return path


def build_clip_tokenizer():
    """A `tokenizers.Tokenizer` equivalent to the one in openai/clip-vit-* on the HF hub."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    lines = gzip.open(clip_bpe_path()).read().decode("utf-8").split("\n")
    # line 0 is a version header; CLIP uses exactly 49152 - 256 - 2 merges
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    assert len(merges) == 48894 and all(len(m) == 2 for m in merges)
    _, chars = _byte_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    assert len(vocab) == VOCAB_SIZE and vocab["<|startoftext|>"] == SOT_ID and vocab["<|endoftext|>"] == EOT_ID

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<|endoftext|>",
                               continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False))
    # open_clip: ftfy + html.unescape + strip, collapse whitespace, lowercase. Only the last two
    # (plus NFC, which ftfy also applies) are expressible here -- see tests/fixtures/README.md.
    tok.normalizer = normalizers.Sequence([
        normalizers.NFC(),
        normalizers.Replace(Regex(r"\s+"), " "),
        normalizers.Lowercase(),
    ])
    clip_pattern = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
                    r"|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(clip_pattern), behavior="removed", invert=True),
        # byte->unicode mapping only; the CLIP split above already did the word splitting
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.post_processor = processors.RobertaProcessing(
        ("<|endoftext|>", EOT_ID), ("<|startoftext|>", SOT_ID), trim_offsets=False, add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|startoftext|>", "<|endoftext|>"])
    return tok


_TOKENIZER_CACHE = {}


def write_clip_tokenizer(path: str):
    if "tok" not in _TOKENIZER_CACHE:
        _TOKENIZER_CACHE["tok"] = build_clip_tokenizer()
    _TOKENIZER_CACHE["tok"].save(path, pretty=False)


def write_tokenizer_config(path: str, max_length: int = 77):
    cfg = {
        "tokenizer_class": "CLIPTokenizer",
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": max_length,
        "do_lower_case": True,
    }
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")


def preprocessor_dict(size: int, crop: int | None = None) -> dict:
    crop = size if crop is None else crop
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": size},
        "resample": 3,  # PIL.Image.BICUBIC
        "do_center_crop": True,
        "crop_size": {"height": crop, "width": crop},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": OPENAI_CLIP_MEAN,
        "image_std": OPENAI_CLIP_STD,
    }


def write_preprocessor_config(path: str, size: int, crop: int | None = None):
    with open(path, "w") as f:
        json.dump(preprocessor_dict(size, crop), f, indent=2)
        f.write("\n")


# --------------------------------------------------------------------------------------------
def write_model_dir(out_dir: str, preset: str, dtype: str | None = None, shards: int | None = None,
                    seed: int = 0):
    """Create a complete HF model directory. Returns the float32 in-memory model (before any
    dtype rounding) and the config."""
    p = PRESETS[preset]
    dtype = dtype or p["dtype"]
    shards = shards or p["shards"]
    cfg = make_config(preset)
    model = make_model(cfg, seed=seed)
    save_model(model, out_dir, dtype=dtype, shards=shards)
    write_clip_tokenizer(os.path.join(out_dir, "tokenizer.json"))
    write_tokenizer_config(os.path.join(out_dir, "tokenizer_config.json"),
                           max_length=cfg.text_config.max_position_embeddings)
    write_preprocessor_config(os.path.join(out_dir, "preprocessor_config.json"),
                              size=cfg.vision_config.image_size, crop=p["crop"])
    return model, cfg


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir")
    ap.add_argument("preset", choices=sorted(PRESETS))
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                    help="weight dtype on disk (default: preset's, f32 except odd=f16)")
    ap.add_argument("--shards", type=int, default=None, help="number of safetensors files (default: preset's)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    model, cfg = write_model_dir(args.dir, args.preset, args.dtype, args.shards, args.seed)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.preset} ({n / 1e6:.2f}M params) to {args.dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
