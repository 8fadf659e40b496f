#!/bin/sh
# Regenerates the committed gRPC/protobuf modules from protos/ark/v1/*.proto, with typed
# stubs (.pyi) for both: mypy-protobuf's protoc-gen-mypy (messages) and
# protoc-gen-mypy_grpc (the synchronous stubs and servicers, all this project uses).
# Usage: protos/generate.sh [OUT_DIR]   (default: the repository root, i.e. in place)
set -eu
cd "$(dirname "$0")/.."
out="${1:-.}"
python="${PYTHON:-.venv/bin/python}"
bin="$(dirname "$python")"
"$python" -m grpc_tools.protoc -I . \
    --plugin=protoc-gen-mypy="$bin/protoc-gen-mypy" \
    --plugin=protoc-gen-mypy_grpc="$bin/protoc-gen-mypy_grpc" \
    --python_out="$out" --mypy_out="$out" --mypy_opt=quiet \
    --grpc_python_out="$out" --mypy_grpc_out="$out" --mypy_grpc_opt=quiet,only_sync \
    protos/ark/v1/*.proto
