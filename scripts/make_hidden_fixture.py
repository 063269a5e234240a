#!/usr/bin/env python3
"""Reference per-token outputs (HF `output_hidden_states=True`) for tests/hidden.rs.

    python3 scripts/make_hidden_fixture.py tests/fixtures

Writes tests/fixtures/hidden/reference.safetensors from the committed tiny model
(tests/fixtures/tiny) and from its Long-CLIP stretch to 248 positions (keep 20, ratio 4, made
here with the formula of methods.md section 2.1, which `clipforge stretch` implements):

  t77.input_ids [3, 77] int64     3 texts padded with 49407 to 77 (no attention_mask, like
                                  diffusion pipelines: the causal mask only)
  t77.hidden.{0,1,2} [3, 77, 32]  hidden_states[i] of the text model
  t77.last [3, 77, 32]            last_hidden_state (final_layer_norm on every token)
  t77.text_embeds [3, 24]         projected pooled output (not normalised)
  t248.input_ids [2, 248]         2 texts of more than 77 tokens, padded to 248
  t248.hidden.{0,1,2}, t248.last, t248.text_embeds   the same on the stretched model
  t248l.input_ids [2, T]          the same texts padded to the longest (T = its length)
  t248l.hidden.1 [2, T, 32]       hidden_states[-2] with that padding
  v.pixel_values [2, 3, 32, 32]   two preprocessed fixture images
  v.hidden.{0,1,2} [2, 17, 64]    hidden_states[i] of the vision model (0 = after pre_layrnorm)
  v.post_ln [2, 17, 64]           post_layernorm applied to every token of the last layer
  v.image_embeds [2, 24]          projected class output (not normalised)
"""
import json
import os
import sys

import torch
from safetensors.numpy import load_file
from safetensors.torch import save_file
from transformers import CLIPModel


def stretch(p: torch.Tensor, keep: int = 20, ratio: int = 4) -> torch.Tensor:
    L, W = p.shape
    rows = [p[j] for j in range(keep)]
    for i in range(L - 1 - keep):
        for k in range(ratio):
            rows.append((1 - k / ratio) * p[keep + i] + (k / ratio) * p[keep + i + 1])
    for k in range(ratio):
        rows.append(p[L - 1] + (k / ratio) * (p[L - 1] - p[L - 2]))
    return torch.stack(rows)


def pad(ids, t, eos=49407):
    return torch.tensor([s + [eos] * (t - len(s)) for s in ids], dtype=torch.int64)


@torch.no_grad()
def text_refs(model, ids, prefix, out, layers=(0, 1, 2)):
    tm = model.text_model
    o = tm(input_ids=ids, output_hidden_states=True)
    out[f"{prefix}.input_ids"] = ids
    for i in layers:
        out[f"{prefix}.hidden.{i}"] = o.hidden_states[i].contiguous()
    out[f"{prefix}.last"] = o.last_hidden_state.contiguous()
    out[f"{prefix}.text_embeds"] = model.text_projection(o.pooler_output).contiguous()


@torch.no_grad()
def main(fixtures: str):
    tiny = os.path.join(fixtures, "tiny")
    model = CLIPModel.from_pretrained(tiny, dtype=torch.float32, attn_implementation="eager").eval()
    tokens = json.load(open(os.path.join(fixtures, "tokens.json")))
    out = {}
    short = [tokens["ids_77"][i] for i in (0, 1, 2)]
    text_refs(model, pad(short, 77), "t77", out)

    # Long-CLIP stretch of the same model: 248 positions.
    cfg = model.config
    cfg.text_config.max_position_embeddings = 248
    big = CLIPModel(cfg).eval()
    sd = model.state_dict()
    key = "text_model.embeddings.position_embedding.weight"
    sd[key] = stretch(sd[key])
    sd.pop("text_model.embeddings.position_ids", None)
    missing, unexpected = big.load_state_dict(sd, strict=False)
    assert not unexpected and all("position_ids" in m for m in missing), (missing, unexpected)
    longs = [s for s in tokens["ids_248"] if 120 < len(s) < 248][:2]
    assert len(longs) == 2
    text_refs(big, pad(longs, 248), "t248", out)
    t = max(len(s) for s in longs)
    o = big.text_model(input_ids=pad(longs, t), output_hidden_states=True)
    out["t248l.input_ids"] = pad(longs, t)
    out["t248l.hidden.1"] = o.hidden_states[-2].contiguous()

    acts = load_file(os.path.join(tiny, "activations.safetensors"))
    px = torch.from_numpy(acts["input.pixel_values"][:2].copy())
    vm = model.vision_model
    o = vm(pixel_values=px, output_hidden_states=True)
    out["v.pixel_values"] = px
    for i in range(3):
        out[f"v.hidden.{i}"] = o.hidden_states[i].contiguous()
    out["v.post_ln"] = vm.post_layernorm(o.hidden_states[-1]).contiguous()
    out["v.image_embeds"] = model.visual_projection(o.pooler_output).contiguous()
    os.makedirs(os.path.join(fixtures, "hidden"), exist_ok=True)
    save_file(out, os.path.join(fixtures, "hidden", "reference.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures")
