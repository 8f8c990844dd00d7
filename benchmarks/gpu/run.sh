#!/bin/bash
# On the GPU machine, from the project root (after benchmarks/gpu/prepare.sh here, carrying .device):
#   bash benchmarks/gpu/run.sh bench128 bench64 base
#   bash benchmarks/gpu/run.sh recipes
# Stages:
#   bench128, bench64  `cxr-fastai bench` at 128 / 64 px on all of cxr3, a 10-epoch schedule
#                      (time to 95% needs more than bench's default 3) -> $OUT/bench-<size>.json
#   base               the train defaults at 128 px (30 epochs) + its --tta row, valid and test
#   recipes            the other ablation recipes at 128 px, valid only (choices are made on valid)
#   test:R1,R2         fill the test column for these recipes (the ones compared at the end)
# Figures only come back ($OUT/*.json, results.jsonl, histories): no models.
# CPU dry run of the same stages: CXR_DATA=... DRY=1 OUT=/tmp/out bash benchmarks/gpu/run.sh bench64 base
set -euo pipefail
OUT=${OUT:?set OUT (the device tool sets it)}
if [ -z "${DRY:-}" ]; then
    bash .device/setup.sh >/dev/null
    export PYTHONPATH=/tmp/site:$PWD CXR_DATA=/tmp/cxr3
    PY=python3
    dev=(--device cuda) size=128 epochs=30 bench_epochs=10 abl=/tmp/abl
else  # tiny CPU rehearsal: same commands, small numbers
    PY=${PY:-.venv/bin/python}
    dev=(--device cpu --limit 256) size=32 epochs=1 bench_epochs=2 abl=$OUT/abl
fi
DATA=${CXR_DATA:?}
mkdir -p "$OUT" "$abl"
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>/dev/null || true
keep() {  # copy the ablation's figures (not models) back
    cp "$abl"/results.jsonl "$OUT"/ 2>/dev/null || true
    for f in "$abl"/*.json; do [ -e "$f" ] && cp "$f" "$OUT"/; done
    for d in "$abl"/*/; do [ -f "$d/history.csv" ] && cp "$d/history.csv" "$OUT/$(basename "$d")-history.csv"; done
    true
}
trap keep EXIT
for stage in "$@"; do
    echo "== $stage $(date +%T)"
    case $stage in
        bench128) "$PY" -m cxr_fastai bench "$DATA" "${dev[@]}" --size "$size" --epochs "$bench_epochs" --json | tee "$OUT/bench-128.json" ;;
        bench64) "$PY" -m cxr_fastai bench "$DATA" "${dev[@]}" --size $((size / 2 > 16 ? size / 2 : 16)) \
                     --epochs "$bench_epochs" --json \
                     | tee "$OUT/bench-64.json" ;;
        base) "$PY" benchmarks/ablation.py --data "$DATA" --out "$abl" --size "$size" --epochs "$epochs" \
                  --recipes base base+tta --test ;;
        recipes) "$PY" benchmarks/ablation.py --data "$DATA" --out "$abl" --size "$size" --epochs "$epochs" \
                     --recipes ls0.1 cw minscale0.35 lr4e-3 no-nih ;;
        test:*) IFS=, read -ra rs <<< "${stage#test:}"
                "$PY" benchmarks/ablation.py --data "$DATA" --out "$abl" --add-test "${rs[@]}" ;;
        *) echo "unknown stage $stage" >&2; exit 2 ;;
    esac
done
