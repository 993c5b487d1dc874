# Helpers shared by the Runewarp role modules (Server, Client, gate). Pure functions of
# `lib` (and `pkgs` where a derivation is built); no module options here.
{ lib }:
rec {
  # Drop nulls from attribute sets and lists, recursively, so that optional
  # typed options left at `null` never reach the TOML file (TOML has no null).
  clean =
    value:
    if builtins.isAttrs value then
      lib.mapAttrs (_: clean) (lib.filterAttrs (_: v: v != null) value)
    else if builtins.isList value then
      map clean (builtins.filter (v: v != null) value)
    else
      value;

  # The port of a literal socket address: "0.0.0.0:443", "[::]:443".
  # Returns null when the text has no numeric port; the build-time
  # `runewarp config check` reports the malformed address precisely. An
  # optional address left unset (null) has no port either.
  portOf =
    address:
    let
      tail = lib.last (lib.splitString ":" address);
    in
    if address != null && builtins.match "[0-9]+" tail != null then lib.toInt tail else null;

  # A Runewarp duration ("60s", "500ms", "2m", "1h") in whole seconds,
  # rounded up; null when it does not parse (again, config check explains).
  durationSeconds =
    text:
    let
      m = builtins.match "([0-9]+)(ms|s|m|h)" text;
      n = lib.toInt (builtins.elemAt m 0);
      unit = builtins.elemAt m 1;
    in
    if m == null then
      null
    else if unit == "ms" then
      (n + 999) / 1000
    else if unit == "s" then
      n
    else if unit == "m" then
      n * 60
    else
      n * 3600;

  # Absolute, and not a Nix store path: secrets handed to LoadCredential must
  # stay outside the world-readable store.
  credentialPath = lib.types.addCheck lib.types.str (
    p: lib.hasPrefix "/" p && !lib.hasPrefix "${builtins.storeDir}/" p
  ) // {
    name = "credentialPath";
    description = "absolute path outside the Nix store (a string, not a Nix path value)";
  };

  # A credential ID as systemd accepts it (a plain file name).
  credentialName = lib.types.strMatching "[A-Za-z0-9_.-]+";

  # Where systemd puts a unit's `LoadCredential=` files at run time.
  credentialsDirectoryOf = unit: "/run/credentials/${unit}.service";

  # The configuration file a role instance runs with: its runtime
  # `configFile` when set, else the one generated from `settings`.
  configPathOf = cfg: if cfg.configFile != null then cfg.configFile else cfg.generatedConfigFile;

  # A table of `settings` (a `[section]` of the TOML file): the typed
  # `options`, anything else passed through as `freeformType` (TOML).
  tomlTable =
    freeformType: options:
    lib.types.submodule {
      inherit freeformType options;
    };

  # An option that is unset (null) by default, null meaning "not set": a
  # null setting is left out of the generated TOML file (see `clean`), so
  # the program's own default applies, and a null module option adds
  # nothing of its own (no flag, no credential, no runtime file). Set, it
  # takes a value of `type`; `attrs` is the rest of the declaration.
  nullableOption =
    type: attrs:
    lib.mkOption (
      {
        type = lib.types.nullOr type;
        default = null;
      }
      // attrs
    );

  # `openFirewall`: off by default; `description` names the ports it opens.
  openFirewallOption =
    description:
    lib.mkOption {
      type = lib.types.bool;
      default = false;
      inherit description;
    };

  # The TOML file for `settings`, checked at build time with
  # `runewarp config check --role <role>` so that invalid settings fail the
  # build (the error names the key and value). `check = false` skips the
  # check, e.g. when cross-compiling.
  configFile =
    {
      pkgs,
      package,
      role,
      name,
      settings,
      check,
    }:
    let
      unchecked = (pkgs.formats.toml { }).generate "${name}-unchecked.toml" (clean settings);
    in
    if !check then
      unchecked
    else
      pkgs.runCommand "${name}.toml"
        {
          nativeBuildInputs = [ package ];
          preferLocalBuild = true;
        }
        ''
          # The modules set every path explicitly; HOME only keeps the check
          # from consulting the builder's (non-existent) home directory.
          export HOME="$TMPDIR"
          if ! runewarp config check --role ${role} -c ${unchecked} > effective.toml 2> error.txt; then
            echo "runewarp: the generated ${role} configuration (${name}) is invalid:" >&2
            cat error.txt >&2
            exit 1
          fi
          cp ${unchecked} "$out"
        '';

  # Sandboxing shared by every Runewarp unit. Capabilities and PrivateUsers
  # follow roleUnit's `lowPorts`; the state directory is set per unit.
  hardening = {
    DynamicUser = true;
    UMask = "0077";
    NoNewPrivileges = true;
    ProtectSystem = "strict";
    ProtectHome = true;
    PrivateTmp = true;
    PrivateDevices = true;
    DevicePolicy = "closed";
    ProtectKernelTunables = true;
    ProtectKernelModules = true;
    ProtectKernelLogs = true;
    ProtectControlGroups = true;
    ProtectClock = true;
    ProtectHostname = true;
    ProtectProc = "invisible";
    ProcSubset = "pid";
    RestrictNamespaces = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    LockPersonality = true;
    MemoryDenyWriteExecute = true;
    RemoveIPC = true;
    SystemCallArchitectures = "native";
    RestrictAddressFamilies = [
      "AF_INET"
      "AF_INET6"
      "AF_UNIX"
      "AF_NETLINK"
    ];
    SystemCallFilter = [
      "@system-service"
      "~@privileged"
      "~@resources"
    ];
    # A filtered call fails with EPERM instead of killing the process
    # (e.g. SO_RCVBUFFORCE attempts are expected to fail and fall back).
    SystemCallErrorNumber = "EPERM";
    # Many concurrent Visitor connections.
    LimitNOFILE = 65536;
  };

  # Restart on failure with exponential backoff: 1 s growing to 2 min over
  # ten steps (systemd >= 254). Exit status 2 is an invalid configuration
  # (or usage): restarting cannot fix it, so the unit stays failed with the
  # error in its journal. TimeoutStartSec covers ExecStartPre (material
  # creation) and the time until READY=1, which both roles send within
  # seconds of starting (the Client while it is still dialling).
  restartPolicy = {
    Restart = "on-failure";
    RestartSec = "1s";
    RestartSteps = 10;
    RestartMaxDelaySec = "2min";
    RestartPreventExitStatus = 2;
    TimeoutStartSec = "90s";
  };

  # A role's systemd unit: started at boot once the network is online,
  # `runewarp <role> --config <configPath>` with the hardening, the restart
  # policy, the notify start, the prepare step, reload by SIGHUP, and a
  # private state and runtime (control socket) directory named after the
  # unit (`runewarp-<role>` unless given). The paths a runtime configFile
  # omits default under the state directory. `lowPorts`: the role binds a
  # port below 1024, so the unit gets exactly that capability and no user
  # namespace; otherwise none at all. `serviceConfig` adds the role's own
  # settings (the stop timeout).
  # `cfg` is the instance's options (`roleOptions`): its package, extra
  # arguments, credentials and configuration file, unless given here.
  roleUnit =
    {
      pkgs,
      utils,
      role,
      unit ? "runewarp-${role}",
      description,
      # Units to start after besides `network-online.target`.
      alsoAfter ? [ ],
      cfg,
      package ? cfg.package,
      prepare ? null,
      configPath ? configPathOf cfg,
      # The arguments after the program; `<role> --config <configPath>` by
      # default (the node takes flags instead of a file).
      command ? [
        role
        "--config"
        configPath
      ],
      extraArgs ? cfg.extraArgs,
      credentials ? cfg.credentials,
      lowPorts ? false,
      serviceConfig,
    }:
    let
      stateDir = "/var/lib/${unit}";
    in
    {
      inherit description;
      after = [ "network-online.target" ] ++ alsoAfter;
      documentation = [ "man:runewarp(1)" ];
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      environment = {
        HOME = stateDir;
        XDG_DATA_HOME = stateDir;
        XDG_STATE_HOME = stateDir;
      };
      serviceConfig =
        hardening
        // restartPolicy
        // {
          Type = "notify";
          NotifyAccess = "main";
          ExecStartPre = lib.optionals (prepare != null) (execPrepare prepare configPath utils);
          ExecStart = utils.escapeSystemdExecArgs ([ (lib.getExe package) ] ++ command ++ extraArgs);
          # `systemctl reload`: the role re-reads its configuration file; an
          # invalid file changes nothing and is logged.
          ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
          KillSignal = "SIGTERM";
          StateDirectory = unit;
          StateDirectoryMode = "0700";
          # Holds the control socket.
          RuntimeDirectory = unit;
          RuntimeDirectoryMode = "0700";
          LoadCredential = lib.mapAttrsToList (name: path: "${name}:${path}") credentials;
          # Binding ports below 1024 needs exactly this capability; nothing
          # else is ever granted. A user namespace would hide the capability
          # from the host's network namespace.
          AmbientCapabilities = lib.optionals lowPorts [ "CAP_NET_BIND_SERVICE" ];
          CapabilityBoundingSet = if lowPorts then "CAP_NET_BIND_SERVICE" else "";
          PrivateUsers = !lowPorts;
        }
        // serviceConfig;
    };

  # Options whose declaration is the same for every role, apart from the
  # values given here: `package` (defaulting to the system's
  # `services.runewarp.package`, from `config`; described as the package
  # "for" `packageFor`), `settings` (`log-level` plus the `[section]` table
  # of `sectionType`, other keys passed through as TOML), `configFile`,
  # `generatedConfigFile` (the TOML file for the instance's own
  # `cfg.settings`, named after its `unit`), `checkConfig`, `credentials`,
  # `credentialsDirectory` (the unit's) and `extraArgs`.
  roleOptions =
    {
      config,
      pkgs,
      cfg,
      role,
      unit ? "runewarp-${role}",
      packageFor,
      sectionType,
      settingsDescription,
      settingsExample ? null,
      credentialsExample,
      credentialsDescription,
    }:
    {
      package = lib.mkOption {
        type = lib.types.package;
        default = config.services.runewarp.package;
        defaultText = lib.literalExpression "config.services.runewarp.package";
        description = "The Runewarp package for ${packageFor}.";
      };
      settings =
        lib.mkOption {
          type = settingsType {
            inherit sectionType;
            freeformType = (pkgs.formats.toml { }).type;
            section = role;
          };
          description = settingsDescription;
        }
        // lib.optionalAttrs (settingsExample != null) { example = settingsExample; };
      configFile = nullableOption lib.types.str {
        example = "/run/runewarp/config.toml";
        description = ''
          Use this file at run time instead of the file generated from
          `settings`. It is validated on every start, not at build time.
          Firewall ports and capabilities are still derived from `settings`.
        '';
      };
      generatedConfigFile = lib.mkOption {
        type = lib.types.path;
        readOnly = true;
        default = configFile {
          inherit pkgs role;
          inherit (cfg) package settings;
          name = unit;
          check = cfg.checkConfig;
        };
        defaultText = lib.literalExpression "the TOML file generated from settings";
        description = "The configuration file generated from `settings` (validated at build time when `checkConfig` is on).";
      };
      checkConfig = lib.mkOption {
        type = lib.types.bool;
        default = pkgs.stdenv.buildPlatform.canExecute pkgs.stdenv.hostPlatform;
        defaultText = lib.literalExpression "pkgs.stdenv.buildPlatform.canExecute pkgs.stdenv.hostPlatform";
        description = "Validate the generated configuration at build time with `runewarp config check`.";
      };
      credentials = lib.mkOption {
        type = lib.types.attrsOf credentialPath;
        default = { };
        example = credentialsExample;
        description = credentialsDescription;
      };
      credentialsDirectory = lib.mkOption {
        type = lib.types.str;
        readOnly = true;
        default = credentialsDirectoryOf unit;
        description = "Where `credentials` appear at run time.";
      };
      extraArgs = lib.mkOption {
        type = lib.types.listOf lib.types.str;
        default = [ ];
        description = "Extra arguments for `runewarp ${role}`.";
      };
    };

  # The type of a role's `settings`: `log-level` plus the role's section
  # (`section`, of type `sectionType`), anything else passed through as TOML.
  settingsType =
    {
      freeformType,
      section,
      sectionType,
    }:
    lib.types.submodule {
      inherit freeformType;
      options = {
        log-level = lib.mkOption {
          type = lib.types.enum [
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
        ${section} = lib.mkOption {
          type = sectionType;
          description = "The `[${section}]` section.";
        };
      };
    };

  # ExecStartPre running `prepare` on `configPath`, escaped for systemd.
  execPrepare = prepare: configPath: utils: [
    (utils.escapeSystemdExecArgs [
      (lib.getExe prepare)
      configPath
    ])
  ];

  # The prepare scripts' reaction to an invalid configuration: say so and
  # leave the rest to the main process, which reports the error and exits 2
  # (RestartPreventExitStatus). A failing ExecStartPre would make systemd
  # restart the unit forever, whatever its exit status.
  invalidConfigDefer = unit: ''
    echo "${unit}: $config is not a valid configuration (see the error above); not preparing material" >&2
    exit 0
  '';

  # A role's prepare step (roleUnit's `prepare`): checks the configuration
  # file it is given with `runewarp config check --role <role>` (deferring
  # when it is invalid, see invalidConfigDefer), then runs `text` with the
  # effective configuration in `$effective`. `runtimeInputs` come after the
  # package, coreutils and sed.
  prepareScript =
    {
      pkgs,
      unit,
      role,
      package,
      runtimeInputs,
      text,
    }:
    pkgs.writeShellApplication {
      name = "${unit}-prepare";
      runtimeInputs = [
        package
        pkgs.coreutils
        pkgs.gnused
      ]
      ++ runtimeInputs;
      text = ''
        config="$1"
        if ! effective="$(runewarp config check --role ${role} -c "$config")"; then
          ${invalidConfigDefer unit}
        fi
      ''
      + text;
    };

  # Assertions that the material paths a module writes are absolute (a
  # relative path would resolve against the config file's directory, which is
  # in the read-only Nix store).
  absolutePathAssertions =
    prefix: paths:
    lib.mapAttrsToList (key: value: {
      assertion = value == null || lib.hasPrefix "/" value;
      message = "${prefix}.${key} must be an absolute path (got \"${toString value}\"); relative paths would resolve inside the Nix store.";
    }) paths;

  # The `[server.acme]` / `[client.acme]` table: typed keys for the
  # documented settings, anything else passed through as TOML. `stateDir`
  # is the unit's StateDirectory, under which the ACME cache lives.
  acmeType =
    { freeformType, stateDir }:
    tomlTable freeformType {
      email = nullableOption lib.types.str {
        description = "ACME account contact address.";
      };
      state-dir = lib.mkOption {
        type = lib.types.str;
        default = "${stateDir}/acme";
        description = "ACME account and certificate cache (kept under the unit's StateDirectory).";
      };
      directory-url = nullableOption lib.types.str {
        example = "https://acme-staging-v02.api.letsencrypt.org/directory";
        description = "ACME directory; Let's Encrypt production when null.";
      };
      directory-ca-file = nullableOption lib.types.str {
        description = "Extra trust root for the ACME directory's HTTPS (private ACME CAs, Pebble).";
      };
    };

  # Runegate's allow-lists, typed the same in `[gate]` and
  # `[client.services.gate]`.
  gateAllowOptions = {
    allowed-emails = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      example = [ "alice@example.com" ];
      description = "Addresses that may sign in.";
    };
    allowed-domains = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      example = [ "example.com" ];
      description = "Every address at these domains may sign in.";
    };
  };

  # `smtpPasswordFile`: the SMTP password file for the `[<section>.smtp]`
  # table, handed to the unit as the `smtp-password` credential.
  smtpPasswordOption =
    section:
    lib.mkOption {
      type = lib.types.nullOr credentialPath;
      default = null;
      example = "/run/secrets/smtp-password";
      description = ''
        The SMTP password for `settings.${section}.smtp` (a file outside the
        Nix store), handed to the unit with systemd `LoadCredential=` as
        `smtp-password`; `smtp.password-file` points there by default.
      '';
    };

  # `[client.smtp]` / `[gate.smtp]`: the mail relay for Runegate's sign-in
  # mails. `passwordFile` is the default `password-file` (the unit's
  # LoadCredential copy of the SMTP password, or null without one).
  smtpType =
    { freeformType, passwordFile }:
    tomlTable freeformType {
      host = lib.mkOption {
        type = lib.types.str;
        example = "smtp.example.com";
        description = "The mail server (DNS name or IP literal).";
      };
      port = nullableOption lib.types.str {
        example = "587";
        description = "Port, as a string; by default 587, 465 or 25 after `tls`.";
      };
      tls = lib.mkOption {
        type = lib.types.enum [
          "starttls"
          "implicit"
          "none"
        ];
        default = "starttls";
        description = "`starttls` (required), `implicit` (SMTPS), or `none` (only for a loopback host).";
      };
      username = nullableOption lib.types.str {
        description = "SMTP user; needs `password-file`.";
      };
      password-file = lib.mkOption {
        type = lib.types.nullOr lib.types.str;
        default = passwordFile;
        defaultText = lib.literalExpression "the smtp-password credential when smtpPasswordFile is set, else null";
        description = "File holding the SMTP password (never the password itself).";
      };
      from = lib.mkOption {
        type = lib.types.str;
        example = "Sign-in <signin@example.com>";
        description = "Sender of the sign-in mails.";
      };
    };
}
