# services.runewarp.gate: Runegate standalone (`runewarp gate`), email
# sign-in in front of a private web app, behind a TLS-terminating proxy
# such as nginx on the same host. One unit: runewarp-gate.service. See
# docs/gate.md.
{ config, lib, pkgs, utils, ... }:
let
  inherit (lib) mkOption mkIf types;
  rw = import ./lib.nix { inherit lib; };
  settingsFormat = pkgs.formats.toml { };
  cfg = config.services.runewarp.gate;
  unit = "runewarp-gate";
  stateDir = "/var/lib/${unit}";
  credentialsDirectory = rw.credentialsDirectoryOf unit;

  gateSection = rw.tomlTable settingsFormat.type (
    rw.gateAllowOptions
    // {
      listen-address = mkOption {
        type = types.str;
        default = "127.0.0.1:7870";
        description = "Where the TLS-terminating proxy sends requests (literal `ip:port`, port 1024 or above).";
      };
      upstream = mkOption {
        type = types.str;
        example = "http://127.0.0.1:7860";
        description = "The app behind the gate, `http://host:port`.";
      };
      base-url = mkOption {
        type = types.str;
        example = "https://app.example.com";
        description = "The public origin Visitors use; links in mails point there.";
      };
      trusted-proxies = mkOption {
        type = types.listOf types.str;
        default = [
          "127.0.0.1"
          "::1"
        ];
        description = "Addresses or CIDR blocks whose `X-Forwarded-For` is believed (the local proxy).";
      };
      state-dir = mkOption {
        type = types.str;
        default = stateDir;
        description = "The session database (kept in the unit's StateDirectory).";
      };
      smtp = mkOption {
        type = rw.smtpType {
          freeformType = settingsFormat.type;
          passwordFile = if cfg.smtpPasswordFile == null then null else "${credentialsDirectory}/smtp-password";
        };
        description = "`[gate.smtp]`: the mail relay for sign-in mails.";
      };
    }
  );
in
{
  imports = [ ./common.nix ];

  options.services.runewarp.gate =
    rw.roleOptions {
      inherit config pkgs cfg;
      role = "gate";
      packageFor = "the gate";
      sectionType = gateSection;
      settingsDescription = ''
        The gate's configuration, mirroring the config file (see
        `runewarp config check --role gate`). Paths must be absolute.
      '';
      credentialsExample = {
        "smtp-password" = "/run/secrets/smtp-password";
      };
      credentialsDescription = ''
        Files passed with systemd `LoadCredential=` (name = absolute path
        outside the Nix store), readable only by the gate under
        `credentialsDirectory`.
      '';
    }
    // {
      enable = lib.mkEnableOption "Runegate, the standalone email sign-in gate (runewarp gate)";

      smtpPasswordFile = rw.smtpPasswordOption "gate";

    };

  config = mkIf cfg.enable {
    assertions =
      rw.absolutePathAssertions "services.runewarp.gate.settings.gate" {
        inherit (cfg.settings.gate) state-dir;
      }
      ++ [
        {
          assertion =
            let
              port = rw.portOf cfg.settings.gate.listen-address;
            in
            port == null || port >= 1024;
          message = "services.runewarp.gate.settings.gate.listen-address: the port must be 1024 or above (the unit has no capabilities).";
        }
        {
          assertion = cfg.settings.gate.allowed-emails != [ ] || cfg.settings.gate.allowed-domains != [ ];
          message = "services.runewarp.gate.settings.gate: set allowed-emails or allowed-domains; otherwise nobody could sign in.";
        }
      ];

    environment.systemPackages = [ cfg.package ];

    services.runewarp.gate.credentials = mkIf (cfg.smtpPasswordFile != null) {
      "smtp-password" = cfg.smtpPasswordFile;
    };

    systemd.services.${unit} = rw.roleUnit {
      inherit pkgs utils cfg;
      role = "gate";
      description = "Runegate: email sign-in in front of a private web app";
      alsoAfter = [ "nss-lookup.target" ];
      # READY=1 once the listener is bound and the session store open;
      # `systemctl reload` re-reads the allow-lists, and sessions of
      # addresses no longer allowed end at once.
      serviceConfig.TimeoutStopSec = 20;
    };
  };
}
