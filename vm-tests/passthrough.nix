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
  scenario = ./scenarios/passthrough.py;
}
