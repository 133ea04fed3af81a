#!/usr/bin/env bash
# The accelerator figures of the benchmark goals in one prepared run, for a session that has a GPU lent for a few
# minutes: `peer` (tljax vs PyTorch + transformers, both bf16 on a GPU), then `mfu` (at batch 32, then 128) and
# `memory` of the ViT-B/16- and BERT-base-sized models, most important first, each benchmark's JSON lines into its own
# file as it goes (a run cut short keeps what finished; a benchmark that fails is named at the end and the others
# still run). The models are random-weight checkpoints built locally: nothing is downloaded.
#
#   OUT=/path/to/results bash experiments/bench/accelerator.sh     # default OUT: ./bench_out
#   QUICK=1 PRECISION=bf16 bash experiments/bench/accelerator.sh    # tiny models, any machine: checks the script and
#                                                                   # the bf16 code path a GPU takes
#   ONLY=memory bash experiments/bench/accelerator.sh              # some of peer, mfu, memory (a second lease)
#   ONLY=peer,mfu ATTENTION=fused bash experiments/bench/accelerator.sh   # tljax with cuDNN's fused attention (both
#                                                                   # sides without attention dropout)
#
# Needs jax, flax, optax, orbax-checkpoint, grain, ml-collections, pillow, transformers and torch (PYTHONPATH=. is
# enough: tljax need not be installed); `python -m experiments.bench.environment` checks them first.
set -euo pipefail
only=,${ONLY:-peer,mfu,memory},
for b in ${only//,/ }; do
  [[ ,peer,mfu,memory, == *,$b,* ]] || { echo "ONLY=$ONLY: '$b' is none of peer, mfu, memory" >&2; exit 2; }
done
out=${OUT:-bench_out}
mkdir -p "$out"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$(pwd)
if [[ -n ${QUICK:-} ]]; then
  quick=(--quick) models=(tiny-bert tiny-vit) peer=(--rounds 1 --reps 2) memory=() mfu_batches=(4)
else  # mfu at the models' batch (32) and at 128, where the GPU is fuller: which of the two the MFU gap is
  quick=() models=(vit-b16 bert-base) peer=(--rounds 2 --reps 3) memory=(--modes full,head --max_batch 512)
  mfu_batches=(128)
fi
prec=(--precision "${PRECISION:-auto}" --attention "${ATTENTION:-eager}")
failed=()
bench() { # name, then the benchmark's arguments; a failure is reported and the next benchmark still runs
  local name=$1
  shift
  [[ $only == *,$1,* ]] || return 0
  echo "# $(date -u +%FT%TZ) $*" >&2
  if ! python3 -m experiments.bench "$@" | tee "$out/$name.jsonl"; then
    failed+=("$name")
    echo "# FAILED: $name" >&2
  fi
}
# seconds, before any benchmark: the versions, and exit 2 naming any module this Python lacks (e.g. grain)
python3 -m experiments.bench.environment
bench peer peer "${quick[@]}" "${prec[@]}" --models "$(IFS=,; echo "${models[*]}")" "${peer[@]}"
for m in "${models[@]}"; do
  bench "mfu_$m" mfu "${quick[@]}" "${prec[@]}" --model "$m"
done
for b in "${mfu_batches[@]}"; do
  for m in "${models[@]}"; do
    bench "mfu_${m}_b$b" mfu "${quick[@]}" "${prec[@]}" --model "$m" --batch "$b"
  done
done
for m in "${models[@]}"; do
  bench "memory_$m" memory "${quick[@]}" "${prec[@]}" --model "$m" "${memory[@]}"
done
if ((${#failed[@]})); then
  echo "# failed: ${failed[*]} (the others' figures are in $out)" >&2
  exit 1
fi
