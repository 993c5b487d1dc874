# The Server appliance: boots into a working Runewarp Server.
#
# Built-in config: examples/server.toml (override `services.runewarp.server.settings`
# when building your own image, or put config.toml on a disk labelled RUNEWARP).
# The private Server CA is created on first boot; its SHA-256 fingerprint is
# shown on the console login banner.
{ lib, config, ... }:
{
  imports = [ ./common.nix ];

  runewarp.appliance = {
    role = "server";
    unit = "runewarp-server";
    builtinConfig = config.services.runewarp.server.generatedConfigFile;
    bannerScript = ''
      effective="$(runewarp config check --role server -c /run/runewarp/config.toml)" || exit 1
      hostname="$(printf '%s\n' "$effective" | sed -n 's/^hostname = "\(.*\)"$/\1/p')"
      cert_dir="$(printf '%s\n' "$effective" | sed -n 's/^cert-dir = "\(.*\)"$/\1/p')"
      echo "Server hostname: $hostname"
      if [ -z "$cert_dir" ]; then
        echo "Server certificate: ACME (clients use server-trust = \"system\")"
      else
        [ -e "$cert_dir/server-ca.crt" ] || exit 1
        echo "Server CA SHA-256 fingerprint:"
        openssl x509 -in "$cert_dir/server-ca.crt" -noout -fingerprint -sha256 | cut -d= -f2
        echo "Server CA certificate for Clients: $cert_dir/server-ca.crt"
      fi
    '';
  };

  services.runewarp.server = {
    enable = true;
    settings = lib.mkDefault (builtins.fromTOML (builtins.readFile ../../examples/server.toml));
    configFile = "/run/runewarp/config.toml";
    openFirewall = true;
  };
}
