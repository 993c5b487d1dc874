# Options shared by the Server and Client modules. Imported by both; the
# module system deduplicates it by path.
{ lib, pkgs, ... }:
{
  options.services.runewarp.package = lib.mkOption {
    type = lib.types.package;
    default =
      pkgs.runewarp or (throw ''
        services.runewarp.package is not set and pkgs has no `runewarp`.
        Import the modules through the Runewarp flake (nixosModules.*), apply
        its overlay (overlays.default), or set services.runewarp.package.
      '');
    defaultText = lib.literalExpression "runewarp from the Runewarp flake (or pkgs.runewarp)";
    description = ''
      The Runewarp package used by the Server and by every Client instance
      unless an instance sets its own `package`.
    '';
  };
}
