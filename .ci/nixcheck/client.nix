# `nixcheck check --flake .#client` config (run by .ci/test): a host with
# two Client instances, i.e. two Tunnels. "home" passes TLS through to a
# local nginx and trusts a private Server CA; "shop" terminates TLS with a
# certificate from a private ACME directory (its CA as a credential) and
# passes a second hostname through with a PROXY header; its terminate
# Service has Runegate in front (SMTP password through LoadCredential).
{ config, ... }:
let
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
            public-hostnames = [
              "app.example.com"
              "www.example.com"
            ];
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
          smtp = {
            host = "smtp.example.com";
            username = "signin@example.com";
            from = "Sign-in <signin@example.com>";
          };
          acme = {
            email = "ops@example.com";
            directory-url = "https://acme.internal.example:14000/dir";
            directory-ca-file = "${shop.credentialsDirectory}/acme-ca.crt";
          };
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
