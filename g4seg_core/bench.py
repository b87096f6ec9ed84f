"""`g4seg bench`: per-stage time and peak memory on a full-size SD2.1-architecture model.

Random weights cost the same compute as real ones. Reports the ratio of the end-to-end
refine time to the sum of the bare model passes (VAE encode + UNet + VAE decode + CLIP x2)
measured in the same run, and the correspondence step at a 128x128 grid.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from .config import G4SegConfig
from .errors import G4SegError
from .output_files import atomic_write_text

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _timed(fn, repeats: int, sync):
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def _example_inputs(size: int):
    from . import mask_files

    image_path, mask_path = EXAMPLES / "cat.png", EXAMPLES / "cat_coarse.png"
    if image_path.exists() and mask_path.exists():
        from PIL import Image

        return np.asarray(Image.open(image_path).convert("RGB")), mask_files.load_probability(mask_path)
    rng = np.random.default_rng(0)
    mask = np.zeros((size, size), np.float32)
    mask[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
    return (rng.random((size, size, 3)) * 255).astype(np.uint8), mask


def run_bench(args) -> int:
    import open_clip

    from .clip_features import DenseCLIPFeatures
    from .correspondence import match_upsampled_features
    from .components import random_components
    from .pipeline import G4SegPipeline

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("float32" if device == "cpu" else "float16")
    if device == "cpu" and dtype != "float32":
        raise G4SegError(f"--dtype {dtype} on CPU: half precision is slow or unsupported there; "
                         "use --dtype float32 (the default on CPU) or --device cuda")
    batch = args.batch if args.batch is not None else (0 if device == "cpu" else 8)
    if batch < 0:
        raise G4SegError(f"--batch {batch}: use 0 (off) or a positive number of images")
    print(f"g4seg bench: SD2.1 architecture, random weights, {args.size}x{args.size}, {device}, {dtype}, "
          f"torch threads {torch.get_num_threads()}")
    torch.manual_seed(0)
    build_start = time.perf_counter()
    components = random_components("sd21")
    clip = DenseCLIPFeatures.from_open_clip(open_clip.create_model("ViT-B-16", pretrained=None).visual,
                                            name="ViT-B-16 (random)")
    pipe = G4SegPipeline(components, clip, device=device, dtype=dtype)
    print(f"built models in {time.perf_counter() - build_start:.1f} s")
    sync = pipe._sync
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    config = G4SegConfig(size=args.size, dtype=dtype)
    image, mask = _example_inputs(args.size)

    pipe.refine(image, mask, "cat", config)  # warm-up (allocations, kernels, prompt cache)
    e2e_time, result = _timed(lambda: pipe.refine(image, mask, "cat", config), args.repeats, sync)

    pixels = pipe.to_pixels(image, config.size)
    _, prompt_embedding, _ = pipe.token_positions("cat", config)
    t_encode, z0 = _timed(lambda: pipe.encode(pixels), args.repeats, sync)
    unet = components.unet
    timestep = torch.tensor([config.timestep], device=pipe.device)
    hidden = prompt_embedding.hidden_states.to(pipe.device, unet.dtype)
    kwargs = components.unet_kwargs(prompt_embedding, config.size, config.size)
    with torch.no_grad():
        t_unet, _ = _timed(lambda: unet(z0.to(unet.dtype), timestep, encoder_hidden_states=hidden, **kwargs).sample,
                           args.repeats, sync)
    t_decode, decoded = _timed(lambda: pipe.decode(z0), args.repeats, sync)
    t_clip, _ = _timed(lambda: pipe.features(pixels), args.repeats, sync)
    bare = t_encode + t_unet + t_decode + 2 * t_clip

    feats = torch.nn.functional.normalize(torch.randn(512, 32, 32), dim=0)
    match_upsampled_features(feats, feats.roll(1, dims=1), 128)  # warm-up, like the end-to-end run
    t_corr, _ = _timed(lambda: match_upsampled_features(feats, feats.roll(1, dims=1), 128), max(args.repeats, 3),
                       lambda: None)

    numbers = {
        "device": device, "dtype": dtype, "size": args.size, "threads": torch.get_num_threads(),
        "end_to_end_s": e2e_time, "stages_last_run_s": result.timings,
        "bare_s": {"vae_encode": t_encode, "unet": t_unet, "vae_decode": t_decode, "clip_x2": 2 * t_clip},
        "bare_sum_s": bare, "ratio_end_to_end_over_bare": e2e_time / bare,
        "correspondence_128_grid_s": t_corr, "peak_rss_mib": _peak_rss_mib(),
    }
    if batch:
        images, masks = [image] * batch, [mask] * batch
        pipe.refine_batch(images, masks, "cat", config)  # warm-up at this batch size
        t_batch, _ = _timed(lambda: pipe.refine_batch(images, masks, "cat", config), args.repeats, sync)
        numbers.update({"batch": batch, "batch_s": t_batch, "images_per_s_batched": batch / t_batch,
                        "seconds_per_image_batched": t_batch / batch})
    if device.startswith("cuda"):
        numbers["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    print(json.dumps(numbers, indent=2))
    print(f"\nend-to-end {e2e_time:.3f} s / bare passes {bare:.3f} s = ratio {e2e_time / bare:.3f} (target <= 1.15)")
    print(f"correspondence at 128x128 grid: {t_corr:.3f} s (target < 1 s on 2 CPU cores)")
    if batch:
        print(f"batched: {batch} images in {t_batch:.3f} s = {batch / t_batch:.2f} images/s "
              f"({t_batch / batch:.3f} s per image; one at a time: {e2e_time:.3f} s)")
    if args.json:
        atomic_write_text(args.json, json.dumps(numbers, indent=2))
    return 0
