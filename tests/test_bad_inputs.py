"""No traceback for inputs a user can get wrong (issue 18.5): absent or unknown devices, empty images in every
node, extreme aspect ratios and window counts, non-finite results."""

import numpy as np
import pytest
import torch

from g4seg_core.commands.main import main
from g4seg_core.errors import G4SegError
from g4seg_core.loading.precision import available_devices, check_device
from nodes import NODE_CLASS_MAPPINGS


def _save(path, array):
    from PIL import Image

    Image.fromarray(array).save(path)
    return str(path)


@pytest.fixture
def pair(tmp_path):
    rng = np.random.default_rng(0)
    image = _save(tmp_path / "i.png", rng.integers(0, 255, (64, 80, 3), dtype=np.uint8))
    mask = np.zeros((64, 80), np.uint8)
    mask[10:40, 10:50] = 255
    return image, _save(tmp_path / "m.png", mask)


def _missing_devices():
    missing = ["gpu0", "cuda:99", "meta"]
    if not torch.cuda.is_available():
        missing.append("cuda")
    return missing


@pytest.mark.parametrize("device", _missing_devices())
@pytest.mark.parametrize("command", ["refine", "segment"])
def test_absent_or_unknown_device_is_one_line_naming_the_devices_there_are(device, command, pair, tmp_path, capsys):
    image, mask = pair
    argv = (["refine", image, mask, "--label", "cat"] if command == "refine"
            else ["segment", image, "--classes", "cat"])
    assert main(argv + ["--out", str(tmp_path / "out"), "--selfcheck", "--device", device]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert f"device={device!r}" in err[0] and "devices here: cpu" in err[0], err
    assert not (tmp_path / "out").exists()  # refused before any work


def test_check_device_accepts_what_exists():
    assert check_device("cpu") == "cpu"
    assert available_devices()[0] == "cpu"
    with pytest.raises(G4SegError, match="not a device name"):
        check_device("gpu0")


def _node_arguments(cls):
    """Every input of a node: IMAGE and MASK empty (0 rows), widgets at their defaults, models None."""
    args, empty = {}, False
    for section in ("required", "optional"):
        for name, spec in cls.INPUT_TYPES().get(section, {}).items():
            kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
            if kind == "IMAGE":
                args[name], empty = torch.zeros(1, 0, 64, 3), True
            elif kind == "MASK":
                args[name], empty = torch.zeros(1, 0, 64), True
            elif isinstance(kind, list):
                args[name] = options.get("default", kind[0] if kind else "")
            elif kind in ("INT", "FLOAT", "STRING", "BOOLEAN"):
                args[name] = options.get("default", "cat" if kind == "STRING" else 0)
            else:
                args[name] = None
    return args if empty else None


@pytest.mark.parametrize("node_id", sorted(NODE_CLASS_MAPPINGS))
def test_nodes_refuse_empty_images_and_masks(node_id):
    cls = NODE_CLASS_MAPPINGS[node_id]
    args = _node_arguments(cls)
    if args is None:
        pytest.skip(f"{node_id} takes no IMAGE or MASK")
    with pytest.raises(G4SegError) as info:
        getattr(cls(), cls.FUNCTION)(**args)
    assert "empty" in str(info.value) or "must come from" in str(info.value), info.value


def test_a_nan_in_the_segmenter_names_the_stage_and_the_knobs():
    from g4seg_core.zeroshot import ZeroShotConfig, ZeroShotSegmenter
    from g4seg_core.models.tiny import tiny_text_to_mask

    features, tower = tiny_text_to_mask()

    def overflowing(pixels):  # what a float16 CLIP that overflows gives
        return features(pixels) * float("nan")

    overflowing.name = "overflowing CLIP"
    segmenter = ZeroShotSegmenter(overflowing, tower, ZeroShotConfig(templates="single", short_side=64, window=64,
                                                                     stride=32))
    with pytest.raises(G4SegError, match=r"window logits \(vision\) gave NaN.*logit_scale=40.0, sigma=5.0"):
        segmenter.segment(np.zeros((64, 64, 3), np.uint8), "cat")


def test_a_failure_after_the_segmenter_leaves_no_label_map_without_its_report(pair, tmp_path, monkeypatch, capsys):
    """--refine failing (here: a stand-in for a NaN found in the flow) writes nothing for that image."""
    from g4seg_core.pipeline import G4SegPipeline

    def failing(self, *args, **kwargs):
        raise G4SegError("the generated image (UNet + VAE decode) gave NaN or infinite values (with dtype='auto')")

    monkeypatch.setattr(G4SegPipeline, "refine_classes", failing)
    image, _ = pair
    out = tmp_path / "out"
    assert main(["segment", image, "--classes", "cat", "--out", str(out), "--selfcheck", "--refine",
                 "--templates", "single"]) != 0
    assert "gave NaN" in capsys.readouterr().err
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()], sorted(out.rglob("*"))


def test_selfcheck_uses_sigma_as_it_records_it(pair, tmp_path):
    """--selfcheck's tiny CLIP runs NACLIP's block with the --sigma the report records (it was ignored)."""
    import json

    from PIL import Image

    image, _ = pair
    probs = {}
    for sigma in ("0.1", "50"):
        out = tmp_path / sigma
        assert main(["segment", image, "--classes", "cat", "--out", str(out), "--selfcheck", "--templates", "single",
                     "--window", "64", "--stride", "32", "--short-side", "128", "--sigma", sigma]) == 0
        assert json.loads((out / "i_segment.json").read_text())["parameters"]["sigma"] == float(sigma)
        probs[sigma] = np.asarray(Image.open(out / "i_cat.png"))
    assert not np.array_equal(probs["0.1"], probs["50"])


def test_refine_selfcheck_builds_the_family_it_records(pair, tmp_path, capsys):
    """--family under --selfcheck was ignored (the tiny sd21 models ran whatever it said): it now picks the tiny
    models' family, the report names it, and --skip-existing tells two families apart."""
    import json

    from PIL import Image

    image, mask = pair
    generated = {}
    for family in ("sd21", "sdxl"):
        out = tmp_path / family
        assert main(["refine", image, mask, "--label", "cat", "--out", str(out), "--selfcheck", "--size", "64",
                     "--family", family]) == 0
        report = json.loads((out / "i_g4seg.json").read_text())
        assert report["models"] == f"selfcheck (random weights; tiny {family})", report["models"]
        assert report["models_key"]["family"] == family
        generated[family] = np.asarray(Image.open(out / "i_generated.png"))
    assert not np.array_equal(generated["sd21"], generated["sdxl"])
    capsys.readouterr()
    assert main(["refine", image, mask, "--label", "cat", "--out", str(tmp_path / "sd21"), "--selfcheck", "--size",
                 "64", "--skip-existing"]) == 0  # no --family: sd21, done before
    assert "skipping 1 image(s)" in capsys.readouterr().err


def test_segment_selfcheck_runs_in_the_dtype_it_records(pair, tmp_path):
    """segment's tiny CLIP ran in float32 on the CPU whatever --dtype/--device said: it now runs in them and
    the report records them, as with weights."""
    import json

    from PIL import Image

    image, _ = pair
    probs = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        assert main(["segment", image, "--classes", "cat", "--out", str(out), "--selfcheck", "--templates", "single",
                     "--window", "64", "--stride", "32", "--short-side", "64", "--dtype", dtype]) == 0
        report = json.loads((out / "i_segment.json").read_text())
        assert report["device"] == "cpu" and report["dtype"].startswith(dtype), report
        probs[dtype] = np.asarray(Image.open(out / "i_cat.png"))
    assert not np.array_equal(probs["float32"], probs["bfloat16"])


def test_extreme_aspect_ratios_and_window_counts_are_refused_up_front_naming_the_fix():
    from g4seg_core.zeroshot import MAX_WINDOWS, ZeroShotConfig, plan

    # 10000x20: at short_side 336 it would be segmented at 168000x336 (the 6.7 GB matrix of the issue)
    with pytest.raises(G4SegError, match=r"10000x20 image at short_side 336 .* 168000x336 px.*short_side \(--short-side\) 176 or less"):
        plan(ZeroShotConfig(), 20, 10000)
    assert plan(ZeroShotConfig(short_side=176), 20, 10000)[0] == (20 * 176 // 20, 88000)
    with pytest.raises(G4SegError, match="crop the image"):
        plan(ZeroShotConfig(), 1, 100000)
    # the smallest window and stride on the largest short side
    with pytest.raises(G4SegError, match=rf"windows .* over the {MAX_WINDOWS} .*raise stride"):
        plan(ZeroShotConfig(short_side=4096, window=32, stride=8), 4096, 4096)
    assert plan(ZeroShotConfig(), 480, 640) == ((336, 448), 6)


def test_segment_refuses_such_images_before_the_models_and_shows_progress_on_long_runs(tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(1)
    wide = _save(tmp_path / "wide.png", rng.integers(0, 255, (20, 10000, 3), dtype=np.uint8))
    out = tmp_path / "out"
    assert main(["segment", wide, "--classes", "cat", "--out", str(out), "--selfcheck"]) != 0
    err = capsys.readouterr().err
    assert "168000x336" in err and "(--short-side) 176" in err and "Traceback" not in err
    assert "RANDOM WEIGHTS" not in err  # refused before the models load
    small = _save(tmp_path / "small.png", rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))
    assert main(["segment", small, "--classes", "cat", "--out", str(out), "--selfcheck", "--templates", "single",
                 "--short-side", "128", "--window", "32", "--stride", "8"]) == 0
    err = capsys.readouterr().err
    assert "small.png: 273 windows" in err and "small.png: 273/273 windows" in err
    assert Image.open(out / "small.png").size == (96, 64)


def test_the_node_plans_every_image_before_any_work():
    tn = pytest.importorskip("nodes.text_to_mask_node")
    from g4seg_core.zeroshot import ZeroShotConfig

    class NoModel:  # never reached: the limits come first
        def __getattr__(self, name):
            raise AssertionError("a model was used before the image was checked")

    from g4seg_core.models.tiny import tiny_text_to_mask

    features, tower = tiny_text_to_mask()
    with pytest.raises(G4SegError, match="168000x336"):
        tn.text_to_mask(NoModel(), None, torch.rand(1, 20, 10000, 3), "cat", ZeroShotConfig(templates="single"),
                        features=features)


@pytest.mark.parametrize("shape", [(1, 0, 0, 4), (1, 0, 16, 4), (0, 16, 16, 4), (16, 4)])
def test_load_coarse_mask_refuses_an_empty_rgba_mask_image_naming_the_input(shape):
    from nodes.mask_nodes import G4SegLoadCoarseMask

    with pytest.raises(G4SegError, match=r"mask_image (is empty|must be an IMAGE)"):
        G4SegLoadCoarseMask().load("", "auto", "", "sdf", 8.0, mask_image=torch.zeros(shape))


def test_load_coarse_mask_reads_rgba_over_black_and_refuses_a_fully_transparent_one():
    """Transparent pixels are background (a stroke painted on a transparent layer), said in the note; a
    fully transparent image has nothing drawn on it: refused, not read as 'whole image' from its hidden RGB."""
    from nodes.mask_nodes import G4SegLoadCoarseMask

    node = G4SegLoadCoarseMask()
    hidden_white = torch.cat([torch.ones(1, 16, 16, 3), torch.zeros(1, 16, 16, 1)], -1)
    with pytest.raises(G4SegError, match=r"mask_image is fully transparent.*connect"):
        node.load("", "auto", "", "none", 8.0, mask_image=hidden_white)
    stroke = hidden_white.clone()
    stroke[0, 4:10, 4:10, 3] = 1.0  # white everywhere, opaque only where painted
    mask, note = node.load("", "auto", "", "none", 8.0, mask_image=stroke)
    assert mask.shape == (1, 16, 16) and float(mask.sum()) == 36.0 and "transparent" in note
    opaque = torch.cat([stroke[..., :3] * 0.5, torch.ones(1, 16, 16, 1)], -1)
    assert torch.allclose(node.load("", "auto", "", "none", 8.0, mask_image=opaque)[0], torch.full((1, 16, 16), 0.5))


# ---- a fresh round of bad and edge inputs (issue 18's last check) ----------------------------------------------
def test_refine_with_a_mask_at_another_resolution_writes_every_output(pair, tmp_path):
    """Any mask resolution with the image's aspect ratio is accepted: the before/after picture was drawn with the
    half-size mask on the full-size image (IndexError traceback after the work)."""
    from PIL import Image

    image, mask = pair
    import json

    Image.open(mask).resize((40, 32), Image.NEAREST).save(tmp_path / "half.png")
    out = tmp_path / "out"
    assert main(["refine", image, str(tmp_path / "half.png"), "--label", "cat", "--out", str(out), "--selfcheck",
                 "--size", "64"]) == 0
    assert Image.open(out / "i_refined_prob.png").size == (40, 32)  # the mask's size, as documented
    assert Image.open(out / "i_overlay.png").size[1] == 64 + 18  # the image's height and the caption
    parameters = json.loads((out / "i_g4seg.json").read_text())["parameters"]
    assert "beta" in parameters and "bg_power" not in parameters  # a one-class refine has no fusion to weight


def test_node_images_and_masks_on_another_scale_are_refused_and_resampling_overshoot_clipped():
    """A 0..255 IMAGE went through the segmenter (nearly black picture, no error) and a 0..255 or negative MASK was
    clipped into another mask by Load Coarse Mask; a bicubic resize's overshoot (1.02) was refused by G4SegRefine
    with 'pass uint8', which a node cannot do. One rule for every node in nodes/common.py."""
    from nodes import common
    from nodes.mask_nodes import G4SegLoadCoarseMask

    image = torch.rand(1, 8, 8, 3)
    with pytest.raises(G4SegError, match=r"image has values in \[.*\], outside \[0, 1\] \(a ComfyUI IMAGE .*divide by 255"):
        common.image_batch(image * 255)
    with pytest.raises(G4SegError, match="image contains NaN"):
        common.image_batch(torch.full((1, 8, 8, 3), float("nan")))
    assert torch.equal(common.image_batch(image * 1.02), (image * 1.02).clamp(0, 1))
    assert torch.equal(common.image_batch((image * 255).round().to(torch.uint8)), (image * 255).round() / 255)
    mask = torch.zeros(1, 8, 8)
    mask[:, 2:6, 2:6] = 1
    for bad in (mask * 255, mask - 0.5):
        with pytest.raises(G4SegError, match=r"mask has values in .* outside \[0, 1\] \(a ComfyUI MASK holds 0..1\)"):
            G4SegLoadCoarseMask().load("", "auto", "", "sdf", 8.0, mask=bad)
    assert torch.equal(common.mask_batch(mask * 1.1), mask)


def test_mask_files_with_alpha_are_read_over_black_as_the_node_reads_them(tmp_path):
    """The CLI ignored a mask file's alpha (a white stroke on a transparent layer was 'covers the whole image')
    while Load Coarse Mask's mask_image reads luminance over black: one rule now."""
    from PIL import Image

    from g4seg_core.files.mask_files import load_probability
    from nodes.mask_nodes import mask_image_sources

    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., :3] = 255  # white everywhere, opaque only where painted
    rgba[4:10, 4:10, 3] = 255
    rgba[10, 4:10, 3] = 128  # a soft edge
    Image.fromarray(rgba).save(tmp_path / "stroke.png")
    prob = load_probability(tmp_path / "stroke.png")
    node = mask_image_sources(torch.from_numpy(rgba.astype(np.float32) / 255)[None])[0][0]
    assert prob[5, 5] == 1 and prob[0, 0] == 0 and abs(prob[10, 5] - 128 / 255) < 1e-6
    assert np.allclose(prob, node, atol=1e-6)
    Image.fromarray(rgba[..., [0, 3]].copy(), "LA").save(tmp_path / "la.png")
    assert np.allclose(load_probability(tmp_path / "la.png"), prob, atol=1e-6)
    rgba[..., 3] = 0
    Image.fromarray(rgba).save(tmp_path / "clear.png")
    with pytest.raises(G4SegError, match="fully transparent"):
        load_probability(tmp_path / "clear.png")


def test_frames_and_exif_orientation_are_said_not_silently_dropped(tmp_path):
    """An animated GIF's first frame and an EXIF-rotated JPEG's stored pixels are what is read: the note says so
    (a mask drawn on the turned view of a square photo would pass every check)."""
    from PIL import Image

    from g4seg_core.files.image_files import read_rgb

    rgb = np.random.default_rng(0).integers(0, 255, (16, 12, 3), dtype=np.uint8)
    frames = [Image.fromarray(np.roll(rgb, i, 1)) for i in range(3)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert "the first of its 3 frames is read" in read_rgb(tmp_path / "anim.gif").note
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(tmp_path / "turned.jpg", exif=exif.tobytes())
    picture = read_rgb(tmp_path / "turned.jpg")
    assert picture.pixels.shape == (16, 12, 3) and "EXIF orientation 6" in picture.note
    assert read_rgb(tmp_path / "turned.jpg").note and not read_rgb(_save(tmp_path / "p.png", rgb)).note


def test_refine_refuses_its_image_as_its_mask_a_config_key_twice_and_a_flag_it_never_uses(pair, tmp_path, capsys):
    image, mask = pair
    out = str(tmp_path / "out")
    base = ["--label", "cat", "--out", out, "--selfcheck", "--size", "64"]
    assert main(["refine", image, image, *base]) == 2
    assert "IMAGE and MASK are both" in capsys.readouterr().err
    cfg = tmp_path / "c.json"
    cfg.write_text('{"beta": 0.9, "beta": 0.1}')  # json keeps the last one without a word
    assert main(["refine", image, mask, *base, "--config", str(cfg)]) == 2
    assert "'beta' given more than once" in capsys.readouterr().err
    assert main(["refine", image, mask, *base, "--bg-power", "3"]) == 2  # one class: no fusion to weight
    err = capsys.readouterr().err
    assert "--bg-power" in err and "segment --refine" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, named", [(["--boundary-ratio", "nan"], "--boundary-ratio"),
                                          (["--boundary-ratio", "0"], "--boundary-ratio"),
                                          (["--limit", "-1"], "--limit"), (["--limit", "0"], "--limit"),
                                          (["--num-classes", "0"], "--num-classes"),
                                          (["--num-classes", "300"], "--num-classes"),
                                          (["--ignore-index", "8"], "--ignore-index")])
def test_eval_refuses_values_that_score_something_else(flags, named, tmp_path, capsys):
    """--boundary-ratio nan was a traceback per image, 0 and -1 scored a 1-px band; --limit -1 evaluated all but the
    last id; --num-classes 0 failed every image; --ignore-index 8 dropped class 8 from every score."""
    root = tmp_path / "voc"
    for d in ("JPEGImages", "SegmentationClass", "coarse"):
        (root / d).mkdir(parents=True)
    rng = np.random.default_rng(0)
    _save(root / "JPEGImages" / "a.png", rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    labels = np.zeros((16, 16), np.uint8)
    labels[4:12, 4:12] = 8
    _save(root / "SegmentationClass" / "a.png", labels)
    _save(root / "coarse" / "a.png", labels)
    out = tmp_path / "out"
    assert main(["eval", str(root), "--coarse", str(root / "coarse"), "--methods", "none", "--out", str(out),
                 "--no-progress", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0], err
    assert not out.exists()


def test_a_class_covering_the_whole_image_passes_through_refine(pair, tmp_path):
    """Issue 18: `--classes cat --background none --refine` failed late with 'mask covers the whole image' and no
    class named; one class with no boundary at the threshold is now passed through (multiclass.refine_classes)."""
    import json

    from g4seg_core.files.mask_files import load_label_map

    image, _ = pair
    out = tmp_path / "out"
    assert main(["segment", image, "--classes", "cat", "--background", "none", "--refine", "--size", "64",
                 "--out", str(out), "--selfcheck", "--templates", "single", "--window", "64", "--stride", "32",
                 "--short-side", "64"]) == 0
    report = json.loads((out / "i_segment.json").read_text())
    assert report["label_fractions"]["cat"] == 1.0 and report["refine"]["refined_classes"] == []
    assert np.array_equal(load_label_map(out / "refined" / "i.png"), load_label_map(out / "i.png"))


def test_a_file_name_too_long_fails_that_image_and_the_rest_go_on(tmp_path, capsys):
    """Issue 18: an OS error of one image (here ENAMETOOLONG: a 240-character stem and its class) stopped the whole
    segment folder run with a partial set; it is listed, leaves nothing of that image, and the rest are done."""
    import json

    rng = np.random.default_rng(0)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for stem in ("a", "b" * 240):
        _save(imgs / f"{stem}.png", rng.integers(0, 255, (48, 40, 3), dtype=np.uint8))
    out = tmp_path / "out"
    assert main(["segment", str(imgs), "--classes", "cat", "--out", str(out), "--selfcheck", "--templates", "single",
                 "--window", "64", "--stride", "32", "--short-side", "64"]) == 1
    assert "2 image(s): 1 done, 0 skipped, 1 failed" in capsys.readouterr().err
    run = json.loads((out / "g4seg_segment_run.json").read_text())
    assert run["done"] == ["a.png"] and "File name too long" in run["failed"][0]["error"]
    assert sorted(p.name[:2] for p in out.iterdir()) == ["a.", "a_", "a_", "a_", "g4"]  # nothing of b*240
