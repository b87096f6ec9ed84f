"""`g4seg bench`: per-stage time and peak memory on a full-size SD2.1-architecture model.

Random weights cost the same compute as real ones. Reports the ratio of the end-to-end
refine time to the sum of the bare model passes (VAE encode + UNet + VAE decode + CLIP x2)
measured in the same run, and the correspondence step at a 128x128 grid. When the dtype is
not float32, the same weights also run in float32 first: speed-up per stage and end to end,
and how far the outputs lie from float32's (latent, UNet output, images, CLIP features,
refined probability, binary mask IoU).

With --batch N: a batch of N distinct images, masks and class names (`example_batch`),
end to end against its own bare passes at batch N. Counted once per run, outside the timed
calls: the matrix FLOPs of each bare pass and of a refine (torch.utils.flop_counter), hence
the TFLOP/s achieved, and the torch operators one refine dispatches at batch 1 and batch N
(`OperatorCount`): a batch that is one pass dispatches about as many as one image.
With --compile: the same again with models/compiled.py's parts compiled, and the bare UNet
compiled on its own (what compiling it would win).
"""

from __future__ import annotations

import json
import resource
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch

from ..config import G4SegConfig
from ..errors import G4SegError
from ..files.output_files import atomic_write_text, prepare_output_file
from ..loading.precision import default_device, dtype_name, resolve_dtype

EXAMPLES = Path(__file__).resolve().parents[2] / "assets"
# Class names of a benchmark batch: distinct prompts, as a real batch of different images has.
BENCH_LABELS = ("cat", "dog", "sofa", "person", "bird", "horse", "chair", "bottle")
BARE_STAGES = ("vae_encode", "unet", "vae_decode", "clip")  # CLIP runs twice per image (original, generated)


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


def example_batch(size: int, n: int) -> Tuple[List[np.ndarray], List[np.ndarray], List[str]]:
    """n distinct images, masks and class names made from the example: image i is the example
    rolled sideways by i/7 of its width (and flipped upside down for i // 7 odd) with its own
    +-8 grey levels of noise; mask i is moved with it; class names cycle through BENCH_LABELS."""
    image, mask = _example_inputs(size)
    images, masks = [], []
    for i in range(n):
        shift = i * max(1, image.shape[1] // 7)
        picture, coarse = np.roll(image, shift, axis=1), np.roll(mask, shift * mask.shape[1] // image.shape[1], axis=1)
        if (i // 7) % 2:
            picture, coarse = picture[::-1], coarse[::-1]
        noise = np.random.default_rng(i).integers(-8, 9, picture.shape)
        images.append(np.clip(picture.astype(np.int16) + noise, 0, 255).astype(np.uint8))
        masks.append(np.ascontiguousarray(coarse))
    return images, masks, [BENCH_LABELS[i % len(BENCH_LABELS)] for i in range(n)]


def _median_stages(results) -> dict:
    keys = [k for k in results[0].timings if k != "batch_size"]
    return {k: statistics.median(r.timings[k] for r in results) for k in keys}


def bare_calls(pipe, pixels: torch.Tensor, labels: Sequence[str], config, latent: torch.Tensor) -> Dict[str, Callable]:
    """The bare model passes of one batch as callables (BARE_STAGES): VAE encode of `pixels`, the UNet
    without injection and the VAE decode on `latent`, one CLIP pass on `pixels`; one prompt per label."""
    from ..pipeline import concat_unet_kwargs

    comps = pipe.components
    unet = comps.unet
    embeddings = [pipe.token_positions(label, config)[1] for label in labels]
    hidden = torch.cat([e.hidden_states.to(pipe.device, unet.dtype) for e in embeddings])
    height, width = (s * comps.vae_downsample for s in latent.shape[-2:])
    kwargs = concat_unet_kwargs([comps.unet_kwargs(e, height, width) for e in embeddings])
    timestep = torch.tensor([config.timestep] * latent.shape[0], device=pipe.device)
    latent = latent.to(pipe.device)

    @torch.no_grad()
    def run_unet(model=unet):
        return model(latent.to(unet.dtype), timestep, encoder_hidden_states=hidden, **kwargs).sample

    return {"vae_encode": lambda: pipe.encode(pixels), "unet": run_unet, "vae_decode": lambda: pipe.decode(latent),
            "clip": lambda: pipe.features(pixels, config.clip_features)}


def _time_bare(calls: Dict[str, Callable], repeats: int, sync) -> Tuple[Dict[str, float], Dict[str, torch.Tensor]]:
    times, outputs = {}, {}
    for name, fn in calls.items():
        times[name], outputs[name] = timed(fn, repeats, sync)
    return times, outputs


def _bare_sum(times: Dict[str, float]) -> float:
    return times["vae_encode"] + times["unet"] + times["vae_decode"] + 2 * times["clip"]


class OperatorCount:
    """Counts the torch operators dispatched inside `with OperatorCount() as ops:` (ops.count; ops.names: a
    Counter by operator name): each aten call that reaches a kernel, after autograd and composite
    decomposition, on any device."""

    @property
    def count(self) -> int:
        return sum(self.names.values())

    def __enter__(self):
        import collections

        from torch.utils._python_dispatch import TorchDispatchMode

        names = self.names = collections.Counter()

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                names[str(func.overloadpacket).replace("aten.", "")] += 1
                return func(*args, **(kwargs or {}))

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def counted(fn: Callable) -> Tuple[int, int]:
    """(matrix FLOPs, operators dispatched) of one call of fn. FLOPs: matmuls, convolutions and fused
    attention (the CPU flash kernel included, which torch's table leaves out); elementwise work uncounted."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_attention(query, key, value, *args, out_shape=None, **kwargs):  # receives shapes
        return sdpa_flop_count(query, key, value)

    flops = FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention})
    with flops, OperatorCount() as ops:
        fn()
    return int(flops.get_total_flops()), ops.count


def _measure(pipe, image, mask, label, config, repeats: int, latent_in=None) -> dict:
    """One dtype: end to end (median of `repeats` after a warm-up), per-stage and bare-pass seconds, and
    the outputs the agreement figures compare. Bare UNet/decode passes start from `latent_in` (the first
    dtype's VAE latent) so that every dtype is compared on the same input."""
    sync = pipe.sync
    pipe.refine(image, mask, label, config)  # warm-up (allocations, kernels, prompt cache)
    results, cpu_times = [], []
    e2e_time, _ = timed(lambda: results.append(pipe.refine(image, mask, label, config)), repeats, sync, cpu_times)
    result = results[-1]

    pixels = pipe.to_pixels(image, config.size)
    z0 = pipe.encode(pixels)
    calls = bare_calls(pipe, pixels, [label], config, z0 if latent_in is None else latent_in)
    bare, outputs = _time_bare(calls, repeats, sync)
    numbers = {
        "dtype": dtype_name(pipe.dtype), "dtype_reason": pipe.dtype_reason, "end_to_end_s": e2e_time,
        "end_to_end_cpu_s": statistics.median(cpu_times),
        "stages_s": _median_stages(results),
        "bare_s": {"vae_encode": bare["vae_encode"], "unet": bare["unet"], "vae_decode": bare["vae_decode"],
                   "clip_x2": 2 * bare["clip"]},
        "bare_sum_s": _bare_sum(bare), "ratio_end_to_end_over_bare": e2e_time / _bare_sum(bare),
    }
    outputs = {"latent": outputs["vae_encode"].float().cpu(), "unet_out": outputs["unet"].float().cpu(),
               "decoded": outputs["vae_decode"].float().cpu(), "clip": outputs["clip"].float().cpu(), "result": result}
    return {"numbers": numbers, "outputs": outputs, "calls": calls}


def _measure_batch(pipe, images, masks, labels, config, repeats: int) -> dict:
    """A batch of distinct images: end to end, its bare passes at that batch size, the ratio."""
    sync = pipe.sync
    pipe.refine_batch(images, masks, labels, config)  # warm-up at this batch size
    t_batch, results = timed(lambda: pipe.refine_batch(images, masks, labels, config), repeats, sync)
    pixels = torch.cat([pipe.to_pixels(image, config.size) for image in images])
    bare, _ = _time_bare(bare_calls(pipe, pixels, labels, config, pipe.encode(pixels)), repeats, sync)
    n = len(images)
    return {"batch": n, "batch_s": t_batch, "images_per_s_batched": n / t_batch, "seconds_per_image_batched": t_batch / n,
            "batch_stages_s": _median_stages([results[0]]) if results else {},
            "bare_batched_s": {"vae_encode": bare["vae_encode"], "unet": bare["unet"], "vae_decode": bare["vae_decode"],
                               "clip_x2": 2 * bare["clip"]},
            "bare_batched_sum_s": _bare_sum(bare), "ratio_batched_end_to_end_over_bare": t_batch / _bare_sum(bare)}


def _counts(pipe, image, mask, label, calls, config, batch_inputs) -> dict:
    """FLOPs per bare stage and per refine, TFLOP/s filled in later; operators per refine at batch 1 and N."""
    flops = {name: counted(fn)[0] for name, fn in calls.items()}
    flops["end_to_end"], ops_one = counted(lambda: pipe.refine(image, mask, label, config))
    numbers = {"flops_per_image": flops, "operators": {"batch_1": ops_one}}
    if batch_inputs is not None:
        images, masks, labels = batch_inputs
        _, ops_n = counted(lambda: pipe.refine_batch(images, masks, labels, config))
        numbers["operators"].update({f"batch_{len(images)}": ops_n, "batch": len(images),
                                     "ratio_batch_over_batch_1": ops_n / ops_one})
    return numbers


def _achieved(numbers: dict) -> dict:
    """TFLOP/s: counted FLOPs over measured seconds (bare passes, end to end, batched)."""
    flops, bare = numbers["flops_per_image"], numbers["bare_s"]
    seconds = {"vae_encode": bare["vae_encode"], "unet": bare["unet"], "vae_decode": bare["vae_decode"],
               "clip": bare["clip_x2"] / 2, "end_to_end": numbers["end_to_end_s"]}
    out = {name: flops[name] / seconds[name] / 1e12 for name in seconds if seconds[name] > 0}
    if "batch_s" in numbers:
        out["end_to_end_batched"] = numbers["batch"] * flops["end_to_end"] / numbers["batch_s"] / 1e12
    return out


def _measure_compiled(pipe, image, mask, label, config, repeats: int, backend: str, eager: dict,
                      batch_inputs) -> dict:
    """--compile: compile time, end to end and the compiled parts' bare passes at batch 1 (and the batch),
    the bare UNet compiled on its own, and how far the compiled refine lies from the eager one."""
    sync = pipe.sync
    parts = pipe.compile(backend=backend)
    start = time.perf_counter()
    pipe.refine(image, mask, label, config)
    sync()
    out = {"parts": parts, "backend": backend, "first_refine_s": time.perf_counter() - start}
    results = []
    out["end_to_end_s"], _ = timed(lambda: results.append(pipe.refine(image, mask, label, config)), repeats, sync)
    ref = eager["outputs"]["result"]
    q = results[-1]
    # a nearest-neighbour match flips on a last-bit difference of the CLIP features, so the max diff of
    # the probabilities alone overstates it: the share of equal matches and the binary IoU say how often
    out["refined_prob_max_abs_diff_vs_eager"] = float(np.abs(q.prob - ref.prob).max())
    out["refined_prob_mean_abs_diff_vs_eager"] = float(np.abs(q.prob - ref.prob).mean())
    out["correspondence_same_match_fraction_vs_eager"] = float((q.correspondence == ref.correspondence).mean())
    union = np.logical_or(q.binary, ref.binary).sum()
    out["binary_iou_vs_eager"] = float(np.logical_and(q.binary, ref.binary).sum() / union) if union else 1.0
    out["generated_image_rel_err_vs_eager"] = _relative_error(torch.from_numpy(results[-1].generated_pixels),
                                                              torch.from_numpy(ref.generated_pixels))
    calls = eager["calls"]
    out["bare_s"] = {name: timed(calls[name], repeats, sync)[0] for name in ("vae_encode", "vae_decode", "clip")}
    if batch_inputs is not None:
        images, masks, labels = batch_inputs
        start = time.perf_counter()
        pipe.refine_batch(images, masks, labels, config)  # compiles this batch size
        sync()
        out["first_batch_s"] = time.perf_counter() - start
        out["batch_s"], _ = timed(lambda: pipe.refine_batch(images, masks, labels, config), repeats, sync)
        out["images_per_s_batched"] = len(images) / out["batch_s"]
    options = {"mode": "reduce-overhead"} if backend == "inductor" else {}
    unet = torch.compile(pipe.components.unet, backend=backend, dynamic=False, **options)  # a wrapper: pipe's stays eager
    start = time.perf_counter()
    calls["unet"](unet)
    sync()
    out["unet_compile_s"] = time.perf_counter() - start
    out["unet_bare_s"], _ = timed(lambda: calls["unet"](unet), repeats, sync)
    return out


def format_table(numbers: dict) -> str:
    """The bench's table (also what bench/gpu.sh prints): per stage seconds, FLOPs and TFLOP/s at batch 1,
    bare seconds at batch N and compiled; end to end against bare passes; operators per refine."""
    stages, bare = numbers["stages_s"], numbers["bare_s"]
    flops, rate = numbers.get("flops_per_image", {}), numbers.get("achieved_tflops_per_s", {})
    batched, compiled = numbers.get("bare_batched_s", {}), numbers.get("compiled", {})
    n = numbers.get("batch")
    in_flow = {"vae_encode": stages.get("vae_encode"), "unet": stages.get("unet"),
               "vae_decode": stages.get("vae_decode"),
               "clip": (stages.get("clip_original", 0.0) + stages.get("clip_generated", 0.0)) or None}
    bare_of = {"vae_encode": bare["vae_encode"], "unet": bare["unet"], "vae_decode": bare["vae_decode"],
               "clip": bare["clip_x2"]}
    batched_of = {"vae_encode": batched.get("vae_encode"), "unet": batched.get("unet"),
                  "vae_decode": batched.get("vae_decode"), "clip": batched.get("clip_x2")}
    comp = compiled.get("bare_s", {})
    compiled_of = {"vae_encode": comp.get("vae_encode"), "unet": compiled.get("unet_bare_s"),
                   "vae_decode": comp.get("vae_decode"), "clip": 2 * comp["clip"] if "clip" in comp else None}

    def cell(value, fmt="{:.3f}"):
        return fmt.format(value) if value is not None else "-"

    head = (f"{'stage (s)':<22}{'in flow':>9}{'bare':>9}{'GFLOP':>9}{'TFLOP/s':>9}"
            f"{f'bare b{n}' if n else 'bare bN':>10}{'compiled':>10}")
    lines = [head, "-" * len(head)]
    names = {"vae_encode": "VAE encode", "unet": "UNet (flow: injected)", "vae_decode": "VAE decode",
             "clip": "CLIP x2"}
    for key, name in names.items():
        lines.append(f"{name:<22}{cell(in_flow[key]):>9}{cell(bare_of[key]):>9}"
                     f"{cell(flops[key] * (2 if key == 'clip' else 1) / 1e9 if key in flops else None, '{:.4g}'):>9}"
                     f"{cell(rate.get(key), '{:.2f}'):>9}{cell(batched_of[key]):>10}{cell(compiled_of[key]):>10}")
    e2e_flops = flops.get("end_to_end")
    lines.append(f"{'end to end':<22}{numbers['end_to_end_s']:>9.3f}{numbers['bare_sum_s']:>9.3f}"
                 f"{cell(e2e_flops / 1e9 if e2e_flops else None, '{:.4g}'):>9}{cell(rate.get('end_to_end'), '{:.2f}'):>9}"
                 f"{cell(numbers.get('batch_s')):>10}{cell(compiled.get('end_to_end_s')):>10}")
    lines.append(f"end to end / bare passes: batch 1 {numbers['ratio_end_to_end_over_bare']:.2f}"
                 + (f", batch {n} {numbers['ratio_batched_end_to_end_over_bare']:.2f} (target <= 1.15 both)"
                    if n else " (target <= 1.15)"))
    if n:
        lines.append(f"batch {n} distinct images: {numbers['images_per_s_batched']:.2f} images/s "
                     f"({numbers['seconds_per_image_batched']:.3f} s per image; one at a time {numbers['end_to_end_s']:.3f} s)"
                     + (f", {rate['end_to_end_batched']:.2f} TFLOP/s" if "end_to_end_batched" in rate else ""))
    ops = numbers.get("operators")
    if ops:
        batch_ops = (f", batch {ops['batch']} {ops['batch_' + str(ops['batch'])]} = "
                     f"{ops['ratio_batch_over_batch_1']:.2f}x (target <= 1.3x at batch 4)") if "batch" in ops else ""
        lines.append(f"torch operators per refine: batch 1 {ops['batch_1']}{batch_ops}")
    if compiled:
        lines.append(f"compiled ({', '.join(compiled['parts'])}; {compiled['backend']}): first refine "
                     f"{compiled['first_refine_s']:.1f} s, then {compiled['end_to_end_s']:.3f} s vs eager "
                     f"{numbers['end_to_end_s']:.3f} s"
                     + (f"; batch {n}: {compiled['batch_s']:.3f} s vs {numbers['batch_s']:.3f} s" if "batch_s" in compiled
                        else "")
                     + f"; bare UNet compiled on its own {compiled['unet_bare_s']:.3f} s vs {bare['unet']:.3f} s "
                       f"(compile {compiled['unet_compile_s']:.1f} s; not used by --compile: injection); refined prob "
                       f"max diff vs eager {compiled['refined_prob_max_abs_diff_vs_eager']:.2e} (mean "
                       f"{compiled.get('refined_prob_mean_abs_diff_vs_eager', float('nan')):.1e}, same matches "
                       f"{compiled.get('correspondence_same_match_fraction_vs_eager', float('nan')):.4f}, binary IoU "
                       f"{compiled.get('binary_iou_vs_eager', float('nan')):.4f})")
    return "\n".join(lines)


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
    if args.compile and args.compile_backend == "inductor":
        from ..models.compiled import check_device

        check_device(device)  # before minutes of measuring
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
    label = BENCH_LABELS[0]
    batch_inputs = example_batch(args.size, batch) if batch else None

    # The float32 reference first: the same modules are then cast in place (one copy of the weights).
    phases, latent_in = {}, None
    for dtype in ([reference] if reference is not None else []) + [choice.dtype]:
        pipe = G4SegPipeline(components, clip, device=device, dtype=args.dtype if dtype == choice.dtype else dtype)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        phase = _measure(pipe, image, mask, label, config, args.repeats, latent_in)
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
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        numbers.update(_measure_batch(pipe, *batch_inputs, config, args.repeats))
        if device.startswith("cuda"):
            numbers["peak_gpu_mib_batched"] = torch.cuda.max_memory_allocated() / 2 ** 20
    print("counting FLOPs and operators (one more pass of each)", flush=True)
    numbers.update(_counts(pipe, image, mask, label, phases[choice.name]["calls"], config, batch_inputs))
    numbers["achieved_tflops_per_s"] = _achieved(numbers)
    if args.compile:
        print(f"compiling ({args.compile_backend}) and measuring again", flush=True)
        numbers["compiled"] = _measure_compiled(pipe, image, mask, label, config, args.repeats, args.compile_backend,
                                                phases[choice.name], batch_inputs)
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
    print("\n" + format_table(numbers))
    if device.startswith("cuda"):
        print(f"peak GPU memory: {main['peak_gpu_mib']:.0f} MiB one image"
              + (f", {numbers['peak_gpu_mib_batched']:.0f} MiB batch of {batch}" if batch else ""))
    if args.json:
        atomic_write_text(args.json, json.dumps(numbers, indent=2))
    return 0
