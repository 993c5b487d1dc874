# Orderly shutdown: `systemctl stop` during a long Visitor transfer returns
# within a bound, the process exits 0 by itself (no SIGKILL, no timeout), and
# the transfer is cut rather than drained. For the Server, then the Client.
{
  pkgs,
  lib,
  common,
}:
common.test {
  name = "runewarp-shutdown";
  script = ''
    # graceful-shutdown-duration = "5s" (configs/server.toml); TimeoutStopSec
    # is 20 s. A clean stop must beat the timeout.
    BOUND = 19
    # No --max-time: the transfer must outlive the stop. Absolute path: the
    # transient unit's PATH is systemd's, not the login shell's.
    CURL_LONG = "${lib.getExe pkgs.curl} -sS --fail --cacert /etc/runewarp-test/ca.crt"


    # 1 MiB/s: the 128 MiB transfer outlives the stop, and what the path
    # buffered before the cut (several MiB) drains well inside download_cut's
    # 30 s (at 256 KiB/s a full receive buffer alone could take longer).
    def start_download(name):
        visitor.succeed(f"rm -f /tmp/{name}")
        visitor.succeed(
            f"systemd-run --unit={name} {CURL_LONG} --limit-rate 1m"
            f" -o /tmp/{name} https://app.example.com/big"
        )
        visitor.wait_until_succeeds(f"test $(stat -c %s /tmp/{name}) -gt 262144")


    def download_cut(name):
        visitor.wait_until_fails(f"systemctl is-active {name}", timeout=30)
        visitor.succeed(f"test $(stat -c %s /tmp/{name}) -lt 134217728")


    start_all()
    backend.wait_for_unit("nginx.service")
    backend.succeed("dd if=/dev/zero of=/srv/www/big bs=1M count=128")
    server.wait_for_unit("runewarp-server.service")
    install_server_ca(server, client)
    client.succeed("systemctl start runewarp-client-test.service")
    visitor.wait_until_succeeds(f"{CURL} https://app.example.com/ | grep -qx backend-1")

    with subtest("Server stop during a transfer is bounded and clean"):
        start_download("download1")
        stop_cleanly(server, "runewarp-server", BOUND)
        assert "server_stopped" in journal(server, "runewarp-server")
        download_cut("download1")
        wait_for_log(client, "runewarp-client-test", "tunnel_closed")

    with subtest("Client reconnects after the Server is back"):
        server.succeed("systemctl start runewarp-server.service")
        visitor.wait_until_succeeds(f"{CURL} https://app.example.com/ | grep -qx backend-1", timeout=120)

    with subtest("Client stop during a transfer is bounded and clean"):
        start_download("download2")
        stop_cleanly(client, "runewarp-client-test", BOUND)
        assert "client_stopped" in journal(client, "runewarp-client-test")
        download_cut("download2")
  '';
}
