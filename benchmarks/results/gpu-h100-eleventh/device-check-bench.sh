#!/bin/bash
# Device check, eleventh session: the CUDA translation benchmark's smoke test after its contender list was mended.
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
nvidia-smi -L; git log --oneline -1 2>/dev/null; date +%T
timeout ${BENCH_TEST_S:-200} python3 -m pytest -q -rP -p no:cacheprovider -k cuda tests/test_benchmarks.py > $OUT/pytest-bench.log 2>&1
echo "bench test rc $?"; tail -3 $OUT/pytest-bench.log; date +%T
R=$(ls -d /tmp/pytest-of-*/pytest-*/test_cuda_translation_benchma*0 | tail -1); cp $R/result.json $OUT/translate_cuda-quick.json 2>/dev/null
python3 -c "import json,sys; r=json.load(open(sys.argv[1])); [print(n) for n in r.get('notes', [])]" $OUT/translate_cuda-quick.json
