# The Runewarp NixOS VM tests, one attribute per scenario (all wired into the
# flake's `checks`). Arguments: nixpkgs `pkgs`, the NixOS module providing
# services.runewarp.*, and the package under test.
{
  pkgs,
  runewarpModule,
  package,
}:
let
  inherit (pkgs) lib;
  common = import ./common.nix {
    inherit
      pkgs
      lib
      runewarpModule
      package
      ;
  };
  test = file: import file { inherit pkgs lib common; };
in
{
  vm-passthrough = test ./passthrough.nix;
  vm-terminate-client-acme = test ./terminate-client-acme.nix;
  vm-server-acme = test ./server-acme.nix;
  vm-connection-replacement = test ./connection-replacement.nix;
  vm-shutdown = test ./shutdown.nix;
  vm-gate = test ./gate.nix;
}
