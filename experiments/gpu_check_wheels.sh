#!/usr/bin/env bash
# Prepare the wheel folder experiments/gpu_check.py installs from on a GPU host that cannot reach PyPI.
#
#   experiments/gpu_check_wheels.sh                 # -> .whl/ (gitignored), for CPython 3.12 on x86_64 Linux
#   PYTHON_VERSIONS="3.11 3.12 3.13" DEST=/tmp/w experiments/gpu_check_wheels.sh
#
# What goes in: every pin of pyproject.toml (dependencies and the `test` extra) that the lent GPU machines lack
# or may hold at another version, with the dependencies pip resolves for them, as binary wheels for the target
# Python(s). Left out on purpose: jax, jaxlib and numpy (the host's jax with its CUDA 13 plugin, and the numpy it
# was installed with, are what gets tested; see NEVER_INSTALL in gpu_check.py), the packages those machines
# already have at the pinned versions (flax, optax, orbax-checkpoint, chex; `pip show` on the host decides at
# run time), and what the check does not use (matplotlib: plots; nbmake, ipykernel: notebooks; OPTIONAL there).
# The folder must fit what travels with a device run (64 MiB in all): the script prints its size.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-.whl}
PYTHON_VERSIONS=${PYTHON_VERSIONS:-3.12}
PLATFORM=${PLATFORM:-manylinux2014_x86_64}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

# name==version of the pins to fetch, read from pyproject.toml (one source of truth).
mapfile -t REQS < <("$PY" - <<'EOF'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
skip = {"jax", "jaxlib", "numpy", "flax", "optax", "orbax-checkpoint", "chex", "matplotlib", "nbmake", "ipykernel"}
for req in [*project["dependencies"], *project["optional-dependencies"]["test"]]:
    m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*==\s*([^\s;#]+).*", req)
    if m and m.group(1).lower() not in skip:
        print(f"{m.group(1)}=={m.group(3)}")
EOF
)
mkdir -p "$DEST"
for version in $PYTHON_VERSIONS; do
  echo "downloading for CPython $version ($PLATFORM): ${REQS[*]}"
  # pip resolves their dependencies for the target; jax/jaxlib are never among them for these packages.
  "$PY" -m pip download --quiet --disable-pip-version-check --dest "$DEST" --only-binary=:all: \
    --python-version "$version" --platform "$PLATFORM" --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 --platform any "${REQS[@]}"
done
for pulled in "$DEST"/jax-*.whl "$DEST"/jaxlib-*.whl "$DEST"/numpy-*.whl; do
  if [ -e "$pulled" ]; then
    echo "removing $(basename "$pulled"), pulled in as a dependency (the host's own is used)"
    rm -f "$pulled"
  fi
done
echo "wheel folder $DEST: $(ls "$DEST" | wc -l) wheels, $(du -sh "$DEST" | cut -f1)"
