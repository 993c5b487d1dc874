# `nixcheck check --flake .#client` config (run by .ci/test): a host with
# two Client instances, i.e. two Tunnels. "home" passes TLS through to a
# local nginx and trusts a private Server CA; "shop" terminates TLS with a
# certificate from a private ACME directory (its CA as a credential) and
# passes a second hostname through with a PROXY header; its terminate
# Service has Runegate in front (SMTP password through LoadCredential).
{ config, ... }:
let
  fixtures = import ./fixtures.nix;
  home = config.services.runewarp.clients.home;
  shop = config.services.runewarp.clients.shop;
in
{
  services.runewarp.clients = {
    home = {
      credentials."server-ca.crt" = "/etc/runewarp/server-ca.crt";
      settings.client = {
        server-address = "tunnel.example.com";
        server-trust = "ca-file";
        server-ca-file = "${home.credentialsDirectory}/server-ca.crt";
        services = [
          {
            public-hostnames = fixtures.appHostnames;
            backend-address = "127.0.0.1:8443";
          }
        ];
      };
    };
    shop = {
      smtpPasswordFile = "/etc/runewarp/smtp-password";
      credentials = {
        "server-ca.crt" = "/etc/runewarp/server-ca.crt";
        "acme-ca.crt" = "/etc/runewarp/acme-ca.crt";
      };
      settings = {
        log-level = "debug";
        client = {
          server-address = "tunnel.example.com:443";
          server-trust = "ca-file";
          server-ca-file = "${shop.credentialsDirectory}/server-ca.crt";
          readiness-bind-address = "127.0.0.1:8082";
          smtp = fixtures.smtp;
          acme = fixtures.acme shop.credentialsDirectory;
          services = [
            {
              public-hostnames = [ "shop.example.com" ];
              backend-address = "127.0.0.1:8080";
              tls-mode = "terminate";
              gate = {
                allowed-domains = [ "example.com" ];
                session-ttl = "8h";
              };
            }
            {
              public-hostnames = [ "api.example.com" ];
              backend-address = "127.0.0.1:9443";
              proxy-protocol = "v2";
            }
          ];
        };
      };
    };
  };
}
