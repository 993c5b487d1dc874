# Server ACME: the Server obtains the certificate for its own hostname
# (tunnel.example.com) from Pebble via TLS-ALPN-01 on its public listener.
# The Client trusts only Pebble's root, so connecting proves the Server
# presents the ACME certificate; Visitor traffic then flows as usual.


def scenario(t):
    server = t.start_server(config="server-acme.toml")

    with t.subtest("No private CA is made when ACME is chosen"):
        server.host.fail(f"test -e {server.state}/certs")

    with t.subtest("Client trusting only Pebble's root connects"):
        root = t.pebble_root_file(t.client)
        t.start_client(t.client, ca=root)
        server.wait_for_log("tunnel_connected", timeout=t.acme_timeout)
        server.host.succeed(f"test -d {server.state}/acme")

    with t.subtest("Visitor reaches the backend"):
        out = t.visitor.wait_until_succeeds(t.curl("https://app.example.com/"))
        assert out.strip() == "backend-1", out
