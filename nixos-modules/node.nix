# services.runewarp.node: a mesh device agent (`runewarp node up`), one unit:
# runewarp-node.service. It enrols once with a setup key (a file handed in
# with LoadCredential, never in the Nix store), keeps the device's
# WireGuard key in its state directory (0600, never sent) and follows the
# network map the control server streams. With `tun` set (the default) it
# also runs the data plane: userspace WireGuard on a TUN device, which needs
# CAP_NET_ADMIN and /dev/net/tun and nothing else. See docs/control.md.
{ config, lib, pkgs, utils, ... }:
let
  inherit (lib) mkOption mkIf types;
  rw = import ./lib.nix { inherit lib; };
  cfg = config.services.runewarp.node;
  unit = "runewarp-node";
  stateDir = "/var/lib/${unit}";
  credentialsDirectory = rw.credentialsDirectoryOf unit;
in
{
  imports = [ ./common.nix ];

  options.services.runewarp.node = {
    enable = lib.mkEnableOption "the Runewarp mesh device agent (runewarp node up)";

    package = mkOption {
      type = types.package;
      default = config.services.runewarp.package;
      defaultText = lib.literalExpression "config.services.runewarp.package";
      description = "The Runewarp package for the node.";
    };

    controlUrl = mkOption {
      type = types.strMatching "https://[^/]+";
      example = "https://control.example.com:7443";
      description = "The control server (an `https://host[:port]` origin).";
    };

    setupKeyFile = rw.nullableOption rw.credentialPath {
      example = "/run/secrets/runewarp-setup-key";
      description = ''
        The setup key for the first enrolment (a file outside the Nix store),
        handed to the unit with systemd `LoadCredential=`. Once enrolled the
        node keeps its enrolment in its state directory and no longer needs
        the key.
      '';
    };

    caFile = rw.nullableOption types.str {
      example = "/etc/runewarp/control-ca.crt";
      description = "The CA certificate the control server's certificate chains to (its `tls/server-ca.crt`); the system roots when null.";
    };

    hostname = rw.nullableOption types.str {
      description = "This device's name in the network; the host name when null.";
    };

    tun = mkOption {
      type = types.nullOr (types.strMatching "[A-Za-z0-9_.-]{1,15}");
      default = "rw0";
      description = ''
        The TUN interface the data plane creates (userspace WireGuard; the
        kernel module is not needed). The unit then holds CAP_NET_ADMIN and
        may open /dev/net/tun. Null: follow the network map only, no traffic.
      '';
    };

    listenPort = mkOption {
      type = types.port;
      default = 41641;
      description = "The UDP port of the data plane's one socket (WireGuard, path probes, STUN).";
    };

    openFirewall = rw.openFirewallOption "Open `listenPort` (UDP) in the firewall, for direct paths from peers that can reach this host.";

    endpoints = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "203.0.113.7:41641" ];
      description = ''
        Public `IP:PORT` addresses this node is known to be reachable at (a
        port forward to `listenPort`), offered to peers ahead of the host's
        own addresses (`--endpoint`).
      '';
    };

    advertiseRoutes = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "10.0.5.0/24" ];
      description = ''
        Make this node a Subnet Connector for these subnets
        (`--advertise-routes`; an admin or the policy's `routes` section
        approves them). The module turns on IP forwarding (the sysctls) and
        puts nftables on the unit's PATH; the node adds and removes its own
        masquerade table.
      '';
    };

    extraArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      description = "Extra arguments for `runewarp node up`.";
    };
  };

  config = mkIf cfg.enable {
    environment.systemPackages = [ cfg.package ];

    systemd.services.${unit} =
      rw.roleUnit {
        inherit pkgs utils cfg;
        role = "node";
        description = "Runewarp mesh device agent";
        alsoAfter = [ "nss-lookup.target" ];
        configPath = null;
        command =
          [
            "node"
            "up"
            "--control"
            cfg.controlUrl
            "--state-dir"
            stateDir
          ]
          ++ lib.optionals (cfg.setupKeyFile != null) [
            "--setup-key-file"
            "${credentialsDirectory}/setup-key"
          ]
          ++ lib.optionals (cfg.caFile != null) [
            "--ca-file"
            cfg.caFile
          ]
          ++ lib.optionals (cfg.hostname != null) [
            "--hostname"
            cfg.hostname
          ]
          ++ lib.optionals (cfg.tun != null) [
            "--tun"
            cfg.tun
            "--listen-port"
            (toString cfg.listenPort)
          ]
          ++ lib.concatMap (e: [
            "--endpoint"
            e
          ]) cfg.endpoints
          ++ lib.optionals (cfg.advertiseRoutes != [ ]) [
            "--advertise-routes"
            (lib.concatStringsSep "," cfg.advertiseRoutes)
          ];
        credentials = lib.optionalAttrs (cfg.setupKeyFile != null) { setup-key = cfg.setupKeyFile; };
        serviceConfig =
          {
            TimeoutStopSec = 20;
          }
          // lib.optionalAttrs (cfg.tun != null) {
            # The TUN device, its addresses and routes: CAP_NET_ADMIN in the
            # host's network namespace (so no private user namespace), and
            # /dev/net/tun alone of the devices.
            AmbientCapabilities = [ "CAP_NET_ADMIN" ];
            CapabilityBoundingSet = "CAP_NET_ADMIN";
            PrivateUsers = false;
            PrivateDevices = false;
            DeviceAllow = [ "/dev/net/tun rw" ];
          };
      }
      // {
        # The Subnet Connector loads its masquerade table with `nft`.
        path = lib.optionals (cfg.advertiseRoutes != [ ]) [ pkgs.nftables ];
      };

    assertions = [
      {
        assertion = (cfg.endpoints != [ ] || cfg.advertiseRoutes != [ ]) -> cfg.tun != null;
        message = "services.runewarp.node: endpoints and advertiseRoutes need the data plane (tun must not be null).";
      }
    ];

    # A Subnet Connector forwards between the TUN device and the subnet.
    # Set here, the node finds forwarding on and never writes /proc/sys
    # (which the unit's ProtectKernelTunables keeps read-only).
    boot.kernel.sysctl = lib.mkIf (cfg.advertiseRoutes != [ ]) (
      {
        "net.ipv4.conf.all.forwarding" = lib.mkDefault true;
      }
      // lib.optionalAttrs (lib.any (r: lib.hasInfix ":" r) cfg.advertiseRoutes) {
        "net.ipv6.conf.all.forwarding" = lib.mkDefault true;
      }
    );

    networking.firewall.allowedUDPPorts = lib.optionals (cfg.openFirewall && cfg.tun != null) [ cfg.listenPort ];
  };
}
