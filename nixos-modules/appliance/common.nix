# Shared by the Server and Client appliances: a small NixOS system that boots
# straight into one Runewarp role.
#
# Configuration source (documented in docs/nixos.md):
#   1. a disk (or partition) labelled RUNEWARP holding `config.toml` is
#      mounted read-only at /run/runewarp-config and its config.toml wins;
#   2. otherwise /etc/runewarp/config.toml, generated from the module's
#      `settings` at build time (and validated at build time).
# `runewarp-config.service` picks one, links it to /run/runewarp/config.toml
# (what the role's unit reads), validates it, and logs the effective config.
#
# The console login banner shows the Client identity pin or the Server CA
# fingerprint (/etc/issue.d/runewarp.issue -> /run/runewarp/issue).
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.runewarp.appliance;
  package = config.services.runewarp.package;

  # The role's unit resolves omitted material paths under its StateDirectory
  # through these variables; the helpers below must see the same defaults.
  roleEnvironment = {
    HOME = "/var/lib/${cfg.unit}";
    XDG_DATA_HOME = "/var/lib/${cfg.unit}";
    XDG_STATE_HOME = "/var/lib/${cfg.unit}";
  };

  selectConfig = pkgs.writeShellApplication {
    name = "runewarp-select-config";
    runtimeInputs = [
      package
      pkgs.coreutils
      pkgs.util-linux
      pkgs.systemd
    ];
    text = ''
      install -d -m 0755 /run/runewarp /run/runewarp-config
      udevadm settle --timeout=10 || true
      if [ -e /dev/disk/by-label/RUNEWARP ] && ! mountpoint -q /run/runewarp-config; then
        mount -o ro,nosuid,nodev,noexec /dev/disk/by-label/RUNEWARP /run/runewarp-config \
          || echo "runewarp: cannot mount the RUNEWARP disk; using the built-in config" >&2
      fi
      if [ -f /run/runewarp-config/config.toml ]; then
        source=/run/runewarp-config/config.toml
      else
        source=/etc/runewarp/config.toml
      fi
      ln -sfn "$source" /run/runewarp/config.toml
      echo "runewarp: using $source"
      if ! runewarp config check --role ${cfg.role} -c "$source"; then
        printf 'Runewarp %s: INVALID configuration in %s (see: journalctl -u runewarp-config)\n' \
          ${cfg.role} "$source" > /run/runewarp/issue
        exit 2
      fi
    '';
  };
in
{
  options.runewarp.appliance = {
    role = lib.mkOption {
      type = lib.types.enum [
        "server"
        "client"
      ];
      description = "Which Runewarp role this appliance runs.";
    };
    unit = lib.mkOption {
      type = lib.types.str;
      description = "The systemd unit running the role.";
    };
    builtinConfig = lib.mkOption {
      type = lib.types.path;
      description = "The build-time configuration installed as /etc/runewarp/config.toml.";
    };
    bannerScript = lib.mkOption {
      type = lib.types.lines;
      description = "Shell snippet printing the banner body; fails while material is missing.";
    };
  };

  config = {
    system.stateVersion = lib.mkDefault "25.11";
    networking.hostName = lib.mkDefault "runewarp-${cfg.role}";
    networking.useDHCP = lib.mkDefault true;
    time.timeZone = lib.mkDefault "UTC";

    # Only for evaluating/building the plain system; the image variants
    # (system.build.images.qemu / .iso) override both with their own layout.
    fileSystems."/" = lib.mkDefault {
      device = "/dev/disk/by-label/nixos";
      fsType = "ext4";
    };
    boot.loader.grub = lib.mkMerge [
      (lib.mkIf pkgs.stdenv.hostPlatform.isx86 {
        devices = lib.mkOverride 1400 [ "/dev/vda" ];
      })
      # aarch64 images boot via EFI (qemu-efi variant, systemd-boot) or ISO.
      (lib.mkIf (!pkgs.stdenv.hostPlatform.isx86) { enable = lib.mkOverride 1400 false; })
    ];
    boot.kernelParams = [ "console=tty0" ] ++ lib.optional pkgs.stdenv.hostPlatform.isx86 "console=ttyS0,115200";

    # A small, appliance-like system.
    documentation.enable = lib.mkDefault false;
    nix.enable = lib.mkDefault false;
    environment.systemPackages = [
      package
      pkgs.openssl
    ];
    users.mutableUsers = lib.mkDefault false;

    # The built-in configuration: the role's `settings`, checked at build time.
    environment.etc."runewarp/config.toml".source = cfg.builtinConfig;

    systemd.services.runewarp-config = {
      description = "Select and validate the Runewarp appliance configuration";
      wantedBy = [ "multi-user.target" ];
      before = [
        "${cfg.unit}.service"
        "runewarp-banner.service"
      ];
      requiredBy = [ "${cfg.unit}.service" ];
      after = [ "local-fs.target" ];
      environment = roleEnvironment;
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
        ExecStart = lib.getExe selectConfig;
      };
    };

    systemd.services.${cfg.unit}.restartTriggers = [ config.environment.etc."runewarp/config.toml".source ];

    # The banner: agetty prints /etc/issue, then /etc/issue.d/*.issue.
    environment.etc."issue.d/runewarp.issue".source = "/run/runewarp/issue";
    systemd.services.runewarp-banner = {
      description = "Show Runewarp identity material on the console login banner";
      wantedBy = [ "multi-user.target" ];
      after = [
        "runewarp-config.service"
        "${cfg.unit}.service"
      ];
      wants = [ "${cfg.unit}.service" ];
      environment = roleEnvironment;
      path = [
        package
        pkgs.coreutils
        pkgs.gnused
        pkgs.openssl
        pkgs.util-linux
      ];
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
        StandardOutput = "journal+console";
      };
      script = ''
        install -d -m 0755 /run/runewarp
        if [ -f /run/runewarp/issue ] && grep -q INVALID /run/runewarp/issue; then
          cat /run/runewarp/issue
          exit 0
        fi
        # Material is created by the role's ExecStartPre; wait for it briefly.
        banner_body() {
          ${cfg.bannerScript}
        }
        for _ in $(seq 1 30); do
          body="$(banner_body)" && break
          body="(material not created yet; see: journalctl -u ${cfg.unit})"
          sleep 1
        done
        {
          echo
          echo "Runewarp ${cfg.role} appliance"
          printf '%s\n' "$body"
          echo
        } > /run/runewarp/issue.tmp
        mv /run/runewarp/issue.tmp /run/runewarp/issue
        cat /run/runewarp/issue
        agetty --reload || true
      '';
    };
  };
}
