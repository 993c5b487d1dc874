# Runegate in both shapes (the scenario: ./scenarios/gate.py), with the SMTP
# sink ./scenarios/smtp_sink.py on the client node storing every mail (and
# the AUTH credentials it was sent with) in /var/lib/smtp-sink:
# - on a terminate Service: the Visitor's TLS ends in Client instance
#   "test", whose gate signs alice in by mail and then proxies to the plain
#   HTTP backend; the SMTP password arrives through LoadCredential;
# - standalone (services.runewarp.gate) on the client node in front of the
#   same backend, signing in with the mailed code; a reload that drops the
#   address ends the session.
{
  pkgs,
  lib,
  common,
}:
let
  smtp = {
    host = "127.0.0.1";
    port = "2525";
    tls = "none";
    username = "signin@example.com";
    from = "Sign-in <signin@example.com>";
  };
in
common.test {
  name = "runewarp-gate";
  nodes = {
    client = {
      imports = [
        (common.client {
          override.client = {
            services = [
              {
                public-hostnames = [ "app.example.com" ];
                backend-address = "backend:8080";
                tls-mode = "terminate";
                gate.allowed-emails = [ "alice@example.com" ];
              }
            ];
            inherit smtp;
          };
        })
      ];
      services.runewarp.clients.test.smtpPasswordFile = "/etc/runewarp-test/smtp-password";
      environment.etc."runewarp-test/smtp-password".text = "sink-secret\n";

      services.runewarp.gate = {
        enable = true;
        smtpPasswordFile = "/etc/runewarp-test/smtp-password";
        configFile = "/etc/runewarp-test/gate.toml";
        # The unit runs with configFile, which the scenario writes
        # (t.gate_config) and edits to reload; `settings` (the same
        # values) is what the module's assertions see.
        settings.gate = {
          upstream = "http://backend:8080";
          base-url = "http://localhost:7870";
          allowed-emails = [ "bob@example.com" ];
          inherit smtp;
        };
      };
      systemd.services.runewarp-gate.wantedBy = lib.mkForce [ ];

      systemd.services.smtp-sink = {
        description = "SMTP sink for the gate tests";
        wantedBy = [ "multi-user.target" ];
        serviceConfig = {
          ExecStart = "${pkgs.python3}/bin/python3 ${./scenarios/smtp_sink.py} /var/lib/smtp-sink";
          StateDirectory = "smtp-sink";
        };
      };
    };
  };
  scenario = ./scenarios/gate.py;
}
