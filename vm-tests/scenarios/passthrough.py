# Passthrough (the default): the Visitor's TLS goes untouched through Server
# and Tunnel to the TLS backend; the Visitor sees the backend's own
# certificate. Also: the Server creates its private CA on first start, a
# fresh Client instance creates its identity on first start, and the Server
# refuses that unknown identity.
import re


def scenario(t):
    server = t.start_server()

    with t.subtest("Server material is created on first start"):
        server.host.succeed(f"test -s {server.state}/certs/server.key")
        if t.systemd:
            # The unit's ExecStartPre (`server cert init`) prints it.
            assert "Server CA SHA-256 fingerprint" in server.log_text()

    with t.subtest("Client connects with its pinned identity"):
        client = t.start_client(t.client)
        server.wait_for_log("tunnel_connected")
        if t.systemd:
            assert f"Client identity pin: {client.pin}" in client.log_text()
            # Connected: the Client's readiness listener (passthrough.nix)
            # accepts.
            t.client.wait_until_succeeds("bash -c 'exec 3<>/dev/tcp/127.0.0.1/8083'", timeout=30)

    with t.subtest("Visitor reaches the TLS backend and sees its certificate"):
        out = t.visitor.wait_until_succeeds(t.curl("https://app.example.com/"))
        assert out.strip() == "backend-1", out
        issuer = t.issuer(t.visitor)
        assert "Runewarp VM test CA" in issuer, issuer

    with t.subtest("Unrouted hostnames and the Server hostname are dropped"):
        t.visitor.fail(t.curl("https://other.example.com/"))
        t.visitor.fail(t.curl("https://tunnel.example.com/"))

    with t.subtest("A fresh instance creates its identity, prints the pin, and is refused"):
        # Returns although the Server refuses the pin: started means
        # running and dialling, not connected (a first deploy).
        fresh = t.start_fresh_client()
        fresh.host.succeed(f"test -s {fresh.state}/identity/client.key")
        assert re.fullmatch(r"[0-9a-f]{64}", fresh.pin), fresh.pin
        assert fresh.pin != client.pin, fresh.pin
        if t.systemd:
            assert f"Client identity pin: {fresh.pin}" in fresh.log_text()
        server.wait_for_log("unknown_identity")
        fresh.wait_for_log("tunnel_refused")
        fresh.assert_running()
        if t.systemd:
            # Its readiness listener (passthrough.nix) stays closed.
            t.client.fail("bash -c 'exec 3<>/dev/tcp/127.0.0.1/8082'")
        # The pinned Client keeps serving.
        assert t.visitor.succeed(t.curl("https://app.example.com/")).strip() == "backend-1"

    if t.systemd:
        with t.subtest("Units are sandboxed"):
            for machine, unit in [(t.server, "runewarp-server"), (t.client, "runewarp-client-test")]:
                props = machine.succeed(
                    f"systemctl show -p DynamicUser,ProtectSystem,NoNewPrivileges,Type {unit}"
                )
                for want in ["DynamicUser=yes", "ProtectSystem=strict", "NoNewPrivileges=yes", "Type=notify"]:
                    assert want in props, f"{unit}: {want} not in {props}"
            caps = t.client.succeed("systemctl show -P CapabilityBoundingSet runewarp-client-test").strip()
            assert caps == "", f"client has capabilities: {caps}"
            caps = t.server.succeed("systemctl show -P AmbientCapabilities runewarp-server").strip()
            assert caps == "cap_net_bind_service", caps
