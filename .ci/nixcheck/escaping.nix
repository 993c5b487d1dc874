# `nixcheck check --flake .#default` config (run by .ci/check_nix): runtime
# config files whose paths contain a space and a quote, for both roles.
# .ci/check_nix checks that each unit's ExecStartPre and ExecStart pass the
# path as one argument (systemd's quoting, done by utils.escapeSystemdExecArgs).
{
  services.runewarp.server = {
    enable = true;
    configFile = "/run/runewarp edge/it's config.toml";
    settings.server = {
      hostname = "tunnel.example.com";
      tunnels = [
        {
          public-hostnames = [ "app.example.com" ];
          client-identity = "6617b06d7075cd58f366bae3b69ba9e2e4ebc7e4b7f4561fd8f0a8c45701ed83";
        }
      ];
    };
  };
  services.runewarp.clients.home = {
    configFile = "/run/runewarp home/config.toml";
    settings.client = {
      server-address = "tunnel.example.com";
      services = [ { backend-address = "127.0.0.1:8443"; } ];
    };
  };
}
