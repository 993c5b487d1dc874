# `nixcheck check --flake .#server` config (run by .ci/test): a Server as a
# user would deploy it. Two Tunnels (one pin, two pins), the Server
# certificate from a private ACME directory whose CA comes in as a
# credential, a readiness listener, ports 443.
{ config, ... }:
let
  fixtures = import ./fixtures.nix;
  creds = config.services.runewarp.server.credentialsDirectory;
in
{
  services.runewarp.server = {
    enable = true;
    openFirewall = true;
    credentials."acme-ca.crt" = "/etc/runewarp/acme-ca.crt";
    settings = {
      log-level = "info";
      server = {
        hostname = "tunnel.example.com";
        readiness-bind-address = "127.0.0.1:8081";
        graceful-shutdown-duration = "10s";
        acme = fixtures.acme creds;
        tunnels = [
          {
            public-hostnames = fixtures.appHostnames;
            client-identity = fixtures.pin;
          }
          {
            public-hostnames = [ "shop.example.com" ];
            client-identities = [
              "0d3c5e3b2a9f1e8d7c6b5a4938271605f4e3d2c1b0a9f8e7d6c5b4a392817061"
              "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90"
            ];
          }
        ];
      };
    };
  };
}
