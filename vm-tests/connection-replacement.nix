# Connection replacement: a second Client with the same identity connects;
# new Visitor streams go to it and the first connection is closed (the first
# Client then pauses before reconnecting). client -> backend-1 (8443),
# client2 -> backend-2 (8444) tell them apart.
{
  pkgs,
  lib,
  common,
}:
let
  to = port: {
    client.services = [
      {
        public-hostnames = [ "app.example.com" ];
        backend-address = "backend:${toString port}";
      }
    ];
  };
in
common.test {
  name = "runewarp-connection-replacement";
  nodes = {
    client = common.client { override = to 8443; };
    client2 = common.client { override = to 8444; };
  };
  script = ''
    start_all()
    backend.wait_for_unit("nginx.service")
    server.wait_for_unit("runewarp-server.service")
    install_server_ca(server, client)
    install_server_ca(server, client2)

    with subtest("The first Client serves"):
        client.succeed("systemctl start runewarp-client-test.service")
        visitor.wait_until_succeeds(f"{CURL} https://app.example.com/ | grep -qx backend-1")

    with subtest("The second Client with the same identity takes over"):
        client2.succeed("systemctl start runewarp-client-test.service")
        visitor.wait_until_succeeds(f"{CURL} https://app.example.com/ | grep -qx backend-2")
        wait_for_log(server, "runewarp-server", "tunnel_replaced")
        wait_for_log(client, "runewarp-client-test", "tunnel_replaced")
        # The first Client pauses before reconnecting: all new streams go to
        # the second one.
        for _ in range(5):
            assert visitor.succeed(f"{CURL} https://app.example.com/").strip() == "backend-2"
        # Replaced is not a failure: the first instance is still running.
        client.succeed("systemctl is-active runewarp-client-test.service")
  '';
}
