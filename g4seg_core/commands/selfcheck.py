"""`g4seg selfcheck`: every stage on tiny random-weight models of each supported family (no weights needed)."""

from __future__ import annotations

import time

from .options import RANDOM_BANNER


def add_selfcheck_parser(sub) -> None:
    p = sub.add_parser("selfcheck", help="run every stage on tiny random-weight models (no weights needed)")
    p.set_defaults(func=cmd_selfcheck)


def cmd_selfcheck(args) -> int:
    import numpy as np

    from ..config import G4SegConfig
    from ..pipeline import G4SegPipeline

    print(RANDOM_BANNER)
    rng = np.random.default_rng(0)
    image = (rng.random((96, 80, 3)) * 255).astype(np.uint8)
    mask = np.zeros((96, 80), np.float32)
    mask[20:70, 15:60] = 1
    config = G4SegConfig(size=64, correspondence_grid=0)
    for family, prediction in (("sd15", "epsilon"), ("sd21", "epsilon"), ("sd21v", "v_prediction"),
                               ("sdxl", "epsilon")):
        start = time.perf_counter()
        result = G4SegPipeline.tiny(family=family, prediction_type=prediction).refine(image, mask, "cat", config)
        assert result.prob.shape == mask.shape and np.isfinite(result.prob).all()
        print(f"ok  {family:6s} {prediction:13s} {time.perf_counter() - start:.2f} s")
    print("selfcheck passed (installation works; load real weights for real masks)")
    return 0
