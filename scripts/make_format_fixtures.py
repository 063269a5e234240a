#!/usr/bin/env python3
"""Generate the exact-pixel fixtures of clipforge: tests/fixtures/formats/ and tests/fixtures/pixels_u8.safetensors.

Run from the repository root (after scripts/make_fixtures.py, whose photos in tests/fixtures/images are the sources):

    python scripts/make_format_fixtures.py [OUT_DIR]          # OUT_DIR defaults to tests/fixtures

CPU only, a few seconds, seeded; needs Pillow, numpy, safetensors and transformers (for the slow PIL-based
CLIPImageProcessor, `CLIPImageProcessorPil` in transformers 5). The references are what Pillow and that
processor produce; tests/pixels_exact.rs compares clipforge with them for exact equality of the uint8 images.

What is written:
    formats/*.{bmp,gif,tif,webp,jpg}   small images (64-200 px) cut from the photos in images/, one per format/variant
    pixels_u8.safetensors               the references, keys:
        lut                      f32 [3,256]   HF's normalised value of every level per channel (rescale 1/255 then
                                               (x - mean) / std, OpenAI mean/std): the processor run on an image that
                                               holds every level, resize and crop off
        photo.{stem}.{S}         u8 [3,S,S]    HF processor output with rescale/normalise off (= Pillow's BICUBIC resize
                                               to shortest edge S + HF's centre crop), S = 98, 32; every photo of images/
                                               but camera_16bit (clipforge keeps the high byte of I;16, see pixels.rs)
        photo.{stem}.32.f32      f32 [3,32,32] the full HF output (rescale + normalise) at 32 px
        resize.{i}.in / .out     u8 [h,w,3]    Pillow `Image.resize((w2, h2), BICUBIC)` on synthetic RGB images
                                               (noise, 0/255 patterns that overshoot and clip in both passes), sizes
                                               chosen to hit up/down/mixed scaling, a skipped pass, 1-px edges, tall/wide
        format.{name}.rgb        u8 [h,w,3]    Pillow's decode + transformers' convert_to_rgb (what the processor sees)
        format.{name}.32         u8 [3,32,32]  HF processor output at 32 px with rescale/normalise off
        embed.{model}.{name}     f32 [D]       HF's l2-normalised image embedding of formats/{name} (Image.open ->
                                               processor -> CLIPModel.get_image_features), model = tiny (32 px), odd (98 px)
"""
from __future__ import annotations

import io
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_hf_model as mh  # noqa: E402

SEED = 15
SIZES = (98, 32)


def processor(size: int | None, rescale_normalize: bool):
    try:
        from transformers import CLIPImageProcessorPil as Proc
    except ImportError:  # transformers 4.x: CLIPImageProcessor is the slow PIL one
        from transformers import CLIPImageProcessor as Proc
    d = {k: v for k, v in mh.preprocessor_dict(size or 224).items() if k != "image_processor_type"}
    if size is None:
        d.update(do_resize=False, do_center_crop=False)
    if not rescale_normalize:
        d.update(do_rescale=False, do_normalize=False)
    p = Proc(**d)
    assert getattr(p, "backend", "pil") == "pil"
    return p


def run_u8(proc, im) -> np.ndarray:
    """The processor's [3,S,S] output with rescale/normalise off, as the uint8 it holds."""
    pv = proc(images=im, return_tensors="np")["pixel_values"][0]
    u8 = pv.astype(np.uint8)
    assert np.array_equal(u8.astype(pv.dtype), pv), "processor output is not integral"
    return np.ascontiguousarray(u8)


def hf_rgb(im) -> np.ndarray:
    from transformers.image_transforms import convert_to_rgb
    return np.ascontiguousarray(convert_to_rgb(im, return_numpy=True))


def lut() -> np.ndarray:
    from PIL import Image
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    im = Image.fromarray(np.dstack([levels] * 3), mode="RGB")
    pv = processor(None, True)(images=im, return_tensors="np")["pixel_values"][0]  # [3,16,16] f32
    assert pv.dtype == np.float32 and pv.shape == (3, 16, 16)
    return np.ascontiguousarray(pv.reshape(3, 256))


def resize_cases(rng) -> list[tuple[np.ndarray, np.ndarray]]:
    from PIL import Image
    # (in_w, in_h, out_w, out_h, kind)
    cases = [
        (40, 30, 17, 13, "noise"), (17, 13, 40, 30, "noise"), (64, 48, 25, 60, "noise"),
        (30, 50, 70, 21, "noise"), (50, 40, 50, 19, "noise"), (50, 40, 23, 40, "noise"),
        (33, 29, 33, 61, "noise"), (200, 9, 7, 9, "noise"), (9, 200, 9, 5, "noise"),
        (3, 350, 2, 40, "noise"), (350, 3, 40, 2, "noise"), (1, 1, 5, 4, "noise"),
        (20, 20, 1, 1, "noise"), (1, 40, 3, 7, "noise"), (57, 43, 56, 42, "noise"),
        (45, 45, 44, 46, "checker"), (48, 36, 20, 15, "checker"), (24, 18, 61, 47, "checker"),
        (60, 8, 13, 30, "stripes"), (8, 60, 30, 13, "stripes"), (81, 65, 37, 29, "checker"),
        (7, 300, 4, 99, "checker"), (69, 37, 120, 64, "noise"), (97, 131, 32, 43, "stripes"),
    ]
    out = []
    for w, h, w2, h2, kind in cases:
        if kind == "noise":
            a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        elif kind == "checker":  # single-pixel 0/255 checker: maximal overshoot in both directions
            y, x = np.mgrid[0:h, 0:w]
            a = np.repeat((((x + y) % 2) * 255).astype(np.uint8)[..., None], 3, axis=2)
            a[..., 1] = 255 - a[..., 1]
            a[..., 2] = rng.integers(0, 2, (h, w), dtype=np.uint8) * 255
        else:  # 0/255 stripes of random widths along x, noise along y in the blue channel
            cols = (np.cumsum(rng.integers(1, 4, w)) % 2 * 255).astype(np.uint8)
            a = np.repeat(np.repeat(cols[None, :, None], h, axis=0), 3, axis=2)
            a[..., 2] = rng.integers(0, 256, (h, w), dtype=np.uint8)
        r = np.asarray(Image.fromarray(a, mode="RGB").resize((w2, h2), Image.Resampling.BICUBIC))
        assert r.shape == (h2, w2, 3)
        out.append((a, np.ascontiguousarray(r)))
    return out


ARITH_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <jpeglib.h>
/* arith W H in.rgb out.jpg: an arithmetic-coded (SOF9) 4:2:0 JPEG, quality 85 */
int main(int argc, char **argv) {
  if (argc != 5) return 2;
  int w = atoi(argv[1]), h = atoi(argv[2]);
  unsigned char *buf = malloc((size_t)w * h * 3);
  FILE *f = fopen(argv[3], "rb");
  if (!f || fread(buf, 1, (size_t)w * h * 3, f) != (size_t)w * h * 3) return 1;
  fclose(f);
  struct jpeg_compress_struct c; struct jpeg_error_mgr e;
  c.err = jpeg_std_error(&e);
  jpeg_create_compress(&c);
  FILE *o = fopen(argv[4], "wb");
  jpeg_stdio_dest(&c, o);
  c.image_width = w; c.image_height = h; c.input_components = 3; c.in_color_space = JCS_RGB;
  jpeg_set_defaults(&c);
  jpeg_set_quality(&c, 85, TRUE);
  c.arith_code = TRUE;
  jpeg_start_compress(&c, TRUE);
  while (c.next_scanline < c.image_height) {
    JSAMPROW r = buf + (size_t)c.next_scanline * w * 3;
    jpeg_write_scanlines(&c, &r, 1);
  }
  jpeg_finish_compress(&c); fclose(o); jpeg_destroy_compress(&c);
  return 0;
}
"""


def save_arith_jpeg(im, path: str):
    """Pillow cannot write arithmetic coding: a tiny C program does, with Pillow's own libjpeg-turbo
    (its wheel's pillow.libs/libjpeg-*.so; the system's -ljpeg otherwise) and the system's jpeglib.h."""
    import glob
    import subprocess
    import tempfile
    import PIL
    libs = glob.glob(os.path.join(os.path.dirname(os.path.dirname(PIL.__file__)), "pillow.libs", "libjpeg-*.so*"))
    with tempfile.TemporaryDirectory() as t:
        src, exe, raw = (os.path.join(t, n) for n in ("arith.c", "arith", "in.rgb"))
        with open(src, "w") as f:
            f.write(ARITH_C)
        link = [libs[0], f"-Wl,-rpath,{os.path.dirname(libs[0])}"] if libs else ["-ljpeg"]
        subprocess.run(["gcc", "-O1", src, *link, "-o", exe], check=True)
        np.asarray(im.convert("RGB")).tofile(raw)
        subprocess.run([exe, str(im.width), str(im.height), raw, path], check=True)
    with open(path, "rb") as f:
        assert b"\xff\xc9" in f.read(), "no SOF9 (arithmetic) marker"


def save_format_images(src: str, d: str) -> list[tuple[str, str]]:
    """Writes the format fixtures; returns [(file name, description)]."""
    from PIL import Image
    os.makedirs(d, exist_ok=True)
    chelsea = Image.open(os.path.join(src, "chelsea.png")).convert("RGB")
    coffee = Image.open(os.path.join(src, "coffee_portrait.png")).convert("RGB")
    astro = Image.open(os.path.join(src, "astronaut_small.png")).convert("RGB")
    camera = Image.open(os.path.join(src, "camera_gray.png")).convert("L")
    rocket = Image.open(os.path.join(src, "rocket_rgba.png")).convert("RGBA")
    L = Image.Resampling.LANCZOS
    small = lambda im, w, h: im.resize((w, h), L)  # noqa: E731
    files = []

    def save(name, im, desc, **kw):
        im.save(os.path.join(d, name), **kw)
        files.append((name, desc))

    save("chelsea.bmp", small(chelsea, 120, 80), "BMP, 24-bit RGB, 120x80")
    pal = small(coffee, 78, 120).quantize(colors=48, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    save("coffee_palette.gif", pal, "GIF, palette of 48 colours, 78x120")
    rp = small(rocket, 112, 75)
    rp_p = rp.convert("RGB").quantize(colors=31, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    rp_p.putpalette(rp_p.getpalette()[: 31 * 3] + [255, 0, 255])
    idx = np.asarray(rp_p).copy()
    idx[np.asarray(rp)[..., 3] < 128] = 31
    gif_t = Image.fromarray(idx, mode="P")
    gif_t.putpalette(rp_p.getpalette())
    save("rocket_transparent.gif", gif_t, "GIF, 32 colours, index 31 transparent (HF composites it onto white), 112x75",
         transparency=31)
    save("astronaut_lzw.tif", small(astro, 100, 78), "TIFF, RGB, LZW compression, 100x78", compression="tiff_lzw")
    save("camera_lossless.webp", small(camera, 96, 72).convert("RGB"), "WebP lossless, RGB, 96x72", lossless=True)
    save("chelsea_lossy.webp", small(chelsea, 105, 70), "WebP lossy (VP8, quality 80), 105x70", quality=80)
    save("rocket_alpha_lossy.webp", small(rocket, 96, 64), "WebP lossy with alpha (VP8 + ALPH), 96x64", quality=75)
    save("chelsea_420.jpg", small(chelsea, 123, 82), "JPEG baseline 4:2:0, quality 90, 123x82 (not a multiple of 16)",
         quality=90, subsampling=2)
    save("coffee_444.jpg", small(coffee, 70, 108), "JPEG baseline 4:4:4, quality 95, 70x108", quality=95, subsampling=0)
    save("astronaut_progressive.jpg", small(astro, 131, 102), "JPEG progressive 4:2:0, quality 85, 131x102",
         quality=85, subsampling=2, progressive=True)
    save("camera_gray.jpg", small(camera, 100, 75), "JPEG grayscale (mode L), quality 90, 100x75", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    save("chelsea_exif6_422.jpg", small(chelsea, 117, 78),
         "JPEG 4:2:2 with EXIF Orientation = 6 (not applied: Image.open and the HF processor ignore it), 117x78",
         quality=88, subsampling=1, exif=exif.tobytes())
    # CMYK with real black ink (grey component removal), saved by libjpeg with an Adobe marker
    rgb = np.asarray(small(coffee, 72, 96)).astype(np.int32)
    k = 255 - rgb.max(axis=2)
    cmy = np.where(k[..., None] < 255, (255 - rgb - k[..., None]) * 255 // np.maximum(255 - k[..., None], 1), 0)
    cmyk = np.dstack([cmy, k]).astype(np.uint8)
    save("coffee_cmyk.jpg", Image.fromarray(cmyk, mode="CMYK"), "JPEG CMYK (4 components, Adobe marker), 72x96",
         quality=90)
    save_arith_jpeg(small(astro, 90, 70), os.path.join(d, "astronaut_arith.jpg"))
    files.append(("astronaut_arith.jpg", "JPEG arithmetic-coded (SOF9) 4:2:0, quality 85, 90x70 (written by "
                  "libjpeg-turbo through a small C helper: Pillow cannot write it)"))
    return files


def write_readme(fdir: str, files: list[tuple[str, str]]):
    import PIL
    import transformers
    from PIL import features
    lines = [
        "# Format fixtures (generated by scripts/make_format_fixtures.py; do not edit)", "",
        f"Made with Pillow {PIL.__version__} (libjpeg-turbo {features.version('libjpeg_turbo')}, libwebp "
        f"{features.version('webp')}, libtiff {features.version('libtiff')}) and transformers {transformers.__version__}, "
        "from the photos in ../images. References in ../pixels_u8.safetensors (`format.{file}.rgb`: Pillow's decode + "
        "transformers' `convert_to_rgb`; `format.{file}.32`: the HF processor's uint8 image at 32 px). "
        "tests/pixels.rs `every_format_decodes_like_pillow` requires both to be equal byte for byte.", "",
        "The EXIF file: `Image.open` and the HF processor ignore the orientation tag (checked by the script: "
        "`ImageOps.exif_transpose` gives a different, transposed result); transformers' `load_image` applies it.", "",
        "| file | what |", "|---|---|",
    ] + [f"| `{n}` | {d} |" for n, d in files]
    with open(os.path.join(fdir, "README.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    from PIL import Image, ImageOps
    from safetensors.numpy import save_file

    out = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures"
    rng = np.random.default_rng(SEED)
    t: dict[str, np.ndarray] = {"lut": lut()}

    u8procs = {s: processor(s, False) for s in SIZES}
    full32 = processor(32, True)
    imgdir = os.path.join(out, "images")
    for f in sorted(os.listdir(imgdir)):
        stem = f.rsplit(".", 1)[0]
        if stem == "camera_16bit":
            continue
        with Image.open(os.path.join(imgdir, f)) as im:
            im.load()
            for s, p in u8procs.items():
                t[f"photo.{stem}.{s}"] = run_u8(p, im)
            full = full32(images=im, return_tensors="np")["pixel_values"][0]
            t[f"photo.{stem}.32.f32"] = np.ascontiguousarray(full)
            # the LUT really is the processor's arithmetic: full output = lut[c][u8]
            u8 = t[f"photo.{stem}.32"]
            assert np.array_equal(full, t["lut"][np.arange(3)[:, None, None], u8]), stem

    for i, (a, r) in enumerate(resize_cases(rng)):
        t[f"resize.{i}.in"], t[f"resize.{i}.out"] = a, r

    fdir = os.path.join(out, "formats")
    files = save_format_images(imgdir, fdir)
    for name, _ in files:
        with Image.open(os.path.join(fdir, name)) as im:
            im.load()
            t[f"format.{name}.rgb"] = hf_rgb(im)
            t[f"format.{name}.32"] = run_u8(u8procs[32], im)
            assert np.array_equal(t[f"format.{name}.32"], run_u8(u8procs[32], Image.fromarray(t[f"format.{name}.rgb"])))
            if name.endswith(".jpg"):
                assert im.info.get("progressive", 0) == ("progressive" in name), name
            if "exif6" in name:
                # the processor does not apply the EXIF orientation (transformers' load_image would)
                assert im.getexif().get(0x0112) == 6
                up = ImageOps.exif_transpose(im)
                assert up.size == im.size[::-1]
                assert not np.array_equal(run_u8(u8procs[32], up), t[f"format.{name}.32"])
    # end to end: HF's embeddings of every format file (Image.open -> processor -> CLIPModel), l2-normalised
    import torch
    from transformers import CLIPModel
    for model_name, size in (("tiny", 32), ("odd", 98)):
        model = CLIPModel.from_pretrained(os.path.join(out, model_name), dtype=torch.float32,
                                          attn_implementation="eager").eval()
        proc = processor(size, True)
        for name, _ in files:
            with Image.open(os.path.join(fdir, name)) as im:
                pv = torch.from_numpy(proc(images=im, return_tensors="np")["pixel_values"])
            with torch.no_grad():
                e = model.get_image_features(pixel_values=pv)
            e = getattr(e, "pooler_output", e)[0]
            t[f"embed.{model_name}.{name}"] = np.ascontiguousarray((e / e.norm()).numpy().astype(np.float32))
    save_file(t, os.path.join(out, "pixels_u8.safetensors"))
    write_readme(fdir, files)
    total = sum(os.path.getsize(os.path.join(fdir, n)) for n, _ in files)
    print(f"{len(t)} tensors; formats/ {total} bytes; pixels_u8.safetensors "
          f"{os.path.getsize(os.path.join(out, 'pixels_u8.safetensors'))} bytes")
    for n, desc in files:
        print(f"| `formats/{n}` | {desc} |")


if __name__ == "__main__":
    main()
