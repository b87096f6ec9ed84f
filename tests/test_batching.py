"""A batch is one pass: distinct images, masks and class names in one UNet call, one attention call per layer,
no host reads inside the UNet call, and each row as if it ran alone."""

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from g4seg_core.config import G4SegConfig
from g4seg_core.method import injection
from g4seg_core.method.injection import InjectionBatch, InjectionSettings, injected_attention
from g4seg_core.pipeline import G4SegPipeline

HEADS, DH = 2, 8


class HostReads(TorchDispatchMode):
    """Records the operators that read a tensor's value on the host (a device sync on a GPU)."""

    SYNCING = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.is_nonzero.default",
               "aten.equal.default", "aten.item.default"}

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in self.SYNCING:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


def _masks():
    masks = torch.zeros(3, 32, 32)
    masks[0, 4:20, 6:22] = 1
    masks[1, 10:30, 0:12] = 1
    masks[2, :, 16:] = 0.8  # half the grid
    return masks


def _qkv(rows, nq, nk, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, n, HEADS * DH, generator=g) for n in (nq, nk, nk)]


@pytest.mark.parametrize("mode", ["densediffusion", "additive"])
@pytest.mark.parametrize("kind,nk", [("self", 64), ("cross", 77)])
def test_each_row_of_a_batch_as_if_alone(mode, kind, nk):
    """Three images with their own masks and class tokens, under CFG (uncond rows first): one call, and each
    conditional row equals the one-mask attention of its image; unconditional rows are plain."""
    masks, positions = _masks(), [[5], [2, 3], [7]]
    batch = InjectionBatch.from_config(masks, positions, G4SegConfig(emi_mode=mode, cross_weight=2.0,
                                                                     self_weight=0.7))
    q, k, v = _qkv(6, 64, nk if kind == "cross" else 64)
    if kind == "self":
        k = q.clone()
    out = batch.attention(q, k, v, HEADS, kind=kind, grid=(8, 8), image_of_row=(0, 1, 2, 0, 1, 2),
                          active=(False,) * 3 + (True,) * 3)
    plain = injection.plain_attention(q, k, v, HEADS)
    torch.testing.assert_close(out[:3], plain[:3], atol=1e-5, rtol=1e-5)
    for row, image in zip(range(3, 6), range(3)):
        tokens = injection.mask_to_tokens(masks[image], 8, 8)
        alone = injected_attention(q[row:row + 1], k[row:row + 1], v[row:row + 1], HEADS, kind=kind,
                                   mask_tokens=tokens, token_positions=positions[image], mode=mode,
                                   weight=2.0 if kind == "cross" else 0.7)
        torch.testing.assert_close(out[row:row + 1], alone, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out[row], plain[row], atol=1e-4)


@pytest.mark.parametrize("mode", ["densediffusion", "additive"])
def test_injected_attention_reads_nothing_on_the_host(mode, monkeypatch):
    """The GPU path (no foreground-row selection, which the CPU path does with a host read) has no .item(),
    bool(), nonzero() or the like: nothing that would wait for the device in the layer."""
    monkeypatch.setattr(injection, "_select_rows_on", lambda device: False)
    batch = InjectionBatch.from_config(_masks(), [[5], [2, 3], [7]], G4SegConfig(emi_mode=mode, emi_schedule="t5"))
    for kind, nk in (("self", 64), ("cross", 77)):
        q, k, v = _qkv(3, 64, nk)
        with HostReads() as mode_:
            batch.attention(q, k, v, HEADS, kind=kind, grid=(8, 8), image_of_row=(0, 1, 2), active=(True,) * 3,
                            timestep=400.0)
        assert mode_.reads == [], mode_.reads


def test_the_unet_call_reads_no_more_on_the_host_injected_than_plain(monkeypatch):
    """A whole diffusers UNet call with three masks and class names: the injection adds no host read."""
    from g4seg_core.models.diffusers_patch import InjectionState, injected

    monkeypatch.setattr(injection, "_select_rows_on", lambda device: False)
    pipe = G4SegPipeline.tiny()
    unet = pipe.components.unet
    latents = torch.randn(3, unet.config.in_channels, 8, 8)
    hidden = torch.randn(3, 77, unet.config.cross_attention_dim)
    timestep = torch.full((3,), 400)

    def call():
        with torch.no_grad(), HostReads() as reads:
            unet(latents, timestep, encoder_hidden_states=hidden)
        return reads.reads

    plain = call()
    for mode in ("densediffusion", "additive"):
        batch = InjectionBatch.from_config(_masks(), [[5], [2, 3], [7]], G4SegConfig(emi_mode=mode))
        with injected(unet, InjectionState(batch, (8, 8), 400.0)):
            assert call() == plain


def _densediffusion_reference(q, k, v, tokens, key, strength):
    """softmax(L') v with L' = L + s m_i [R (rowmax L - L) - (1 - R)(L - rowmin L)], R = m key^T, per head."""
    d = q.shape[-1] // HEADS
    qh, kh, vh = (x.view(-1, HEADS, d).transpose(0, 1) for x in (q, k, v))
    logits = qh @ kh.transpose(-1, -2) / d ** 0.5
    related = torch.outer(tokens, key) > 0.5
    push = torch.where(related, logits.amax(-1, keepdim=True) - logits, -(logits - logits.amin(-1, keepdim=True)))
    out = (logits + strength * tokens[:, None] * push).softmax(-1) @ vh
    return out.transpose(0, 1).reshape(-1, HEADS * d)


@pytest.mark.parametrize("kind,nk", [("self", 64), ("cross", 77)])
def test_accelerator_path_equals_cpu_path_and_layers_share_one_build(kind, nk, monkeypatch):
    """The path a GPU takes (every row's extremes, no host read; the head dimension padded with zeros to a multiple
    of 8) gives the CPU path's densediffusion attention, and a second layer of the same shape reuses what the first
    built from the row inputs (one build per call shape, not per layer)."""
    batch = InjectionBatch.from_config(_masks(), [[5], [2, 3], [7]], G4SegConfig(emi_mode="densediffusion",
                                                                                 cross_weight=2.0, self_weight=0.7))
    q, k, v = _qkv(6, 64, nk)
    layout = dict(kind=kind, grid=(8, 8), image_of_row=(0, 1, 2, 0, 1, 2), active=(False,) * 3 + (True,) * 3)
    cpu = batch.attention(q, k, v, HEADS, **layout)
    monkeypatch.setattr(injection, "_select_rows_on", lambda device: False)
    monkeypatch.setattr(injection, "_padded_width", lambda width, device: -(-width // 8) * 8)  # 9 -> 16
    accelerator = InjectionBatch.from_config(_masks(), [[5], [2, 3], [7]], G4SegConfig(
        emi_mode="densediffusion", cross_weight=2.0, self_weight=0.7))
    first = accelerator.attention(q, k, v, HEADS, **layout)
    torch.testing.assert_close(first, cpu, atol=1e-5, rtol=1e-5)
    for row, image in zip(range(3, 6), range(3)):  # and both are DenseDiffusion's formula, written out
        m = injection.mask_to_tokens(_masks()[image], 8, 8)
        key = m if kind == "self" else injection.class_indicator([[5], [2, 3], [7]][image], nk)
        weight = 0.7 if kind == "self" else 2.0
        want = _densediffusion_reference(q[row], k[row], v[row], m, key, weight * (1 - m.mean()))
        torch.testing.assert_close(first[row], want, atol=1e-5, rtol=1e-5)
    derived = [entry[-1] for key, entry in accelerator._cache.items() if key[0] == "rows"]
    assert len(derived) == 1 and len(derived[0]) == 1
    (terms,) = derived[0].values()
    assert terms.key_tail.shape[-1] == 16 - DH and terms.index is None
    q2, k2, v2 = _qkv(6, 64, nk, seed=1)  # another layer of the same shape
    second = accelerator.attention(q2, k2, v2, HEADS, **layout)
    assert len(derived[0]) == 1 and next(iter(derived[0].values())) is terms
    monkeypatch.undo()
    torch.testing.assert_close(second, InjectionBatch.from_config(_masks(), [[5], [2, 3], [7]], G4SegConfig(
        emi_mode="densediffusion", cross_weight=2.0, self_weight=0.7)).attention(q2, k2, v2, HEADS, **layout),
        atol=1e-5, rtol=1e-5)


def _scene(count, size=72):
    rng = np.random.default_rng(3)
    images, masks = [], []
    for i in range(count):
        images.append((rng.random((size, size, 3)) * 255).astype(np.uint8))
        mask = np.zeros((size, size), np.float32)
        mask[8 + 4 * i: 40 + 6 * i, 10 + 3 * i: 50] = 1
        masks.append(mask)
    return images, masks


@pytest.fixture(scope="module")
def pipe():
    return G4SegPipeline.tiny()


@pytest.mark.parametrize("mode", ["densediffusion", "additive"])
def test_one_unet_call_for_k_class_names_and_each_row_as_alone(pipe, mode):
    images, masks = _scene(3)
    labels = ["cat", "dog", "potted plant"]
    config = G4SegConfig(size=64, emi_mode=mode, seed=11)
    calls = []
    hook = pipe.components.unet.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        together = pipe.refine_batch(images, masks, labels, config)
        assert calls == [3]  # one UNet call for the three class names
        for i in range(3):  # image i of a batch gets the noise of seed + i
            alone = pipe.refine(images[i], masks[i], labels[i], config.replace(seed=11 + i))
            np.testing.assert_allclose(together[i].generated_pixels, alone.generated_pixels, atol=1e-5)
            # The batched matmuls round differently in the last bits; on these random tiny models a few
            # correspondence matches are near-ties (many grid cells) that such bits flip, so a handful of pixels move a
            # little.
            differ = np.abs(together[i].prob - alone.prob) > 1e-5
            assert differ.mean() < 0.03 and np.abs(together[i].prob - alone.prob).max() < 5e-3
            assert together[i].label == labels[i]
    finally:
        hook.remove()


def test_k_classes_of_one_image_one_call(pipe):
    """Several classes of one image (the multi-class refinement): VAE/CLIP once, one UNet call for all."""
    images, masks = _scene(1)
    other = np.zeros_like(masks[0])
    other[40:70, 5:30] = 1
    calls = []
    hook = pipe.components.unet.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        results = pipe.refine_batch([images[0]] * 2, [masks[0], other], ["cat", "dog"], G4SegConfig(size=64))
    finally:
        hook.remove()
    assert calls == [2] and [r.label for r in results] == ["cat", "dog"]


def test_batch_settings_errors():
    from g4seg_core.errors import G4SegError

    mask = torch.ones(8, 8)
    with pytest.raises(G4SegError, match="one EMI mode"):
        InjectionBatch.from_settings([InjectionSettings(mask, [1], mode="additive"),
                                      InjectionSettings(mask, [1], mode="densediffusion")])
    batch = InjectionBatch.from_settings([InjectionSettings(mask, [1])])
    q, k, v = _qkv(2, 16, 77)
    with pytest.raises(G4SegError, match="images"):
        batch.attention(q, k, v, HEADS, kind="cross", grid=(4, 4), image_of_row=(0, 1), active=(True, True))
    with pytest.raises(G4SegError, match="outside"):
        batch.attention(q, k[:, :1], v[:, :1], HEADS, kind="cross", grid=(4, 4), image_of_row=(0, 0),
                        active=(True, True))


def test_images_are_checked_on_the_host_and_moved_before_their_resize():
    """The flow resizes pixels on the models' device (a uint8 image moves as bytes); checks stay on the host, so a
    bad float image is refused before anything moves."""
    from g4seg_core.errors import G4SegError
    from g4seg_core.method.flow import image_to_tensor

    image = (np.random.default_rng(0).random((5, 7, 3)) * 255).astype(np.uint8)
    moved = image_to_tensor(image, "meta")
    assert moved.device.type == "meta" and moved.dtype == torch.float32 and moved.shape == (3, 5, 7)
    torch.testing.assert_close(image_to_tensor(image), torch.from_numpy(image).permute(2, 0, 1).float() / 255)
    assert image_to_tensor(image.astype(np.float32) / 255, "meta").device.type == "meta"
    with pytest.raises(G4SegError, match="NaN"):
        image_to_tensor(np.full((5, 7, 3), np.nan, np.float32), "meta")


@pytest.mark.parametrize("mode", ["densediffusion", "additive"])
def test_what_layers_share_follows_timestep_and_dtype(mode, monkeypatch):
    """One batch over several sampler steps (ComfyUI keeps it with the patched MODEL) and layers of two dtypes:
    each call equals a fresh batch's, so what is shared is keyed by all it depends on; the row inputs of an
    earlier timestep are dropped when the timestep changes."""
    monkeypatch.setattr(injection, "_select_rows_on", lambda device: False)  # the accelerator path
    config = G4SegConfig(emi_mode=mode, emi_schedule="t5", cross_weight=2.0)
    fresh = lambda: InjectionBatch.from_config(_masks(), [[5], [2, 3], [7]], config)  # noqa: E731
    kept = fresh()
    q, k, v = _qkv(3, 64, 77)
    layout = dict(kind="cross", grid=(8, 8), image_of_row=(0, 1, 2), active=(True,) * 3)
    for timestep in (300.0, 900.0, 300.0):
        for dtype in (torch.float32, torch.bfloat16):
            args = [x.to(dtype) for x in (q, k, v)]
            got = kept.attention(*args, HEADS, timestep=timestep, **layout)
            want = fresh().attention(*args, HEADS, timestep=timestep, **layout)
            assert torch.equal(got, want), (timestep, dtype)
        assert {key[6] for key in kept._cache if key[0] == "rows"} == {timestep}
    with_t5 = kept.attention(q, k, v, HEADS, timestep=900.0, **layout)
    assert not torch.allclose(with_t5, kept.attention(q, k, v, HEADS, timestep=300.0, **layout), atol=1e-4)
