"""G4SegTextToMask's text tower in a real ComfyUI: prompts batched against one prompt per call.

    COMFYUI_PATH=/path/ComfyUI python bench/comfy_text.py [--device cpu|cuda] [--prompts 64] [--json out.json]

Builds ComfyUI's own SD2.x CLIP (OpenCLIP ViT-H/14 text tower, full size, 24 layers) with random
weights (they cost the same time as real ones; no file is read), then times, in one process,
`ComfyTextTower` (token rows through the tower in batches) against `encode_one` (ComfyUI's
encode_from_tokens per prompt, how the node encoded before), on the same prompts, and reports how far
the two lie apart. A first run of G4SegTextToMask with the recipe's 80 templates encodes 80 x (classes +
26 background words) prompts: 2,320 for 3 classes.
"""

import argparse
import json
import os
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="cpu or cuda (default: ComfyUI's choice)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    comfy_path = os.environ.get("COMFYUI_PATH")
    if not comfy_path or not (Path(comfy_path) / "main.py").exists():
        ap.error("set COMFYUI_PATH to a ComfyUI checkout")
    sys.path.insert(0, comfy_path)
    sys.path.insert(0, str(ROOT))
    import torch

    import comfy.cli_args

    if args.device == "cpu" or not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    import comfy.sd
    from comfy.text_encoders import sd2_clip

    from g4seg_core.commands.bench import timed
    from g4seg_core.files.output_files import atomic_write_text, prepare_output_file
    from g4seg_core.zeroshot.vocabulary import IMAGENET_TEMPLATES
    from nodes.comfy.zeroshot import ComfyTextTower

    if args.json:
        prepare_output_file(args.json, "--json")
    target = types.SimpleNamespace(clip=sd2_clip.SD2ClipModel, tokenizer=sd2_clip.SD2Tokenizer, params={})
    clip = comfy.sd.CLIP(target)
    with torch.no_grad():
        for p in clip.cond_stage_model.parameters():
            p.normal_(0, 0.02)  # ComfyUI leaves weights uninitialised until a file is loaded
    tower = ComfyTextTower(clip)
    words = ["cat", "potted plant", "sky", "wall"]
    prompts = [t.replace("{}", words[i % len(words)]) for i, t in
               enumerate((IMAGENET_TEMPLATES * (args.prompts // len(IMAGENET_TEMPLATES) + 1))[:args.prompts])]
    device = clip.patcher.load_device
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    with torch.inference_mode():
        tower(prompts[:4])  # loads the model onto its device, warms up
        batched_s, batched = timed(lambda: tower(prompts), args.repeats, sync)
        one_s, one = timed(lambda: torch.stack([tower.encode_one(p) for p in prompts]), args.repeats, sync)
    out = {"device": str(device), "dtype": str(clip.cond_stage_model.clip_h.transformer.text_projection.weight.dtype),
           "prompts": len(prompts), "batch_size": tower.batch_size,
           "batched_s_per_prompt": batched_s / len(prompts), "one_per_call_s_per_prompt": one_s / len(prompts),
           "speedup": one_s / batched_s, "max_abs_diff": float((batched - one).abs().max()),
           "scale": float(one.abs().max()),
           "first_run_estimate_s_3_classes_imagenet80": batched_s / len(prompts) * 80 * 29}
    print(json.dumps(out, indent=2))
    if args.json:
        atomic_write_text(args.json, json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
