"""CI tests of the node declarations and their pure conversion code (no ComfyUI needed)."""

import importlib
import os

import numpy as np
import pytest
import torch
from PIL import Image

from g4seg_core.errors import G4SegError
from g4seg_core.method.masks import check_same_framing
from nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from g4seg_core.method import flow
from nodes.comfy import backend as comfy_backend
from nodes import common, correspondence_nodes, inject_nodes, mask_nodes

IDS = ["G4SegLoadCoarseMask", "G4SegInjectAttention", "G4SegOneStepDenoise", "G4SegCLIPCorrespondence",
       "G4SegMixForeground", "G4SegRefine", "G4SegMaskToSegPalette", "G4SegDenseCRF", "G4SegTextToMask",
       "G4SegRefineClasses"]

# Widget order is permanent (saved workflows store values by position): pin it.
WIDGET_ORDER = {
    "G4SegLoadCoarseMask": ["image", "mask_kind", "class_index_or_name", "soften", "soften_width", "size"],
    "G4SegInjectAttention": ["class_name", "prompt_template", "emi_mode", "cross_weight", "self_weight", "area_scale", "schedule"],
    "G4SegOneStepDenoise": ["timestep", "seed", "cfg"],
    "G4SegCLIPCorrespondence": ["grid", "direction"],
    "G4SegMixForeground": ["beta", "band_low", "band_high", "iterations", "threshold"],
    "G4SegRefine": ["class_name", "timestep", "seed", "emi_mode", "cross_weight", "self_weight", "beta", "band_low",
                    "band_high", "iterations", "threshold", "size", "soften", "soften_width", "prompt_template",
                    "area_scale", "schedule", "grid", "direction", "cfg", "negative_prompt"],
    "G4SegMaskToSegPalette": ["class_name", "threshold", "background"],
    "G4SegDenseCRF": ["iterations", "gaussian_sxy", "gaussian_compat", "bilateral_sxy", "bilateral_srgb",
                      "bilateral_compat", "confidence", "threshold"],
    "G4SegTextToMask": ["classes", "background", "prob_threshold", "templates", "short_side", "window", "stride",
                        "logit_scale", "sigma", "window_batch"],
    "G4SegRefineClasses": ["classes", "timestep", "seed", "emi_mode", "cross_weight", "self_weight", "beta",
                           "band_low", "band_high", "iterations", "threshold", "size", "soften", "soften_width",
                           "prompt_template", "area_scale", "schedule", "grid", "direction", "cfg", "negative_prompt"],
}


def _widgets(cls):
    it = cls.INPUT_TYPES()
    out = []
    for sec in ("required", "optional"):
        for name, spec in it.get(sec, {}).items():
            t = spec[0]
            if isinstance(t, list) or t in ("INT", "FLOAT", "STRING", "BOOLEAN"):
                out.append(name)
    return out


def test_root_package_imports_outside_comfyui():
    spec = importlib.util.spec_from_file_location(
        "g4seg_root_pkg", os.path.join(os.path.dirname(os.path.dirname(__file__)), "__init__.py"),
        submodule_search_locations=[os.path.dirname(os.path.dirname(__file__))])
    mod = importlib.util.module_from_spec(spec)
    import sys
    sys.modules["g4seg_root_pkg"] = mod  # as ComfyUI's custom-node loader does
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.modules.pop("g4seg_root_pkg", None)
    assert sorted(mod.NODE_CLASS_MAPPINGS) == sorted(IDS)
    assert os.path.isdir(os.path.join(os.path.dirname(mod.__file__), mod.WEB_DIRECTORY, "js"))


@pytest.mark.parametrize("node_id", IDS)
def test_declarations(node_id):
    cls = NODE_CLASS_MAPPINGS[node_id]
    assert NODE_DISPLAY_NAME_MAPPINGS[node_id].endswith("(G4Seg)")
    assert cls.CATEGORY == "G4Seg" and callable(getattr(cls, cls.FUNCTION))
    assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS)
    it = cls.INPUT_TYPES()
    for sec in ("required", "optional"):
        for name, spec in it.get(sec, {}).items():
            assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
            if spec[0] in ("INT", "FLOAT"):
                o = spec[1]
                assert o["min"] <= o["default"] <= o["max"]
            if isinstance(spec[0], list) and spec[0] and "default" in spec[1]:
                assert spec[1]["default"] in spec[0]
    assert _widgets(cls) == WIDGET_ORDER[node_id]


def test_mask_batch_shapes():
    assert common.mask_batch(torch.zeros(5, 6)).shape == (1, 5, 6)
    assert common.mask_batch(torch.zeros(2, 5, 6)).shape == (2, 5, 6)
    assert common.mask_batch(torch.zeros(2, 1, 5, 6)).shape == (2, 5, 6)
    with pytest.raises(G4SegError):
        common.mask_batch(torch.zeros(5))
    with pytest.raises(G4SegError):
        common.mask_batch(torch.full((4, 4), float("nan")))


def test_pairing_and_size_checks():
    imgs, masks = torch.zeros(3, 8, 8, 3), torch.zeros(1, 8, 8)
    assert common.pair_batches(imgs, masks) == 3
    with pytest.raises(G4SegError, match="batch"):
        common.pair_batches(imgs, torch.zeros(2, 8, 8))
    with pytest.raises(G4SegError, match="aspect"):
        check_same_framing((64, 128), (64, 64))
    check_same_framing((64, 128), (32, 64))
    with pytest.raises(G4SegError):
        correspondence_nodes.check_generated_size((64, 80), (32, 80))
    correspondence_nodes.check_generated_size((67, 83), (64, 80))
    assert common.image_batch(torch.zeros(1, 4, 4, 4)).shape[-1] == 3


def test_prompt_and_working_size():
    assert inject_nodes.fill_prompt("a photo of a {}", "cat") == "a photo of a cat"
    with pytest.raises(G4SegError):
        inject_nodes.fill_prompt("a photo", "cat")
    assert flow.working_size(512, (300, 400)) == (512, 512)
    assert flow.working_size(0, (300, 405)) == (296, 400)


class _Sampling:
    def __init__(self):
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        ab = torch.cumprod(1 - betas, 0)
        self.sigmas = ((1 - ab) / ab) ** 0.5

    def sigma(self, t):
        return self.sigmas[int(t)].float().reshape(1)


def test_sigma_for_timestep_uses_model_schedule():
    assert abs(comfy_backend.sigma_for_timestep(_Sampling(), 400) - 1.16439) < 1e-3


def test_zero_conditioning():
    pos = [[torch.ones(1, 77, 8), {"pooled_output": torch.ones(1, 8)}]]
    neg = comfy_backend.zero_conditioning(pos)
    assert float(neg[0][0].abs().sum()) == 0 and float(neg[0][1]["pooled_output"].abs().sum()) == 0
    assert float(pos[0][0].sum()) > 0


def test_load_coarse_mask_from_files(tmp_path):
    binary = np.zeros((40, 50), np.uint8)
    binary[10:30, 10:40] = 255
    p = tmp_path / "bin.png"
    Image.fromarray(binary).save(p)
    mask, text = mask_nodes.load_coarse_mask(str(p), "auto", "", "sdf", 8.0)
    assert mask.shape == (1, 40, 50) and "softened" in text
    assert 0.0 < float(mask.min()) and float(mask.max()) < 1.0
    # soft 16-bit stays unchanged
    soft = (np.linspace(0, 65535, 40 * 50).reshape(40, 50)).astype(np.uint16)
    p16 = tmp_path / "soft16.png"
    Image.fromarray(soft).save(p16)
    m16, t16 = mask_nodes.load_coarse_mask(str(p16), "auto", "", "sdf", 8.0)
    assert "not softened" in t16 and abs(float(m16.max()) - 1.0) < 1e-4
    # palette label map: class by VOC name and by index
    labels = np.zeros((40, 50), np.uint8)
    labels[5:20, 5:20] = 8  # cat
    labels[25:35, 25:45] = 15  # person
    im = Image.fromarray(labels, mode="P")
    from g4seg_core.files.palettes import voc_palette
    im.putpalette(voc_palette().reshape(-1).tolist())
    pp = tmp_path / "labels.png"
    im.save(pp)
    cat, tc = mask_nodes.load_coarse_mask(str(pp), "auto", "cat", "none", 8.0)
    person, _ = mask_nodes.load_coarse_mask(str(pp), "auto", "15", "none", 8.0)
    assert float(cat[0, 10, 10]) == 1.0 and float(cat[0, 30, 30]) == 0.0 and "label map" in tc
    assert float(person[0, 30, 30]) == 1.0
    with pytest.raises(G4SegError, match="class_index_or_name"):
        mask_nodes.load_coarse_mask(str(pp), "auto", "", "none", 8.0)


def test_load_coarse_mask_from_inputs():
    m = torch.zeros(2, 16, 16)
    m[:, 4:12, 4:12] = 1
    out, text = mask_nodes.load_coarse_mask("", "auto", "", "blur", 4.0, mask=m)
    assert out.shape == (2, 16, 16) and "blur" in text
    img = torch.zeros(1, 16, 16, 3)
    img[:, 4:12, 4:12] = 1
    out2, _ = mask_nodes.load_coarse_mask("", "auto", "", "none", 4.0, mask_image=img)
    assert torch.equal(out2[0] > 0.5, img[0, :, :, 0] > 0.5)
    with pytest.raises(G4SegError):
        mask_nodes.load_coarse_mask("", "auto", "", "sdf", 4.0)


def test_seg_palette():
    m = torch.zeros(1, 8, 8)
    m[:, 2:6, 2:6] = 0.9
    img = mask_nodes.mask_to_seg_palette(m, "cat", 0.5)
    assert img.shape == (1, 8, 8, 3)
    assert float(img[0, 0, 0].sum()) == 0.0 and float(img[0, 3, 3].sum()) > 0


def test_mix_and_visualisation_with_synthetic_features():
    # features that identify each pixel: identity correspondence keeps the map unchanged
    h = w = 8
    c = h * w
    feats = torch.eye(c).reshape(c, h, w)
    corr = correspondence_nodes.G4SegCorrespondence(feats[None], feats[None], 0, "original_to_generated", (32, 32))
    prob = torch.rand(1, 32, 32)
    refined, binary = correspondence_nodes.mix_foreground(prob, corr, 0.8, 0.2, 0.6, 1, 0.5)
    torch.testing.assert_close(refined, prob)
    assert torch.equal(binary, (prob >= 0.5).float())
    img = torch.rand(32, 32, 3)
    vis = correspondence_nodes.match_visualisation(img, img, feats, feats, "original_to_generated", 0)
    torch.testing.assert_close(vis, img, atol=1e-5, rtol=0)
    with pytest.raises(G4SegError, match="aspect"):
        correspondence_nodes.mix_foreground(torch.rand(1, 32, 64), corr, 0.8, 0.2, 0.6, 1, 0.5)


class _Extractor:
    """Stand-in for the CLIP feature extractor: colour features per 8x8 cell."""

    def __call__(self, x):
        return torch.nn.functional.normalize(torch.nn.functional.avg_pool2d(x, 8) + 0.01, dim=1)


def test_clip_correspondence_with_stub_extractor():
    orig = torch.rand(1, 64, 80, 3)
    gen = orig[:, :60, :72]  # VAE-style crop
    corr, vis = correspondence_nodes.clip_correspondence(None, orig, gen, 0, "original_to_generated",
                                                         extractor=_Extractor())
    assert corr.orig_feats.shape == (1, 3, 8, 10) and vis.shape == (1, 64, 80, 3)


def test_pack_import_does_not_put_the_pack_folder_on_sys_path(tmp_path):
    """As ComfyUI loads it: g4seg_core importable by name, but tests/tools/bench not exposed."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (
        "import importlib.util, sys\n"
        f"root = {root!r}\n"
        "spec = importlib.util.spec_from_file_location('ComfyUI_G4Seg', root + '/__init__.py', "
        "submodule_search_locations=[root])\n"
        "pack = importlib.util.module_from_spec(spec); sys.modules['ComfyUI_G4Seg'] = pack\n"
        "spec.loader.exec_module(pack)\n"
        "assert root not in sys.path and root + '/' not in sys.path, sys.path\n"
        "import g4seg_core; assert g4seg_core.__file__.startswith(root)\n"
        "for name in ('tests', 'tools', 'bench'):\n"
        "    assert importlib.util.find_spec(name) is None, name\n"
        "print('ok', len(pack.NODE_CLASS_MAPPINGS))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr[-2000:]


def test_load_coarse_mask_softens_like_refine_at_the_same_size():
    """soften_width means working-size pixels everywhere: with LoadCoarseMask's size = G4SegRefine's size the
    softening is the refine flow's own (prepare_coarse); size 0 keeps the old meaning (the mask's pixels)."""
    from g4seg_core.method.softening import prepare_coarse, soften_binary

    binary = np.zeros((256, 320), np.float32)
    binary[60:200, 80:260] = 1
    mask = torch.from_numpy(binary)[None]
    node = mask_nodes.G4SegLoadCoarseMask()
    at_512, _ = node.load("", "auto", "", "sdf", 8.0, mask=mask, size=512)
    flow_prob, _ = prepare_coarse(binary, 512, "sdf", 8.0)
    np.testing.assert_allclose(at_512[0].numpy(), flow_prob, atol=1e-6)
    old, _ = node.load("", "auto", "", "sdf", 8.0, mask=mask)
    np.testing.assert_allclose(old[0].numpy(), soften_binary(binary, "sdf", 8.0)[0], atol=1e-6)
    with pytest.raises(G4SegError, match="size"):
        node.load("", "auto", "", "sdf", 8.0, mask=mask, size=100)
