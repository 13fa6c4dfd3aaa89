"""runtime/parallel.py helpers that need no process group."""


def test_free_port_is_below_the_ephemeral_range_and_bindable():
    """Ports from bind(0) can sit in TIME_WAIT from gloo's connections; TCPStore then fails (EADDRINUSE)."""
    import socket

    from agpo_megatron.runtime.parallel import _ephemeral_low, free_port

    for _ in range(20):
        port = free_port()
        assert port < _ephemeral_low()
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_one_gpu_per_task_maps_local_rank_onto_the_visible_device(monkeypatch):
    """Issue 18 item 7: with one GPU bound per Slurm task (--gpus-per-task=1) task 3 of a node has
    LOCAL_RANK=3 and one visible device; `set_device(3)` fails and vLLM asserts local_rank < count.
    `init_distributed` on a faked CUDA with 1 (then 8, then 2) visible devices."""
    import torch
    import torch.distributed as dist

    from agpo_megatron.runtime import cpu_platform, parallel

    chosen, inits = [], []
    monkeypatch.setattr(cpu_platform, "cuda_present", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: inits.append(backend))
    for count, local, device in ((1, 3, 0), (8, 3, 3), (2, 3, 1), (1, 0, 0)):
        monkeypatch.setattr(torch.cuda, "device_count", lambda count=count: count)
        monkeypatch.delenv("AGPO_TASK_LOCAL_RANK", raising=False)
        for k, v in dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK=str(local), MASTER_ADDR="h", MASTER_PORT="1").items():
            monkeypatch.setenv(k, v)
        chosen.clear()
        parallel.init_distributed()
        assert chosen == [device] and inits[-1] == "nccl", (count, local, chosen)
        # what vLLM's external launcher reads: a device index it can use; the task's own kept aside
        assert parallel.os.environ["LOCAL_RANK"] == str(device)
        assert parallel.os.environ.get("AGPO_TASK_LOCAL_RANK") == (None if device == local else str(local))
