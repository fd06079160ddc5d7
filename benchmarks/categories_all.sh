#!/usr/bin/env bash
# Every row of the category benchmark's table (issue 21) that benchmarks/results/categories_cpu.jsonl
# does not hold yet, in order of cost, one run at a time (a killed run resumes: --skip_existing
# skips finished rows, a half-trained workdir is resumed). About 6 h on 2 idle cores when no
# row exists: the reference (~5 min), STFPM `cpu` before and after (~7 × 4–12 min each), the
# Uninformed Students `cpu` preset now (issue 23's teachers), after issue 21 (its teachers) and
# before (~7 × 30 min each).
#
#   benchmarks/categories_all.sh                 # everything missing
#   FAMILIES="stfpm" benchmarks/categories_all.sh
#   python -m benchmarks.categories --table_only # the table so far
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
run() { "$PY" -m benchmarks.categories --skip_existing "$@"; }
families=${FAMILIES:-"reference stfpm students"}
# The presets as they were before issue 21: STFPM counted 3 epochs at the square size;
# Uninformed Students counted 10 / 12 epochs per scale, held out 10 % of the images (no
# minimum), normalised by mean/σ, kept the last step, square size. (CSV: a field holding a comma
# is quoted, a quote inside it doubled.)
stfpm_before=train_steps=0,min_train_steps=0,epochs=3,keep_aspect=False
students_before='"scale_epochs={""p17"":10,""p33"":12}",scale_train_steps={},epochs=12'
students_before+=,min_train_steps=0,val_min_images=0,score_normalization=moments,select=last
students_before+=,keep_aspect=False
# The teachers of both rows above: issue 23 shipped a new p33_small and p17_small (live target);
# the head-target teachers that the names held until then are p33_small_head and p17_small_head.
# `teachers23` = the cpu preset as shipped now.
old_teachers='"scale_teachers={""p17"":""p17_small_head"",""p33"":""p33_small_head""}"'
for family in $families; do
  case "$family" in
    reference) run --family=reference --image_size=256 ;;
    stfpm)
      run --family=stfpm --config=cpu
      run --family=stfpm --config=cpu --override="$stfpm_before" --label=before ;;
    students)
      run --family=students --config=cpu --label=teachers23
      run --family=students --config=cpu --override="$old_teachers"
      run --family=students --config=cpu --override="$students_before,$old_teachers" --label=before ;;
    *) echo "categories_all.sh: unknown family $family (reference, stfpm, students)" >&2; exit 2 ;;
  esac
done
"$PY" -m benchmarks.categories --table_only
