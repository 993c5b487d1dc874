"""Fail if any package in `cargo metadata` declares a rust-version newer
than the root package's (nixpkgs stable must be able to build us)."""
import json
import sys

meta = json.load(sys.stdin)
root_id = meta["resolve"]["root"]
root = next(p for p in meta["packages"] if p["id"] == root_id)
floor = tuple(int(x) for x in root["rust_version"].split(".")[:2])
bad = []
for p in meta["packages"]:
    rv = p.get("rust_version")
    if rv and tuple(int(x) for x in rv.split(".")[:2]) > floor:
        bad.append(f'{p["name"]} {p["version"]} needs Rust {rv}')
if bad:
    print("dependencies newer than rust-version " + root["rust_version"] + ":", *bad, sep="\n  ")
    sys.exit(1)
print(f"ok: {len(meta['packages'])} packages, all within Rust {root['rust_version']}")
