#!/usr/bin/env bash
# make gpu-kit: every wheel the GPU machine's image lacks (scripts/gpu-kit.txt, pinned) and svd-batch's own, in
# one folder (default gpu-kit/, git-ignored) that travels with the tree: at most 60 MiB. Built in a temporary
# folder and renamed into place, so a kit that exists is complete. Needs the package registry (here, not there).
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=${1:-gpu-kit}
PYTHON=${PYTHON:-python3}
LIMIT_MIB=60
# The image's python: CPython 3.12 on x86-64 Linux.
PLATFORM=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

tmp=$(mktemp -d "${KIT%/}.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
quiet() { "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; return "${PIPESTATUS[0]}"; }

while read -r spec tag; do
  case "$spec" in ''|'#'*) continue ;; esac
  if [[ "$tag" == "# build" ]]; then  # a source archive only: build the (pure-Python) wheel here
    quiet "$PYTHON" -m pip wheel -q --no-deps -w "$tmp" "$spec"
  else
    quiet "$PYTHON" -m pip download -q --no-deps --only-binary=:all: "${PLATFORM[@]}" -d "$tmp" "$spec"
  fi
done < scripts/gpu-kit.txt
quiet "$PYTHON" -m pip wheel -q --no-deps -w "$tmp" .   # svd-batch itself, from this tree

# One wheel per pinned name, each for any Python 3 or CPython 3.12, and the size limit.
"$PYTHON" - "$tmp" "$LIMIT_MIB" <<'PY'
import os, re, sys
kit, limit = sys.argv[1], float(sys.argv[2])
pins = [l.split("#")[0].strip() for l in open("scripts/gpu-kit.txt") if l.split("#")[0].strip()]
norm = lambda s: re.sub(r"[-_.]+", "_", s).lower()
wheels = sorted(f for f in os.listdir(kit) if f.endswith(".whl"))
have = {norm(w.split("-")[0]): w.split("-")[1] for w in wheels}
problems = [f"{p}: got {have.get(norm(p.split('==')[0]))}" for p in pins
            if have.get(norm(p.split("==")[0])) != p.split("==")[1]]
problems += [f"{w}: not for CPython 3.12" for w in wheels if not re.search(r"-(py3|cp312)-(none|abi3|cp312)-", w)]
if len(wheels) != len(pins) + 1 or "svd_batch" not in have:
    problems.append(f"expected {len(pins)} pinned wheels and svd-batch's, got {wheels}")
size = sum(os.path.getsize(os.path.join(kit, w)) for w in wheels) / 2**20
if size > limit:
    problems.append(f"{size:.1f} MiB in all, over the {limit:.0f} MiB that may travel")
if problems:
    sys.exit("make gpu-kit: " + "; ".join(problems))
for w in wheels:
    print(f"  {os.path.getsize(os.path.join(kit, w)) / 2**20:7.2f} MiB  {w}")
print(f"  {size:7.2f} MiB in all (at most {limit:.0f})")
PY
(cd "$tmp" && sha256sum ./*.whl > SHA256SUMS)
rm -rf "$KIT"
mv "$tmp" "$KIT"
trap - EXIT
echo "gpu-kit ready: $KIT/ (carry it with the tree: bash scripts/gpu_check.sh on the GPU machine installs it)"
