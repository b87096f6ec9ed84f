"""The diffusers attention processors: identical to diffusers' own when injection is off."""

import torch

from g4seg_core.models.diffusers_patch import G4SegAttnProcessor, InjectionState, injected
from g4seg_core.method.injection import InjectionSettings


def _tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
                                attention_head_dim=8, norm_num_groups=8).eval()


def _call(unet):
    g = torch.Generator().manual_seed(1)
    latents, context = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 24, generator=g)
    with torch.no_grad():
        return unet(latents, torch.tensor([400, 400]), encoder_hidden_states=context).sample


def _state(mode, weight=1.0, apply_to=None):
    mask = torch.zeros(128, 128)
    mask[32:96, 20:80] = 1
    settings = InjectionSettings(mask, [5], mode=mode, cross_weight=weight, self_weight=weight)
    return InjectionState(settings, (16, 16), 400.0, apply_to)


def test_off_mode_equals_diffusers_attention_and_restores_processors():
    unet = _tiny_unet()
    reference = _call(unet)
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    with injected(unet, _state("off")):
        assert all(isinstance(p, G4SegAttnProcessor) for p in unet.attn_processors.values())
        patched = _call(unet)
    assert torch.allclose(patched, reference, atol=1e-5)
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before


def test_injection_changes_only_selected_batch_rows():
    unet = _tiny_unet()
    reference = _call(unet)
    with injected(unet, _state("additive", weight=30.0, apply_to=torch.tensor([False, True]))):
        patched = _call(unet)
    assert torch.allclose(patched[0], reference[0], atol=1e-5)
    assert not torch.allclose(patched[1], reference[1], atol=1e-3)
    with injected(unet, _state("densediffusion", weight=1.0)):
        dd = _call(unet)
    assert not torch.allclose(dd, reference, atol=1e-3)
