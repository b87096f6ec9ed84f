"""The one summary bench/gpu.sh prints: python bench/gpu_summary.py OUT_DIR (core.json [+ comfyui.json])."""

import json
import statistics
import sys
from pathlib import Path

import torch

out = Path(sys.argv[1])
core = json.loads((out / "core.json").read_text())
gpu = torch.cuda.get_device_name(0) if core["device"].startswith("cuda") else "no GPU (" + core["device"] + ")"
print("\n==================== G4Seg GPU summary ====================")
print(f"{gpu}; torch {torch.__version__}, CUDA {torch.version.cuda}; {core['size']}x{core['size']}, SD2.1 "
      f"architecture, random weights")
e2e = core["end_to_end_s"]
print(f"core, {core['dtype']} ({core['dtype_reason']}): {e2e:.3f} s per image one at a time (goal <= 0.35 s on "
      f"H100/H200), end to end / bare passes {core['ratio_end_to_end_over_bare']:.2f}")
if "images_per_s_batched" in core:
    print(f"batched {core['batch']}: {core['images_per_s_batched']:.2f} images/s (goal >= 10), "
          f"{core['seconds_per_image_batched']:.3f} s per image")
if "peak_gpu_mib" in core:
    print(f"peak GPU memory: {core['peak_gpu_mib']:.0f} MiB one image"
          + (f", {core['peak_gpu_mib_batched']:.0f} MiB batched" if "peak_gpu_mib_batched" in core else ""))
print("stages (s): " + ", ".join(f"{k} {v:.3f}" for k, v in core["stages_s"].items()))
if "float32_reference" in core:
    a = core["agreement_with_float32"]
    print(f"vs float32 in the same run: {core['speedup_over_float32']['end_to_end']:.2f}x faster end to end; "
          f"latent rel err {a['vae_encode_latent_rel_err']:.2%}, UNet {a['unet_output_rel_err']:.2%}, image "
          f"{a['vae_decode_image_rel_err']:.2%}, refined prob max diff {a['refined_prob_max_abs_diff']:.4f}, "
          f"binary IoU {a['binary_iou']:.4f}")
comfy = out / "comfyui.json"
if comfy.exists():
    for name, r in json.loads(comfy.read_text())["results"].items():
        node = statistics.median(r["node_s"])
        print(f"ComfyUI G4SegRefine ({name}): {node:.3f} s per image, node/core {r['node_over_core_median']:.2f}; "
              f"ComfyUI dtypes {r['comfy_dtypes']}")
else:
    print("ComfyUI comparison: skipped (set COMFYUI_PATH to a ComfyUI checkout to run it)")
print(f"numbers: {out}/core.json" + (f", {comfy}" if comfy.exists() else ""))
