"""Offline loading: tokenizer, shipped configs, diffusers folders, single-file LDM checkpoints, CLIP vision."""

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ldm_format import components_to_ldm, write_checkpoint  # noqa: E402

from g4seg_core.errors import G4SegError  # noqa: E402
from g4seg_core.loading.clip_loading import load_clip_vision, split_clip_spec  # noqa: E402
from g4seg_core.models.components import SDComponents, components_from_configs  # noqa: E402
from g4seg_core.loading.conversion import convert_ldm_checkpoint  # noqa: E402
from g4seg_core.loading.detection import detect_family  # noqa: E402
from g4seg_core.models.families import FAMILIES, family_configs, scheduler_alphas_cumprod  # noqa: E402
from g4seg_core.loading.sd_loading import load_sd_components, save_diffusers_folder  # noqa: E402
from g4seg_core.loading.state_dicts import assign_weights  # noqa: E402
from g4seg_core.models.tiny import tiny_clip_features, tiny_configs, tiny_sd_components  # noqa: E402
from g4seg_core.models.tokenizer import G4SegTokenizer  # noqa: E402

PROMPT = "a photo of a cat"


# ----------------------------------------------------------------------------- tokenizer
def test_tokenizer_matches_open_clip():
    from open_clip.tokenizer import SimpleTokenizer

    reference = SimpleTokenizer()
    ours = G4SegTokenizer(0)
    for text in [PROMPT, "A  Photo of a TV-Monitor!", "potted plant, dining table's 42 &amp; café", "日本語 😀"]:
        assert ours.encode_words(text) == reference.encode(text), text
    assert torch.equal(ours(PROMPT), reference(PROMPT)[0])  # open_clip pads with 0, like SD2's tokenizer
    assert ours.decode(ours.encode_words(PROMPT)) == PROMPT


def test_tokenizer_ids_and_padding():
    words = G4SegTokenizer().encode_words(PROMPT)
    assert words == [320, 1125, 539, 320, 2368]  # no start/end tokens
    clip_l = G4SegTokenizer(49407)(PROMPT)
    open_clip_pad = G4SegTokenizer(0)(PROMPT)
    assert clip_l.shape == (77,) and clip_l.dtype == torch.long
    assert clip_l[:7].tolist() == [49406] + words + [49407]
    assert (clip_l[7:] == 49407).all() and (open_clip_pad[7:] == 0).all()
    assert torch.equal(clip_l[:7], open_clip_pad[:7])
    assert G4SegTokenizer(49407)(PROMPT, pad_token_id=0).tolist() == open_clip_pad.tolist()


def test_tokenizer_length_limit():
    tok = G4SegTokenizer()
    assert tok("cat " * 75).shape == (77,)  # 75 words + start + end fit exactly
    with pytest.raises(G4SegError, match="77"):
        tok("cat " * 76)
    with pytest.raises(G4SegError):
        G4SegTokenizer(50000)


# ----------------------------------------------------------------------------- configs
def test_schedule():
    ab = scheduler_alphas_cumprod()
    assert ab.dtype == torch.float64 and ab.shape == (1000,)
    assert abs(float(ab[400]) - 0.42448) < 1e-4
    assert math.isclose(math.sqrt((1 - ab[400]) / ab[400]), 1.16439, abs_tol=1e-4)


# Published parameter counts of the released models.
PARAMS = {"sd15": (859520964, [123060480]), "sd21": (865910724, [340387840]),
          "sdxl": (2567463684, [123060480, 694659840])}


@pytest.mark.parametrize("family", ["sd15", "sd21", "sd21v", "sdxl"])
def test_shipped_configs_match_ldm_layout(family):
    """Full-size architectures on the meta device: published sizes, and a full LDM key set converts strictly."""
    src = components_from_configs(family_configs(family), family, empty=True)
    count = lambda m: sum(p.numel() for p in m.parameters())
    unet_params, text_params = PARAMS["sd21" if family == "sd21v" else family]
    assert count(src.unet) == unet_params and count(src.vae) == 83653863
    assert [count(e) for e in src.text_encoders] == text_params
    assert src.vae_downsample == 8
    assert src.vae_scaling_factor == (0.13025 if family == "sdxl" else 0.18215)
    assert src.prediction_type == ("v_prediction" if family == "sd21v" else "epsilon")
    state_dict = components_to_ldm(src, schedule=False)
    assert detect_family(state_dict) == ("sd21" if family == "sd21v" else family)
    dst = components_from_configs(family_configs(family), family, empty=True)
    converted = convert_ldm_checkpoint(state_dict, family, dst)
    assign_weights(dst.unet, converted["unet"], "UNet", family)
    assign_weights(dst.vae, converted["vae"], "VAE", family)
    for encoder, weights in zip(dst.text_encoders, converted["text_encoders"]):
        assign_weights(encoder, weights, "text", family)


# ----------------------------------------------------------------------------- components
def _outputs(c: SDComponents):
    """Text embedding, one UNet call and a VAE round trip: what the pipeline uses."""
    g = torch.Generator().manual_seed(0)
    emb = c.encode_prompt(PROMPT)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        eps = c.unet(latents, torch.tensor([400]), encoder_hidden_states=emb.hidden_states,
                     **c.unet_kwargs(emb, 64, 64)).sample
        image = c.vae.decode(latents).sample
        z = c.vae.encode(image.clamp(-1, 1)).latent_dist.mean
    return [emb.hidden_states, eps, image, z] + ([emb.pooled] if emb.pooled is not None else [])


def _assert_same(a: SDComponents, b: SDComponents):
    """Bitwise-equal weights; outputs equal up to float round-off (CPU kernels may pick different
    vectorised paths for differently aligned copies of the same weights)."""
    assert (a.family, a.prediction_type, a.vae_scaling_factor) == (b.family, b.prediction_type, b.vae_scaling_factor)
    assert torch.allclose(a.alphas_cumprod, b.alphas_cumprod, atol=1e-7)
    for ma, mb in [(a.unet, b.unet), (a.vae, b.vae)] + list(zip(a.text_encoders, b.text_encoders)):
        sa, sb = ma.state_dict(), mb.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    for x, y in zip(_outputs(a), _outputs(b)):
        assert x.shape == y.shape and torch.allclose(x, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["sd15", "sd21", "sdxl"])
def test_encode_prompt_shapes(family):
    c = tiny_sd_components(family)
    emb = c.encode_prompt(PROMPT)
    width = sum(e.config.hidden_size for e in c.text_encoders)
    assert emb.hidden_states.shape == (1, 77, width)
    assert emb.token_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert c.label_token_ids("cat") == [2368]
    kwargs = c.unet_kwargs(emb, 96, 64)
    if family == "sdxl":
        assert emb.pooled.shape == (1, c.text_encoders[1].config.projection_dim)
        assert kwargs["added_cond_kwargs"]["time_ids"].tolist() == [[96, 64, 0, 0, 96, 64]]
        # SDXL context = both encoders' penultimate hidden states, side by side
        ids = torch.tensor([c.tokenizer(PROMPT, pad_token_id=p).tolist() for p in (49407, 0)])
        first = c.text_encoders[0](input_ids=ids[:1], output_hidden_states=True).hidden_states[-2]
        assert torch.allclose(emb.hidden_states[..., :first.shape[-1]], first)
    else:
        assert emb.pooled is None and kwargs == {}


def test_sdxl_fp16_keeps_vae_fp32():
    c = tiny_sd_components("sdxl").to("cpu", torch.float16)
    assert c.unet.dtype == torch.float16 and c.text_encoders[1].dtype == torch.float16
    assert c.vae.dtype == torch.float32
    c.to("cpu", torch.bfloat16)
    assert c.vae.dtype == torch.bfloat16
    assert tiny_sd_components("sd21").to("cpu", torch.float16).vae.dtype == torch.float16


@pytest.mark.parametrize("family", ["sd21", "sdxl", "sd21v"])
def test_diffusers_folder_round_trip(tmp_path, family):
    original = tiny_sd_components(family, seed=1)
    save_diffusers_folder(original, tmp_path / "model")
    loaded = load_sd_components(tmp_path / "model")
    _assert_same(original, loaded)
    assert loaded.files == [str(tmp_path / "model")]


@pytest.mark.parametrize("family", ["sd15", "sd21", "sdxl"])
def test_single_file_round_trip(tmp_path, family):
    original = tiny_sd_components(family, seed=2)
    path = tmp_path / f"tiny_{family}.safetensors"
    write_checkpoint(original, path)
    loaded = load_sd_components(path, configs=tiny_configs(family))
    assert loaded.family == family and loaded.prediction_type == "epsilon"
    _assert_same(original, loaded)
    assert loaded.files == [str(path)]


def test_single_file_ckpt_and_dtype(tmp_path):
    original = tiny_sd_components("sd15", seed=2)
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": components_to_ldm(original), "global_step": 1}, path)
    loaded = load_sd_components(path, configs=tiny_configs("sd15"))
    _assert_same(original, loaded)
    half = load_sd_components(path, configs=tiny_configs("sd15"), dtype=torch.bfloat16)
    assert half.unet.dtype == torch.bfloat16 and half.text_encoders[0].dtype == torch.bfloat16
    # a dtype that depends on the detected family (auto on GPUs: bf16 for SDXL) is chosen after detection
    seen = []
    by_family = load_sd_components(path, configs=tiny_configs("sd15"),
                                   dtype=lambda family: seen.append(family) or torch.bfloat16)
    assert seen == ["sd15"] and by_family.vae.dtype == torch.bfloat16


def test_sd2_prediction_type(tmp_path):
    original = tiny_sd_components("sd21v", seed=4)
    marked = tmp_path / "v.safetensors"
    write_checkpoint(original, marked, v_pred_marker=True)
    loaded = load_sd_components(marked, configs=tiny_configs("sd21v"))
    assert (loaded.family, loaded.prediction_type) == ("sd21v", "v_prediction")
    _assert_same(original, loaded)
    plain = tmp_path / "plain.safetensors"
    write_checkpoint(original, plain)  # no marker, no weight statistic in a tiny model: epsilon...
    assert load_sd_components(plain, configs=tiny_configs("sd21")).prediction_type == "epsilon"
    # ...unless the user says which model it is
    forced = load_sd_components(plain, family="sd21v", configs=tiny_configs("sd21v"))
    assert (forced.family, forced.prediction_type) == ("sd21v", "v_prediction")
    by_type = load_sd_components(plain, prediction_type="v_prediction", configs=tiny_configs("sd21v"))
    assert by_type.family == "sd21v"
    with pytest.raises(G4SegError, match="sd21"):
        load_sd_components(plain, family="sd15", configs=tiny_configs("sd15"))


def test_sd2_weight_statistic_detects_v():
    from g4seg_core.loading.detection import detect_prediction_type

    key = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    g = torch.Generator().manual_seed(0)
    assert detect_prediction_type({key: torch.randn(320, generator=g) * 0.2}, "sd21")[0] == "v_prediction"
    assert detect_prediction_type({key: torch.randn(320, generator=g) * 0.01}, "sd21")[0] == "epsilon"
    assert detect_prediction_type({"v_pred": torch.tensor([])}, "sdxl")[0] == "v_prediction"


def _tiny_state_dict(family="sd15"):
    return components_to_ldm(tiny_sd_components(family, seed=5))


def _write(state_dict, path):
    from safetensors.torch import save_file

    save_file(state_dict, str(path))
    return path


def test_strict_key_errors(tmp_path):
    sd = _tiny_state_dict()
    missing_key = "model.diffusion_model.out.2.weight"
    del sd[missing_key]
    sd["model.diffusion_model.extra_layer.weight"] = torch.zeros(3)
    sd["first_stage_model.decoder.conv_in.weight"] = torch.zeros(1, 2, 3, 3)
    with pytest.raises(G4SegError) as info:
        load_sd_components(_write(sd, tmp_path / "broken.safetensors"), configs=tiny_configs("sd15"))
    message = str(info.value)
    assert "broken.safetensors" in message and "conv_out.weight" in message and "missing" in message
    assert "extra_layer" in message and "unexpected" in message
    sd = _tiny_state_dict()
    sd["first_stage_model.decoder.conv_in.weight"] = torch.zeros(1, 2, 3, 3)
    with pytest.raises(G4SegError, match="wrong shape"):
        load_sd_components(_write(sd, tmp_path / "shape.safetensors"), configs=tiny_configs("sd15"))
    # a real-size architecture does not accept tiny weights either
    with pytest.raises(G4SegError, match="wrong shape"):
        load_sd_components(_write(_tiny_state_dict(), tmp_path / "tiny.safetensors"))


def test_corrupt_file(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(G4SegError, match="could not read"):
        load_sd_components(path)
    with pytest.raises(G4SegError, match="does not exist"):
        load_sd_components(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("keys, expected", [
    ({"model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale": (4,)}, "Flux"),
    ({"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": (4,)}, "Stable Diffusion 3"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}, "inpainting"),
    ({"model.diffusion_model.input_blocks.1.1.time_stack.0.norm1.weight": (4,),
      "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}, "video"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 4)}, "LoRA"),
    ({"input_blocks.0.0.weight": (320, 4, 3, 3)}, "UNet only"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
      "conditioner.embedders.0.model.token_embedding.weight": (4, 4),
      "first_stage_model.decoder.conv_in.weight": (4, 4, 3, 3)}, "refiner"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
      "first_stage_model.decoder.conv_in.weight": (4, 4, 3, 3)}, "no text encoder"),
])
def test_unsupported_models(tmp_path, keys, expected):
    sd = {k: torch.zeros(shape) for k, shape in keys.items()}
    with pytest.raises(G4SegError, match=expected):
        load_sd_components(_write(sd, tmp_path / "model.safetensors"))


def test_family_detection():
    for family in ("sd15", "sd21", "sdxl"):
        assert detect_family(_tiny_state_dict(family)) == family
    sd = _tiny_state_dict("sd21")
    del sd["model.diffusion_model.out.2.weight"]  # detection needs keys, not completeness
    assert detect_family(sd) == "sd21"

def test_family_argument_checked_first(tmp_path):
    path = _write(_tiny_state_dict("sd15"), tmp_path / "m.safetensors")
    with pytest.raises(G4SegError, match="family"):
        load_sd_components(path, family="sd3")


def test_bad_family_names():
    from g4seg_core.models.families import normalize_family

    assert normalize_family("SD1.5") == "sd15" and normalize_family("sd2") == "sd21"
    assert normalize_family("SDXL") == "sdxl" and normalize_family("sd21v") == "sd21v"
    with pytest.raises(G4SegError, match="flux"):
        normalize_family("flux")
    assert set(FAMILIES) == {"sd15", "sd21", "sd21v", "sdxl"}


# ----------------------------------------------------------------------------- CLIP vision
def _images():
    return torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("width, act", [(64, "quick_gelu"), (1280, "gelu")])
def test_clip_vision_transformers_file(tmp_path, width, act):
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from g4seg_core.models.clip_features import DenseCLIPFeatures

    torch.manual_seed(0)
    heads = {64: 1, 1280: 16}[width]
    config = CLIPVisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2 if width == 64 else 1,
                              num_attention_heads=heads, image_size=32, patch_size=16, projection_dim=16, hidden_act=act)
    model = CLIPVisionModelWithProjection(config).eval()
    path = tmp_path / "clip_vision_tiny.safetensors"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["vision_model.embeddings.position_ids"] = torch.arange(5)[None]  # older files store it
    save_file(state, str(path))
    loaded = load_clip_vision(path)
    expected = DenseCLIPFeatures.from_transformers(model)(_images())
    got = loaded(_images())
    assert got.shape == expected.shape == (2, 16, 4, 3)
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("openai", [False, True])
def test_clip_vision_open_clip_file(tmp_path, openai):
    from open_clip.transformer import QuickGELU, VisionTransformer

    from g4seg_core.models.clip_features import DenseCLIPFeatures

    torch.manual_seed(1)
    visual = VisionTransformer(image_size=32, patch_size=16, width=64, layers=2, heads=1, mlp_ratio=4.0,
                               output_dim=24, act_layer=QuickGELU if openai else torch.nn.GELU).eval()
    full = {"visual." + k: v for k, v in visual.state_dict().items()}
    full["logit_scale"] = torch.tensor(1.0)
    full["token_embedding.weight"] = torch.zeros(10, 8)  # a full CLIP state dict: text side ignored
    path = tmp_path / ("tiny-openai.bin" if openai else "tiny.bin")
    torch.save(full, path)
    got = load_clip_vision(str(path))(_images())
    expected = DenseCLIPFeatures.from_open_clip(visual)(_images())
    assert got.shape == (2, 24, 4, 3) and torch.allclose(got, expected, atol=1e-5)


def test_clip_vision_errors(tmp_path):
    with pytest.raises(G4SegError, match="do not exist"):
        load_clip_vision(tmp_path / "none.safetensors")
    path = _write({"something.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(G4SegError, match="not a CLIP image encoder"):
        load_clip_vision(path)
    with pytest.raises(G4SegError, match="open_clip model name"):
        load_clip_vision(f"NotAModel-99:{path}")
    with pytest.raises(G4SegError, match="download"):
        load_clip_vision(f"hf-hub:{path}")


def test_split_clip_spec(tmp_path):
    assert split_clip_spec("ViT-B-16:/x/y.bin") == ("ViT-B-16", "/x/y.bin")
    assert split_clip_spec("/x/y.bin") == (None, "/x/y.bin")
    existing = tmp_path / "a.bin"
    existing.write_bytes(b"")
    assert split_clip_spec(str(existing)) == (None, str(existing))
    assert split_clip_spec("C:\\models\\clip.bin")[0] is None  # a Windows drive letter is not a model name


def test_tiny_components_are_deterministic():
    a, b = tiny_sd_components("sd21", seed=0), tiny_sd_components("sd21", seed=0)
    assert torch.equal(next(a.unet.parameters()), next(b.unet.parameters()))
    assert not torch.equal(next(a.unet.parameters()), next(tiny_sd_components("sd21", seed=1).unet.parameters()))
    assert tiny_sd_components("sd21", prediction_type="v_prediction").family == "sd21v"
    features = tiny_clip_features()(torch.rand(1, 3, 64, 64))
    assert features.shape == (1, 16, 4, 4)
    assert torch.allclose(features.norm(dim=1), torch.ones(1, 4, 4), atol=1e-5)
