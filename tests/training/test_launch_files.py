"""The Slurm scripts and the Dockerfile cannot run here; check that they parse and are coherent."""

import re
import shlex
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_slurm_scripts_are_valid_bash():
    for script in (REPO / "tools" / "slurm").iterdir():
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, (script.name, proc.stderr)


def test_sbatch_directives_and_launch():
    text = (REPO / "tools" / "slurm" / "train_stage.sbatch").read_text()
    directives = dict(re.findall(r"^#SBATCH --([a-z-]+)=?(\S*)", text, flags=re.M))
    assert directives["ntasks-per-node"] == directives["gpus-per-node"] == "8"  # one task per GPU
    assert directives["signal"].startswith("TERM@")  # preemption warning -> checkpoint and exit
    srun = next(line for line in text.splitlines() if line.strip().startswith("python -m"))
    argv = shlex.split(srun.replace('"$RECIPE"', "RECIPE").replace('"$@"', ""))
    assert argv[:3] == ["python", "-m", "megatron_vlm.train"] and "--recipe" in argv


def test_dockerfile_copies_existing_paths_and_installs_gpu_extra():
    lines = [l.strip() for l in (REPO / "Dockerfile").read_text().splitlines()
             if l.strip() and not l.strip().startswith("#")]
    instructions = [l.split()[0] for l in lines if not l.startswith(("&&", "ENV", "NCCL", "PYTHON"))]
    assert instructions[0] == "ARG" and instructions[1] == "FROM"
    for line in lines:
        if line.startswith("COPY"):
            for src in line.split()[1:-1]:
                assert (REPO / src).exists(), src
    assert '".[gpu]"' in (REPO / "Dockerfile").read_text()
