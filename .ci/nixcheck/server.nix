# `nixcheck check --flake .#server` config (run by .ci/test): a Server as a
# user would deploy it. Two Tunnels (one pin, two pins), the Server
# certificate from a private ACME directory whose CA comes in as a
# credential, a readiness listener, ports 443.
{ config, ... }:
let
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
        acme = {
          email = "ops@example.com";
          directory-url = "https://acme.internal.example:14000/dir";
          directory-ca-file = "${creds}/acme-ca.crt";
        };
        tunnels = [
          {
            public-hostnames = [
              "app.example.com"
              "www.example.com"
            ];
            client-identity = "6617b06d7075cd58f366bae3b69ba9e2e4ebc7e4b7f4561fd8f0a8c45701ed83";
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
