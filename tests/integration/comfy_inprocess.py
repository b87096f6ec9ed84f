"""Run inside ComfyUI's Python (subprocess of the integration tests, or by hand):

    COMFYUI_PATH=/work/ComfyUI python tests/integration/comfy_inprocess.py chain  CKPT CLIP_VISION
    COMFYUI_PATH=/work/ComfyUI python tests/integration/comfy_inprocess.py bench  CKPT CLIP_VISION [size] [runs]
    COMFYUI_PATH=/work/ComfyUI python tests/integration/comfy_inprocess.py parity CKPT DIFFUSERS_DIR CLIP_VISION
    COMFYUI_PATH=/work/ComfyUI python tests/integration/comfy_inprocess.py drift  CKPT DIFFUSERS_DIR CLIP_VISION TMP
    COMFYUI_PATH=/work/ComfyUI python tests/integration/comfy_inprocess.py lowprec CKPT CLIP_VISION
    COMFYUI_PATH=/work/ComfyUI python tests/integration/comfy_inprocess.py broadcast CKPT CLIP_VISION

G4SEG_COMFY_FLAGS="--bf16-unet --bf16-vae" sets ComfyUI switches for the whole run.
Prints one JSON line with the results.
"""

import importlib.util
import json
import os
import sys
import time

COMFY = os.environ["COMFYUI_PATH"]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, COMFY)

import torch  # noqa: E402

import comfy.cli_args  # noqa: E402

if not torch.cuda.is_available():
    comfy.cli_args.args.cpu = True


def set_comfy_flags(flags):
    """ComfyUI command-line switches such as --bf16-unet, set as main.py would (read when models load)."""
    for flag in flags:
        name = flag.lstrip("-").replace("-", "_")
        if not isinstance(getattr(comfy.cli_args.args, name, None), bool):
            raise SystemExit(f"{flag} is not a ComfyUI on/off switch (see python main.py --help)")
        setattr(comfy.cli_args.args, name, True)


# G4SEG_COMFY_FLAGS="--bf16-unet --bf16-vae --bf16-text-enc": run under ComfyUI's low-precision modes
set_comfy_flags(os.environ.get("G4SEG_COMFY_FLAGS", "").split())
import comfy.clip_vision  # noqa: E402
import comfy.sd  # noqa: E402


def load_pack():
    spec = importlib.util.spec_from_file_location("g4seg_pack", os.path.join(ROOT, "__init__.py"),
                                                  submodule_search_locations=[ROOT])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["g4seg_pack"] = pack
    spec.loader.exec_module(pack)  # a failed import raises, as it does inside ComfyUI
    return pack


def load_models(ckpt, clip_vision):
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=True, output_clip=True)[:3]
    return model, clip, vae, comfy.clip_vision.load(clip_vision)


def comfy_dtypes(model, clip, vae, cv) -> dict:
    """The dtypes ComfyUI stores and computes each model in (after its switches) and our CLIP-vision adapter's."""
    correspondence = sys.modules["g4seg_pack.nodes.correspondence_nodes"]
    text = {}
    for p in clip.cond_stage_model.parameters():  # a few small ones (logit_scale...) stay float32
        text[str(p.dtype)] = text.get(str(p.dtype), 0) + p.numel()
    return {"unet_weights": str(model.model.get_dtype()), "unet_manual_cast": str(model.model.manual_cast_dtype),
            "vae": str(vae.vae_dtype), "text_encoder_weights": max(text, key=text.get),
            "clip_vision_weights": str(cv.dtype),
            "clip_vision_compute": str(correspondence.comfy_clip_vision_features(cv).dtype)}


def chain(ckpt, cv_path):
    """Another pack's attn2 replace patch on the model first; G4Seg must call it, not drop it."""
    pack = load_pack()
    m = pack.NODE_CLASS_MAPPINGS
    ap = sys.modules["g4seg_pack.nodes.comfy.attention_patch"]
    model, clip, vae, _ = load_models(ckpt, cv_path)
    calls = {"other": 0, "g4seg": 0}
    from comfy.ldm.modules.attention import optimized_attention

    def other(q, k, v, extra_options):
        calls["other"] += 1
        return optimized_attention(q, k, v, extra_options["n_heads"])

    keys = ap.attention_blocks(model.model.diffusion_model)
    base = model.clone()
    for name, number, index in keys:
        base.set_model_attn2_replace(other, name, number, index)
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1
    patched, positive, info = m["G4SegInjectAttention"]().apply(
        base, clip, mask, "cat", prompt_template="a photo of a {}", emi_mode="densediffusion", cross_weight=1.0,
        self_weight=0.3, area_scale=1.0, schedule="constant")  # widgets arrive by name, as ComfyUI passes them
    original_call = ap.G4SegAttentionPatch.__call__

    def counting(self, q, k, v, eo):
        calls["g4seg"] += 1
        return original_call(self, q, k, v, eo)

    ap.G4SegAttentionPatch.__call__ = counting
    img = torch.rand(1, 64, 64, 3)
    latent = {"samples": vae.encode(img)}
    x0, = m["G4SegOneStepDenoise"]().denoise(patched, positive, latent, 400, 0)
    # the unpatched clone must give a different x0 (the injection changes the output)
    calls_before = dict(calls)
    x0_plain, = m["G4SegOneStepDenoise"]().denoise(base, positive, latent, 400, 0)
    table = patched.model_options["transformer_options"]["patches_replace"]
    wrapped = all(table["attn2"][k].inner is other for k in keys)
    return {"blocks": len(keys), "calls": calls_before, "wrapped": wrapped,
            "x0_shape": list(x0["samples"].shape), "changed": float((x0["samples"] - x0_plain["samples"]).abs().max()),
            "info": info}


def bench(ckpt, cv_path, size=512, runs=2):
    load_pack()
    from g4seg_core.config import G4SegConfig
    t = time.time()
    model, clip, vae, cv = load_models(ckpt, cv_path)
    load_s = time.time() - t
    img = torch.rand(1, size, size, 3)
    mask = torch.zeros(1, size, size)
    mask[:, size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
    refine_node = sys.modules["g4seg_pack.nodes.refine_node"]
    times, stages = [], []
    for i in range(runs):
        t = time.time()
        with torch.inference_mode():  # as ComfyUI's executor runs every node
            r, b, g = refine_node.refine(model, clip, vae, cv, img, mask, "cat", G4SegConfig(size=size, seed=i),
                                         stage_timings=stages)
        times.append(time.time() - t)
    return {"size": size, "load_s": load_s, "seconds_per_image": times, "stages_last_run_s": stages[-1],
            "threads": torch.get_num_threads(), "out": list(r.shape), "dtypes": comfy_dtypes(model, clip, vae, cv)}


def parity(ckpt, diffusers_dir, cv_path, size=128):
    """G4SegRefine (ComfyUI's models from CKPT) vs G4SegPipeline (the same weights as a diffusers folder)."""
    import numpy as np

    load_pack()  # puts the repository (and so g4seg_core) on sys.path
    from g4seg_core.config import G4SegConfig
    from g4seg_core.pipeline import G4SegPipeline

    refine_node = sys.modules["g4seg_pack.nodes.refine_node"]
    model, clip, vae, cv = load_models(ckpt, cv_path)
    rng = np.random.default_rng(0)
    image = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    mask = np.zeros((size, size), np.float32)
    mask[size // 4: 3 * size // 4, size // 5: 3 * size // 4] = 1
    with torch.inference_mode():
        prob, binary, generated = refine_node.refine(
            model, clip, vae, cv, torch.from_numpy(image).float()[None] / 255, torch.from_numpy(mask)[None], "cat",
            G4SegConfig(size=size))
    core = G4SegPipeline.from_pretrained(diffusers_dir, clip=cv_path, device="cpu", dtype="float32").refine(
        image, mask, "cat", G4SegConfig(size=size))
    core_prob, core_gen = torch.from_numpy(core.prob), torch.from_numpy(np.array(core.generated)).float() / 255
    return {"prob_max_diff": float((prob[0] - core_prob).abs().max()),
            "binary_agreement": float((binary[0].bool() == torch.from_numpy(core.binary)).float().mean()),
            "generated_max_diff": float((generated[0] - core_gen).abs().max()),
            "changed_fraction": float((core_prob != torch.from_numpy(core.coarse)).float().mean())}


def _v_prediction_copies(model, diffusers_dir, tmp):
    """The same weights as v-prediction on both sides: ComfyUI's ModelSamplingDiscrete patch, and a diffusers
    folder whose scheduler config says v_prediction (the models themselves are linked, not copied)."""
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    model_v = ModelSamplingDiscrete().patch(model, "v_prediction", False)[0]
    folder_v = os.path.join(tmp, "diffusers_v")
    os.makedirs(os.path.join(folder_v, "scheduler"), exist_ok=True)
    for name in os.listdir(diffusers_dir):
        if name != "scheduler" and not os.path.exists(os.path.join(folder_v, name)):
            os.symlink(os.path.join(diffusers_dir, name), os.path.join(folder_v, name))
    scheduler_file = os.path.join(diffusers_dir, "scheduler", "scheduler_config.json")
    scheduler = json.load(open(scheduler_file)) if os.path.exists(scheduler_file) else {}
    scheduler["prediction_type"] = "v_prediction"
    json.dump(scheduler, open(os.path.join(folder_v, "scheduler", "scheduler_config.json"), "w"))
    return model_v, folder_v


def drift(ckpt, diffusers_dir, cv_path, tmp):
    """Node vs core where the two used to drift: a non-square image both resize, a batch of two images
    with two masks, CFG > 1, a class name with parentheses, v-prediction; and G4SegRefine vs the `g4seg refine` command on PNG files."""
    import subprocess

    import numpy as np
    from PIL import Image

    load_pack()
    from g4seg_core.config import G4SegConfig
    from g4seg_core.pipeline import G4SegPipeline

    refine_node = sys.modules["g4seg_pack.nodes.refine_node"]
    model, clip, vae, cv = load_models(ckpt, cv_path)
    core = G4SegPipeline.from_pretrained(diffusers_dir, clip=cv_path, device="cpu", dtype="float32")
    rng = np.random.default_rng(0)

    def picture(h, w, box):
        image = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        mask = np.zeros((h, w), np.float32)
        y0, y1, x0, x1 = (int(f * d) for f, d in zip(box, (h, h, w, w)))
        mask[y0:y1, x0:x1] = 1
        return image, mask

    def node(m, images, masks, config, label="cat"):
        with torch.inference_mode():
            prob, binary, generated = refine_node.refine(
                m, clip, vae, cv, torch.from_numpy(np.stack(images)).float() / 255,
                torch.from_numpy(np.stack(masks)), label, config)
        return prob, generated

    def compare(name, node_out, core_results):
        prob, generated = node_out
        core_prob = torch.from_numpy(np.stack([r.prob for r in core_results]))
        core_gen = torch.from_numpy(np.stack([r.generated_pixels for r in core_results]))
        changed = float(np.mean([np.mean(r.prob != r.coarse) for r in core_results]))
        return name, {"prob_max_diff": float((prob - core_prob).abs().max()),
                      "generated_max_diff": float((generated - core_gen).abs().max()),
                      "binary_agreement": float(((prob >= 0.5) == (core_prob >= 0.5)).float().mean()),
                      "changed_fraction": changed}

    out = {}
    image, mask = picture(240, 320, (0.25, 0.75, 0.2, 0.7))  # 320x240, resized to 128x128 by both
    config = G4SegConfig(size=128)
    out.update([compare("non_square_resized", node(model, [image], [mask], config),
                        [core.refine(image, mask, "cat", config)])])
    image_b, mask_b = picture(240, 320, (0.1, 0.6, 0.4, 0.9))
    out.update([compare("batch_two_images_two_masks", node(model, [image, image_b], [mask, mask_b], config),
                        core.refine_batch([image, image_b], [mask, mask_b], "cat", config))])
    config_cfg = G4SegConfig(size=128, cfg_scale=3.0, seed=7)
    out.update([compare("cfg_3", node(model, [image], [mask], config_cfg),
                        [core.refine(image, mask, "cat", config_cfg)])])
    # ComfyUI reads "(...)" as prompt weighting; the core reads it literally, and so must the node
    label = "tv (monitor)"
    out.update([compare("class_name_with_parentheses", node(model, [image], [mask], config, label),
                        [core.refine(image, mask, label, config)])])
    model_v, folder_v = _v_prediction_copies(model, diffusers_dir, tmp)
    core_v = G4SegPipeline.from_pretrained(folder_v, clip=cv_path, device="cpu", dtype="float32")
    assert core_v.components.prediction_type == "v_prediction"
    out.update([compare("v_prediction", node(model_v, [image], [mask], config),
                        [core_v.refine(image, mask, "cat", config)])])

    # LoadImage -> ImageToMask -> G4SegRefine against `g4seg refine` on the same files (8-bit outputs)
    Image.fromarray(image).save(os.path.join(tmp, "photo.png"))
    Image.fromarray((mask * 255).astype(np.uint8)).save(os.path.join(tmp, "photo_mask.png"))
    loaded = np.asarray(Image.open(os.path.join(tmp, "photo.png")).convert("RGB")).astype(np.float32) / 255
    loaded_mask = np.asarray(Image.open(os.path.join(tmp, "photo_mask.png")).convert("RGB"))[..., 0] / 255.0
    with torch.inference_mode():
        prob, _, _ = refine_node.refine(model, clip, vae, cv, torch.from_numpy(loaded)[None],
                                        torch.from_numpy(loaded_mask.astype(np.float32))[None], "cat",
                                        G4SegConfig(size=256))
    node8 = np.round(prob[0].numpy() * 255)
    # float32 = the precision ComfyUI computes in on a CPU by default; "auto" is the CLI's default dtype
    for dtype in ("float32", "auto"):
        cli_out = os.path.join(tmp, f"cli_{dtype}")
        run = subprocess.run([sys.executable, "-m", "g4seg_core.commands.main", "refine", os.path.join(tmp, "photo.png"),
                              os.path.join(tmp, "photo_mask.png"), "--label", "cat", "--out", cli_out, "--size", "256",
                              "--checkpoint", diffusers_dir, "--clip", cv_path, "--device", "cpu", "--dtype", dtype],
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT}, cwd=ROOT)
        assert run.returncode == 0, run.stderr[-2000:]
        report = json.load(open(os.path.join(cli_out, "photo_g4seg.json")))
        cli16 = np.asarray(Image.open(os.path.join(cli_out, "photo_refined_prob.png"))).astype(np.float64) / 65535
        cli8 = np.round(cli16 * 255)
        out[f"node_vs_cli_320x240_size256_dtype_{dtype}"] = {
            "cli_dtype_used": report.get("dtype_used", report.get("parameters", {}).get("dtype")),
            "prob_max_diff": float(np.abs(prob[0].numpy() - cli16).max()),
            "max_8bit_diff": float(np.abs(node8 - cli8).max()),
            "changed_fraction": float(np.mean(np.abs(cli16 - loaded_mask) > 1e-4))}
    return out


def lowprec(ckpt, cv_path, size=64):
    """G4SegRefine with ComfyUI's defaults, then with --bf16-unet --bf16-vae --bf16-text-enc (models loaded
    again: ComfyUI reads the switches at load time): the dtypes ComfyUI used and how far the masks moved."""
    load_pack()
    from g4seg_core.config import G4SegConfig
    refine_node = sys.modules["g4seg_pack.nodes.refine_node"]
    image = torch.rand(1, size, size, 3, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, size, size)
    mask[:, size // 4: 3 * size // 4, size // 5: 3 * size // 4] = 1
    runs = {}
    for name, flags in (("default", []), ("bf16", ["--bf16-unet", "--bf16-vae", "--bf16-text-enc"])):
        set_comfy_flags(flags)
        model, clip, vae, cv = load_models(ckpt, cv_path)
        seen = set()

        def spy(q, k, v, extra_options, _seen=seen):  # another pack's patch underneath ours: sees q's dtype
            _seen.add(str(q.dtype))
            from comfy.ldm.modules.attention import optimized_attention
            return optimized_attention(q, k, v, extra_options["n_heads"])

        base = model.clone()
        for block, number, index in sys.modules["g4seg_pack.nodes.comfy.attention_patch"].attention_blocks(
                model.model.diffusion_model):
            base.set_model_attn2_replace(spy, block, number, index)
        with torch.inference_mode():
            prob, binary, generated = refine_node.refine(base, clip, vae, cv, image, mask, "cat",
                                                         G4SegConfig(size=size))
        runs[name] = {"prob": prob, "binary": binary, "generated": generated,
                      "dtypes": dict(comfy_dtypes(model, clip, vae, cv), attention_qkv=sorted(seen))}
    a, b = runs["default"], runs["bf16"]
    inter = float((a["binary"].bool() & b["binary"].bool()).sum())
    union = float((a["binary"].bool() | b["binary"].bool()).sum())
    return {"dtypes": {k: v["dtypes"] for k, v in runs.items()},
            "prob_max_diff": float((a["prob"] - b["prob"]).abs().max()),
            "binary_iou": inter / union if union else 1.0,
            "generated_rel_err": float((a["generated"] - b["generated"]).norm() / a["generated"].norm()),
            "finite": bool(torch.isfinite(b["prob"]).all() and torch.isfinite(b["generated"]).all())}


def broadcast(ckpt, cv_path):
    """One image with two masks (one sampling call for both, the image encoded once) vs each mask refined on
    its own (mask i: seed + i): the generated images agree to float tolerance (batched kernels round
    differently); the maps agree except where that rounding flips a near-tied CLIP match."""
    load_pack()
    from g4seg_core.config import G4SegConfig
    refine_node = sys.modules["g4seg_pack.nodes.refine_node"]
    model, clip, vae, cv = load_models(ckpt, cv_path)
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(2, 64, 64)
    masks[0, 16:48, 16:48] = 1
    masks[1, 8:40, 20:60] = 1

    def run(m, seed):
        with torch.inference_mode():
            prob, _, generated = refine_node.refine(model, clip, vae, cv, image, m, "cat",
                                                    G4SegConfig(size=64, seed=seed))[:3]
        return prob, generated

    both_prob, both_gen = run(masks, 0)
    singles = [run(masks[:1], 0), run(masks[1:], 1)]
    swapped = run(masks[1:], 0)  # what a wrong seed for mask 1 would give
    return {"shape": list(both_prob.shape),
            "diff": [float((both_prob[i] - singles[i][0][0]).abs().max()) for i in range(2)],
            "generated_diff": [float((both_gen[i] - singles[i][1][0]).abs().max()) for i in range(2)],
            "binary_agreement": [float(((both_prob[i] >= 0.5) == (singles[i][0][0] >= 0.5)).float().mean())
                                 for i in range(2)],
            "wrong_seed_generated_diff": float((both_gen[1] - swapped[1][0]).abs().max())}


if __name__ == "__main__":
    what = sys.argv[1]
    if what == "chain":
        print(json.dumps(chain(sys.argv[2], sys.argv[3])))
    elif what == "bench":
        size = int(sys.argv[4]) if len(sys.argv) > 4 else 512
        runs = int(sys.argv[5]) if len(sys.argv) > 5 else 2
        print(json.dumps(bench(sys.argv[2], sys.argv[3], size, runs)))
    elif what == "lowprec":
        print(json.dumps(lowprec(sys.argv[2], sys.argv[3])))
    elif what == "broadcast":
        print(json.dumps(broadcast(sys.argv[2], sys.argv[3])))
    elif what == "drift":
        print(json.dumps(drift(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5])))
    elif what == "parity":
        print(json.dumps(parity(sys.argv[2], sys.argv[3], sys.argv[4])))
