"""Build the toy world and train, on it, the four small models G4Seg needs (issue 19).

    python tools/train_toyworld.py                      # world -> build/toyworld/world, models -> tests/data/toyworld
    python tools/train_toyworld.py --out DIR --world DIR --scale 0.1   # a quick smoke run (10 % of the steps)

Writes, each stage cached (skipped when its output exists and was made with the same settings,
see DIR/train_config.json; --force redoes everything):
    WORLD/                      VOC-style toy dataset (g4seg_core/evaluation/toyworld.py), train + val splits
    DIR/sd/                     diffusers folder: unet/ (UNet2DConditionModel, cross-attention, epsilon,
                                SD's scaled-linear 1000-step schedule), vae/ (AutoencoderKL, downsamples 8x),
                                text_encoder/ (CLIPTextModelWithProjection), scheduler/
                                -> G4SegPipeline.from_pretrained(DIR/sd, clip=...), g4seg --checkpoint DIR/sd
    DIR/clip_vision.safetensors open_clip ViT image encoder (visual.* keys) trained contrastively with the
                                text encoder on "a photo of a {class}" -> --clip DIR/clip_vision.safetensors
    DIR/train_config.json       settings, seeds, losses and timings of every stage

Order: CLIP (text + image encoders, contrastive) -> VAE (reconstruction + small KL) -> UNet (epsilon
loss on the VAE's latents, conditioned on the frozen text encoder's prompt states, computed by the
project's own SDComponents.encode_prompt). Seeded; weights stored in float16 (small enough to commit).
Run it under `nice`: it uses every core it is given (torch threads = --threads).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from g4seg_core.evaluation import toyworld as tw  # noqa: E402

SIZE = 128
TEXT_WIDTH = 64
SETTINGS = {
    "seed": 0, "size": SIZE, "world_train": 100, "world_val": 200,
    # scenes: a pool rendered once per stage and sampled from (rendering costs as much as a step)
    "clip": {"steps": 100, "batch": 24, "lr": 2e-3, "width": 64, "layers": 3, "patch": 8, "scenes": 400},
    # 64 px crops: with 32 px the mid-block attention sees 4x4 tokens and fails on whole images (measured).
    # Measured at 300-600 steps (full-image L1 on [-1, 1]): channels 8-32 with an L1 loss stay grey (0.23,
    # only red survives: L1 pulls to the median, the grey background); MSE 0.19; channels 16-64 + MSE 0.10
    # at 600 steps with every object's shape and colour
    "vae": {"steps": 1500, "batch": 8, "crop": 64, "lr": 1e-3, "kl": 1e-6, "channels": [16, 32, 64, 64], "scenes": 200},
    # timesteps drawn from [t_min, t_max): G4Seg uses one step at t = 100..700 (paper Fig. 4), never t ~ 1000
    "unet": {"steps": 1500, "batch": 12, "lr": 2e-3, "scenes": 400, "channels": [32, 64], "heads": 4,
             "t_min": 100, "t_max": 700},
}


DEVICE = torch.device("cpu")  # --device: where every model trains (saved weights are CPU tensors)


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def seeded(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1] (the VAE's range)."""
    return (torch.from_numpy(images).to(DEVICE).permute(0, 3, 1, 2).float() / 127.5 - 1.0)


# ----------------------------------------------------------------------------- models
def make_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=49408, hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH,
                            projection_dim=TEXT_WIDTH, num_hidden_layers=2, num_attention_heads=2,
                            max_position_embeddings=77, hidden_act="gelu",  # gelu: read as the SD2 family
                            layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407, pad_token_id=0)
    return CLIPTextModelWithProjection(config)


def make_vision(s):
    from open_clip.transformer import VisionTransformer

    # heads = width // 64: what g4seg_core.loading.clip_loading infers from the shapes
    return VisionTransformer(image_size=SIZE, patch_size=s["patch"], width=s["width"], layers=s["layers"],
                             heads=max(1, s["width"] // 64), mlp_ratio=2.0, output_dim=TEXT_WIDTH)


def make_vae(s):
    from diffusers import AutoencoderKL

    n = len(s["channels"])
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                         block_out_channels=s["channels"], down_block_types=["DownEncoderBlock2D"] * n,
                         up_block_types=["UpDecoderBlock2D"] * n, norm_num_groups=8, sample_size=SIZE,
                         scaling_factor=1.0)


def make_unet(s):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=SIZE // 8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=s["channels"], down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], attention_head_dim=s["heads"], norm_num_groups=16,
        cross_attention_dim=TEXT_WIDTH, use_linear_projection=True, transformer_layers_per_block=1)


def warmup_cosine(opt, steps: int, warmup: float):
    """Linear warm-up over the first `warmup` fraction of the steps, then cosine decay to 5 %."""
    n = max(1, int(steps * warmup))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda i: (i + 1) / n if i < n else
                                             0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (i - n) / max(1, steps - n))))


# ----------------------------------------------------------------------------- stages
def text_embeds(model, tokenizer, prompts):
    """Projected end-of-text embeddings, tokenized as zeroshot.text.TransformersTextTower does."""
    ids = [tokenizer.prompt_ids(p) for p in prompts]
    length = max(len(i) for i in ids)
    tokens = torch.tensor([i + [0] * (length - len(i)) for i in ids], device=DEVICE)
    return model(input_ids=tokens).text_embeds


def train_clip(s, seed, report):
    """Text + image encoders, CLIP's loss over the class captions (random ImageNet templates); scenes
    without objects are captioned with tw.BACKGROUND_WORD, so the segmenter has a background query."""
    from g4seg_core.models.tokenizer import G4SegTokenizer
    from g4seg_core.zeroshot.vocabulary import IMAGENET_TEMPLATES

    seeded(seed)
    text, vision = make_text_encoder().to(DEVICE), make_vision(s).to(DEVICE)
    scale = torch.nn.Parameter(torch.tensor(math.log(10.0), device=DEVICE))
    params = list(text.parameters()) + list(vision.parameters()) + [scale]
    opt = torch.optim.AdamW(params, lr=s["lr"], weight_decay=0.05)
    sched = warmup_cosine(opt, s["steps"], 0.1)
    tok = G4SegTokenizer(pad_token_id=0)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], device=DEVICE).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711], device=DEVICE).view(1, 3, 1, 1)
    names = (tw.BACKGROUND_WORD,) + tw.CLASS_NAMES[1:]  # caption index = the scene's main class (0: none)
    rng = np.random.default_rng(seed)
    pool = [tw.scene(seed, "clip", i, SIZE, i % len(names)) for i in range(s["scenes"])]
    for step in range(s["steps"]):
        scenes = [pool[i] for i in rng.choice(len(pool), s["batch"], replace=False)]
        mains = np.array([x.main for x in scenes])
        pix = (torch.from_numpy(np.stack([x.image for x in scenes])).to(DEVICE).permute(0, 3, 1, 2).float() / 255
               - mean) / std
        template = IMAGENET_TEMPLATES[int(rng.integers(len(IMAGENET_TEMPLATES)))] if step % 2 else "a photo of a {}."
        t = F.normalize(text_embeds(text, tok, [template.format(n) for n in names]), dim=-1)
        v = F.normalize(vision(pix), dim=-1)
        logits = scale.exp().clamp(max=100) * v @ t.T
        target = torch.from_numpy(mains).to(DEVICE)
        loss = F.cross_entropy(logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 10 == 0 or step == s["steps"] - 1:
            acc = (logits.argmax(1) == target).float().mean().item()
            log(f"clip step {step}: loss {loss.item():.3f} acc {acc:.2f}")
    report["clip"] = {"final_loss": float(loss.item()), "final_batch_accuracy": float(acc)}
    vision.eval()
    return text.eval(), vision


def train_vae(s, seed, report):
    seeded(seed + 1)
    vae = make_vae(s).to(DEVICE)
    opt = torch.optim.AdamW(vae.parameters(), lr=s["lr"], weight_decay=0.0)
    sched = warmup_cosine(opt, s["steps"], 0.1)
    rng = np.random.default_rng(seed + 1)
    c = s["crop"]
    pool = [tw.scene(seed, "vae", i, SIZE).image for i in range(s["scenes"])]
    for step in range(s["steps"]):
        crops = []
        for i in rng.choice(len(pool), s["batch"], replace=False):
            img = pool[i]
            y, x = rng.integers(0, SIZE - c + 1, 2)
            crops.append(img[y:y + c, x:x + c])
        x = to_tensor(np.stack(crops))
        post = vae.encode(x).latent_dist
        # the posterior mean, not a sample: with std ~1 at initialisation the sampling noise drowns the
        # signal for hundreds of steps (measured: grey blobs after 150 steps); G4Seg encodes with the mean too
        rec = vae.decode(post.mean).sample
        kl = post.kl().mean()
        rec_loss = F.mse_loss(rec, x)  # not L1: see SETTINGS["vae"]
        loss = rec_loss + s["kl"] * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 10 == 0 or step == s["steps"] - 1:
            log(f"vae step {step}: MSE {rec_loss.item():.4f} kl {kl.item():.1f}")
    vae.eval()
    # SD's convention: scaling_factor makes the latents unit-variance
    with torch.no_grad():
        imgs = np.stack([tw.scene(seed, "vae", 10**6 + i, SIZE).image for i in range(32)])
        z = vae.encode(to_tensor(imgs)).latent_dist.mean
        rec = vae.decode(z).sample
    factor = float(1.0 / z.std())
    vae.register_to_config(scaling_factor=factor)
    report["vae"] = {"final_mse_crop": float(rec_loss.item()), "l1_full_128px": float((rec - to_tensor(imgs)).abs().mean()),
                     "scaling_factor": factor}
    log(f"vae: full-image L1 {report['vae']['l1_full_128px']:.4f}, scaling factor {factor:.4f}")
    return vae


def train_unet(s, seed, components, report):
    """Epsilon prediction with SD's scaled-linear schedule, caption = one class of the scene."""
    from g4seg_core.models.families import scheduler_alphas_cumprod

    seeded(seed + 2)
    unet = make_unet(s).to(DEVICE)
    vae = components.vae
    prompts = {c: components.encode_prompt(tw.caption(c)).hidden_states[0] for c in range(1, len(tw.CLASS_NAMES))}
    latents, classes = [], []
    with torch.no_grad():
        for start in range(0, s["scenes"], 50):
            scenes = [tw.scene(seed, "unet", i, SIZE) for i in range(start, min(start + 50, s["scenes"]))]
            x = to_tensor(np.stack([x.image for x in scenes]))
            latents.append(vae.encode(x).latent_dist.mean * vae.config.scaling_factor)
            classes += [x.classes for x in scenes]
    latents = torch.cat(latents)
    log(f"unet: {len(latents)} latents, std {latents.std():.3f}")
    alphas = scheduler_alphas_cumprod(None).float().to(DEVICE)  # SD's schedule, as the project reads it
    unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=s["lr"], weight_decay=0.01)
    sched = warmup_cosine(opt, s["steps"], 0.05)
    rng = np.random.default_rng(seed + 2)
    ema = None
    for step in range(s["steps"]):
        idx = rng.integers(0, len(latents), s["batch"])
        z0 = latents[idx]
        if rng.random() < 0.5:
            z0 = z0.flip(-1)  # mirror: the world has no left/right
        cond = torch.stack([prompts[int(rng.choice(classes[i]))] for i in idx])
        t = torch.from_numpy(rng.integers(s["t_min"], s["t_max"], s["batch"])).to(DEVICE)
        noise = torch.randn_like(z0)
        ab = alphas[t].view(-1, 1, 1, 1)
        zt = ab.sqrt() * z0 + (1 - ab).sqrt() * noise
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 20 == 0 or step == s["steps"] - 1:
            log(f"unet step {step}: loss {loss.item():.4f} (ema {ema:.4f})")
    report["unet"] = {"final_loss_ema": float(ema)}
    return unet.eval()


# ----------------------------------------------------------------------------- saving
def save_clip_vision(vision, path: Path):
    from safetensors.torch import save_file

    weights = {f"visual.{k}": v.detach().half().contiguous() for k, v in vision.state_dict().items()}
    save_file(weights, str(path))


def fingerprint(settings) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def scaled(settings, scale: float):
    out = json.loads(json.dumps(settings))
    for stage in ("clip", "vae", "unet"):
        out[stage]["steps"] = max(2, int(round(out[stage]["steps"] * scale)))
        if scale < 1:
            out[stage]["scenes"] = max(2 * out[stage]["batch"], int(out[stage]["scenes"] * scale))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "tests" / "data" / "toyworld"), help="models folder")
    p.add_argument("--world", default=str(ROOT / "build" / "toyworld" / "world"), help="VOC-style dataset folder")
    p.add_argument("--cache", default=str(ROOT / "build" / "toyworld" / "cache"),
                   help="trained stages, reused when their settings are unchanged")
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the training steps (smoke runs)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... (the weights differ in the last bits between devices)")
    p.add_argument("--force", action="store_true", help="redo every stage")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    global DEVICE
    DEVICE = torch.device(args.device)
    settings = scaled(SETTINGS, args.scale)
    seed = settings["seed"]
    out, world = Path(args.out), Path(args.world)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "train_config.json"
    key = fingerprint(settings)
    old = json.loads(config_path.read_text()) if config_path.is_file() else {}
    models_done = (old.get("fingerprint") == key and (out / "sd" / "model_index.json").is_file()
                   and (out / "clip_vision.safetensors").is_file() and not args.force)

    world_key = fingerprint({k: settings[k] for k in ("seed", "size", "world_train", "world_val")})
    stamp = world / "toyworld.json"
    if args.force or not stamp.is_file() or json.loads(stamp.read_text()).get("fingerprint") != world_key:
        t0 = time.time()
        tw.write_voc_dataset(world, settings["world_train"], settings["world_val"], seed, settings["size"])
        stamp.write_text(json.dumps({"fingerprint": world_key, "seed": seed, "size": settings["size"]}))
        log(f"world: {world} ({time.time() - t0:.0f} s)")
    else:
        log(f"world: {world} (cached)")
    if models_done:
        log(f"models: {out} (cached; --force to retrain)")
        return 0

    from g4seg_core.loading.sd_loading import save_diffusers_folder
    from g4seg_core.models.components import SDComponents
    from g4seg_core.models.families import scheduler_alphas_cumprod
    from g4seg_core.models.tokenizer import G4SegTokenizer

    report = {"fingerprint": key, "settings": settings, "torch": torch.__version__, "device": args.device,
              "timings_s": {}}
    cache = Path(args.cache)

    def stage(name, train, save, load, depends=""):
        """Train a stage, or load it from the cache when its settings (and upstream stages) are unchanged."""
        folder = cache / f"{name}-{fingerprint([settings[name], seed, depends])}"
        if folder.is_dir() and (folder / "report.json").is_file() and not args.force:
            log(f"{name}: cached in {folder}")
            report[name] = json.loads((folder / "report.json").read_text())
            return load(folder), folder.name
        t0 = time.time()
        result = train()
        report["timings_s"][name] = round(time.time() - t0)
        folder.mkdir(parents=True, exist_ok=True)
        save(result, folder)
        (folder / "report.json").write_text(json.dumps(report.get(name, {})))
        return result, folder.name

    def save_clip(pair, folder):
        pair[0].save_pretrained(str(folder / "text"))
        torch.save(pair[1].state_dict(), folder / "vision.pt")

    def load_clip(folder):
        from transformers import CLIPTextModelWithProjection

        vision = make_vision(settings["clip"])
        vision.load_state_dict(torch.load(folder / "vision.pt", weights_only=True))
        return (CLIPTextModelWithProjection.from_pretrained(str(folder / "text")).to(DEVICE).eval(),
                vision.to(DEVICE).eval())

    def load_vae(folder):
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_pretrained(str(folder / "vae")).to(DEVICE).eval()

    (text, vision), clip_key = stage("clip", lambda: train_clip(settings["clip"], seed, report), save_clip, load_clip)
    vae, vae_key = stage("vae", lambda: train_vae(settings["vae"], seed, report),
                         lambda m, f: m.save_pretrained(str(f / "vae")), load_vae)
    components = SDComponents(unet=make_unet(settings["unet"]), vae=vae, text_encoders=[text],
                              tokenizer=G4SegTokenizer(0), family="sd21", prediction_type="epsilon",
                              alphas_cumprod=scheduler_alphas_cumprod(None),
                              vae_scaling_factor=float(vae.config.scaling_factor), files=[], text_layers=["last"])
    def load_unet(folder):
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_pretrained(str(folder / "unet")).to(DEVICE).eval()

    components.unet, _ = stage("unet", lambda: train_unet(settings["unet"], seed, components, report),
                               lambda m, f: m.save_pretrained(str(f / "unet")), load_unet, clip_key + vae_key)
    for m in (components.unet, vae, text, vision):
        m.cpu()
    for m in (components.unet, vae, text):
        m.half()
    save_diffusers_folder(components, out / "sd")
    save_clip_vision(vision, out / "clip_vision.safetensors")
    config_path.write_text(json.dumps(report, indent=2))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"models: {out} ({size / 1e6:.1f} MB), timings {report['timings_s']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
