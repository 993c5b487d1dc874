# Orderly shutdown: stopping a role during a long Visitor transfer returns
# within a bound, the process exits 0 by itself (no SIGKILL, no timeout), and
# the transfer is cut rather than drained. For the Server, then the Client.

# graceful-shutdown-duration = "5s" (configs/server.toml); the units'
# TimeoutStopSec is 20 s. A clean stop must beat the timeout.
BOUND = 19


def scenario(t):
    server = t.start_server()
    client = t.start_client(t.client)
    t.visitor.wait_until_succeeds(t.curl("https://app.example.com/ | grep -qx backend-1"))

    with t.subtest("Server stop during a transfer is bounded and clean"):
        download = t.start_download("download1")
        took = server.stop_cleanly(BOUND)
        assert "server_stopped" in server.log_text()
        cut = t.download_cut(download)
        client.wait_for_log("tunnel_closed")
        t.log(f"    server stopped in {took:.2f}s; {cut}")

    with t.subtest("Client reconnects after the Server is back"):
        server = t.restart_server(server)
        t.visitor.wait_until_succeeds(t.curl("https://app.example.com/ | grep -qx backend-1"), timeout=120)

    with t.subtest("Client stop during a transfer is bounded and clean"):
        download = t.start_download("download2")
        took = client.stop_cleanly(BOUND)
        assert "client_stopped" in client.log_text()
        cut = t.download_cut(download)
        t.log(f"    client stopped in {took:.2f}s; {cut}")
