"""`make demo`: generate the demo corpus, train the tiny base + Stage 0-4 recipes on 2 CPU
processes, print the stage table, export the final model to Hugging Face format
(``transformers``' nemotron_h_omni VLM, and the LLM alone as NemotronHForCausalLM) and verify that
the export's logits match ours (``convert_checkpoint verify``).

    python -m megatron_vlm.cli.demo [--workdir runs/tiny] [--nproc 2]

Re-running continues where it stopped: finished stages are skipped, an interrupted stage resumes
from its latest checkpoint.
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("runs/tiny"),
                    help="where the stages write checkpoints, logs and the table (default runs/tiny)")
    ap.add_argument("--nproc", type=int, default=2, help="processes per stage (default 2)")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    data = Path("demo_data")  # where the tiny recipes read it
    if not (REPO / data / "datasets.json").is_file():
        print(f"== generating the demo corpus in {data}", flush=True)
        subprocess.run([sys.executable, "-m", "megatron_vlm.data_prep.make_demo_data", "--out", str(data)],
                       cwd=REPO, check=True)
    else:
        print(f"== demo corpus already in {data}", flush=True)
    subprocess.run([sys.executable, "-m", "megatron_vlm.cli.run_stages", "--recipes",
                    "recipes/tiny", "--workdir", str(args.workdir), "--nproc", str(args.nproc)],
                   cwd=REPO, check=True)
    hf_dir = args.workdir / "hf" / "stage4"
    if not (REPO / hf_dir / "config.json").is_file():
        print(f"== exporting the Stage 4 model to Hugging Face format in {hf_dir}", flush=True)
        subprocess.run([sys.executable, "-m", "megatron_vlm.cli.convert_checkpoint", "export", "--recipe",
                        "recipes/tiny/stage4.yaml", "--checkpoint", str(args.workdir / "stage4"),
                        "--out", str(hf_dir), "--llm-out", str(hf_dir) + "-llm"],
                       cwd=REPO, check=True)
    # The export computes what our model computes: same random tokens and tiles, max |logit diff|.
    print(f"== verifying the export {hf_dir} against {args.workdir / 'stage4'}", flush=True)
    # (--recipe: a stage trained before checkpoints described themselves is skipped, not redone.)
    subprocess.run([sys.executable, "-m", "megatron_vlm.cli.convert_checkpoint", "verify", "--recipe",
                    "recipes/tiny/stage4.yaml", "--checkpoint", str(args.workdir / "stage4"),
                    "--hf", str(hf_dir)], cwd=REPO, check=True)
    print(f"\ndemo finished in {(time.monotonic() - t0) / 60:.1f} min; TensorBoard: "
          f"tensorboard --logdir {args.workdir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
