"""Each equation against a direct re-computation (SPEC steps 3-9)."""

import math

import numpy as np
import pytest
import torch

from g4seg_core.method import injection
from g4seg_core.config import G4SegConfig, emi_time_factor
from g4seg_core.method.correspondence import grid_match_to_pixels, match_features, resample_features
from g4seg_core.errors import G4SegError
from g4seg_core.method.mixing import correspondence_for, mix_foreground, update_from_features
from g4seg_core.method.schedule import (
    add_noise,
    alpha_bar_at,
    predict_x0,
    scaled_linear_alphas_cumprod,
    sigma_from_alpha_bar,
)
from g4seg_core.method.tokens import find_token_positions


# ---- config ---------------------------------------------------------------------------
def test_config_defaults_are_the_papers():
    c = G4SegConfig()
    assert (c.size, c.timestep, c.beta, c.band, c.iterations, c.threshold) == (512, 400, 0.8, (0.2, 0.6), 1, 0.5)
    assert c.prompt_for("cat") == "a photo of a cat"
    assert G4SegConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("bad, fragment", [
    (dict(size=500), "multiple of 64"), (dict(timestep=0), "timestep"), (dict(beta=1.5), "beta"),
    (dict(band=(0.7, 0.2)), "band"), (dict(prompt_template="a photo"), "{}"), (dict(emi_mode="x"), "emi_mode"),
    (dict(iterations=0), "iterations"), (dict(correspondence_grid=256), "correspondence_grid"),
    (dict(cross_weight=float("nan")), "cross_weight"), (dict(direction="up"), "direction"),
])
def test_config_rejects_bad_values(bad, fragment):
    with pytest.raises(G4SegError, match=fragment.replace("{", r"\{").replace("}", r"\}")):
        G4SegConfig(**bad)


def test_config_unknown_key():
    with pytest.raises(G4SegError, match="unknown"):
        G4SegConfig.from_dict({"betta": 0.8})


def test_t5_schedule_factor():
    assert emi_time_factor("constant", 400) == 1.0
    assert emi_time_factor("t5", 400) == pytest.approx(0.01024)


# ---- schedule (Eq. 1-2) -----------------------------------------------------------------
def test_sd_schedule_numbers_from_spec():
    ab = scaled_linear_alphas_cumprod()
    assert alpha_bar_at(ab, 400) == pytest.approx(0.42448, abs=5e-5)
    assert math.sqrt(alpha_bar_at(ab, 400)) == pytest.approx(0.65152, abs=5e-5)
    assert sigma_from_alpha_bar(alpha_bar_at(ab, 400)) == pytest.approx(1.16439, abs=5e-4)


def test_add_noise_and_x0_round_trip_eps_and_v():
    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    ab = 0.42448
    zt = add_noise(z0, eps, ab)
    assert torch.allclose(zt, math.sqrt(ab) * z0 + math.sqrt(1 - ab) * eps)
    assert torch.allclose(predict_x0(zt, eps, ab, "epsilon"), z0, atol=1e-5)
    v = math.sqrt(ab) * eps - math.sqrt(1 - ab) * z0
    assert torch.allclose(predict_x0(zt, v, ab, "v_prediction"), z0, atol=1e-5)
    with pytest.raises(G4SegError, match="prediction_type"):
        predict_x0(zt, eps, ab, "sample")
    with pytest.raises(G4SegError, match="shape"):
        add_noise(z0, eps[..., :4], ab)


# ---- token positions (alpha(T) of Eq. 3) ------------------------------------------------
def test_token_positions_subsequence():
    prompt = [49406, 320, 1125, 539, 320, 2368, 49407, 49407]
    assert find_token_positions(prompt, [2368]) == [5]
    assert find_token_positions([49406, 320, 7, 8, 49407], [7, 8]) == [2, 3]
    with pytest.raises(G4SegError, match="not found"):
        find_token_positions(prompt, [999], label="dog", prompt="a photo of a cat")
    with pytest.raises(G4SegError, match="empty"):
        find_token_positions(prompt, [])


def test_template_with_two_slots_injects_both():
    # "a {} next to a {}" with cat = [2368]: both slots, not only the last
    prompt = [49406, 320, 2368, 1131, 531, 320, 2368, 49407]
    assert find_token_positions(prompt, [2368]) == [6]
    assert find_token_positions(prompt, [2368], occurrences=2) == [2, 6]
    assert find_token_positions([49406, 5, 7, 8, 9, 7, 8, 49407], [7, 8], occurrences=2) == [2, 3, 5, 6]


def test_pipeline_injects_every_slot_of_the_template():
    from g4seg_core.config import G4SegConfig
    from g4seg_core.pipeline import G4SegPipeline

    pipe = G4SegPipeline.tiny()
    one = pipe.token_positions("cat", G4SegConfig(prompt_template="a photo of a {}"))[2]
    two = pipe.token_positions("cat", G4SegConfig(prompt_template="a {} sitting next to a {}"))[2]
    assert len(one) >= 1 and len(two) == 2 * len(one) and two[0] < two[-1]


# ---- injection (Eq. 3-5) ----------------------------------------------------------------
def test_grid_for_tokens_and_mask_to_tokens():
    assert injection.grid_for_tokens(64 * 64, 64, 64) == (64, 64)
    assert injection.grid_for_tokens(16 * 16, 64, 64) == (16, 16)
    assert injection.grid_for_tokens(4 * 3, 13, 10) == (4, 3)  # ceil halving: 13x10 -> 7x5 -> 4x3
    with pytest.raises(G4SegError, match="attention tokens"):
        injection.grid_for_tokens(77, 64, 64)
    mask = torch.zeros(8, 8)
    mask[:4, :4] = 1
    assert injection.mask_to_tokens(mask, 2, 2).tolist() == [1, 0, 0, 0]


def test_class_indicator():
    assert injection.class_indicator([2, 3], 5).tolist() == [0, 0, 1, 1, 0]
    with pytest.raises(G4SegError, match="outside"):
        injection.class_indicator([9], 5)


def _qkv(b=2, nq=16, nk=16, heads=2, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, nq, heads * d, generator=g), torch.randn(b, nk, heads * d, generator=g),
            torch.randn(b, nk, heads * d, generator=g))


def _reference(q, k, v, heads, logits_fn):
    b, nq, inner = q.shape
    d = inner // heads
    qh = q.view(b, nq, heads, d).transpose(1, 2)
    kh = k.view(b, -1, heads, d).transpose(1, 2)
    vh = v.view(b, -1, heads, d).transpose(1, 2)
    logits = logits_fn(qh @ kh.transpose(-1, -2), d)
    return (logits.softmax(-1) @ vh).transpose(1, 2).reshape(b, nq, inner)


def test_additive_self_attention_matches_eq5():
    q, k, v = _qkv()
    m = (torch.arange(16) % 3 == 0).float()
    a = 2.5
    got = injection.injected_attention(q, k, v, 2, kind="self", mask_tokens=m, mode="additive", weight=a)
    A = torch.outer(m, m)
    want = _reference(q, k, v, 2, lambda qk, d: (qk + a * A) / math.sqrt(d))
    assert torch.allclose(got, want, atol=1e-5)


def test_additive_cross_attention_matches_eq5():
    q, k, v = _qkv(nk=7)
    m = (torch.arange(16) < 5).float()
    got = injection.injected_attention(q, k, v, 2, kind="cross", mask_tokens=m, token_positions=[4, 5],
                                       mode="additive", weight=3.0)
    t = torch.zeros(7)
    t[[4, 5]] = 1
    want = _reference(q, k, v, 2, lambda qk, d: (qk + 3.0 * torch.outer(m, t)) / math.sqrt(d))
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("kind", ["self", "cross"])
def test_densediffusion_matches_formula_and_chunks_exactly(kind, monkeypatch):
    q, k, v = _qkv(nk=16 if kind == "self" else 6)
    m = (torch.arange(16) % 4 < 2).float()
    w, s = 0.8, 1.0
    positions = [1, 2] if kind == "cross" else []
    nk = k.shape[1]
    if kind == "self":
        R = torch.outer(m, m) > 0.5
    else:
        t = torch.zeros(nk)
        t[positions] = 1
        R = torch.outer(m, t) > 0.5

    def modulated(qk, d):
        L = qk / math.sqrt(d)
        strength = w * (1 - s * m.mean())
        push = torch.where(R, L.amax(-1, keepdim=True) - L, -(L - L.amin(-1, keepdim=True)))
        return L + strength * m[:, None] * push

    want = _reference(q, k, v, 2, modulated)
    got = injection.injected_attention(q, k, v, 2, kind=kind, mask_tokens=m, token_positions=positions,
                                       mode="densediffusion", weight=w, area_scale=s)
    assert torch.allclose(got, want, atol=1e-5)
    monkeypatch.setattr(injection, "_DD_BLOCK_ELEMENTS", 2 * 2 * nk * 3)  # chunks of 3 query rows
    chunked = injection.injected_attention(q, k, v, 2, kind=kind, mask_tokens=m, token_positions=positions,
                                           mode="densediffusion", weight=w, area_scale=s)
    assert torch.allclose(chunked, want, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_extremes_equal_scaling_every_logit_first(dtype, monkeypatch):
    # Extremes are taken before the (positive) scale and in the input dtype: same numbers.
    g = torch.Generator().manual_seed(3)
    qh, kh = torch.randn(1, 2, 10, 8, generator=g).to(dtype), torch.randn(1, 2, 12, 8, generator=g).to(dtype)
    logits = torch.matmul(qh, kh.transpose(-1, -2)).float() * 0.35
    monkeypatch.setattr(injection, "_DD_BLOCK_ELEMENTS", 2 * 12 * 4)  # chunks of 4 query rows
    row_max, row_min = injection._row_extremes(qh, kh, 0.35)
    assert row_max.dtype == row_min.dtype == dtype  # taken in the matmul's dtype; the span is float32
    row_max, row_min = row_max.float(), row_min.float()
    tol = 1e-5 if dtype == torch.float32 else 3e-2  # chunked matmuls may round differently, nothing more
    assert torch.allclose(row_max, logits.amax(-1), atol=tol) and torch.allclose(row_min, logits.amin(-1), atol=tol)
    rows = torch.tensor([True, False, False, True, True, False, False, False, False, True])
    want = logits.amax(-1) - logits.amin(-1)
    for select_rows in (True, False):  # True: the CPU path (foreground rows only); False: the GPU path
        span = injection._foreground_span(qh, kh, 0.35, rows[None], select_rows=select_rows)
        assert torch.allclose(span[:, :, rows], want[:, :, rows], atol=2 * tol)
        assert not span[:, :, ~rows].any()  # background rows are never modulated: 0


def test_float16_logits_beyond_its_range_stay_finite_on_background_rows():
    # Unscaled q k^T of 3.3e5 overflows float16 (max 65504); the scaled logits (4.1e4) do not.
    qh = torch.full((1, 1, 4, 64), 2.0 ** 5 * 0.7, dtype=torch.float16)
    kh = torch.full((1, 1, 4, 64), 2.0 ** 8 * 0.9, dtype=torch.float16)
    kh[..., 0, :] *= -1
    rows = torch.tensor([True, False, True, False])
    for select_rows in (True, False):
        span = injection._foreground_span(qh, kh, 0.125, rows[None], select_rows=select_rows)
        assert torch.isfinite(span).all() and not span[:, :, ~rows].any()


def test_only_selected_rows_are_modulated_and_off_is_plain():
    q, k, v = _qkv()
    m = (torch.arange(16) < 8).float()
    plain = injection.plain_attention(q, k, v, 2)
    both = injection.injected_attention(q, k, v, 2, kind="self", mask_tokens=m, mode="additive", weight=4.0)
    only_second = injection.injected_attention(q, k, v, 2, kind="self", mask_tokens=m, mode="additive",
                                               weight=4.0, apply_to=torch.tensor([False, True]))
    assert torch.allclose(only_second[0], plain[0], atol=1e-6)
    assert torch.allclose(only_second[1], both[1], atol=1e-6)
    assert not torch.allclose(both[1], plain[1])
    off = injection.injected_attention(q, k, v, 2, kind="self", mask_tokens=m, mode="off", weight=4.0)
    assert torch.allclose(off, plain)
    # Background query rows are untouched in both modes (Eq. 3-4 rows are zero there).
    dd = injection.injected_attention(q, k, v, 2, kind="self", mask_tokens=m, mode="densediffusion", weight=1.0)
    assert torch.allclose(dd[:, 8:], plain[:, 8:], atol=1e-5)


def test_injection_errors():
    q, k, v = _qkv()
    with pytest.raises(G4SegError, match="tokens"):
        injection.injected_attention(q, k, v, 2, kind="self", mask_tokens=torch.ones(5), mode="additive")
    with pytest.raises(G4SegError, match="mode"):
        injection.injected_attention(q, k, v, 2, kind="self", mask_tokens=torch.ones(16), mode="bogus")
    with pytest.raises(G4SegError, match="NaN"):
        injection.InjectionSettings(torch.full((4, 4), float("nan")), [1])


def test_settings_weights_and_token_cache():
    mask = torch.zeros(64, 64)
    mask[:32] = 1
    s = injection.InjectionSettings(mask, [5], cross_weight=2.0, self_weight=0.5, schedule="t5")
    cw, sw = s.weights_at(400)
    assert cw == pytest.approx(2.0 * 0.4 ** 5) and sw == pytest.approx(0.5 * 0.4 ** 5)
    tokens = s.tokens_for(16 * 16, 64, 64)
    assert tokens.shape == (256,) and tokens.sum() == 128
    assert s.tokens_for(16 * 16, 64, 64) is tokens


# ---- correspondence (Eq. 8) ---------------------------------------------------------------
def test_match_features_against_brute_force_any_chunk():
    g = torch.Generator().manual_seed(1)
    gen, orig = torch.randn(6, 5, 7, generator=g), torch.randn(6, 5, 7, generator=g)
    gn = gen.reshape(6, -1).t()
    on = orig.reshape(6, -1).t()
    brute = torch.tensor([max(range(35), key=lambda j: float(torch.cosine_similarity(gn[i], on[j], dim=0)))
                          for i in range(35)]).view(5, 7)
    for chunk in (1, 4, 35, 4096):
        assert torch.equal(match_features(gen, orig, chunk_size=chunk), brute)


def test_match_features_errors():
    with pytest.raises(G4SegError, match="NaN"):
        match_features(torch.full((2, 3, 3), float("nan")), torch.zeros(2, 3, 3))
    with pytest.raises(G4SegError, match="widths"):
        match_features(torch.zeros(2, 3, 3), torch.zeros(3, 3, 3))


def test_displacement_field_keeps_subgrid_detail():
    h = w = 4
    identity = torch.arange(h * w).view(h, w)
    assert torch.equal(grid_match_to_pixels(identity, 16, 16).flatten(), torch.arange(256))
    shifted = identity.roll(-1, dims=1).clone()  # each cell matched to its right neighbour
    shifted[:, -1] = identity[:, -1]
    delta = grid_match_to_pixels(shifted, 16, 16)
    ys, xs = delta // 16, delta % 16
    assert torch.equal(ys, torch.arange(16).view(16, 1).expand(16, 16))
    assert int(xs[0, 1] - 1) == 4  # pixel 1 moved one cell (4 px) right, not to the cell's corner
    assert resample_features(torch.randn(3, 8, 8), 16).shape == (3, 16, 16)


# ---- mixing (Eq. 9 + coarse filtering) -----------------------------------------------------
def test_mix_inside_and_outside_band():
    prob = torch.tensor([[0.1, 0.3], [0.6, 0.9]])
    delta = torch.tensor([[3, 3], [0, 0]])  # everyone looks at 0.9 / 0.1
    out = mix_foreground(prob, delta, beta=0.8, band=(0.2, 0.6))
    want = torch.tensor([[0.1, 0.8 * 0.3 + 0.2 * 0.9], [0.8 * 0.6 + 0.2 * 0.1, 0.9]])
    assert torch.allclose(out, want)
    twice = mix_foreground(prob, delta, beta=0.8, band=(0.2, 0.6), iterations=2)
    once_more = mix_foreground(out, delta, beta=0.8, band=(0.2, 0.6))
    assert torch.allclose(twice, once_more)
    assert isinstance(mix_foreground(prob.numpy(), delta.numpy()), np.ndarray)


def test_mix_errors():
    prob = torch.tensor([[0.1, float("nan")]])
    with pytest.raises(G4SegError, match="NaN"):
        mix_foreground(prob, torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(G4SegError, match="outside"):
        mix_foreground(torch.tensor([[0.1, 0.5]]), torch.tensor([[0, 7]]))
    with pytest.raises(G4SegError, match=r"\[0, 1\]"):
        mix_foreground(torch.tensor([[0.1, 2.0]]), torch.tensor([[0, 1]]))


def _strip_example():
    """SPEC's red object / blue background example, over-segmented by a strip."""
    h, w = 8, 12
    red, blue = torch.zeros(4), torch.zeros(4)
    red[0], blue[1] = 1, 1
    orig = blue.view(4, 1, 1).repeat(1, h, w)
    orig[:, 2:6, 2:6] = red.view(4, 1, 1)  # object
    gen = orig.clone()
    gen[:, 2:6, 6:8] = red.view(4, 1, 1)  # the generation paints the strip red
    noise = torch.randn(4, h, w, generator=torch.Generator().manual_seed(0)) * 1e-3
    prob = torch.full((h, w), 0.1)
    prob[2:6, 2:6] = 0.9
    prob[2:6, 6:8] = 0.55  # wrongly included strip
    return prob, orig + noise, gen + noise


def test_default_direction_fixes_over_segmentation_literal_reinforces_it():
    prob, orig, gen = _strip_example()
    fixed = update_from_features(prob, orig, gen, direction="original_to_generated")
    literal = update_from_features(prob, orig, gen, direction="generated_to_original")
    assert torch.allclose(fixed[2:6, 6:8], torch.full((4, 2), 0.8 * 0.55 + 0.2 * 0.1))
    assert torch.allclose(literal[2:6, 6:8], torch.full((4, 2), 0.8 * 0.55 + 0.2 * 0.9))
    assert torch.equal(fixed[prob > 0.6], prob[prob > 0.6])  # certain pixels untouched
    match, delta = correspondence_for(orig, gen, (16, 24))
    assert match.shape == (8, 12) and delta.shape == (16, 24)


@pytest.mark.parametrize("shape, grid, chunk", [((16, 5, 7), 16, 256), ((8, 4, 4), 12, 7), ((8, 6, 6), 6, 5),
                                               ((8, 4, 4), 10, 30), ((8, 9, 7), 5, 10)])
def test_fast_upsampled_matching_equals_direct(shape, grid, chunk):
    """Same similarity at the chosen index as the direct route (ties may pick another index)."""
    from g4seg_core.method.correspondence import match_upsampled_features

    g = torch.Generator().manual_seed(3)
    query, ref = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    fast = match_upsampled_features(query, ref, grid, keys_per_chunk=chunk)
    q_up, r_up = resample_features(query, grid), resample_features(ref, grid)
    direct = match_features(q_up, r_up)
    sims = torch.nn.functional.normalize(q_up.reshape(shape[0], -1), dim=0).t() @ \
        torch.nn.functional.normalize(r_up.reshape(shape[0], -1), dim=0)
    rows = torch.arange(grid * grid)
    assert torch.allclose(sims[rows, fast.flatten()], sims[rows, direct.flatten()], atol=1e-5)
