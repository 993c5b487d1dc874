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
  scenario = ./scenarios/connection_replacement.py;
}
