"""`--compile`: torch.compile, mode "reduce-overhead" (CUDA graphs), for the model passes of fixed shape.

On an H200 a batch-1 pass is launch-bound: the bare UNet took 28 ms eager against 9.3 ms replayed from
a CUDA graph, the VAE decoder 22.9 ms eager against 7.5 ms compiled (docs/BENCHMARKS.md). What is
compiled, in place (the same modules and weights):

* the VAE encoder and decoder, and the CLIP image tower (`DenseCLIPFeatures.tokens_fn`): the same
  shapes for every image of a working size and batch size, no per-call Python state.

What is not:

* the UNet: mask injection installs fresh attention processors on every call
  (`diffusers_patch.injected`), so a compiled UNet would be traced again on every call. `g4seg bench
  --compile` measures the bare UNet compiled, to show what compiling it would win once the
  injection's per-call state reaches the UNet as tensors instead of new Python objects;
* NACLIP's features (`clip_features=naclip`, words -> masks): another tower built on demand.

CUDA only: on the CPU there are no CUDA graphs, and inductor spent 50-100 s compiling even the
tiny self-check models here for no measured gain, so `check_device` refuses it with the fix.
Each new batch size or working size compiles once more (shapes are static: dynamic=False).
"""

from __future__ import annotations

from typing import List

import torch

from ..errors import G4SegError

COMPILED_PARTS = ("vae_encoder", "vae_decoder", "clip")
MODE = "reduce-overhead"


def check_device(device) -> None:
    """--compile runs on CUDA devices only; elsewhere a G4SegError says what to do instead."""
    if torch.device(device).type != "cuda":
        raise G4SegError(f"--compile needs a CUDA device (it records CUDA graphs through torch.compile's "
                         f"'{MODE}' mode), not {device}: on the CPU compiling takes minutes and won nothing "
                         "measured. Drop --compile, or run on a GPU (--device cuda)")


def compile_models(components, clip, backend: str = "inductor") -> List[str]:
    """Compile the parts of COMPILED_PARTS in place; returns their names.

    `backend="eager"` traces with dynamo and runs the captured graphs eagerly (tests check the
    plumbing and the unchanged results on the CPU with it); the CUDA graphs come with "inductor".
    """
    options = {"mode": MODE} if backend == "inductor" else {}
    vae = components.vae
    vae.encoder.compile(backend=backend, dynamic=False, **options)
    vae.decoder.compile(backend=backend, dynamic=False, **options)
    clip.tokens_fn = torch.compile(clip.tokens_fn, backend=backend, dynamic=False, **options)
    return list(COMPILED_PARTS)
