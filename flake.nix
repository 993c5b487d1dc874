{
  description = "Runewarp: self-hosted ingress tunnel (TLS passthrough over one mutually authenticated QUIC connection)";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.11";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      cargoToml = lib.importTOML ./Cargo.toml;

      # Only what cargo needs: editing docs, Nix files or example configs
      # does not rebuild the package.
      src = lib.fileset.toSource {
        root = ./.;
        fileset = lib.fileset.unions [
          ./Cargo.toml
          ./Cargo.lock
          ./src
          ./tests
          (lib.fileset.maybeMissing ./benches)
          # The metrics tests check the Grafana dashboard against the metrics.
          (lib.fileset.maybeMissing ./contrib)
        ];
      };

      commonArgs = {
        inherit (cargoToml.package) version;
        inherit src;
        cargoLock.lockFile = ./Cargo.lock;
      };

      packageFor =
        pkgs:
        pkgs.callPackage (
          {
            lib,
            stdenv,
            rustPlatform,
            installShellFiles,
          }:
          rustPlatform.buildRustPackage (
            commonArgs
            // {
              pname = "runewarp";
              nativeBuildInputs = [ installShellFiles ];

              # `cargo test` here runs in the build sandbox: no root, no
              # network namespaces, no pebble/curl/python3, only `src`
              # above. Tests that need those are opt-in
              # (RUNEWARP_TEST_NETNS, RUNEWARP_TEST_EXTERNAL: unset here)
              # and skip; .ci/check_phase reproduces this run. The rest
              # use loopback only. The material CLI tests write under HOME.
              preCheck = ''
                export HOME="$TMPDIR"
              '';

              postInstall = lib.optionalString (stdenv.buildPlatform.canExecute stdenv.hostPlatform) ''
                installShellCompletion --cmd runewarp \
                  --bash <("$out/bin/runewarp" completions bash) \
                  --fish <("$out/bin/runewarp" completions fish) \
                  --zsh <("$out/bin/runewarp" completions zsh)
                # runewarp(1) and one page per subcommand.
                "$out/bin/runewarp" man --out-dir man
                installManPage man/*.1
              '';

              meta = {
                description = cargoToml.package.description;
                homepage = "https://github.com/runewarp/runewarp";
                license = lib.licenses.asl20;
                mainProgram = "runewarp";
                platforms = lib.platforms.linux;
              };
            }
          )
        ) { };

      # `cargo fmt --check` and `cargo clippy -D warnings` over every target,
      # offline against the vendored Cargo.lock dependencies.
      lintFor =
        pkgs:
        pkgs.rustPlatform.buildRustPackage (
          commonArgs
          // {
            pname = "runewarp-lint";
            nativeBuildInputs = [
              pkgs.clippy
              pkgs.rustfmt
            ];
            doCheck = false;
            buildPhase = ''
              runHook preBuild
              cargo fmt --all --check
              cargo clippy --locked --offline --all-targets -- -D warnings
              runHook postBuild
            '';
            installPhase = ''
              touch "$out"
            '';
          }
        );

      # The appliances, per system and role.
      applianceFor =
        system: role:
        lib.nixosSystem {
          modules = [
            self.nixosModules.default
            ./nixos-modules/appliance/${role}.nix
            { nixpkgs.hostPlatform = system; }
          ];
        };

      applianceName = system: role: "${role}-appliance" + lib.optionalString (system != "x86_64-linux") "-${lib.head (lib.splitString "-" system)}";

      # Package the module for one host: the default package comes from this
      # flake, built with the host's nixpkgs.
      withPackage =
        module:
        { pkgs, ... }:
        {
          _file = "${toString ./flake.nix}#nixosModules";
          imports = [ module ];
          services.runewarp.package = lib.mkDefault (packageFor pkgs);
        };
    in
    {
      overlays.default = final: _prev: { runewarp = packageFor final; };

      nixosModules = {
        server = withPackage ./nixos-modules/server.nix;
        client = withPackage ./nixos-modules/client.nix;
        gate = withPackage ./nixos-modules/gate.nix;
        control = withPackage ./nixos-modules/control.nix;
        node = withPackage ./nixos-modules/node.nix;
        default = withPackage ./nixos-modules/default.nix;
      };

      packages = forAllSystems (
        pkgs:
        let
          system = pkgs.stdenv.hostPlatform.system;
          images =
            role:
            let
              inherit (self.nixosConfigurations.${applianceName system role}.config.system.build) images;
            in
            {
              # Legacy BIOS boot on x86_64; EFI (systemd-boot) on aarch64.
              "${role}-image-qcow2" = if pkgs.stdenv.hostPlatform.isx86 then images.qemu else images.qemu-efi;
              "${role}-image-iso" = images.iso;
            };
        in
        rec {
          runewarp = packageFor pkgs;
          default = runewarp;
        }
        // images "server"
        // images "client"
      );

      nixosConfigurations = lib.listToAttrs (
        lib.concatMap (
          system:
          map (role: lib.nameValuePair (applianceName system role) (applianceFor system role)) [
            "server"
            "client"
          ]
        ) systems
      );

      checks = forAllSystems (
        pkgs:
        let
          system = pkgs.stdenv.hostPlatform.system;
          package = self.packages.${system}.runewarp;
        in
        {
          inherit package;
          lint = lintFor pkgs;
          server-appliance = self.nixosConfigurations.${applianceName system "server"}.config.system.build.toplevel;
          client-appliance = self.nixosConfigurations.${applianceName system "client"}.config.system.build.toplevel;
        }
        // import ./vm-tests {
          inherit pkgs package;
          runewarpModule = ./nixos-modules/default.nix;
        }
      );

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          inputsFrom = [ self.packages.${pkgs.stdenv.hostPlatform.system}.runewarp ];
          packages = [
            pkgs.cargo
            pkgs.rustc
            pkgs.clippy
            pkgs.rustfmt
            pkgs.rust-analyzer
            pkgs.nixfmt-tree
            pkgs.openssl
            pkgs.curl
          ];
        };
      });

      formatter = forAllSystems (pkgs: pkgs.nixfmt-tree);
    };
}
