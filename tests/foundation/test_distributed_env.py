import pytest

from megatron_vlm.distributed import (ParallelConfigError, check_parallel_sizes, first_slurm_host,
                                      read_launch_env)


def test_torchrun_env():
    env = read_launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                           "MASTER_ADDR": "n0", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port,
            env.launcher) == (3, 8, 1, "n0", 1234, "torchrun")


def test_slurm_env():
    env = read_launch_env({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                           "SLURM_JOB_NODELIST": "dgx[017-018,020]", "SLURM_JOB_ID": "123456"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.launcher) == (
        9, 16, 1, "dgx017", "slurm")
    assert env.master_port == 20000 + 123456 % 10000


@pytest.mark.parametrize("nodelist,host", [
    ("node1", "node1"), ("gpu[3-5]", "gpu3"), ("gpu[07,9]", "gpu07"), ("a[1-2],b[3]", "a1")])
def test_first_slurm_host(nodelist, host):
    assert first_slurm_host(nodelist) == host


def test_single_process_fallback():
    env = read_launch_env({})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single")


def test_layout_derives_data_parallel():
    layout = check_parallel_sizes(16, tp=2, pp=2, cp=2)
    assert layout.dp == 2 and layout.describe() == "tp=2 pp=2 cp=2 dp=2"


@pytest.mark.parametrize("kwargs,message", [
    ({"world_size": 2, "tp": 3}, "tp=3 x pp=1 x cp=1 = 3 do not divide the world size 2"),
    ({"world_size": 8, "tp": 2, "pp": 3}, "tp=2 x pp=3 x cp=1 = 6 do not divide the world size 8"),
    ({"world_size": 2, "tp": 0}, "tensor_model_parallel_size must be a positive integer"),
    ({"world_size": 4, "pp": 1, "vpp": 2}, "needs pipeline_model_parallel_size >= 2"),
])
def test_bad_layouts(kwargs, message):
    with pytest.raises(ParallelConfigError, match=message.replace("(", r"\(")):
        check_parallel_sizes(**kwargs)
