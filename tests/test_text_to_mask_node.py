"""G4SegTextToMask / G4SegRefineClasses without ComfyUI: declarations, plumbing, checks (fake CLIP objects)."""

import types

import numpy as np
import pytest
import torch

from g4seg_core.errors import G4SegError
from g4seg_core.zeroshot import ZeroShotConfig, ZeroShotSegmenter
from g4seg_core.zeroshot.vocabulary import parse_classes

from nodes import NODE_CLASS_MAPPINGS
from nodes import common
from nodes.comfy import zeroshot as cz
from nodes import text_to_mask_node as tn


def test_declarations_and_widget_order():
    node = NODE_CLASS_MAPPINGS["G4SegTextToMask"]
    spec = node.INPUT_TYPES()
    assert list(spec["required"]) == ["clip", "clip_vision", "image", "classes", "background", "prob_threshold",
                                      "templates"]
    assert list(spec["optional"]) == ["short_side", "window", "stride", "logit_scale", "sigma", "window_batch"]
    assert spec["required"]["clip"][0] == "CLIP" and spec["required"]["clip_vision"][0] == "CLIP_VISION"
    assert spec["required"]["templates"][0] == ["imagenet80", "single"]
    assert spec["required"]["prob_threshold"][1]["default"] == 0.1
    assert node.RETURN_TYPES == ("MASK", "IMAGE", "STRING")
    refine = NODE_CLASS_MAPPINGS["G4SegRefineClasses"].INPUT_TYPES()
    assert list(refine["required"])[:7] == ["model", "clip", "vae", "clip_vision", "image", "masks", "classes"]


class FakeTower(torch.nn.Module):
    """Looks like ComfyUI's SDClipModel far enough: transformer.text_projection.weight, and encode(rows of token
    ids) -> (None, pooled [N, D]) computed by a core text tower on the prompts the ids stand for."""

    def __init__(self, width, weight=None, core=None, prompts=None):
        super().__init__()
        self.transformer = torch.nn.Module()
        self.transformer.text_projection = torch.nn.Linear(width, width, bias=False)
        if weight is not None:
            self.transformer.text_projection.weight.data.copy_(weight)
        self.core, self.prompts, self.batches = core, prompts, []

    def encode(self, rows):
        self.batches.append(len(rows))
        return None, self.core([self.prompts[row[1]] for row in rows])


class FakeClip:
    """A ComfyUI CLIP stand-in whose pooled output comes from a core text tower: tokenize gives one 77-token
    row [start, prompt number, end, pad...] per prompt (ComfyUI's shape), encode_from_tokens one prompt."""

    def __init__(self, tower, attr="clip_h", projection=None):
        self.core = tower
        self.prompts = []
        self.tower = FakeTower(tower.width, projection, tower, self.prompts)
        self.cond_stage_model = types.SimpleNamespace(**{attr: self.tower}, reset_clip_options=lambda: None,
                                                      set_clip_options=lambda options: None)
        self.patcher = types.SimpleNamespace(load_device="cpu")
        self.layer_idx = None
        self.seen = []

    def tokenize(self, text):
        self.seen.append(text)
        self.prompts.append(text.replace("\\(", "(").replace("\\)", ")"))
        return {"h": [[(49406, 1.0), (len(self.prompts) - 1, 1.0), (49407, 1.0)] + [(0, 1.0)] * 74]}

    def load_model(self):
        return self.patcher

    def encode_from_tokens(self, tokens, return_pooled=False):
        return None, self.core([self.prompts[tokens["h"][0][1][0]]])


def _core():
    from g4seg_core.models.tiny import tiny_text_to_mask

    return tiny_text_to_mask()


def test_text_to_mask_equals_the_core_on_the_same_towers():
    features, tower = _core()
    features.width = 16
    clip = FakeClip(tower)
    cz._TEXT_CACHE.clear()
    image = torch.rand(2, 40, 56, 3)
    config = ZeroShotConfig(templates="single", short_side=64, window=64, stride=32, background="sky, wall")
    masks, labels, names = tn.text_to_mask(clip, None, image, "cat, potted plant (indoor)|pot", config,
                                           features=features)
    assert masks.shape == (4, 40, 56) and labels.shape == (2, 40, 56) and names == ["cat", "potted plant (indoor)"]
    assert "a photo of a potted plant \\(indoor\\)." in clip.seen  # parentheses escaped for ComfyUI
    core = ZeroShotSegmenter(features, tower, config)
    for b in range(2):
        want = core.segment(image[b].permute(2, 0, 1), parse_classes("cat, potted plant (indoor)|pot", "sky, wall"))
        assert np.allclose(masks[2 * b:2 * b + 2].numpy(), want.probs, atol=1e-5)
        assert np.array_equal(labels[b].numpy(), want.labels)
    picture = tn.label_map_image(labels)
    assert picture.shape == (2, 40, 56, 3) and float(picture.max()) <= 1
    assert max(clip.tower.batches) > 1  # prompts go through the tower in batches, not one per call
    calls = len(clip.seen)
    tn.text_to_mask(clip, None, image[:1], "cat", config, features=features)
    assert len(clip.seen) == calls  # query embeddings cached per text encoder


def test_text_tower_batches_equal_one_prompt_per_call():
    _, tower = _core()
    comfy = cz.ComfyTextTower(FakeClip(tower), batch_size=3)
    prompts = [f"a photo of a {w}." for w in ("cat", "dog", "potted plant (indoor)", "sky", "wall", "tree", "sofa")]
    batched = comfy(prompts)
    assert comfy.tower.batches == [3, 3, 1]
    one_by_one = torch.stack([comfy.encode_one(p) for p in prompts])
    assert batched.shape == (7, tower.width) and torch.allclose(batched, one_by_one, atol=1e-5)


def test_missing_projection_sd1_and_width_errors():
    features, tower = _core()
    features.width = 16
    cz._TEXT_CACHE.clear()
    with pytest.raises(G4SegError, match="uninitialised"):
        cz.ComfyTextTower(FakeClip(tower, projection=torch.zeros(16, 16)))
    with pytest.raises(G4SegError, match="uninitialised"):
        cz.ComfyTextTower(FakeClip(tower, projection=torch.full((16, 16), float("nan"))))
    with pytest.raises(G4SegError, match="SD1.x"):
        cz.ComfyTextTower(FakeClip(tower, attr="clip_l"))
    features.width = 24
    with pytest.raises(G4SegError, match="two halves of one CLIP"):
        tn.text_to_mask(FakeClip(tower), None, torch.rand(1, 32, 32, 3), "cat", ZeroShotConfig(templates="single"),
                        features=features)
    assert common.escape_prompt("a (b) c") == "a \\(b\\) c"


def test_refine_classes_checks_mask_count():
    with pytest.raises(G4SegError, match="one mask per class per image"):
        tn.refine_classes(None, None, None, None, torch.rand(1, 32, 32, 3), torch.rand(3, 32, 32), "cat, dog",
                          __import__("g4seg_core.config", fromlist=["G4SegConfig"]).G4SegConfig())
