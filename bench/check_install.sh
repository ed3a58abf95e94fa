#!/usr/bin/env bash
# Does installing dlm-align keep the torch an environment already has?
#
# In a throwaway virtual environment (no system site packages) this installs one torch build alone, then asks
# pip's resolver what `pip install -e .` would do, without constraints and without installing anything
# (`--dry-run --report`). It fails when the report would replace or reinstall torch, and prints what would be
# installed and which of the environment's packages would change. Run it with `make check-install`; it reads the
# package index (no other network), and the test suite does not call it.
#
#   TORCH        the torch to start from (default torch==2.13.0)
#   TORCH_FLAGS  extra flags for that install, e.g. --no-deps to start from a CUDA build without its CUDA
#                libraries (the report then lists them, since torch needs them; torch itself must stay)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-torch==2.13.0}
TORCH_FLAGS=${TORCH_FLAGS:-}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PYTHON" -m venv "$tmp/venv"
# shellcheck disable=SC2086  # TORCH_FLAGS holds several flags
"$tmp/venv/bin/python" -m pip install -q $TORCH_FLAGS "$TORCH"
"$tmp/venv/bin/python" -m pip list --format=json > "$tmp/before.json"
"$tmp/venv/bin/python" -m pip install -q --dry-run --report "$tmp/report.json" -e .
"$tmp/venv/bin/python" - "$tmp/before.json" "$tmp/report.json" "$TORCH" <<'EOF'
import json
import sys

before = {p["name"].lower().replace("_", "-"): p["version"] for p in json.load(open(sys.argv[1]))}
report = json.load(open(sys.argv[2]))
install = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"] for i in report["install"]}
project = install.pop("dlm-align", None)
print(f"environment: torch {before['torch']} ({sys.argv[3]}), {len(before)} packages")
print(f"pip install -e . would install dlm-align {project} and {len(install)} other packages:")
print("  " + " ".join(f"{name}=={version}" for name, version in sorted(install.items())))
changed = {name: (before[name], version) for name, version in install.items() if name in before}
if changed:
    print("it would replace: " + ", ".join(f"{n} {old} -> {new}" for n, (old, new) in sorted(changed.items())))
if "torch" in changed:
    sys.exit(f"FAIL: torch {before['torch']} would be replaced by torch {install['torch']}")
print(f"ok: torch {before['torch']} is kept")
EOF
