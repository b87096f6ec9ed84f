import sys

import numpy as np
import pytest

from g4seg_core.errors import G4SegError
from g4seg_core.evaluation.metrics import iou


def scene(seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :80]
    gt = (yy - 32) ** 2 + (xx - 36) ** 2 < 18 ** 2
    img = np.where(gt[..., None], [210, 50, 40], [40, 80, 200]).astype(np.float64)
    img = np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)
    # noisy soft mask: 15 % of the pixels flipped, soft values 0.3 / 0.7
    flip = rng.random(gt.shape) < 0.15
    noisy = np.where(gt ^ flip, 0.7, 0.3).astype(np.float32)
    return img, gt, noisy


def test_missing_package_names_the_fix(monkeypatch):
    from g4seg_core.evaluation.densecrf import dense_crf

    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    img, gt, noisy = scene()
    with pytest.raises(G4SegError, match="pip install pydensecrf2"):
        dense_crf(img, noisy)


def test_densecrf_improves_noisy_mask():
    pytest.importorskip("pydensecrf.densecrf")
    from g4seg_core.evaluation.densecrf import dense_crf

    img, gt, noisy = scene()
    out = dense_crf(img, noisy)
    assert out.shape == gt.shape and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    before, after = iou(noisy, gt), iou(out, gt)
    assert after > before + 0.1 and after > 0.95


def test_densecrf_multiclass_and_validation():
    pytest.importorskip("pydensecrf.densecrf")
    from g4seg_core.evaluation.densecrf import dense_crf

    img, gt, noisy = scene()
    probs = np.stack([1 - noisy, noisy * 0.5, noisy * 0.5])
    out = dense_crf(img, probs, iterations=5)
    assert out.shape == (3, 64, 80)
    np.testing.assert_allclose(out.sum(0), 1.0, atol=1e-4)
    with pytest.raises(G4SegError, match="differ in size"):
        dense_crf(img, noisy[:32])
    with pytest.raises(G4SegError, match="RGB"):
        dense_crf(img[..., 0], noisy)
    # hard 0/1 inputs: confidence < 1 lets the CRF move them
    hard = (noisy > 0.5).astype(np.float32)
    assert iou(dense_crf(img, hard, confidence=0.8), gt) > iou(hard, gt) + 0.1


def test_densecrf_node_batch_matches_core_and_checks_inputs():
    pytest.importorskip("pydensecrf.densecrf")
    import torch

    from g4seg_core.evaluation.densecrf import dense_crf
    from nodes import NODE_CLASS_MAPPINGS

    node = NODE_CLASS_MAPPINGS["G4SegDenseCRF"]()
    img, gt, noisy = scene()
    img2, gt2, noisy2 = scene(seed=1)
    images = torch.from_numpy(np.stack([img, img2])).float() / 255.0
    masks = torch.from_numpy(np.stack([noisy, noisy2]))
    prob, binary, overlay = node.refine(images, masks, 10, 3.0, 3.0, 80.0, 13.0, 10.0, 1.0, 0.5)["result"]
    assert prob.shape == binary.shape == (2, 64, 80)
    assert overlay.shape == (2, 64 + 18, 2 * 80 + 8, 3)  # input | CRF on the image, captions above
    # the node converts IMAGE -> uint8 exactly as a user of the core would
    np.testing.assert_allclose(prob[1].numpy(), dense_crf(img2, noisy2), atol=1e-5)
    assert torch.equal(binary, (prob >= 0.5).float())
    assert iou(prob[0].numpy(), gt) > iou(noisy, gt) + 0.1
    # one mask for a batch of images broadcasts; wrong size / out of range / batch mismatch are errors
    assert node.refine(images, masks[:1], 2, 3.0, 3.0, 80.0, 13.0, 10.0, 0.8, 0.5)["result"][0].shape == (2, 64, 80)
    with pytest.raises(G4SegError, match="resize the mask"):
        node.refine(images, masks[:, :32], 2, 3.0, 3.0, 80.0, 13.0, 10.0, 1.0, 0.5)
    with pytest.raises(G4SegError, match=r"\[0, 1\]"):
        node.refine(images, masks * 3, 2, 3.0, 3.0, 80.0, 13.0, 10.0, 1.0, 0.5)
    with pytest.raises(G4SegError, match="batch"):
        node.refine(images, torch.cat([masks, masks[:1]]), 2, 3.0, 3.0, 80.0, 13.0, 10.0, 1.0, 0.5)
