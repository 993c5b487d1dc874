# Passthrough (the default): the Visitor's TLS goes untouched through Server
# and Tunnel to the TLS nginx on the backend node; the Visitor sees the
# backend's own certificate. Also: the Server creates its private CA on first
# start, a Client instance creates its identity on first start and prints the
# pin, and the Server refuses that unknown identity.
{
  pkgs,
  lib,
  common,
}:
common.test {
  name = "runewarp-passthrough";
  nodes.client = {
    imports = [ (common.client { }) ];
    services.runewarp.clients.test.settings.client.readiness-bind-address = "127.0.0.1:8083";
    # A second instance with a fresh identity the Server does not know.
    services.runewarp.clients.fresh = {
      settings.client = {
        server-address = "tunnel.example.com";
        server-trust = "ca-file";
        server-ca-file = "/run/credentials/runewarp-client-fresh.service/server-ca.crt";
        readiness-bind-address = "127.0.0.1:8082";
        services = [ { backend-address = "backend:8443"; } ];
      };
      credentials."server-ca.crt" = "/run/runewarp-test/server-ca.crt";
    };
    systemd.services.runewarp-client-fresh.wantedBy = lib.mkForce [ ];
  };
  script = ''
    import re

    start_all()
    backend.wait_for_unit("nginx.service")
    server.wait_for_unit("runewarp-server.service")

    with subtest("Server material is created on first start"):
        server.succeed("test -s /var/lib/runewarp-server/certs/server.key")
        assert "Server CA SHA-256 fingerprint" in journal(server, "runewarp-server")

    with subtest("Client connects with its pinned identity from LoadCredential"):
        install_server_ca(server, client)
        client.succeed("systemctl start runewarp-client-test.service")
        wait_for_log(server, "runewarp-server", "tunnel_connected")
        pin = client.succeed("cat /etc/runewarp-test/identity/client-identity.txt").strip()
        assert f"Client identity pin: {pin}" in journal(client, "runewarp-client-test")
        # Connected: the Client's readiness listener accepts.
        client.wait_until_succeeds("bash -c 'exec 3<>/dev/tcp/127.0.0.1/8083'", timeout=30)

    with subtest("Visitor reaches the TLS backend and sees its certificate"):
        out = visitor.wait_until_succeeds(f"{CURL} https://app.example.com/")
        assert out.strip() == "backend-1", out
        issuer = visitor.succeed(
            "openssl s_client -connect app.example.com:443 -servername app.example.com"
            " </dev/null 2>/dev/null | openssl x509 -noout -issuer"
        )
        assert "Runewarp VM test CA" in issuer, issuer

    with subtest("Unrouted hostnames and the Server hostname are dropped"):
        visitor.fail(f"{CURL} https://other.example.com/")
        visitor.fail(f"{CURL} https://tunnel.example.com/")

    with subtest("A fresh instance creates its identity, prints the pin, and is refused"):
        # Returns although the Server refuses the pin: started means
        # running and dialling, not connected (a first deploy).
        client.succeed("timeout 60 systemctl start runewarp-client-fresh.service")
        client.succeed("test -s /var/lib/runewarp-client-fresh/identity/client.key")
        fresh = client.succeed(
            "runewarp client identity show --dir /var/lib/runewarp-client-fresh/identity"
        ).strip()
        assert re.fullmatch(r"[0-9a-f]{64}", fresh), fresh
        assert f"Client identity pin: {fresh}" in journal(client, "runewarp-client-fresh")
        wait_for_log(server, "runewarp-server", "unknown_identity")
        wait_for_log(client, "runewarp-client-fresh", "tunnel_refused")
        client.succeed("systemctl is-active runewarp-client-fresh.service")
        client.fail("bash -c 'exec 3<>/dev/tcp/127.0.0.1/8082'")
        # The pinned Client keeps serving.
        assert visitor.succeed(f"{CURL} https://app.example.com/").strip() == "backend-1"

    with subtest("Units are sandboxed"):
        for machine, unit in [(server, "runewarp-server"), (client, "runewarp-client-test")]:
            props = machine.succeed(
                f"systemctl show -p DynamicUser,ProtectSystem,NoNewPrivileges,Type {unit}"
            )
            for want in ["DynamicUser=yes", "ProtectSystem=strict", "NoNewPrivileges=yes", "Type=notify"]:
                assert want in props, f"{unit}: {want} not in {props}"
        caps = client.succeed("systemctl show -P CapabilityBoundingSet runewarp-client-test").strip()
        assert caps == "", f"client has capabilities: {caps}"
        caps = server.succeed("systemctl show -P AmbientCapabilities runewarp-server").strip()
        assert caps == "cap_net_bind_service", caps
  '';
}
