# The Client appliance: boots into one Runewarp Client instance named
# "appliance" (unit runewarp-client-appliance).
#
# Built-in config: examples/client.toml (override
# `services.runewarp.clients.appliance.settings` when building your own image,
# or put config.toml on a disk labelled RUNEWARP). The Client identity is
# created on first boot; its pin is shown on the console login banner so it
# can be copied into the Server's [[server.tunnels]] client-identity.
{ lib, config, ... }:
let
  instance = config.services.runewarp.clients.appliance;
in
{
  imports = [ ./common.nix ];

  runewarp.appliance = {
    role = "client";
    unit = "runewarp-client-appliance";
    builtinConfig = instance.generatedConfigFile;
    bannerScript = ''
      effective="$(runewarp config check --role client -c /run/runewarp/config.toml)" || exit 1
      identity_dir="$(printf '%s\n' "$effective" | sed -n 's/^identity-dir = "\(.*\)"$/\1/p')"
      server="$(printf '%s\n' "$effective" | sed -n 's/^server-address = "\(.*\)"$/\1/p')"
      pin="$(runewarp client identity show --dir "$identity_dir")" || exit 1
      echo "Server: $server"
      echo "Client identity pin (put it in the Server's [[server.tunnels]] client-identity):"
      echo "$pin"
    '';
  };

  services.runewarp.clients.appliance = {
    settings = lib.mkDefault (builtins.fromTOML (builtins.readFile ../../examples/client.toml));
    configFile = "/run/runewarp/config.toml";
  };
}
