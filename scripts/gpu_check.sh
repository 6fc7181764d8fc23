#!/usr/bin/env bash
# svd-batch on the GPU machine: SVD-XT at full size (random weights), measured in parts.
#
#   bash scripts/gpu_check.sh [PART ...]            on the GPU machine, from the repository root, with $OUT set
#                                                   and gpu-kit/ carried with the tree (make gpu-kit builds it)
#   bash scripts/gpu_check.sh --dry-run [PART ...]  the same steps here: CPU, tiny sizes, a fresh environment
#                                                   holding only the GPU image's packages, no network
#
# It installs gpu-kit/ offline (--no-index --no-deps) into /tmp/site, prints the versions, then runs
# scripts/bench_gpu.py's parts in order, skipping a part whose estimate no longer fits the budget. Every figure
# lands in $OUT/gpu_check.json and $OUT/summary.txt as soon as it is measured; $OUT/log.txt has the whole output.
#
# Parts (estimated seconds on one H200; 'all' runs them in this order, most important first):
#   versions ~5, fast ~330, eager ~80, attention ~70, e2e ~70, compiled ~240, levers ~420, frames ~15, memory ~60
#   plus about 30 s before the first part: kit install ~10, imports ~10, model build ~10.
#   fast: the fast path (AnimateLCM's sampler, 4 steps, no guidance; fp16, 576x1024, 25 frames): eager with the
#   per-stage timeline, svd-batch's own loop on 8 rows (MP4s and scores on: GPU idle at steady state), the UNet
#   compiled, then the loop again with it; each figure is written the moment it is measured.
# The first window:  bash scripts/gpu_check.sh all       (budget 540 s: about 9 minutes in all; the fast
#                    path's figures first, then eager, then what fits of the rest)
# A second window:   bash scripts/gpu_check.sh attention e2e compiled
# A third window:    bash scripts/gpu_check.sh levers frames memory
#
# Options: --budget-s S (default 540: seconds for the whole command, this script's set-up included),
#          --kit DIR (default gpu-kit), --dry-run, -h.

set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'; }

DRY=0 KIT=gpu-kit BUDGET=540 PARTS=()
while (($#)); do
  case "$1" in
    --dry-run) DRY=1 ;;
    --kit) KIT=$2; shift ;;
    --budget-s) BUDGET=$2; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) PARTS+=("$1") ;;
  esac
  shift
done
((${#PARTS[@]})) || PARTS=(all)
STARTED=$SECONDS

if [[ -z "${OUT:-}" ]]; then
  ((DRY)) || { echo "gpu_check.sh: set OUT to an empty folder for the results" >&2; exit 2; }
  OUT=$(mktemp -d -t gpu-check-out.XXXXXX)
fi
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1

shopt -s nullglob
WHEELS=("$KIT"/*.whl)
if ((${#WHEELS[@]} == 0)); then
  echo "gpu_check.sh: no wheels in $KIT/. Build them with 'make gpu-kit' on the development machine and carry" \
       "$KIT with the tree (the device tool's carry: [\"$KIT\"])."
  exit 2
fi

# The GPU image's own packages, for the rehearsal's fresh environment: what KINDS.md lists for the image
# (torch is the development venv's CPU build: the image's is CUDA).
DEVICE_PACKAGES=(transformers==5.17.0 accelerate==1.15.0 huggingface_hub==1.33.0 safetensors==0.8.0
                 numpy pyarrow pillow tqdm requests pyyaml fsspec filelock regex packaging)

make_device_env() {  # a fresh venv holding only the image's packages
  local venv=$1 dev_python=${DEV_PYTHON:-.venv/bin/python}
  python3 -m venv "$venv"
  # torch: the development venv's torch and its own requirements, linked (not reinstalled: 1.4 GB unpacked
  # takes minutes on two cores), so that the venv sees them and nothing else of the development venv.
  "$dev_python" - "$venv/torch-link" <<'PY'
import os, re, sys
from importlib import metadata
link, todo, seen = sys.argv[1], ["torch"], set()
os.makedirs(link)
while todo:
    name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
    if name in seen:
        continue
    seen.add(name)
    dist = metadata.distribution(name)
    top = {str(f).split("/")[0] for f in dist.files or [] if not str(f).startswith("..")}
    for entry in sorted(top):
        src = os.path.join(str(dist.locate_file("")), entry)
        if entry not in ("bin", "__pycache__") and os.path.exists(src) and not os.path.exists(os.path.join(link, entry)):
            os.symlink(src, os.path.join(link, entry))
    for req in dist.requires or []:
        if "extra ==" not in req:
            todo.append(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0])
PY
  "$venv/bin/python" -c "import site; print(site.getsitepackages()[0])" | {
    read -r sp; echo "$venv/torch-link" > "$sp/dev-torch.pth"; }
  "$venv/bin/python" -m pip install -q --no-compile "${DEVICE_PACKAGES[@]}" 2>&1 | grep -v "^WARNING: Location" || true
  "$venv/bin/python" -c "import torch, transformers, accelerate, huggingface_hub, pyarrow, PIL, tqdm, numpy, requests"
}

NONET=()
if ((DRY)); then
  WORK=$(mktemp -d -t gpu-check-dry.XXXXXX)
  echo "== dry run: CPU, tiny sizes; fresh device-like environment in $WORK/venv"
  t=$SECONDS
  make_device_env "$WORK/venv"
  echo "   environment ready in $((SECONDS - t)) s: $("$WORK/venv/bin/python" -m pip list 2>/dev/null | tail -n +3 | awk '{printf "%s ", $1}')"
  PY=$WORK/venv/bin/python SITE=$WORK/site
  # From here on, as on the device: no network. unshare needs root or user namespaces; where it is not to be
  # had, --no-index and the Hub's offline switch below keep the steps off the network all the same.
  if unshare -n true 2>/dev/null; then NONET=(unshare -n); echo "   network cut for the device steps (unshare -n)"
  else echo "   unshare -n unavailable: device steps run offline by --no-index and HF_HUB_OFFLINE only"; fi
  # max-autotune is the compiled part's code with another mode, which the CPU rehearsal's eager backend ignores.
  BENCH_ARGS=(--tiny --repeats 1 --attention auto,math,cudnn --attention-calls 1 --e2e-rows 2 --fast-e2e-rows 2
              --skip-levers max-autotune-no-cudagraphs)
else
  PY=python3 SITE=/tmp/site BENCH_ARGS=()
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
t=$SECONDS
rm -rf "$SITE"
"${NONET[@]}" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "${WHEELS[@]}"
export PYTHONPATH=$SITE
echo "== gpu-kit installed offline in $((SECONDS - t)) s: $(cd "$KIT" && ls -1 *.whl | tr '\n' ' ')"

# The kit's svd-batch is the tree's as of `make gpu-kit`: when the tree changed since, run the tree's code
# (what was meant) and say so, rather than lose the window to a rebuild.
if ! "$PY" - "$SITE/svd_batch" svd_batch <<'PY'
import filecmp, os, sys
kit, tree = sys.argv[1], sys.argv[2]
names = lambda root: {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
                      if f.endswith((".py", ".yaml"))}
differ = sorted(n for n in names(kit) | names(tree)
                if not (os.path.exists(os.path.join(kit, n)) and os.path.exists(os.path.join(tree, n))
                        and filecmp.cmp(os.path.join(kit, n), os.path.join(tree, n), shallow=False)))
if differ:
    print(f"!! gpu-kit's svd-batch wheel differs from this tree in {len(differ)} file(s) ({', '.join(differ[:5])}): "
          "running the tree's code. Rebuild the kit with `make gpu-kit` before the next window.")
sys.exit(1 if differ else 0)
PY
then
  export PYTHONPATH=$PWD:$SITE
fi

echo "== versions"
"${NONET[@]}" "$PY" - <<'PY' || true
import importlib.metadata as md, platform, torch
names = ["torch", "diffusers", "transformers", "accelerate", "huggingface_hub", "hydra-core", "omegaconf",
         "imageio-ffmpeg", "pyarrow", "numpy", "pillow", "svd-batch"]
print(f"python {platform.python_version()}; " + "; ".join(f"{n} {md.version(n)}" for n in names))
print(f"CUDA {torch.version.cuda}; cuDNN {torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}; "
      f"GPU {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
PY
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true

LEFT=$((BUDGET - (SECONDS - STARTED)))
PART_LIST=$(IFS=,; echo "${PARTS[*]}")
echo "== bench_gpu.py --parts $PART_LIST ($LEFT s of the budget left)"
set +e
"${NONET[@]}" "$PY" scripts/bench_gpu.py --parts "$PART_LIST" --out-dir "$OUT" --budget-s "$LEFT" "${BENCH_ARGS[@]}"
code=$?
set -e
echo "== done in $((SECONDS - STARTED)) s (exit $code); results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
((DRY)) && rm -rf "$WORK"
exit $code
