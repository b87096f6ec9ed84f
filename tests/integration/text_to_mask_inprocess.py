"""G4SegTextToMask inside ComfyUI's own Python, on tiny random towers built with ComfyUI's classes:

    COMFYUI_PATH=/work/ComfyUI python tests/integration/text_to_mask_inprocess.py WORKDIR
    COMFYUI_PATH=/work/ComfyUI python tests/integration/text_to_mask_inprocess.py loaders CKPT CLIP_VISION_H

The same weights are written as files the core loads (an SD2-style single file's text tower, a
transformers-format clip_vision file) and loaded into ComfyUI's CLIP (SD2ClipModel, converted by
ComfyUI's own clip_text_transformers_convert) and ClipVisionModel. Prints one JSON line: the node's
per-class probabilities against the core's (parity), a diffusers-style file without text_projection
and an SD1 CLIP refused with the right messages.
"""

import json
import os
import sys
import types

COMFY = os.environ["COMFYUI_PATH"]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, COMFY)

import torch  # noqa: E402

import comfy.cli_args  # noqa: E402

if not torch.cuda.is_available():
    comfy.cli_args.args.cpu = True
# fp32 text encoder and CLIP vision weights: parity down to float round-off (fp16 storage alone moves
# probabilities by ~1e-3 at logit scale 40)
comfy.cli_args.args.fp32_text_enc = True
import comfy.clip_vision  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402
from comfy.text_encoders import sd2_clip  # noqa: E402

sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

WIDTH, HEADS = 128, 2  # 64-wide heads like every released CLIP (heads are not in the weights)
OUT = WIDTH  # ComfyUI builds text_projection width x width (as in SD2.x / SDXL)


def towers(seed=0):
    from open_clip.transformer import TextTransformer, VisionTransformer

    torch.manual_seed(seed)
    visual = VisionTransformer(image_size=64, patch_size=16, width=WIDTH, layers=3, heads=HEADS, mlp_ratio=2.0,
                               output_dim=OUT).eval()
    text = TextTransformer(width=WIDTH, heads=HEADS, layers=3, mlp_ratio=2.0, output_dim=OUT).eval()
    with torch.no_grad():
        text.positional_embedding.normal_(0, 0.1)
        text.text_projection.normal_(0, WIDTH ** -0.5)
    return visual, text


def comfy_clip(text_sd):
    target = types.SimpleNamespace(clip=sd2_clip.SD2ClipModel, tokenizer=sd2_clip.SD2Tokenizer, params={})
    config = {"num_hidden_layers": 3, "hidden_size": WIDTH, "num_attention_heads": HEADS,
              "intermediate_size": 2 * WIDTH, "hidden_act": "gelu", "max_position_embeddings": 77,
              "eos_token_id": 49407, "vocab_size": 49408, "projection_dim": OUT}
    clip = comfy.sd.CLIP(target, model_options={"clip_h_model_config": config})
    sd = comfy.utils.clip_text_transformers_convert(dict(text_sd), "cond_stage_model.model.", "clip_h.transformer.")
    missing, _ = clip.load_sd(sd, full_model=True)
    return clip, [k for k in missing if "logit_scale" not in k]


def comfy_vision(vision_sd, workdir):
    path = os.path.join(workdir, "tiny_clip_vision.json")
    with open(path, "w") as f:
        json.dump({"hidden_size": WIDTH, "intermediate_size": 2 * WIDTH, "num_hidden_layers": 3,
                   "num_attention_heads": HEADS, "image_size": 64, "patch_size": 16, "projection_dim": OUT,
                   "hidden_act": "gelu", "num_channels": 3, "model_type": "clip_vision_model"}, f)
    cv = comfy.clip_vision.ClipVisionModel(path)
    missing, _ = cv.load_sd(vision_sd)
    return cv, missing


def main(workdir):
    import numpy as np
    from safetensors.torch import save_file

    from test_zeroshot import to_transformers

    from g4seg_core.zeroshot import ZeroShotConfig, load_segmenter
    from g4seg_core.errors import G4SegError

    os.makedirs(workdir, exist_ok=True)
    visual, text = towers()
    text_sd = {"cond_stage_model.model." + k: v.contiguous() for k, v in text.state_dict().items() if k != "attn_mask"}
    text_file = os.path.join(workdir, "tiny_sd2_text.safetensors")
    save_file(text_sd, text_file)
    hf = to_transformers(visual)
    vision_sd = {("vision_model." + k if not k.startswith(("vision_model.", "visual_projection.")) else k): v.contiguous()
                 for k, v in hf.state_dict().items() if "position_ids" not in k}
    # "laion" in the name: the core takes GELU for it, as ComfyUI's ViT-H/bigG configs do
    vision_file = os.path.join(workdir, "tiny_laion_clip_vision.safetensors")
    save_file(vision_sd, vision_file)

    pack_nodes = __import__("nodes.text_to_mask_node", fromlist=["x"])  # the repo's nodes package (ROOT on sys.path)
    clip, missing_text = comfy_clip(text_sd)
    cv, missing_vision = comfy_vision(vision_sd, workdir)
    config = dict(background="sky, wall, grass", prob_threshold=0.1, templates="single", short_side=96, window=64,
                  stride=32)
    image = torch.rand(1, 72, 100, 3, generator=torch.Generator().manual_seed(0))
    classes = "cat, potted plant (indoor)|plant, person"
    with torch.inference_mode():
        masks, label_map, names = pack_nodes.G4SegTextToMask().segment(clip, cv, image, classes, **config)
    core = load_segmenter(vision_file, text_file, ZeroShotConfig(**config))
    want = core.segment(image[0].permute(2, 0, 1), classes)
    out = {"missing_text": missing_text, "missing_vision": list(missing_vision), "masks": list(masks.shape),
           "label_map": list(label_map.shape), "names": names,
           "prob_max_diff": float(np.abs(masks.cpu().numpy() - want.probs).max()),
           "label_agreement": float((pack_nodes_labels(label_map) == want.labels).mean())}

    # the node's text tower batches token rows: equal to ComfyUI's own one-prompt encode_from_tokens
    from nodes.comfy.zeroshot import ComfyTextTower

    tower = ComfyTextTower(clip, batch_size=4)
    prompts = [f"a photo of a {w}." for w in ("cat", "potted plant (indoor)", "person", "sky", "wall", "grass")]
    with torch.inference_mode():
        batched = tower(prompts)
        one_by_one = torch.stack([tower.encode_one(p) for p in prompts])
    out["text_batched_vs_one_by_one_max_diff"] = float((batched - one_by_one).abs().max())
    out["text_scale"] = float(one_by_one.abs().max())

    # a checkpoint without text_projection (diffusers-converted): ComfyUI leaves it uninitialised
    no_proj = {k: v for k, v in text_sd.items() if not k.endswith("text_projection")}
    clip2, _ = comfy_clip(no_proj)
    with torch.no_grad():
        clip2.cond_stage_model.clip_h.transformer.text_projection.weight.zero_()  # what fresh CPU memory holds
    try:
        pack_nodes.G4SegTextToMask().segment(clip2, cv, image, "cat", **config)
        out["no_projection"] = "accepted"
    except G4SegError as exc:
        out["no_projection"] = str(exc)
    return out


def pack_nodes_labels(label_map):
    """VOC colours back to indices (the node outputs a colour picture)."""
    import numpy as np

    from g4seg_core.files.palettes import voc_palette

    colours = (label_map[0].cpu().numpy() * 255).round().astype(np.int64)
    palette = voc_palette().astype(np.int64)
    codes = colours[..., 0] * 65536 + colours[..., 1] * 256 + colours[..., 2]
    lut = {int(c[0] * 65536 + c[1] * 256 + c[2]): i for i, c in enumerate(palette[:254])}
    return np.vectorize(lut.get)(codes)


def loaders(ckpt, clip_vision_path):
    """The nodes on models from ComfyUI's own loaders (the random-weight SD2.1 test checkpoint and ViT-H/14):
    Text to Mask, then Refine Classes on its masks, as the words -> label map workflow wires them."""
    import comfy.clip_vision

    from nodes.text_to_mask_node import G4SegRefineClasses, G4SegTextToMask

    model, clip, vae = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=True, output_clip=True)[:3]
    cv = comfy.clip_vision.load(clip_vision_path)
    image = torch.rand(1, 64, 80, 3, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        masks, label_map, names = G4SegTextToMask().segment(clip, cv, image, "cat, sofa", background="voc",
                                                            prob_threshold=0.0, templates="single", short_side=224)
        refined, fused = G4SegRefineClasses().refine(
            model, clip, vae, cv, image, masks, names, timestep=400, seed=0, emi_mode="densediffusion",
            cross_weight=1.0, self_weight=0.3, beta=0.8, band_low=0.2, band_high=0.6, iterations=1, threshold=0.01,
            size=64, soften="sdf", soften_width=8.0)
    return {"masks": list(masks.shape), "label_map": list(label_map.shape), "names": names,
            "refined": list(refined.shape), "fused": list(fused.shape),
            "finite": bool(torch.isfinite(masks).all() and torch.isfinite(refined).all())}


if __name__ == "__main__":
    if sys.argv[1] == "loaders":
        print(json.dumps(loaders(sys.argv[2], sys.argv[3])))
    else:
        print(json.dumps(main(sys.argv[1])))
