"""Fault scenarios, namespace-only: the WAN link down, a Client address
change, Server restart, Client SIGKILL, Pebble unavailable."""

import signal
import subprocess
import time

from .net import CLIENT_WAN, Failure, log
from .world import DOWNLOAD_RATE, check_prefix, curl, download_cut, start_download, subtest

# --- faults -----------------------------------------------------------------

def tunnel_up(w):
    server = w.start_server()
    client = w.start_client(w.client, server)
    w.visitor.wait_until_succeeds(curl(w, "https://app.example.com/ | grep -qx backend-1"))
    return server, client


def download_end(d, within, late):
    """Wait up to `within` s for the download `d` to end (killed after
    that: its exit code is then `late`); returns (curl exit code, correct
    bytes received)."""
    try:
        code = d.p.wait(timeout=within)
    except subprocess.TimeoutExpired:
        d.kill()
        code = late
    return code, check_prefix(d.out)


def fault_link_down(w, seconds=30):
    server, client = tunnel_up(w)
    closed = client.count("tunnel_closed")
    n = 8 << 20
    with subtest(f"Client link down {seconds}s: what a Visitor sees"):
        d = start_download(w, "dl-linkdown", path=f"/bytes/{n}", rate="512k")
        w.client.ip("link", "set", "eth0", "down")
        t0 = time.monotonic()
        time.sleep(2)
        t = time.monotonic()
        out = w.visitor.fail("curl -sS --max-time 5 --cacert %s/ca.crt https://app.example.com/" % w.pki)
        log(f"    while down, a new Visitor gets after {time.monotonic() - t:.1f}s: {out.strip()[:120]}")
        time.sleep(max(0, seconds - (time.monotonic() - t0)))
    with subtest("Link up: the tunnel comes back by itself; Visitors succeed again"):
        w.client.ip("link", "set", "eth0", "up")
        w.net.client_routes("client", CLIENT_WAN["client"])
        t1 = time.monotonic()
        w.visitor.wait_until_succeeds(curl(w, "https://app.example.com/ | grep -qx backend-1"), timeout=90)
        back = time.monotonic() - t1
        reconnected = client.count("tunnel_closed") > closed
        log(f"    Visitors succeed {back:.1f}s after link up; tunnel "
            f"{'was re-established' if reconnected else 'survived (same QUIC connection)'}")
        code, size = download_end(d, 120, "killed")
        log(f"    in-flight download across the outage: curl exit {code}, {size} correct bytes "
            f"of {n} ({'completed' if size == n and code == 0 else 'cut'})")
        if code == 0 and size != n:
            raise Failure("curl reported success on a short download")
    client.kill()
    server.kill()
    return {"link_down_back_s": round(back, 1)}


def fault_address_change(w):
    server, client = tunnel_up(w)
    closed = client.count("tunnel_closed")
    n = 16 << 20
    with subtest("Client address change mid-transfer (QUIC migration)"):
        d = start_download(w, "dl-migrate", path=f"/bytes/{n}", rate="2m")
        new = "10.231.2.2"
        w.client.ip("addr", "add", f"{new}/32", "dev", "eth0")
        w.net.client_routes("client", new)
        w.client.ip("addr", "del", f"{CLIENT_WAN['client']}/32", "dev", "eth0")
        code, size = download_end(d, 60, "timeout")
        stream = size == n and code == 0
        w.visitor.wait_until_succeeds(curl(w, "https://app.example.com/ | grep -qx backend-1"), timeout=60)
        survived = client.count("tunnel_closed") == closed
        log(f"    tunnel {'survived (no reconnect)' if survived else 'was re-established'}; "
            f"in-flight stream {'survived' if stream else f'cut at {size} bytes (curl exit {code})'}")
        # Restore for later scenarios.
        w.client.ip("addr", "add", f"{CLIENT_WAN['client']}/32", "dev", "eth0")
        w.net.client_routes("client", CLIENT_WAN["client"])
        w.client.ip("addr", "del", f"{new}/32", "dev", "eth0")
    client.kill()
    server.kill()
    return {"migration_tunnel_survived": survived, "migration_stream_survived": stream}


def fault_server_restart(w):
    server, client = tunnel_up(w)
    with subtest("Server restart: in-flight transfer is cut cleanly; traffic resumes"):
        d = start_download(w, "dl-restart")
        code, took = server.stop(signal.SIGTERM)
        t0 = time.monotonic()
        server2 = w.restart_server(server)
        w.visitor.wait_until_succeeds(curl(w, "https://app.example.com/ | grep -qx backend-1"), timeout=60)
        back = time.monotonic() - t0
        code, size = download_cut(d)
        log(f"    traffic flows {back:.1f}s after the restart; cut download kept {size} correct bytes")
    client.kill()
    server2.kill()
    return {"server_restart_back_s": round(back, 1)}


def fault_client_sigkill(w):
    server, client = tunnel_up(w)
    with subtest("Client SIGKILL mid-transfer; a restarted Client takes over"):
        d = start_download(w, "dl-sigkill")
        client.stop(signal.SIGKILL)
        t0 = time.monotonic()
        time.sleep(1)
        hung = d.running()
        client2 = w.start_client(w.client, server)
        server.wait_for_log("tunnel_replaced")
        w.visitor.wait_until_succeeds(curl(w, "https://app.example.com/ | grep -qx backend-1"), timeout=60)
        back = time.monotonic() - t0
        code, size = download_cut(d, within=30)
        cut = time.monotonic() - t0
        log(f"    Visitor's curl {'still running 1s after the kill' if hung else 'ended within 1s'}; ended {cut:.1f}s "
            f"after the kill (bytes already buffered drain at the {DOWNLOAD_RATE}/s limit first), {size} correct bytes, "
            f"curl exit {code}; new Visitors ok {back:.1f}s after the kill")
    client2.kill()
    server.kill()
    return {"client_kill_back_s": round(back, 1)}


def fault_pebble_down(w):
    server = w.start_server()
    with subtest("Pebble unavailable: the Client starts, hostname fails closed"):
        w.pebble.stop(signal.SIGTERM)
        client = w.start_client(w.client, server, config="client-terminate-acme.toml")
        server.wait_for_log("tunnel_connected")
        client.wait_for_log("acme_order_failed")
        w.visitor.fail("curl -sS --max-time 5 -k https://app.example.com/")
    with subtest("Pebble available: the certificate is issued, Visitors succeed"):
        w.start_acme()
        t0 = time.monotonic()
        root = w.pebble_root(w.visitor)
        client.wait_for_log("acme_certificate_issued", timeout=90)
        out = w.visitor.wait_until_succeeds(
            f"curl -sS --fail --max-time 10 --cacert {root} https://app.example.com/", timeout=60)
        assert out.strip() == "plain-http-backend", out
        back = time.monotonic() - t0
        log(f"    certificate issued and served {back:.1f}s after Pebble came back")
    client.kill()
    server.kill()
    return {"pebble_back_s": round(back, 1)}
