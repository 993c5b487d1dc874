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

  # A one-shot step of the boot (configuration, banner) that stays active
  # once done and sees the role's defaults; `unit` adds its description,
  # ordering and work.
  bootStep =
    description: unit:
    lib.mkMerge [
      {
        inherit description;
        wantedBy = [ "multi-user.target" ];
        environment = roleEnvironment;
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
        };
      }
      unit
    ];

  stateLabel = "RUNEWARP-STATE";

  # Whether state lives in RAM (the live ISO's root is a tmpfs) with no
  # state disk: the banner then warns that the material changes every boot.
  volatileStateWarning = ''
    if ! mountpoint -q /var/lib/private && [ "$(stat -f -c %T /var/lib)" = tmpfs ]; then
      echo "WARNING: /var/lib is in RAM (live ISO): new ${materialName} on every boot."
      echo "Attach a disk labelled ${stateLabel} (mkfs.ext4 -L ${stateLabel}) to keep it."
    fi
  '';
  materialName = if cfg.role == "server" then "Server CA and certificate" else "Client identity (pin)";

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
      # Persistent state: a disk labelled RUNEWARP-STATE (a Linux filesystem
      # with file ownership, e.g. ext4) becomes /var/lib/private, where the
      # role's StateDirectory (DynamicUser) keeps the Server CA or Client
      # identity. Without it the live ISO keeps state in RAM (banner warns).
      if [ -e /dev/disk/by-label/${stateLabel} ] && ! mountpoint -q /var/lib/private; then
        install -d -m 0700 /var/lib/private
        if mount -o nosuid,nodev,noexec /dev/disk/by-label/${stateLabel} /var/lib/private; then
          chmod 0700 /var/lib/private
          echo "runewarp: state on the ${stateLabel} disk (/var/lib/private)"
        else
          echo "runewarp: cannot mount the ${stateLabel} disk; state is not kept across boots" >&2
        fi
      fi
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
    sshAuthorizedKeys = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      example = [ "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA... ops@example.com" ];
      description = ''
        SSH public keys allowed to log in as root. Empty (the default): the
        appliance has no login at all, by design (console banner only).
        Non-empty: sshd runs with key authentication only.
      '';
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
      # `device`, not `devices`: grub.nix defines `devices` from `device` at
      # normal priority, so a weak `devices` definition would be discarded.
      (lib.mkIf pkgs.stdenv.hostPlatform.isx86 {
        device = lib.mkDefault "/dev/vda";
      })
      # aarch64 images boot via EFI (qemu-efi variant, systemd-boot) or ISO.
      (lib.mkIf (!pkgs.stdenv.hostPlatform.isx86) { enable = lib.mkOverride 1400 false; })
    ];
    boot.kernelParams = [ "console=tty0" ] ++ lib.optional pkgs.stdenv.hostPlatform.isx86 "console=ttyS0,115200";

    # The disk images install a system, not a NixOS channel: no copy of
    # the nixpkgs source in the image (make-disk-image's copyChannel).
    # Same arguments as nixpkgs' virtualisation/disk-image.nix otherwise.
    image.modules = lib.genAttrs [ "qemu" "qemu-efi" ] (
      _:
      {
        config,
        lib,
        pkgs,
        modulesPath,
        ...
      }:
      let
        makeDiskImage = import (modulesPath + "/../lib/make-disk-image.nix");
        args = {
          inherit lib config pkgs;
          inherit (config.virtualisation) diskSize;
          inherit (config.image) baseName format;
          partitionTableType = if config.image.efiSupport then "efi" else "legacy";
          copyChannel = false;
        };
      in
      {
        system.build.image = lib.mkForce (
          makeDiskImage (builtins.intersectAttrs (builtins.functionArgs makeDiskImage) args)
        );
      }
    );

    # A small, appliance-like system.
    documentation.enable = lib.mkDefault false;
    nix.enable = lib.mkDefault false;
    environment.systemPackages = [
      package
      pkgs.openssl
    ];
    # No login by design: no passwords, no SSH unless sshAuthorizedKeys is
    # set. The console shows the banner below; everything else happens
    # through the config disk. NixOS refuses such a system unless told so.
    users.mutableUsers = lib.mkDefault false;
    users.allowNoPasswordLogin = cfg.sshAuthorizedKeys == [ ];
    users.users.root.openssh.authorizedKeys.keys = cfg.sshAuthorizedKeys;
    services.openssh = lib.mkIf (cfg.sshAuthorizedKeys != [ ]) {
      enable = true;
      settings.PasswordAuthentication = false;
      settings.KbdInteractiveAuthentication = false;
    };

    # The built-in configuration: the role's `settings`, checked at build time.
    environment.etc."runewarp/config.toml".source = cfg.builtinConfig;

    systemd.services.runewarp-config = bootStep "Select and validate the Runewarp appliance configuration" {
      before = [
        "${cfg.unit}.service"
        "runewarp-banner.service"
      ];
      requiredBy = [ "${cfg.unit}.service" ];
      after = [ "local-fs.target" ];
      serviceConfig.ExecStart = lib.getExe selectConfig;
    };

    systemd.services.${cfg.unit}.restartTriggers = [ config.environment.etc."runewarp/config.toml".source ];

    # The banner: agetty prints /etc/issue, then /etc/issue.d/*.issue.
    environment.etc."issue.d/runewarp.issue".source = "/run/runewarp/issue";
    systemd.services.runewarp-banner = bootStep "Show Runewarp identity material on the console login banner" {
      after = [
        "runewarp-config.service"
        "${cfg.unit}.service"
      ];
      wants = [ "${cfg.unit}.service" ];
      path = [
        package
        pkgs.coreutils
        pkgs.gnused
        pkgs.openssl
        pkgs.util-linux
      ];
      serviceConfig.StandardOutput = "journal+console";
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
          ${volatileStateWarning}
          echo
        } > /run/runewarp/issue.tmp
        mv /run/runewarp/issue.tmp /run/runewarp/issue
        cat /run/runewarp/issue
        agetty --reload || true
      '';
    };
  };
}
