#!/bin/bash
# Device check, eleventh session, second run: the CUDA tests on the code after the soak-audit fixes (loads that
# outlive their callers, a signal during the start, trimmed memory at unload, streams ending at the drain), then
# `seqserve serve` on the GPU: --device-id 99 refused, a SIGTERM while the CUDA sessions open, --device-id 0 answering
# a client (translate, nsp, encode), unload/load, a drain delay at SIGTERM.
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
S=/tmp/site
mkdir -p $S
[ -d $S/onnxruntime ] || tar -C $S -xJf .gpu/ortgpu.tar.xz || exit 3
[ -f $S/google/protobuf/__init__.py ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $S .gpu/whl/*.whl
ln -sfn "$PWD" $S/seqserve
sed -i "s/^GRPC_GENERATED_VERSION = .*/GRPC_GENERATED_VERSION = '1.0.0'/" protos/v1/seqserve_pb2_grpc.py protos/inference/open_inference_pb2_grpc.py $S/grpc_health/v1/health_pb2_grpc.py $S/grpc_reflection/v1alpha/reflection_pb2_grpc.py
export PYTHONPATH=$S
NV=$(python3 -c "import nvidia, os; print(list(nvidia.__path__)[0])")
export LD_LIBRARY_PATH=$(find "$NV" -name 'lib*.so*' -printf '%h\n' | sort -u | tr '\n' ':')$LD_LIBRARY_PATH
nvidia-smi -L; date +%T
python3 -c "import onnxruntime as o, grpc; print('ort', o.__version__, o.get_available_providers(), 'grpc', grpc.__version__)"
set -o pipefail
timeout ${TEST_S:-240} python3 -m pytest -q -rP -p no:cacheprovider -k cuda tests/test_cuda.py tests/test_repository.py tests/test_server_drain.py tests/test_export.py > $OUT/pytest.log 2>&1
echo "pytest rc $?"; date +%T
grep -E "passed|failed|error|refused|started;|Error|EP Error|Falling back|assert" $OUT/pytest.log | head -40

R=$(ls -d /tmp/pytest-of-*/pytest-*/cuda_repository0 | tail -1); echo "repository $R"
SV='import sys; from seqserve.cli import main; sys.exit(main())'
timeout 60 python3 -c "$SV" serve --repository $R --device cuda --device-id 99 --port 0 --metrics-port 0 > $OUT/serve99.log 2>&1
echo "serve --device-id 99 rc $?"; grep -v "^\*\|EP Error\|Falling back" $OUT/serve99.log | tail -3 | cut -c1-400
python3 -c "$SV" serve --repository $R --device cuda --device-id 0 --port 8556 --metrics-port -1 > $OUT/serve-sigterm-start.log 2>&1 &
for i in $(seq 600); do grep -q " is READY " $OUT/serve-sigterm-start.log && break; sleep 0.05; done; kill -TERM %1
wait %1; echo "SIGTERM while starting: rc $?"; grep -c "ready: gRPC" $OUT/serve-sigterm-start.log; grep "while starting\|stopped\|Traceback" $OUT/serve-sigterm-start.log | cut -c1-200
python3 -c "$SV" serve --repository $R --device cuda --device-id 0 --port 8555 --metrics-port 0 --drain-delay 2 > $OUT/serve0.log 2>&1 &
for i in $(seq 60); do grep -q "ready:" $OUT/serve0.log && break; sleep 1; done; grep "ready:\|serving" $OUT/serve0.log | cut -c1-300
C='import sys; from seqserve.clients.cli import main; sys.exit(main())'
echo "a b c" | python3 -c "$C" --server localhost:8555 translate -m tiny-gru; echo "client rc $?"
echo "a b c" | python3 -c "$C" --server localhost:8555 translate -m tiny-transformer; echo "client rc $?"
printf 'forest five foru\tforest six foru\n' | python3 -c "$C" --server localhost:8555 nsp -m tiny-bert; echo "client rc $?"
echo "forest five foru" | python3 -c "$C" --server localhost:8555 encode -m tiny-bert | cut -c1-80; echo "client rc $?"
python3 -c "$C" --server localhost:8555 models | cut -c1-200
python3 -c "$C" --server localhost:8555 models unload tiny-transformer; python3 -c "$C" --server localhost:8555 models load tiny-transformer | cut -c1-120
echo "a b c" | python3 -c "$C" --server localhost:8555 translate -m tiny-transformer; echo "client after reload rc $?"
nvidia-smi --query-compute-apps=pid,used_memory --format=csv
kill -TERM %1; sleep 0.5; python3 -c "$C" --server localhost:8555 health; echo "health during drain rc $?"
wait %1; echo "serve rc $?"; tail -3 $OUT/serve0.log | cut -c1-300
date +%T
timeout ${BENCH_TEST_S:-200} python3 -m pytest -q -rP -p no:cacheprovider -k cuda tests/test_benchmarks.py > $OUT/pytest-bench.log 2>&1
echo "bench test rc $?"; tail -3 $OUT/pytest-bench.log; date +%T
