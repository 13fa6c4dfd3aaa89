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
