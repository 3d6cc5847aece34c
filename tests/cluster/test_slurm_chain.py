"""The Slurm chain finishes: a stopped stage requeues itself, the next one waits for it.

``sbatch``, ``scontrol`` and ``srun`` are fakes on PATH that record every call; a small scheduler
in the test runs the submitted batch scripts (the real tools/slurm/train_stage.sbatch, submitted by
the real tools/slurm/run_all_stages.sh) the way Slurm does: a job starts when its ``afterok``
dependency has completed with exit 0, and a job that ran ``scontrol requeue`` goes back to pending
under the same id with SLURM_RESTART_COUNT + 1. The fake ``srun`` stands for the training: it exits
75 (stopped, checkpoint saved) the planned number of times, then 0.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SLURM = REPO / "tools" / "slurm"

FAKE_SBATCH = """
import json, os, sys
state = os.environ["FAKE_SLURM_STATE"]
jobs_file = os.path.join(state, "jobs.json")
jobs = json.load(open(jobs_file)) if os.path.exists(jobs_file) else {}
args = sys.argv[1:]
options, i = {}, 0
while i < len(args) and args[i].startswith("--"):
    key, _, value = args[i][2:].partition("=")
    options[key] = value
    i += 1
job_id = str(1000 + len(jobs))
jobs[job_id] = {"script": args[i], "args": args[i + 1:], "options": options, "state": "PENDING",
                "restarts": 0}
json.dump(jobs, open(jobs_file, "w"))
with open(os.path.join(state, "events.jsonl"), "a") as f:
    f.write(json.dumps({"event": "sbatch", "job": job_id, "argv": sys.argv[1:]}) + "\\n")
print(job_id if "parsable" in options else f"Submitted batch job {job_id}")
"""

FAKE_SCONTROL = """
import json, os, sys
state = os.environ["FAKE_SLURM_STATE"]
with open(os.path.join(state, "events.jsonl"), "a") as f:
    f.write(json.dumps({"event": "scontrol", "argv": sys.argv[1:]}) + "\\n")
if sys.argv[1:3] == ["show", "hostnames"]:
    print("node001")
elif sys.argv[1] == "requeue":
    open(os.path.join(state, f"requeue_{sys.argv[2]}"), "w").close()
"""

FAKE_SRUN = """
import json, os, sys
state = os.environ["FAKE_SLURM_STATE"]
recipe = sys.argv[sys.argv.index("--recipe") + 1]
stage = os.path.splitext(os.path.basename(recipe))[0]
plan = json.load(open(os.path.join(state, "plan.json")))
counter = os.path.join(state, f"attempts_{stage}")
attempt = int(open(counter).read()) if os.path.exists(counter) else 0
open(counter, "w").write(str(attempt + 1))
rc = 75 if attempt < plan.get(stage, 0) else 0
with open(os.path.join(state, "events.jsonl"), "a") as f:
    f.write(json.dumps({"event": "train", "stage": stage, "job": os.environ["SLURM_JOB_ID"],
                        "restart": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
                        "exit": rc}) + "\\n")
sys.exit(rc)
"""


def _fake_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("sbatch", FAKE_SBATCH), ("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
        path.chmod(0o755)
    return bin_dir


def _schedule(state: Path, env: dict, max_runs: int = 20) -> None:
    """Run pending jobs whose afterok dependency completed, as Slurm would, until none is left."""
    for _ in range(max_runs):
        jobs = json.loads((state / "jobs.json").read_text())
        runnable = []
        for job_id, job in sorted(jobs.items()):
            dep = job["options"].get("dependency", "")
            after = dep.split(":", 1)[1] if dep.startswith("afterok:") else None
            if job["state"] == "PENDING" and (after is None or jobs[after]["state"] == "COMPLETED"):
                runnable.append(job_id)
            elif job["state"] == "PENDING" and jobs[after]["state"] == "FAILED":
                job["state"] = "CANCELLED"  # --kill-on-invalid-dep=yes
        if not runnable:
            (state / "jobs.json").write_text(json.dumps(jobs))
            return
        job_id = runnable[0]
        job = jobs[job_id]
        job_env = dict(env, SLURM_JOB_ID=job_id, SLURM_JOB_NODELIST="node001",
                       SLURM_RESTART_COUNT=str(job["restarts"]))
        proc = subprocess.run(["bash", job["script"], *job["args"]], env=job_env, cwd=state,
                              capture_output=True, text=True, timeout=60)
        requeued = state / f"requeue_{job_id}"
        if requeued.exists():
            requeued.unlink()
            job["state"], job["restarts"] = "PENDING", job["restarts"] + 1
        else:
            job["state"] = "COMPLETED" if proc.returncode == 0 else "FAILED"
        jobs[job_id] = job
        (state / "jobs.json").write_text(json.dumps(jobs))
    raise AssertionError("the chain did not finish")


def _events(state: Path) -> list:
    return [json.loads(line) for line in (state / "events.jsonl").read_text().splitlines()]


def _submit(tmp_path, plan: dict):
    state = tmp_path / "state"
    state.mkdir()
    (state / "plan.json").write_text(json.dumps(plan))
    env = dict(os.environ, FAKE_SLURM_STATE=str(state),
               PATH=f"{_fake_bin(tmp_path)}{os.pathsep}{os.environ['PATH']}", STAGES="stage1 stage2")
    out = subprocess.run(["bash", str(SLURM / "run_all_stages.sh"), "recipes/nano_v2_vl", "4"],
                         env=env, capture_output=True, text=True, check=True, cwd=REPO).stdout
    return state, env, out


def test_preempted_stage_requeues_and_the_next_waits(tmp_path):
    state, env, out = _submit(tmp_path, {"stage1": 2})
    assert out.split() == ["stage1", "->", "job", "1000", "stage2", "->", "job", "1001"]
    _schedule(state, env)
    events = _events(state)
    submits = [e for e in events if e["event"] == "sbatch"]
    assert len(submits) == 2  # each stage submitted once; requeues reuse the job id
    assert "--dependency=afterok:1000" in submits[1]["argv"]
    assert not any(a.startswith("--dependency") for a in submits[0]["argv"])
    runs = [(e["stage"], e["job"], e["restart"], e["exit"]) for e in events if e["event"] == "train"]
    assert runs == [("stage1", "1000", 0, 75), ("stage1", "1000", 1, 75), ("stage1", "1000", 2, 0),
                    ("stage2", "1001", 0, 0)]
    requeues = [e["argv"] for e in events if e["event"] == "scontrol" and e["argv"][0] == "requeue"]
    assert requeues == [["requeue", "1000"], ["requeue", "1000"]]
    # stage 2 started only after stage 1's finishing run
    order = [i for i, e in enumerate(events) if e["event"] == "train"]
    assert events[order[3]]["stage"] == "stage2" and events[order[2]]["exit"] == 0
    jobs = json.loads((state / "jobs.json").read_text())
    assert {j: v["state"] for j, v in jobs.items()} == {"1000": "COMPLETED", "1001": "COMPLETED"}


def test_failed_stage_stops_the_chain(tmp_path):
    """A real failure (exit != 0, != 75) is not requeued and cancels the dependent stage."""
    state, env, _ = _submit(tmp_path, {"stage1": 0})
    (tmp_path / "bin" / "srun").write_text("#!/bin/bash\nexit 3\n")
    _schedule(state, env)
    jobs = json.loads((state / "jobs.json").read_text())
    assert {j: v["state"] for j, v in jobs.items()} == {"1000": "FAILED", "1001": "CANCELLED"}
    assert not any(e["event"] == "scontrol" and e["argv"][0] == "requeue" for e in _events(state))


def test_requeue_limit(tmp_path):
    state, env, _ = _submit(tmp_path, {"stage1": 5})
    env["MAX_REQUEUES"] = "2"
    _schedule(state, env)
    jobs = json.loads((state / "jobs.json").read_text())
    assert jobs["1000"]["state"] == "FAILED" and jobs["1000"]["restarts"] == 2
    assert jobs["1001"]["state"] == "CANCELLED"
