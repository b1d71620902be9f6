#!/usr/bin/env bash
# Download, here (where PyPI is reachable), the wheels bench/gpu_all.sh installs on a GPU machine that has no network:
# LitGPT 0.5.13 + jsonargparse 4.41 (the anchor; bench-only, never a litft dependency), docstring-parser and
# typeshed-client (jsonargparse[signatures], for the litft CLI), bitsandbytes (QLoRA) and the serve stack (fastapi,
# starlette, pydantic, uvicorn). Into .bench-anchor/whl (git-ignored; ~48 MB, bitsandbytes is 43 of them).
# For a CPU run of the anchors here: python -m pip install --no-deps --target .bench-anchor/site \
#   .bench-anchor/whl/litgpt-*.whl .bench-anchor/whl/jsonargparse-*.whl  and  PYTHONPATH=.bench-anchor/site
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .bench-anchor/whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d .bench-anchor/whl \
  litgpt==0.5.13 jsonargparse==4.41.0 docstring-parser==0.18.0 typeshed-client==2.15.0 \
  bitsandbytes==0.50.2 fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5 \
  annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 uvicorn==0.55.0 opentelemetry-api==1.45.2
ls -la .bench-anchor/whl
