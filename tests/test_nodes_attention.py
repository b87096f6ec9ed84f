"""CI tests of nodes/comfy/attention_patch.py with tensors and option dicts shaped like ComfyUI's (no ComfyUI)."""

import copy

import pytest
import torch

from g4seg_core.errors import G4SegError
from g4seg_core.method.injection import InjectionSettings, injected_attention, plain_attention
from nodes.comfy import attention_patch as ap

HEADS, DH = 2, 8


def _qkv(batch, nq, nk, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, nq, HEADS * DH, generator=g)
    k = torch.randn(batch, nk, HEADS * DH, generator=g)
    v = torch.randn(batch, nk, HEADS * DH, generator=g)
    return q, k, v


def _mask(h=16, w=16):
    m = torch.zeros(h, w)
    m[4:12, 3:10] = 1.0
    return m


def _settings(mask=None, mode="additive", cross=4.0, selfw=2.0, schedule="constant"):
    return InjectionSettings(mask=_mask() if mask is None else mask, token_positions=[5], mode=mode,
                             cross_weight=cross, self_weight=selfw, area_scale=1.0, schedule=schedule)


def _opts(order=(1, 0), latent=(8, 8), block_hw=(4, 4), activations=True, sigma=1.16):
    o = {"n_heads": HEADS, "dim_head": DH, "block": ("input", 1), "block_index": 0,
         "original_shape": [len(order), 4, latent[0], latent[1]], "cond_or_uncond": list(order),
         "sigmas": torch.tensor([sigma])}
    if activations:
        o["activations_shape"] = [len(order), 320, block_hw[0], block_hw[1]]
    return o


def _expected(q, k, v, kind, settings, hw, rows):
    tokens = settings.tokens_for_grid(*hw)
    w = settings.cross_weight if kind == "cross" else settings.self_weight
    out = plain_attention(q, k, v, HEADS)
    emi = injected_attention(q, k, v, HEADS, kind=kind, mask_tokens=tokens, token_positions=settings.token_positions,
                             mode=settings.mode, weight=w, area_scale=settings.area_scale)
    out[rows] = emi[rows]
    return out


@pytest.mark.parametrize("kind,nk", [("self", 16), ("cross", 77)])
@pytest.mark.parametrize("order", [(1, 0), (0, 1), (0,)])
def test_only_cond_rows_are_modulated(kind, nk, order):
    q, k, v = _qkv(len(order), 16, nk)
    if kind == "self":
        k, v = q.clone(), _qkv(len(order), 16, 16, seed=3)[2]
    s = _settings()
    patch = ap.G4SegAttentionPatch(kind, [s])
    out = patch(q, k, v, _opts(order=order))
    rows = torch.tensor([c == 0 for c in order])
    torch.testing.assert_close(out, _expected(q, k, v, kind, s, (4, 4), rows))
    plain = plain_attention(q, k, v, HEADS)
    for i, c in enumerate(order):
        if c == 1:
            torch.testing.assert_close(out[i], plain[i])
        else:
            assert not torch.allclose(out[i], plain[i])


def test_activations_shape_absent_uses_original_shape():
    q, k, v = _qkv(2, 16, 77)
    s = _settings()
    patch = ap.G4SegAttentionPatch("cross", [s])
    a = patch(q, k, v, _opts(activations=True))
    b = patch(q, k, v, _opts(activations=False))  # 16 tokens on an 8x8 latent -> 4x4
    torch.testing.assert_close(a, b)


def test_token_grid_odd_sizes():
    assert ap.token_grid({"original_shape": [1, 4, 75, 100]}, 38 * 50) == (38, 50)
    assert ap.token_grid({"activations_shape": [1, 640, 19, 25]}, 475) == (19, 25)
    with pytest.raises(G4SegError):
        ap.token_grid({}, 64)


def test_weight_zero_and_mode_off_are_plain():
    q, k, v = _qkv(2, 16, 77)
    plain = plain_attention(q, k, v, HEADS)
    for s in (_settings(cross=0.0), _settings(mode="off")):
        out = ap.G4SegAttentionPatch("cross", [s])(q, k, v, _opts())
        torch.testing.assert_close(out, plain)


class _Inner:
    """Another pack's replace patch: plain attention plus a visible offset, and a call log."""

    def __init__(self):
        self.calls = 0

    def __call__(self, q, k, v, extra_options):
        self.calls += 1
        return plain_attention(q, k, v, extra_options["n_heads"]) + 10.0


def test_chains_with_existing_replace_patch():
    q, k, v = _qkv(2, 16, 77)
    s = _settings()
    inner = _Inner()
    patch = ap.G4SegAttentionPatch("cross", [s], inner=inner)
    out = patch(q, k, v, _opts(order=(1, 0)))
    assert inner.calls == 1
    alone = ap.G4SegAttentionPatch("cross", [s])(q, k, v, _opts(order=(1, 0)))
    # uncond row: exactly the inner patch; cond row: inner + our change
    torch.testing.assert_close(out[0], plain_attention(q, k, v, HEADS)[0] + 10.0)
    torch.testing.assert_close(out[1], alone[1] + 10.0)


def test_schedule_t5_reads_sigma():
    # SD schedule: sigma at t=400 is 1.16439; (0.4)^5 = 0.01024
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    ab = torch.cumprod(1 - betas, 0)
    log_sigmas = (((1 - ab) / ab) ** 0.5).log().float()
    t = ap.timestep_from_sigma(1.16439, log_sigmas)
    assert abs(t - 400) < 0.05
    s = _settings(schedule="t5")
    patch = ap.G4SegAttentionPatch("cross", [s], log_sigmas=log_sigmas)
    t = patch._timestep(_opts(sigma=1.16439))
    assert abs(s.weights_at(t)[0] - 4.0 * 0.4 ** 5) < 1e-4


def test_per_image_masks_in_batch():
    m1, m2 = _mask(), torch.flip(_mask(), dims=[1])
    s1, s2 = _settings(m1), _settings(m2)
    q, k, v = _qkv(4, 16, 77)  # chunks (uncond, cond) x 2 images
    out = ap.G4SegAttentionPatch("cross", [s1, s2])(q, k, v, _opts(order=(1, 0)))
    plain = plain_attention(q, k, v, HEADS)
    torch.testing.assert_close(out[:2], plain[:2])
    e1 = _expected(q[2:3], k[2:3], v[2:3], "cross", s1, (4, 4), torch.tensor([True]))
    e2 = _expected(q[3:4], k[3:4], v[3:4], "cross", s2, (4, 4), torch.tensor([True]))
    torch.testing.assert_close(out[2:3], e1)
    torch.testing.assert_close(out[3:4], e2)


# --------------------------------------------------------------------------- model-level injection

class _TB(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList([torch.nn.Identity() for _ in range(n)])


class UNetModel(torch.nn.Module):  # the class name ComfyUI's UNet has
    def __init__(self):
        super().__init__()
        self.input_blocks = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Identity()),
                                                 torch.nn.Sequential(torch.nn.Identity(), _TB(1)),
                                                 torch.nn.Sequential(torch.nn.Identity(), _TB(2))])
        self.middle_block = torch.nn.Sequential(torch.nn.Identity(), _TB(1), torch.nn.Identity())
        self.output_blocks = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Identity()),
                                                  torch.nn.Sequential(torch.nn.Identity(), _TB(1))])


class SD15:
    pass


class SD20:
    unet_config = {"context_dim": 1024}


class Flux:
    pass


class _Base:
    def __init__(self, config, latent, unet=None):
        self.model_config = config
        self.latent_format = latent
        self.diffusion_model = unet if unet is not None else UNetModel()


class FakePatcher:
    """The ModelPatcher surface inject() uses: clone, model_options, set_model_patch_replace."""

    def __init__(self, base):
        self.model = base
        self.model_options = {"transformer_options": {}}

    def clone(self):
        n = FakePatcher(self.model)
        n.model_options = copy.deepcopy(self.model_options)
        return n

    def get_model_object(self, name):
        raise AttributeError(name)

    def set_model_patch_replace(self, patch, name, block_name, number, transformer_index=None):
        to = self.model_options["transformer_options"]
        table = to.setdefault("patches_replace", {}).setdefault(name, {})
        key = (block_name, number, transformer_index) if transformer_index is not None else (block_name, number)
        table[key] = patch


def test_attention_blocks_enumeration():
    keys = ap.attention_blocks(UNetModel())
    assert keys == [("input", 1, 0), ("input", 2, 0), ("input", 2, 1), ("middle", 0, 0), ("output", 1, 0)]


def test_model_family_checks():
    assert ap.model_family(FakePatcher(_Base(SD15(), SD15()))) == "SD1.x"
    assert ap.model_family(FakePatcher(_Base(SD20(), SD15()))) == "SD2.x"
    with pytest.raises(G4SegError, match="Supported: SD1"):
        ap.model_family(FakePatcher(_Base(Flux(), Flux(), unet=torch.nn.Linear(1, 1))))


def test_inject_wraps_other_packs_and_replaces_itself():
    model = FakePatcher(_Base(SD15(), SD15()))
    other = _Inner()
    model.set_model_patch_replace(other, "attn2", "input", 1)            # 2-key form
    model.set_model_patch_replace(other, "attn1", "output", 1, 0)        # 3-key form
    patched, family, n = ap.inject(model, [_settings()])
    assert family == "SD1.x" and n == 5
    assert "attn1" not in model.model_options["transformer_options"].get("patches_replace", {}) or \
        ("input", 1, 0) not in model.model_options["transformer_options"]["patches_replace"]["attn1"]  # original untouched
    table = patched.model_options["transformer_options"]["patches_replace"]
    p2 = table["attn2"][("input", 1, 0)]
    assert isinstance(p2, ap.G4SegAttentionPatch) and isinstance(p2.inner, _Inner)
    assert isinstance(table["attn1"][("output", 1, 0)].inner, _Inner)
    assert table["attn1"][("input", 1, 0)].inner is None
    # injecting again replaces our layer but keeps the other pack underneath
    again, _, _ = ap.inject(patched, [_settings(cross=1.0)])
    p2b = again.model_options["transformer_options"]["patches_replace"]["attn2"][("input", 1, 0)]
    assert isinstance(p2b.inner, _Inner) and p2b.injection.cross_weights[0] == 1.0


def test_label_positions_from_comfy_tokens():
    def toks(ids, pad=49407):
        row = [(49406, 1.0)] + [(i, 1.0) for i in ids] + [(49407, 1.0)]
        return [row + [(pad, 1.0)] * (77 - len(row))]

    prompt = {"l": toks([320, 1125, 539, 320, 2368]), "g": toks([320, 1125, 539, 320, 2368], pad=0)}
    label = {"l": toks([2368]), "g": toks([2368], pad=0)}
    empty = {"l": toks([]), "g": toks([], pad=0)}
    assert ap.label_positions_from_tokens(prompt, label, empty, "cat", "a photo of a cat") == [5]
    with pytest.raises(G4SegError):
        ap.label_positions_from_tokens(prompt, {"l": toks([999]), "g": toks([999], pad=0)}, empty, "dog", "x")
