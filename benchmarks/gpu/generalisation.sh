#!/bin/bash
# Issue 11 on the GPU machine: the 128 px rows and the leave-one-source-out series that take hours on the CPU.
# cxr3 and cxr3-adult together are over the 64 MiB a call may carry, so it takes two calls, the second
# within the machine's idle release (the first call's /tmp survives while the machine stays warm):
#   here:   bash benchmarks/gpu/prepare.sh && OUT=/tmp/x bash benchmarks/gpu/generalisation.sh pack-adult
#   call 1: run(carry=[".device"], command="bash benchmarks/gpu/generalisation.sh setup")
#   call 2: run(carry=[".device-adult"], command="bash benchmarks/gpu/generalisation.sh adult rows128 refit rows-half rows-swa rows-ms rows-adv rows-crop rows-mix rows-dro loso-default adapt loso-swa loso-ms loso-half loso-adv")
# Stages (in the order given; each writes its figures to $OUT as it ends, so a timeout keeps the finished ones):
#   setup         wheels into /tmp/site, cxr3 into /tmp/cxr3, the machine's versions into $OUT/env.txt
#   adult         cxr3-adult into /tmp/cxr3-adult
#   rows128       the recommended recipe (defaults, cxr3 + cxr3-adult) and class-then-source + light at
#                 128 px / 10 epochs: train, export, evaluate on cxr3 test and cxr3-adult test (+ valid by source)
#   rows-mix      --mixup 0.4 and --mixup 0.4 --mixup-pairs lisa on the recommended data at 128 px / 10 epochs,
#                 as rows128
#   rows-dro      --group-dro 0.01 on the recommended data at 128 px / 10 epochs, as rows128
#   rows-crop     --crop-border 0.1 on the recommended data at 128 px / 10 epochs, as rows128
#   rows-half     --balance class-then-source --balance-power 0.5 --crop-border 0.1 at 128 px / 10 epochs, as rows128
#   rows-adv      --source-adversary 1 on the recommended data at 128 px / 10 epochs, as rows128
#   rows-swa      --weight-average 0.5 on the recommended data at 128 px / 10 epochs, as rows128
#   rows-ms       --mix-style 0.5 on the recommended data at 128 px / 10 epochs, as rows128
#   loso-default  crossval of the recommended recipe at 32 px / 10 epochs (every fold: a GPU series of its own)
#   loso-cxr3     crossval of the old default (cxr3 only) at 32 px / 10 epochs
#   loso-lever    crossval with --balance class-then-source --augment light at 32 px / 10 epochs
#   loso-half     crossval with --balance class-then-source --balance-power 0.5 --crop-border 0.1 at 32 px / 10 epochs
#   loso-adv      crossval with --source-adversary 1 at 32 px / 10 epochs
#   loso-swa      crossval with --weight-average 0.5 at 32 px / 10 epochs
#   loso-ms       crossval with --mix-style 0.5 at 32 px / 10 epochs
#   adapt         `cxr-fastai adapt` (BatchNorm statistics from a source's unlabelled train + valid films) on the
#                 models the stages above left: plain128 to NIH, loso-default's NIH and rsna_adult folds to
#                 their held-out source; each scored on that source's test split before and after
#   refit         `cxr-fastai refit` (the last layer on class-and-source-balanced data, chosen on validation) of
#                 plain128 (and of loso-default's NIH fold, NIH held out, when that stage ran before); each
#                 scored on cxr3 test, cxr3-adult test and NIH test, the unrefitted model beside it
# Figures only come back (JSON, Markdown, PNG, histories); no model.
# CPU rehearsal on tiny synthetic roots: DRY=1 OUT=/tmp/gout bash benchmarks/gpu/generalisation.sh rows128 loso-default refit
set -euo pipefail
OUT=${OUT:?set OUT (the device tool sets it)}
if [ -z "${DRY:-}" ]; then
    export PYTHONPATH=/tmp/site:$PWD
    PY=python3 dev=(--device cuda) d1=/tmp/cxr3 d2=/tmp/cxr3-adult w=/tmp/gen
    nih=darkcovidnet_nih rsna=rsna_adult
    s128=128 s32=32 epochs=10 extra=()
else
    # two tiny synthetic roots named like the real ones (sources site_a/site_b and site_c), so every command runs
    PY=${PY:-.venv/bin/python} dev=(--device cpu) w=$OUT/work d1=$OUT/work/data/cxr3 d2=$OUT/work/data/cxr3-adult
    s128=16 s32=16 epochs=1 extra=(--set widths=8,16,16,32)
    nih=site_a rsna=site_c
    [ -d "$d1" ] || "$PY" - "$d1" "$d2" <<'PYEOF'
import sys
import pandas as pd
from cxr_fastai.synth import make_synthetic_dataset
for root, sources in ((sys.argv[1], ("site_a", "site_b")), (sys.argv[2], ("site_c",))):
    make_synthetic_dataset(root, {"train": 20, "valid": 4, "test": 4}, size=24, seed=len(sources))
    df = pd.read_csv(f"{root}/labels.csv", dtype=str, keep_default_na=False)
    df["source"] = [sources[i % len(sources)] for i in range(len(df))]
    df.to_csv(f"{root}/labels.csv", index=False)
PYEOF
fi
cli() { "$PY" -m cxr_fastai "$@"; }
mkdir -p "$OUT" "$w"
row() {  # NAME [train options]: train both roots, export, evaluate, keep the figures
    local name=$1; shift
    cli train "$d1" "$d2" --run "$w/$name" --size "$s128" --epochs "$epochs" "${dev[@]}" --cache-dir "$w/cache" \
        "$@" --quiet
    cli export "$w/$name" --to "$w/art-$name"
    cli evaluate "$w/art-$name" "$d1" --split test "${dev[@]}" --out "$OUT/$name-cxr3-test.json" >/dev/null
    cli evaluate "$w/art-$name" "$d2" --split test "${dev[@]}" --out "$OUT/$name-adult-test.json" >/dev/null
    cli evaluate "$w/art-$name" "$d1" "$d2" --split valid "${dev[@]}" --out "$OUT/$name-valid.json" >/dev/null
    cp "$w/$name/history.csv" "$OUT/$name-history.csv"
    cp "$w/$name/run.json" "$OUT/$name-run.json"   # best epoch, validation by source, the adversary's figures
}
series() {  # NAME ROOTS... -- [options]: a crossval series, its summaries and every fold's result back
    local name=$1; shift
    cli crossval "$@" --out "$w/$name" --size "$s32" --epochs "$epochs" "${dev[@]}" --cache-dir "$w/cache" "${extra[@]}" -q \
        || echo "crossval $name failed (rc $?): what finished is kept" >&2
    mkdir -p "$OUT/$name"
    cp "$w/$name"/crossval.* "$OUT/$name/" 2>/dev/null || true
    for f in "$w/$name"/folds/*/result.json; do [ -e "$f" ] && cp "$f" "$OUT/$name/$(basename "$(dirname "$f")").json"; done
    true
}
adapted() {  # NAME ART ROOT SOURCE: adapt ART to SOURCE's train + valid films, score its test split before and after
    local name=$1 art=$2 root=$3 src=$4
    [ -d "$art" ] || { echo "adapt $name: no $art (run its stage first)" >&2; return 0; }
    cli adapt "$art" "$root" --source "$src" --split train --split valid --to "$w/adapted-$name" "${dev[@]}" --force -q \
        > "$OUT/adapt-$name.txt" || { echo "adapt $name failed" >&2; return 0; }
    cli evaluate "$art" "$root" --split test --source "$src" "${dev[@]}" --out "$OUT/adapt-$name-before.json" >/dev/null
    cli evaluate "$w/adapted-$name" "$root" --split test --source "$src" "${dev[@]}" --out "$OUT/adapt-$name-after.json" >/dev/null
}
refitted() {  # NAME ART [refit options]: refit ART on both roots, score cxr3, cxr3-adult and NIH test before and after
    local name=$1 art=$2; shift 2
    [ -d "$art" ] || { echo "refit $name: no $art (run its stage first)" >&2; return 0; }
    local rc=0
    cli refit "$art" "$d1" "$d2" --to "$w/refit-$name" "${dev[@]}" --force -q "$@" > "$OUT/refit-$name.txt" \
        2> "$OUT/refit-$name.err" || rc=$?
    if [ "$rc" != 0 ]; then   # rc 1 with "nothing written": no head kept pooled validation; else an error
        echo "refit $name: rc $rc: $(tail -1 "$OUT/refit-$name.err")" >&2; return 0
    fi
    local a tag
    for a in "$art" "$w/refit-$name"; do
        [ "$a" = "$art" ] && tag=before || tag=after
        cli evaluate "$a" "$d1" --split test "${dev[@]}" --out "$OUT/refit-$name-$tag-cxr3-test.json" >/dev/null
        cli evaluate "$a" "$d2" --split test "${dev[@]}" --out "$OUT/refit-$name-$tag-adult-test.json" >/dev/null
        cli evaluate "$a" "$d1" --split test --source "$nih" "${dev[@]}" --out "$OUT/refit-$name-$tag-nih-test.json" >/dev/null
    done
}
for stage in "$@"; do
    echo "== $stage $(date +%T)"
    case $stage in
        pack-adult) mkdir -p .device-adult && grep -qx '/.device-adult/' .git/info/exclude 2>/dev/null \
                        || echo '/.device-adult/' >> .git/info/exclude
                    tar cf - -C "${CXR_DATA:-../shared/data}" cxr3-adult | gzip -1 > .device-adult/cxr3-adult.tgz
                    du -sh .device-adult ;;
        setup) bash .device/setup.sh >/dev/null
               { python3 --version; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
                 python3 -c "import torch, fastai; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'fastai', fastai.__version__)"
               } > "$OUT/env.txt" 2>&1 || true
               cat "$OUT/env.txt" ;;
        adult) tar xzf .device-adult/cxr3-adult.tgz -C /tmp && ls /tmp/cxr3-adult | head -3 ;;
        rows128) row plain128
                 row cts-aug128 --balance class-then-source --augment light ;;
        rows-mix) row mixup128 --mixup 0.4
                  row lisa128 --mixup 0.4 --mixup-pairs lisa ;;
        rows-dro) row dro128 --group-dro 0.01 ;;
        rows-crop) row crop128 --crop-border 0.1 ;;
        rows-half) row half128 --balance class-then-source --balance-power 0.5 --crop-border 0.1 ;;
        rows-adv) row adv128 --source-adversary 1 ;;
        rows-swa) row swa128 --weight-average 0.5 ;;
        rows-ms) row ms128 --mix-style 0.5 ;;
        loso-default) series loso-default "$d1" "$d2" ;;
        loso-cxr3) series loso-cxr3 "$d1" ;;
        loso-lever) series loso-lever "$d1" "$d2" --balance class-then-source --augment light ;;
        loso-half) series loso-half "$d1" "$d2" --balance class-then-source --balance-power 0.5 --crop-border 0.1 ;;
        loso-adv) series loso-adv "$d1" "$d2" --source-adversary 1 ;;
        loso-swa) series loso-swa "$d1" "$d2" --weight-average 0.5 ;;
        loso-ms) series loso-ms "$d1" "$d2" --mix-style 0.5 ;;
        adapt) adapted plain128-nih "$w/art-plain128" "$d1" "$nih"
               adapted loso-nih "$w/loso-default/folds/holdout-$nih/model" "$d1" "$nih"
               adapted loso-rsna "$w/loso-default/folds/holdout-$rsna/model" "$d2" "$rsna" ;;
        refit) refitted plain128 "$w/art-plain128"
               refitted loso-nih "$w/loso-default/folds/holdout-$nih/model" ;;   # its training's held-out source stays out
        *) echo "unknown stage $stage" >&2; exit 2 ;;
    esac
done
echo "== done $(date +%T)"
