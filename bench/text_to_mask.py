"""Speed of words -> coarse mask on the full-size ViT-H/14 architecture with random weights (no quality).

    python bench/text_to_mask.py [--device cuda] [--templates imagenet80|single] [--json out.json]

Times, in one run: one 224 px window through NACLIP's vision tower; the 24-layer OpenCLIP-H text
tower on 64 prompts in one batch against one prompt per call; a whole segmentation of a 336x448
image (6 windows) with 3 classes and the 26 VOC background words: the first run (every prompt
encoded: 80 templates x 29 words with imagenet80) and cached runs (median of --repeats), and the
cached run with one window per vision call (window_batch 1) against all windows in one batch.
Random weights say nothing about masks; they cost the same time. Default templates: imagenet80
on CUDA, single on a CPU (80x less text work; the estimate for imagenet80 is printed too).
"""

import argparse
import json
import time

import torch


def random_fill(module, device, dtype):
    module.to_empty(device=device)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.02)  # uninitialised memory can hold NaN/denormals, which are slow on CPUs
    return module.to(dtype).eval()


def main():
    from open_clip.transformer import TextTransformer, VisionTransformer

    from g4seg_core.commands.bench import timed
    from g4seg_core.errors import G4SegError
    from g4seg_core.files.output_files import atomic_write_text, prepare_output_file
    from g4seg_core.zeroshot import ZeroShotConfig, ZeroShotSegmenter
    from g4seg_core.zeroshot.neighbourhood import from_open_clip
    from g4seg_core.zeroshot.text import OpenCLIPTextTower
    from g4seg_core.zeroshot.vocabulary import IMAGENET_TEMPLATES, parse_classes, template_set

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"))
    ap.add_argument("--templates", default=None, choices=("imagenet80", "single"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.json:
        try:  # before the minutes of measuring
            prepare_output_file(args.json, "--json")
        except G4SegError as exc:
            ap.error(str(exc))
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    templates = args.templates or ("imagenet80" if device.type == "cuda" else "single")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.device("meta"):  # ViT-H/14 (laion2b): 1280 wide, 32 layers, 16 heads; text 1024 wide, 24 layers
        visual = VisionTransformer(image_size=224, patch_size=14, width=1280, layers=32, heads=16, mlp_ratio=4.0,
                                   output_dim=1024)
        text = TextTransformer(width=1024, heads=16, layers=24, mlp_ratio=4.0, output_dim=1024, no_causal_mask=True)
    features = from_open_clip(random_fill(visual, device, dtype), name="ViT-H/14 (random)")
    tower = OpenCLIPTextTower(random_fill(text, device, dtype), name="OpenCLIP-H text (random)")
    out = {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
           "templates": templates}
    classes = parse_classes("cat, sofa, person", "voc")
    with torch.inference_mode():
        window = torch.rand(1, 3, 224, 224)
        features(window)  # warm-up
        out["vision_window_224_s"] = timed(lambda: features(window), args.repeats, sync)[0]
        prompts = [t.replace("{}", "potted plant") for t in IMAGENET_TEMPLATES[:64]]
        tower(prompts[:8])
        out["text_batched_s_per_prompt"] = timed(lambda: tower(prompts), args.repeats, sync)[0] / len(prompts)
        out["text_one_per_call_s_per_prompt"] = timed(lambda: [tower([p]) for p in prompts[:16]], args.repeats,
                                                      sync)[0] / 16
        image = torch.rand(3, 336, 448)
        seg = ZeroShotSegmenter(features, tower, ZeroShotConfig(templates=templates))
        out["prompts_first_run"] = len(classes.queries) * len(template_set(templates))
        start = time.perf_counter()
        seg.segment(image, classes)
        sync()
        out["segment_first_run_s"] = time.perf_counter() - start
        out["segment_cached_s"] = timed(lambda: seg.segment(image, classes), args.repeats, sync)[0]
        one_by_one = ZeroShotSegmenter(features, seg.text, ZeroShotConfig(templates=templates, window_batch=1))
        out["segment_cached_one_window_per_call_s"] = timed(lambda: one_by_one.segment(image, classes),
                                                            args.repeats, sync)[0]
    # the recipe's 80 templates encode 80 prompts per word on the first run of a class list
    out["first_run_text_estimate_s_imagenet80"] = out["text_batched_s_per_prompt"] * 80 * len(classes.queries)
    print(json.dumps(out, indent=2))
    if args.json:
        atomic_write_text(args.json, json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
