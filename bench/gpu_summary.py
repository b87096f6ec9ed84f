"""The one summary bench/gpu.sh prints: python bench/gpu_summary.py OUT_DIR (core.json [+ softening.json, text.json, comfy_text.json, comfyui.json])."""

import json
import statistics
import sys
from pathlib import Path

import torch

from g4seg_core.commands.bench import format_table

out = Path(sys.argv[1])
core = json.loads((out / "core.json").read_text())
gpu = torch.cuda.get_device_name(0) if core["device"].startswith("cuda") else "no GPU (" + core["device"] + ")"
print("\n==================== G4Seg GPU summary ====================")
print(f"{gpu}; torch {torch.__version__}, CUDA {torch.version.cuda}; {core['size']}x{core['size']}, SD2.1 "
      f"architecture + CLIP ViT-B/16, random weights; {core['dtype']} ({core['dtype_reason']})")
print(format_table(core))
print("targets (H100/H200, float16, 512x512): one image <= 0.08 s eager, <= 0.05 s compiled; 8 distinct images "
      ">= 30 images/s; end to end / bare <= 1.15 at batch 1 and 8; operators batch 4 / batch 1 <= 1.3")
if "peak_gpu_mib" in core:
    print(f"peak GPU memory: {core['peak_gpu_mib']:.0f} MiB one image"
          + (f", {core['peak_gpu_mib_batched']:.0f} MiB batched" if "peak_gpu_mib_batched" in core else ""))
if "float32_reference" in core:
    a = core["agreement_with_float32"]
    print(f"vs float32 in the same run: {core['speedup_over_float32']['end_to_end']:.2f}x faster end to end; "
          f"latent rel err {a['vae_encode_latent_rel_err']:.2%}, UNet {a['unet_output_rel_err']:.2%}, image "
          f"{a['vae_decode_image_rel_err']:.2%}, refined prob max diff {a['refined_prob_max_abs_diff']:.4f}, "
          f"binary IoU {a['binary_iou']:.4f}")
softening = out / "softening.json"
if softening.exists():
    m = json.loads(softening.read_text())
    rows = [f"{key} {row['numpy_per_mask_ms']:.2f} -> {row['batched_per_mask_ms']:.2f} ms/mask"
            for key, row in m.items() if isinstance(row, dict)]
    print(f"masks prepared on {m['device']} ({m['size']}², numpy one by one -> batched on the device): "
          + "; ".join(rows) + f"; signed distance equal to numpy on {m['exact_cases']} masks")
else:
    print("masks prepared on the device: no numbers (bench/softening_device.py failed or did not run: see its output)")
text = out / "text.json"
if text.exists():
    t = json.loads(text.read_text())
    print(f"words -> masks (ViT-H/14 towers, {t['dtype']}): first run {t['segment_first_run_s']:.3f} s "
          f"({t['templates']} templates, {t['prompts_first_run']} prompts), cached {t['segment_cached_s']:.3f} s; "
          f"text {t['text_batched_s_per_prompt'] * 1e3:.2f} ms/prompt batched vs "
          f"{t['text_one_per_call_s_per_prompt'] * 1e3:.2f} ms one per call; one 224 px window "
          f"{t['vision_window_224_s']:.3f} s")
else:
    print("words -> masks: skipped (--skip-text)")
comfy_text = out / "comfy_text.json"
if comfy_text.exists():
    c = json.loads(comfy_text.read_text())
    print(f"ComfyUI text tower (G4SegTextToMask, {c['dtype']}): {c['batched_s_per_prompt'] * 1e3:.2f} ms/prompt in "
          f"batches of {c['batch_size']} vs {c['one_per_call_s_per_prompt'] * 1e3:.2f} ms one per call "
          f"({c['speedup']:.1f}x; max diff {c['max_abs_diff']:.1e}); a first run with 80 templates and 3 classes "
          f"~{c['first_run_estimate_s_3_classes_imagenet80']:.2f} s of text")
comfy = out / "comfyui.json"
if comfy.exists():
    for name, r in json.loads(comfy.read_text())["results"].items():
        node = statistics.median(r["node_s"])
        print(f"ComfyUI G4SegRefine ({name}): {node:.3f} s per image, node/core {r['node_over_core_median']:.2f} "
              f"(target <= 1.15); ComfyUI dtypes {r['comfy_dtypes']}")
else:
    print("ComfyUI comparison: skipped (set COMFYUI_PATH to a ComfyUI checkout to run it)")
print(f"numbers: {out}/core.json" + (f", {text}" if text.exists() else "") + (f", {comfy}" if comfy.exists() else ""))
