# Terminate mode with Client ACME: the Client obtains a certificate for
# app.example.com from Pebble, the TLS-ALPN-01 challenge travelling
# Pebble -> Server (TCP 443) -> Tunnel -> Client; Visitors then get that
# certificate from the Client, and the backend speaks plain HTTP.


def scenario(t):
    server = t.start_server()
    client = t.start_client(t.client, config="client-terminate-acme.toml")
    server.wait_for_log("tunnel_connected")

    with t.subtest("Visitor gets the ACME certificate and the plain HTTP backend"):
        root = t.pebble_root_file(t.visitor)
        out = t.visitor.wait_until_succeeds(
            t.curl("https://app.example.com/", cacert=root), timeout=t.acme_timeout
        )
        assert out.strip() == "plain-http-backend", out
        issuer = t.issuer(t.visitor)
        assert "Pebble" in issuer, issuer

    with t.subtest("ACME state lives in the instance's state directory"):
        client.host.succeed(f"test -d {client.state}/acme")
