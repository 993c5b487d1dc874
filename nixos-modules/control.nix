# services.runewarp.control: the mesh control plane (`runewarp control`),
# seed 000's User Management Server and Signal Server in one unit:
# runewarp-control.service. Devices enrol with setup keys (`runewarp-control
# setup-key create ...`, a wrapper running the admin commands as the
# service's user) and follow their network maps over HTTPS. See
# docs/control.md.
{ config, lib, pkgs, utils, ... }:
let
  inherit (lib) mkOption mkIf types;
  rw = import ./lib.nix { inherit lib; };
  settingsFormat = pkgs.formats.toml { };
  cfg = config.services.runewarp.control;
  unit = "runewarp-control";
  # A fixed system user (not DynamicUser): the admin wrapper must open the
  # same database files as the service, with the same owner.
  user = "runewarp-control";
  stateDir = "/var/lib/${unit}";
  credentialsDirectory = rw.credentialsDirectoryOf unit;
  configPath = rw.configPathOf cfg;
  port = rw.portOf cfg.settings.control.listen-address;
  needsLowPort = port != null && port < 1024;

  controlSection = rw.tomlTable settingsFormat.type {
    listen-address = mkOption {
      type = types.str;
      default = "0.0.0.0:7443";
      description = "Where the HTTPS API listens (literal `ip:port`).";
    };
    hostname = mkOption {
      type = types.str;
      example = "control.example.com";
      description = "The DNS name devices connect to; the API's certificate is made for it.";
    };
    state-dir = mkOption {
      type = types.str;
      default = stateDir;
      description = "The SQLite database and the API's certificate material (kept in the unit's StateDirectory).";
    };
    database-url-file = mkOption {
      type = types.nullOr types.str;
      default = if cfg.databaseUrlFile == null then null else "${credentialsDirectory}/db-url";
      defaultText = lib.literalExpression "the db-url credential when databaseUrlFile is set, else null (SQLite)";
      description = "A file holding the PostgreSQL connection string (for several replicas on one database); SQLite in `state-dir` when null.";
    };
  };

  # `runewarp-control <command>`: the admin commands (setup keys, devices,
  # policies) against this server's configuration, as its user.
  adminWrapper = pkgs.writeShellApplication {
    name = "runewarp-control";
    runtimeInputs = [ pkgs.util-linux ];
    text = ''
      exec runuser -u ${user} -- ${lib.getExe cfg.package} control --config ${configPath} "$@"
    '';
  };
in
{
  imports = [ ./common.nix ];

  options.services.runewarp.control =
    rw.roleOptions {
      inherit config pkgs cfg;
      role = "control";
      packageFor = "the control server";
      sectionType = controlSection;
      settingsDescription = ''
        The control server's configuration, mirroring the config file (see
        `runewarp config check --role control`). Paths must be absolute.
      '';
      credentialsExample = { };
      credentialsDescription = ''
        Files passed with systemd `LoadCredential=` (name = absolute path
        outside the Nix store), readable only by the control server under
        `credentialsDirectory`.
      '';
    }
    // {
      enable = lib.mkEnableOption "the Runewarp mesh control server (runewarp control)";

      databaseUrlFile = rw.nullableOption rw.credentialPath {
        example = "/run/secrets/runewarp-db-url";
        description = ''
          The PostgreSQL connection string (a file outside the Nix store,
          one line: a `postgresql://` URL or `key=value` pairs), handed to
          the unit with `LoadCredential=` as `db-url`;
          `settings.control.database-url-file` points there by default.
          See docs/control.md, Storage.
        '';
      };

      openFirewall = rw.openFirewallOption "Open the API's TCP port in the firewall.";
    };

  config = mkIf cfg.enable {
    assertions = rw.absolutePathAssertions "services.runewarp.control.settings.control" {
      inherit (cfg.settings.control) state-dir;
    };

    services.runewarp.control.credentials = mkIf (cfg.databaseUrlFile != null) {
      db-url = cfg.databaseUrlFile;
    };

    users.users.${user} = {
      isSystemUser = true;
      group = user;
      home = stateDir;
    };
    users.groups.${user} = { };

    networking.firewall = mkIf (cfg.openFirewall && port != null) {
      allowedTCPPorts = [ port ];
    };

    environment.systemPackages = [ adminWrapper ];

    systemd.services.${unit} = rw.roleUnit {
      inherit pkgs utils cfg;
      role = "control";
      description = "Runewarp mesh control server";
      # A PostgreSQL on the same host is up first (harmless without one).
      alsoAfter = [ "postgresql.service" ];
      lowPorts = needsLowPort;
      serviceConfig = {
        DynamicUser = false;
        User = user;
        Group = user;
        TimeoutStopSec = 20;
      };
    };
  };
}
