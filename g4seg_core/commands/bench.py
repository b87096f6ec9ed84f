"""`g4seg bench`: per-stage time and peak memory on a full-size SD2.1-architecture model.

Random weights cost the same compute as real ones. Reports the ratio of the end-to-end
refine time to the sum of the bare model passes (VAE encode + UNet + VAE decode + CLIP x2)
measured in the same run, and the correspondence step at a 128x128 grid. When the dtype is
not float32, the same weights also run in float32 first: speed-up per stage and end to end,
and how far the outputs lie from float32's (latent, UNet output, images, CLIP features,
refined probability, binary mask IoU).
"""

from __future__ import annotations

import json
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from ..config import G4SegConfig
from ..errors import G4SegError
from ..files.output_files import atomic_write_text, prepare_output_file
from ..loading.precision import default_device, dtype_name, resolve_dtype

EXAMPLES = Path(__file__).resolve().parents[2] / "assets"


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def timed(fn, repeats: int, sync, cpu_times=None):
    """Median wall seconds of `repeats` calls and the last output; `cpu_times` receives each call's
    process CPU seconds (all threads): on a shared CPU machine they move less than wall time."""
    times, out = [], None
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        out = fn()
        sync()
        times.append(time.perf_counter() - start)
        if cpu_times is not None:
            cpu_times.append(time.process_time() - cpu_start)
    return statistics.median(times), out


def _example_inputs(size: int):
    from ..files import mask_files
    from ..files.image_files import read_rgb

    image_path, mask_path = EXAMPLES / "cat.png", EXAMPLES / "cat_coarse.png"
    if image_path.exists() and mask_path.exists():
        return read_rgb(image_path).pixels, mask_files.load_probability(mask_path)
    rng = np.random.default_rng(0)
    mask = np.zeros((size, size), np.float32)
    mask[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
    return (rng.random((size, size, 3)) * 255).astype(np.uint8), mask


def _median_stages(results) -> dict:
    keys = [k for k in results[0].timings if k != "batch_size"]
    return {k: statistics.median(r.timings[k] for r in results) for k in keys}


def _measure(pipe, image, mask, config, repeats: int, latent_in=None) -> dict:
    """One dtype: end to end (median of `repeats` after a warm-up), per-stage and bare-pass seconds, and
    the outputs the agreement figures compare. Bare UNet/decode passes start from `latent_in` (the first
    dtype's VAE latent) so that every dtype is compared on the same input."""
    sync = pipe.sync
    pipe.refine(image, mask, "cat", config)  # warm-up (allocations, kernels, prompt cache)
    results, cpu_times = [], []
    e2e_time, _ = timed(lambda: results.append(pipe.refine(image, mask, "cat", config)), repeats, sync, cpu_times)
    result = results[-1]

    pixels = pipe.to_pixels(image, config.size)
    _, prompt_embedding, _ = pipe.token_positions("cat", config)
    t_encode, z0 = timed(lambda: pipe.encode(pixels), repeats, sync)
    latent_in = z0 if latent_in is None else latent_in.to(pipe.device)
    unet = pipe.components.unet
    timestep = torch.tensor([config.timestep], device=pipe.device)
    hidden = prompt_embedding.hidden_states.to(pipe.device, unet.dtype)
    kwargs = pipe.components.unet_kwargs(prompt_embedding, config.size, config.size)
    with torch.no_grad():
        t_unet, eps = timed(lambda: unet(latent_in.to(unet.dtype), timestep, encoder_hidden_states=hidden,
                                          **kwargs).sample, repeats, sync)
    t_decode, decoded = timed(lambda: pipe.decode(latent_in), repeats, sync)
    t_clip, feats = timed(lambda: pipe.features(pixels), repeats, sync)
    bare = t_encode + t_unet + t_decode + 2 * t_clip
    numbers = {
        "dtype": dtype_name(pipe.dtype), "dtype_reason": pipe.dtype_reason, "end_to_end_s": e2e_time,
        "end_to_end_cpu_s": statistics.median(cpu_times),
        "stages_s": _median_stages(results),
        "bare_s": {"vae_encode": t_encode, "unet": t_unet, "vae_decode": t_decode, "clip_x2": 2 * t_clip},
        "bare_sum_s": bare, "ratio_end_to_end_over_bare": e2e_time / bare,
    }
    outputs = {"latent": z0.float().cpu(), "unet_out": eps.float().cpu(), "decoded": decoded.float().cpu(),
               "clip": feats.float().cpu(), "result": result}
    return {"numbers": numbers, "outputs": outputs}


def _relative_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-12))


def agreement(out, ref) -> dict:
    """How far `out` (a lower precision) lies from `ref` (float32): same weights, inputs and seed."""
    r, q = ref["result"], out["result"]
    inter = np.logical_and(r.binary, q.binary).sum()
    union = np.logical_or(r.binary, q.binary).sum()
    cos = (out["clip"] * ref["clip"]).sum(dim=1)  # features are L2-normalised per location
    gen_r, gen_q = torch.from_numpy(r.generated_pixels), torch.from_numpy(q.generated_pixels)
    return {
        "vae_encode_latent_rel_err": _relative_error(out["latent"], ref["latent"]),
        "unet_output_rel_err": _relative_error(out["unet_out"], ref["unet_out"]),
        "vae_decode_image_rel_err": _relative_error(out["decoded"], ref["decoded"]),
        "clip_feature_cosine_mean": float(cos.mean()), "clip_feature_cosine_min": float(cos.min()),
        "generated_image_rel_err": _relative_error(gen_q, gen_r),
        "correspondence_same_match_fraction": float((q.correspondence == r.correspondence).mean()),
        "refined_prob_max_abs_diff": float(np.abs(q.prob - r.prob).max()),
        "refined_prob_mean_abs_diff": float(np.abs(q.prob - r.prob).mean()),
        "binary_iou": float(inter / union) if union else 1.0,
        "binary_pixels_differing": int((q.binary != r.binary).sum()),
        "pixels_changed_by_refinement_float32": int(np.count_nonzero(np.abs(r.prob - r.coarse) > 1e-6)),
    }


def bench_models():
    """Full-size SD2.1 architecture and CLIP ViT-B/16, random weights (seeded): (components, clip)."""
    import open_clip

    from ..models.clip_features import DenseCLIPFeatures
    from ..models.components import random_components

    torch.manual_seed(0)
    components = random_components("sd21")
    clip = DenseCLIPFeatures.from_open_clip(open_clip.create_model("ViT-B-16", pretrained=None).visual,
                                            name="ViT-B-16 (random)")
    return components, clip


def run_bench(args) -> int:
    from ..method.correspondence import match_upsampled_features
    from ..pipeline import G4SegPipeline

    device = default_device(args.device)
    choice = resolve_dtype(args.dtype, device, "sd21")
    reference = None if args.reference == "none" or choice.dtype == torch.float32 else torch.float32
    batch = args.batch if args.batch is not None else (0 if device == "cpu" else 8)
    if batch < 0:
        raise G4SegError(f"--batch {batch}: use 0 (off) or a positive number of images")
    if args.repeats < 1:
        raise G4SegError(f"--repeats {args.repeats}: use 1 or more")
    if args.json:
        prepare_output_file(args.json, "--json")  # minutes of measuring must not end in an unwritable path
    print(f"g4seg bench: SD2.1 architecture, random weights, {args.size}x{args.size}, {device}, "
          f"{choice.name} ({choice.reason}), torch threads {torch.get_num_threads()}"
          + (", float32 reference in the same run" if reference is not None else ""))
    build_start = time.perf_counter()
    components, clip = bench_models()
    print(f"built models in {time.perf_counter() - build_start:.1f} s")
    config = G4SegConfig(size=args.size)
    image, mask = _example_inputs(args.size)

    # The float32 reference first: the same modules are then cast in place (one copy of the weights).
    phases, latent_in = {}, None
    for dtype in ([reference] if reference is not None else []) + [choice.dtype]:
        pipe = G4SegPipeline(components, clip, device=device, dtype=args.dtype if dtype == choice.dtype else dtype)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        phase = _measure(pipe, image, mask, config, args.repeats, latent_in)
        latent_in = phase["outputs"]["latent"] if latent_in is None else latent_in
        phase["numbers"]["peak_rss_mib"] = _peak_rss_mib()
        if device.startswith("cuda"):
            phase["numbers"]["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
        phases[dtype_name(dtype)] = phase
        print(f"  {dtype_name(dtype)}: end to end {phase['numbers']['end_to_end_s']:.3f} s", flush=True)
    main = phases[choice.name]["numbers"]

    feats = torch.nn.functional.normalize(torch.randn(512, 32, 32), dim=0)
    match_upsampled_features(feats, feats.roll(1, dims=1), 128)  # warm-up, like the end-to-end run
    t_corr, _ = timed(lambda: match_upsampled_features(feats, feats.roll(1, dims=1), 128), max(args.repeats, 3),
                       lambda: None)

    numbers = {"device": device, "dtype": choice.name, "dtype_reason": choice.reason, "size": args.size,
               "threads": torch.get_num_threads(), **{k: v for k, v in main.items() if k not in ("dtype", "dtype_reason")},
               "correspondence_128_grid_s": t_corr}
    if reference is not None:
        ref = phases["float32"]
        numbers["float32_reference"] = ref["numbers"]
        numbers["speedup_over_float32"] = {
            "end_to_end": ref["numbers"]["end_to_end_s"] / main["end_to_end_s"],
            "end_to_end_cpu_time": ref["numbers"]["end_to_end_cpu_s"] / main["end_to_end_cpu_s"],
            **{k: ref["numbers"]["stages_s"][k] / v for k, v in main["stages_s"].items() if v > 0}}
        numbers["agreement_with_float32"] = agreement(phases[choice.name]["outputs"], ref["outputs"])
    if batch:
        images, masks = [image] * batch, [mask] * batch
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        pipe.refine_batch(images, masks, "cat", config)  # warm-up at this batch size
        t_batch, _ = timed(lambda: pipe.refine_batch(images, masks, "cat", config), args.repeats, pipe.sync)
        numbers.update({"batch": batch, "batch_s": t_batch, "images_per_s_batched": batch / t_batch,
                        "seconds_per_image_batched": t_batch / batch})
        if device.startswith("cuda"):
            numbers["peak_gpu_mib_batched"] = torch.cuda.max_memory_allocated() / 2 ** 20
    print(json.dumps(numbers, indent=2))
    e2e, bare = main["end_to_end_s"], main["bare_sum_s"]
    print(f"\n{choice.name}: end-to-end {e2e:.3f} s / bare passes {bare:.3f} s = ratio {e2e / bare:.3f} "
          "(target <= 1.15)")
    if reference is not None:
        ref_e2e = numbers["float32_reference"]["end_to_end_s"]
        a = numbers["agreement_with_float32"]
        speedup = numbers["speedup_over_float32"]
        stages = ", ".join(f"{k} {v:.2f}x" for k, v in speedup.items()
                           if not k.startswith("end_to_end") and k != "total")
        print(f"{choice.name} vs float32, same run: end to end {e2e:.3f} s vs {ref_e2e:.3f} s = "
              f"{ref_e2e / e2e:.2f}x faster ({e2e / ref_e2e:.2f} of the time; process CPU time "
              f"{speedup['end_to_end_cpu_time']:.2f}x); per stage: {stages}")
        print(f"agreement with float32 (same weights, image, mask, seed): latent rel err "
              f"{a['vae_encode_latent_rel_err']:.2%}, UNet output {a['unet_output_rel_err']:.2%}, decoded image "
              f"{a['vae_decode_image_rel_err']:.2%}, generated image {a['generated_image_rel_err']:.2%}, CLIP cosine "
              f"mean {a['clip_feature_cosine_mean']:.4f} (min {a['clip_feature_cosine_min']:.4f}), same match "
              f"{a['correspondence_same_match_fraction']:.1%}; refined prob max diff "
              f"{a['refined_prob_max_abs_diff']:.4f} (mean {a['refined_prob_mean_abs_diff']:.2e}), binary IoU "
              f"{a['binary_iou']:.4f} ({a['binary_pixels_differing']} pixels differ; float32 refinement changed "
              f"{a['pixels_changed_by_refinement_float32']})")
    print(f"correspondence at 128x128 grid: {t_corr:.3f} s (target < 1 s on 2 CPU cores)")
    if batch:
        print(f"batched: {batch} images in {numbers['batch_s']:.3f} s = {numbers['images_per_s_batched']:.2f} "
              f"images/s ({numbers['seconds_per_image_batched']:.3f} s per image; one at a time: {e2e:.3f} s)")
    if device.startswith("cuda"):
        print(f"peak GPU memory: {main['peak_gpu_mib']:.0f} MiB one image"
              + (f", {numbers['peak_gpu_mib_batched']:.0f} MiB batch of {batch}" if batch else ""))
    if args.json:
        atomic_write_text(args.json, json.dumps(numbers, indent=2))
    return 0
