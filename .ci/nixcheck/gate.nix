# `nixcheck check --flake .#gate` config (run by .ci/test): the standalone
# gate behind a local TLS proxy, its SMTP password through LoadCredential.
let
  fixtures = import ./fixtures.nix;
in
{
  services.runewarp.gate = {
    enable = true;
    smtpPasswordFile = "/etc/runewarp/smtp-password";
    settings.gate = {
      upstream = "http://10.0.0.2:7860";
      base-url = "https://app.example.com";
      allowed-emails = [ "alice@example.com" ];
      allowed-domains = [ "team.example.com" ];
      session-idle = "30m";
      smtp = fixtures.smtp;
    };
  };
}
