# Server ACME: the Server obtains the certificate for its own hostname
# (tunnel.example.com) from Pebble via TLS-ALPN-01 on its public listener.
# The Client trusts only Pebble's root, so connecting proves the Server
# presents the ACME certificate; Visitor traffic then flows as usual.
{
  pkgs,
  lib,
  common,
}:
common.test {
  name = "runewarp-server-acme";
  withAcme = true;
  nodes.server = common.server { config = ./configs/server-acme.toml; };
  script = ''
    start_all()
    acme.wait_for_unit("pebble.service")
    acme.wait_for_open_port(14000)
    backend.wait_for_unit("nginx.service")
    server.wait_for_unit("runewarp-server.service")

    with subtest("No private CA is made when ACME is chosen"):
        server.fail("test -e /var/lib/runewarp-server/certs")

    with subtest("Client trusting only Pebble's root connects"):
        root = client.wait_until_succeeds(f"{CURL} https://acme.test:15000/roots/0")
        install_server_ca(server, client, pem=root)
        client.succeed("systemctl start runewarp-client-test.service")
        wait_for_log(server, "runewarp-server", "tunnel_connected", timeout=240)
        server.succeed("test -d /var/lib/runewarp-server/acme")

    with subtest("Visitor reaches the backend"):
        out = visitor.wait_until_succeeds(f"{CURL} https://app.example.com/")
        assert out.strip() == "backend-1", out
  '';
}
