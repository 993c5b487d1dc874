# services.runewarp.gate: Runegate standalone (`runewarp gate`), email
# sign-in in front of a private web app, behind a TLS-terminating proxy
# such as nginx on the same host. One unit: runewarp-gate.service. See
# docs/gate.md.
{
  config,
  lib,
  pkgs,
  utils,
  ...
}:
let
  inherit (lib)
    mkOption
    mkIf
    types
    literalExpression
    ;
  rw = import ./lib.nix { inherit lib; };
  settingsFormat = pkgs.formats.toml { };
  cfg = config.services.runewarp.gate;
  unit = "runewarp-gate";
  stateDir = "/var/lib/${unit}";
  credentialsDirectory = "/run/credentials/${unit}.service";
  configPath = if cfg.configFile != null then cfg.configFile else cfg.generatedConfigFile;

  gateSection = types.submodule {
    freeformType = settingsFormat.type;
    options = {
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
      allowed-emails = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "alice@example.com" ];
        description = "Addresses that may sign in.";
      };
      allowed-domains = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "example.com" ];
        description = "Every address at these domains may sign in.";
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
    };
  };
in
{
  imports = [ ./common.nix ];

  options.services.runewarp.gate = {
    enable = lib.mkEnableOption "Runegate, the standalone email sign-in gate (runewarp gate)";

    package = mkOption {
      type = types.package;
      default = config.services.runewarp.package;
      defaultText = literalExpression "config.services.runewarp.package";
      description = "The Runewarp package for the gate.";
    };

    settings = mkOption {
      type = types.submodule {
        freeformType = settingsFormat.type;
        options = {
          log-level = mkOption {
            type = types.enum [
              "off"
              "error"
              "warn"
              "info"
              "debug"
              "trace"
            ];
            default = "info";
            description = "Log verbosity.";
          };
          gate = mkOption {
            type = gateSection;
            description = "The `[gate]` section.";
          };
        };
      };
      description = ''
        The gate's configuration, mirroring the config file (see
        `runewarp config check --role gate`). Paths must be absolute.
      '';
    };

    smtpPasswordFile = mkOption {
      type = types.nullOr rw.credentialPath;
      default = null;
      example = "/run/secrets/smtp-password";
      description = ''
        The SMTP password (a file outside the Nix store), handed to the unit
        with systemd `LoadCredential=` as `smtp-password`;
        `settings.gate.smtp.password-file` points there by default.
      '';
    };

    configFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      description = "Use this file at run time instead of the one generated from `settings` (validated on start).";
    };

    generatedConfigFile = mkOption {
      type = types.path;
      readOnly = true;
      default = rw.configFile {
        inherit pkgs;
        inherit (cfg) package settings;
        role = "gate";
        name = unit;
        check = cfg.checkConfig;
      };
      defaultText = literalExpression "the TOML file generated from settings";
      description = "The configuration file generated from `settings` (validated at build time when `checkConfig` is on).";
    };

    checkConfig = mkOption {
      type = types.bool;
      default = pkgs.stdenv.buildPlatform.canExecute pkgs.stdenv.hostPlatform;
      defaultText = literalExpression "pkgs.stdenv.buildPlatform.canExecute pkgs.stdenv.hostPlatform";
      description = "Validate the generated configuration at build time with `runewarp config check`.";
    };
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

    systemd.services.${unit} = {
      description = "Runegate: email sign-in in front of a private web app";
      documentation = [ "man:runewarp(1)" ];
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [
        "network-online.target"
        "nss-lookup.target"
      ];
      environment = {
        HOME = stateDir;
        XDG_STATE_HOME = stateDir;
      };
      serviceConfig =
        rw.hardening
        // rw.restartPolicy
        // {
          # READY=1 once the listener is bound and the session store open.
          Type = "notify";
          NotifyAccess = "main";
          ExecStart = utils.escapeSystemdExecArgs [
            (lib.getExe cfg.package)
            "gate"
            "--config"
            configPath
          ];
          # `systemctl reload`: re-read the allow-lists; sessions of
          # addresses no longer allowed end at once.
          ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
          KillSignal = "SIGTERM";
          TimeoutStopSec = 20;
          StateDirectory = unit;
          StateDirectoryMode = "0700";
          LoadCredential = lib.optional (cfg.smtpPasswordFile != null) "smtp-password:${cfg.smtpPasswordFile}";
          CapabilityBoundingSet = "";
          PrivateUsers = true;
        };
    };
  };
}
