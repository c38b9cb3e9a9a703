import socket

from latch.stack import bind_socket


def test_http_listener_is_tcp_so_asyncio_sets_nodelay_on_accepted_sockets() -> None:
    """A listener made with proto 0 made every keep-alive HTTP response wait ~40 ms (Nagle and
    delayed ACK): asyncio only sets TCP_NODELAY when the socket's proto is IPPROTO_TCP."""
    sock = bind_socket("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
        client = socket.create_connection(sock.getsockname())
        sock.setblocking(True)
        accepted, _ = sock.accept()
        assert accepted.proto == socket.IPPROTO_TCP
        accepted.close()
        client.close()
    finally:
        sock.close()
