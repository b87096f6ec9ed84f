"""`g4seg` command line: the dispatcher. One module per command: refine.py, segment.py, evaluate.py
(eval, eval-merge), selfcheck.py, bench.py; options.py holds the flags they share and folder_run.py the one
way they run over many images (check first, skip bad items, list failures, exit 0/1)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from ..config import DTYPE_CHOICES
from ..errors import G4SegError
from ..files.output_files import os_error_message
from .evaluate import add_eval_parser
from .refine import add_refine_parser
from .segment import add_segment_parser
from .selfcheck import add_selfcheck_parser

# How to go on after Ctrl-C, per command (finished outputs are whole: every file is written atomically).
RESUME_HINTS = {"refine": "rerun the same `g4seg refine` command with --skip-existing",
                "segment": "rerun the same `g4seg segment` command with --skip-existing",
                "eval": "rerun the same `g4seg eval` command (it resumes)"}


# ---- bench (its work lives in bench.py, which imports torch: loaded only when run) ----
def cmd_bench(args) -> int:
    from .bench import run_bench

    return run_bench(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="g4seg", description="G4Seg: refine coarse segmentation masks with "
                                                               "Stable Diffusion (no downloads, ever).")
    sub = parser.add_subparsers(dest="command", required=True)

    add_refine_parser(sub)
    add_selfcheck_parser(sub)

    p = sub.add_parser("bench", help="per-stage time and memory on a full-size SD2.1-architecture model")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="default auto: bfloat16 on CPUs where it is fast (AMX, AMD AVX512-BF16), float16 on CUDA, else float32")
    p.add_argument("--reference", default="float32", choices=("float32", "none"),
                   help="when the dtype is not float32, also run float32 on the same weights in the same run: "
                        "time ratio per stage and agreement of the outputs (default float32; none skips it)")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch", type=int, default=None,
                   help="also time refine_batch on this many images, for images per second (default: 8 on a GPU, "
                        "off on CPU; 0 turns it off)")
    p.add_argument("--compile", action="store_true",
                   help="also measure with --compile's parts compiled (CUDA graphs), and the bare UNet compiled")
    p.add_argument("--compile-backend", default="inductor", choices=("inductor", "eager"),
                   help="torch.compile backend for --compile: inductor (CUDA only); eager traces without compiling "
                        "and runs anywhere: a check of the plumbing, not a speed-up")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    p.set_defaults(func=cmd_bench)

    add_eval_parser(sub)
    add_segment_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Exit status: 0 done; 1 a folder run or eval finished but some images failed (listed); 2 error;
    130 interrupted (Ctrl-C)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # our own process never talks to a hub
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except G4SegError as exc:
        print(f"g4seg: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file or folder we could not read or write: one line, no traceback
        print(f"g4seg: error: {os_error_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outputs are atomic: what is on disk is whole
        hint = RESUME_HINTS.get(args.command)
        print("g4seg: interrupted; finished outputs are kept" + (f" ({hint} to go on)" if hint else ""),
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
