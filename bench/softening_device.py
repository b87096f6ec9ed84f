"""Mask preparation on a device (issue 16): the batched torch softening against the one-mask numpy path.

    python bench/softening_device.py --device cuda          # about a minute on a GPU
    python bench/softening_device.py --device cpu --size 128 --batch 2 --repeats 1   # the plumbing on a CPU

Checks that the torch signed distance on the device equals the numpy one exactly on random masks (borders,
single pixels, 1xN, non-square) and that prepare_coarse_batch's maps lie within 1e-5 of prepare_coarse's,
then times, per mask: the one-mask numpy path (validate_probability + soften_checked, what refine_batch ran
per mask before), prepare_coarse_batch on the device (stack, one copy, checks with one sync, softening), and
the signed distance alone, at batch 1 and --batch. Prints one table; --json writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from g4seg_core.method.distance_transform import signed_distance, signed_distance_torch
from g4seg_core.method.masks import validate_probability
from g4seg_core.method.softening import prepare_coarse, prepare_coarse_batch, soften_checked


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str, repeats: int) -> float:
    fn()  # warm-up
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _masks(size: int, n: int) -> list:
    yy, xx = np.mgrid[:size, :size]
    out = []
    for i in range(n):
        cy, cx, r = size * (0.4 + 0.02 * i), size * (0.5 - 0.015 * i), size * (0.23 + 0.01 * i)
        m = ((yy - cy) ** 2 + ((xx - cx) * 0.8) ** 2 < r * r) | ((yy > 0.8 * size) & (xx < size * (0.2 + 0.04 * i)))
        out.append(m.astype(np.float32))
    return out


def check_exact(device: str) -> int:
    rng = np.random.default_rng(0)
    cases = [rng.random((int(h), int(w))) < rng.uniform(0.01, 0.9) for h, w in rng.integers(1, 70, size=(40, 2))]
    cases += [np.eye(9, 13, dtype=bool), np.array([[False, True, False, True]]), np.array([[True], [False]])]
    for m in cases:
        got = signed_distance_torch(torch.from_numpy(m)[None].to(device))[0].cpu().numpy()
        if not np.array_equal(got, signed_distance(m)):
            raise SystemExit(f"signed distance on {device} differs from numpy for a {m.shape} mask")
    return len(cases)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = args.device
    numbers = {"device": device, "size": args.size, "exact_cases": check_exact(device)}
    masks = _masks(args.size, args.batch)
    for soften in ("sdf", "blur"):
        groups, _ = prepare_coarse_batch(masks, device, args.size, soften, 8.0)
        worst = max(float(np.abs(maps[j].cpu().numpy() - prepare_coarse(masks[r], args.size, soften, 8.0)[0]).max())
                    for rows, maps in groups for j, r in enumerate(rows))
        if worst > 1e-5:
            raise SystemExit(f"soften={soften}: batched maps differ from prepare_coarse's by {worst:g}")
        numbers[f"{soften}_max_abs_diff"] = worst
        for n in sorted({1, args.batch}):
            batch = masks[:n]
            old = _timed(lambda: [soften_checked(validate_probability(m), args.size, soften, 8.0) for m in batch],
                         "cpu", args.repeats)
            new = _timed(lambda: prepare_coarse_batch(batch, device, args.size, soften, 8.0), device, args.repeats)
            numbers[f"{soften}_batch{n}"] = {"numpy_per_mask_ms": 1e3 * old / n, "batched_per_mask_ms": 1e3 * new / n,
                                             "speedup": old / new}
    on_device = torch.from_numpy(np.stack(masks) > 0.5).to(device)
    numbers["signed_distance_batch_ms"] = 1e3 * _timed(lambda: signed_distance_torch(on_device), device, args.repeats)
    worst = max(numbers["sdf_max_abs_diff"], numbers["blur_max_abs_diff"])
    print(f"mask preparation, {args.size}x{args.size}, {device}: signed distance equal to numpy on "
          f"{numbers['exact_cases']} masks; batched maps within {worst:.1e}")
    print(f"{'':>14} {'numpy ms/mask':>14} {'batched ms/mask':>16} {'speed-up':>9}")
    for key, row in numbers.items():
        if isinstance(row, dict):
            print(f"{key:>14} {row['numpy_per_mask_ms']:>14.2f} {row['batched_per_mask_ms']:>16.2f} "
                  f"{row['speedup']:>9.2f}")
    print(f"torch signed distance of {args.batch} masks on {device}: {numbers['signed_distance_batch_ms']:.2f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(numbers, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
