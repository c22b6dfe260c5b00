#!/usr/bin/env bash
# Prepare .whl/ (git-ignored) with what scripts/gpu_check.sh needs on the device machine,
# which has Python 3.12, PyTorch and pynvml but no Ray, SQLModel or FastAPI. Ray's wheel is
# re-zipped without ray/jars (Java) and the dashboard's .js.map files to fit the transfer.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
PY=${PYTHON:-.venv/bin/python}
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
pkgs=(ray==2.60.0 jsonschema jsonschema-specifications referencing rpds-py
      sqlmodel sqlalchemy alembic mako fastapi starlette "uvicorn[standard]" uvicorn httptools
      pydantic pydantic-core pydantic-settings python-dotenv annotated-types typing-inspection
      pathspec)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${plat[@]}" -d .whl "${pkgs[@]}"
ray_whl=$(ls .whl/ray-*.whl)
tmp=$(mktemp -d)
(cd "$tmp" && unzip -q "$OLDPWD/$ray_whl" && rm -rf ray/jars && find . -name '*.js.map' -delete \
  && rm "$OLDPWD/$ray_whl" && zip -q -r -9 "$OLDPWD/$ray_whl" .)
rm -rf "$tmp"
"$PY" -m pip wheel -q --no-deps -w .whl .
du -sh .whl
