"""Capacity planner: does a recipe's layout fit the GPUs, and how fast will a step be?

    python -m megatron_vlm.cli.plan --recipe recipes/nano_v2_vl/stage2.yaml [--gpus 256] [--gpu h100]
        [--gpu-mem 80] [--tp 8] [--pp 2] [--cp 4] [--sp] [--recompute full]
        [--micro-batch 1] [--seq-length 49152] [--impl kernels|torch] [--no-flash]
        [--efficiency 0.35] [--image-fraction 0.5]

Prints parameters per part, memory per GPU on every pipeline stage (weights, gradients,
optimizer state, activations per layer type, logits), forward FLOPs per token, the step time at
the stated efficiency with its MFU, and the verdict: FITS, or DOES NOT FIT with the smallest
changes that fit. The model is ``megatron_vlm/planning.py``. Exit status 0 fits, 1 does not fit,
2 bad arguments.
"""

from __future__ import annotations

import argparse
import sys

from megatron_vlm.known_warnings import ignore_known_noise

ignore_known_noise()


def main(argv=None) -> int:
    from megatron_vlm.planning import IMPLS, RECOMPUTE_MODES, Hardware, plan_recipe

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", required=True, nargs="+", help="recipe YAML(s)")
    ap.add_argument("--gpus", type=int, default=256, help="GPUs in the job (default 32 x 8)")
    ap.add_argument("--gpu", default="h100", choices=("h100", "h200", "b200"),
                    help="GPU type: memory and peak bf16 FLOP/s (default h100)")
    ap.add_argument("--gpu-mem", type=float, default=None, help="GB per GPU (default: the GPU's)")
    ap.add_argument("--tp", type=int, help="tensor-parallel size (default: the recipe's)")
    ap.add_argument("--pp", type=int, help="pipeline-parallel size (default: the recipe's)")
    ap.add_argument("--cp", type=int, help="context-parallel size (default: the recipe's)")
    ap.add_argument("--sp", action="store_true", default=None, help="sequence parallelism on")
    ap.add_argument("--recompute", choices=RECOMPUTE_MODES,
                    help="activation recompute mode (default: the recipe's)")
    ap.add_argument("--micro-batch", type=int, help="micro-batch size (default: the recipe's)")
    ap.add_argument("--seq-length", type=int, help="packed sequence length (default: the recipe's)")
    ap.add_argument("--impl", choices=IMPLS, default="kernels",
                    help="activation model: GPU kernels (TE, mamba-ssm) or the CPU torch path "
                         "(default kernels)")
    ap.add_argument("--no-flash", action="store_true",
                    help="attention without flash/fused kernels (stores the score matrix)")
    ap.add_argument("--efficiency", type=float, default=0.35,
                    help="achieved share of peak FLOP/s (default 0.35)")
    ap.add_argument("--image-fraction", type=float, default=None,
                    help="share of each sequence that is image tokens (default 0.5)")
    args = ap.parse_args(argv)
    try:
        hw = Hardware.named(args.gpu, args.gpu_mem)
        fits = True
        for path in args.recipe:
            p = plan_recipe(path, hw, gpus=args.gpus, efficiency=args.efficiency, impl=args.impl,
                            tp=args.tp, pp=args.pp, cp=args.cp, sequence_parallel=args.sp,
                            recompute=args.recompute, micro_batch=args.micro_batch,
                            seq_length=args.seq_length, image_fraction=args.image_fraction,
                            flash=False if args.no_flash else None)
            print(p.report())
            print()
            fits = fits and p.fits
    except (ValueError, OSError) as e:
        print(f"plan: {e}", file=sys.stderr)
        return 2
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())
