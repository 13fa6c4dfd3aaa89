"""srun's SLURM_* -> torchrun's variables, for a two-node job (pure Python, no cluster)."""

import pytest

from agpo_megatron.runtime.parallel import _tasks_on_node, torchrun_env_from_slurm

# What srun sets for the 7th of 8 tasks (node 1, local index 2) of `sbatch --nodes=2 --ntasks-per-node=4`.
TWO_NODES = {
    "SLURM_JOB_ID": "123456",
    "SLURM_JOB_NODELIST": "gpu-[07-08]",
    "SLURM_NNODES": "2",
    "SLURM_NTASKS": "8",
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "6",
    "SLURM_LOCALID": "2",
    "SLURM_NODEID": "1",
    "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
    "SLURM_TASKS_PER_NODE": "4(x2)",
}


def _hosts(nodelist: str) -> str:
    assert nodelist == "gpu-[07-08]"
    return "gpu-07"


def test_two_node_task_maps_to_global_rank_local_rank_and_node():
    env = torchrun_env_from_slurm(TWO_NODES, first_host=_hosts)
    assert env == {
        "RANK": "6",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "2",
        "LOCAL_WORLD_SIZE": "4",
        "GROUP_RANK": "1",
        "NODE_RANK": "1",
        "MASTER_ADDR": "gpu-07",
        "MASTER_PORT": str(20000 + 123456 % 12000),
    }


def test_a_requeued_job_gets_another_port():
    """The restart must not bind the port its previous run's TCPStore may hold in TIME_WAIT."""
    first = torchrun_env_from_slurm(TWO_NODES, first_host=_hosts)["MASTER_PORT"]
    again = torchrun_env_from_slurm({**TWO_NODES, "SLURM_RESTART_COUNT": "1"}, first_host=_hosts)["MASTER_PORT"]
    assert first != again and 20000 <= int(again) < 32000  # below the ephemeral range (32768+)


def test_every_task_of_two_nodes_gets_a_distinct_rank_and_one_master():
    seen = []
    for proc in range(8):
        env = torchrun_env_from_slurm(
            {**TWO_NODES, "SLURM_PROCID": str(proc), "SLURM_LOCALID": str(proc % 4), "SLURM_NODEID": str(proc // 4)},
            first_host=_hosts,
        )
        seen.append((env["RANK"], env["NODE_RANK"], env["LOCAL_RANK"], env["MASTER_ADDR"], env["MASTER_PORT"]))
    assert [int(r) for r, *_ in seen] == list(range(8))
    assert [(n, l) for _, n, l, *_ in seen] == [(str(p // 4), str(p % 4)) for p in range(8)]
    assert len({(a, p) for *_, a, p in seen}) == 1


def test_exported_master_wins_and_torchrun_env_is_left_alone():
    env = torchrun_env_from_slurm(
        {**TWO_NODES, "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29400"},
        first_host=lambda _: pytest.fail("scontrol must not be called"),
    )
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("10.0.0.7", "29400")
    assert torchrun_env_from_slurm({**TWO_NODES, "RANK": "0"}) == {}  # torchrun inside an allocation
    assert torchrun_env_from_slurm({"PATH": "/bin"}) == {}  # not under Slurm
    batch_shell = {k: v for k, v in TWO_NODES.items() if k != "SLURM_STEP_ID"}
    assert torchrun_env_from_slurm(batch_shell) == {}  # sbatch's shell itself: not one of srun's tasks


@pytest.mark.parametrize("spec, node, n", [("4(x2)", 1, 4), ("3,2", 1, 2), ("2(x3),1", 3, 1), ("8", 0, 8)])
def test_compressed_tasks_per_node(spec, node, n):
    assert _tasks_on_node(spec, node) == n
