#!/bin/sh
# Regenerates the committed gRPC/protobuf modules from protos/ark/v1/*.proto.
# Usage: protos/generate.sh [OUT_DIR]   (default: the repository root, i.e. in place)
set -eu
cd "$(dirname "$0")/.."
out="${1:-.}"
python="${PYTHON:-.venv/bin/python}"
"$python" -m grpc_tools.protoc -I . --python_out="$out" --pyi_out="$out" \
    --grpc_python_out="$out" protos/ark/v1/*.proto
