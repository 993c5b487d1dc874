# Terminate mode with Client ACME: the Client obtains a certificate for
# app.example.com from Pebble, the TLS-ALPN-01 challenge travelling
# Pebble -> Server (TCP 443) -> Tunnel -> Client; Visitors then get that
# certificate from the Client, and the backend speaks plain HTTP.
{
  pkgs,
  lib,
  common,
}:
common.test {
  name = "runewarp-terminate-client-acme";
  withAcme = true;
  nodes.client = common.client { config = ./configs/client-terminate-acme.toml; };
  script = ''
    start_all()
    acme.wait_for_unit("pebble.service")
    acme.wait_for_open_port(14000)
    backend.wait_for_unit("nginx.service")
    server.wait_for_unit("runewarp-server.service")

    install_server_ca(server, client)
    client.succeed("systemctl start runewarp-client-test.service")
    wait_for_log(server, "runewarp-server", "tunnel_connected")

    with subtest("Visitor gets the ACME certificate and the plain HTTP backend"):
        root = visitor.wait_until_succeeds(f"{CURL} https://acme.test:15000/roots/0")
        write_file(visitor, "/tmp/pebble-root.pem", root)
        out = visitor.wait_until_succeeds(
            "curl -sS --fail --max-time 10 --cacert /tmp/pebble-root.pem https://app.example.com/",
            timeout=240,
        )
        assert out.strip() == "plain-http-backend", out
        issuer = visitor.succeed(
            "openssl s_client -connect app.example.com:443 -servername app.example.com"
            " </dev/null 2>/dev/null | openssl x509 -noout -issuer"
        )
        assert "Pebble" in issuer, issuer

    with subtest("ACME state lives in the instance's StateDirectory"):
        client.succeed("test -d /var/lib/runewarp-client-test/acme")
  '';
}
