# Connection replacement: a second Client with the same identity connects;
# new Visitor streams go to it and the first connection is closed (the first
# Client then pauses before reconnecting). client -> backend-1 (8443),
# client2 -> backend-2 (8444) tell them apart.


def backend_at(port):
    """The Client's Service for app.example.com, to the backend on `port`
    (the VM test's nodes declare the same; connection-replacement.nix)."""
    return {
        "client": {
            "services": [{"public-hostnames": ["app.example.com"], "backend-address": f"backend:{port}"}]
        }
    }


def scenario(t):
    server = t.start_server()

    with t.subtest("The first Client serves"):
        client = t.start_client(t.client, override=backend_at(8443))
        t.visitor.wait_until_succeeds(t.curl("https://app.example.com/ | grep -qx backend-1"))

    with t.subtest("The second Client with the same identity takes over"):
        t.start_client(t.client2, override=backend_at(8444))
        t.visitor.wait_until_succeeds(t.curl("https://app.example.com/ | grep -qx backend-2"))
        server.wait_for_log("tunnel_replaced")
        client.wait_for_log("tunnel_replaced")
        # The first Client pauses before reconnecting: all new streams go to
        # the second one.
        for _ in range(5):
            assert t.visitor.succeed(t.curl("https://app.example.com/")).strip() == "backend-2"
        # Replaced is not a failure: the first instance is still running.
        client.assert_running()
