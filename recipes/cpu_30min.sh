#!/usr/bin/env bash
# The best CPU result in one command: a teacher, a student trained against it, eval.py on the test split.
#   bash recipes/cpu_30min.sh [train.py flags for both runs, e.g. --data_seed 1]
# Environment: OUT (default out/cpu-30min), MINUTES (the whole command's budget, default 30),
# TEST_FILE (default WikiText-2's test split). Settings: configs/cpu/{recipe,teacher,student}.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/cpu-30min}
MINUTES=${MINUTES:-30}
TEST_FILE=${TEST_FILE:-data/wikitext-2-raw/wiki.test.raw}
RESERVE=4  # minutes for the student's data preparation, calibration, final evaluation and eval.py
start=$(date +%s)

python train.py configs/cpu/recipe.yaml configs/cpu/teacher.yaml --output_dir "$OUT/teacher" "$@"

# The student trains for 15 minutes, or for what is left of the budget where the teacher was slow.
student_minutes=$(python -c "import sys; left = $MINUTES - ($(date +%s) - $start) / 60 - $RESERVE
print(f'{max(1.0, min(15.0, left)):.2f}')")
echo "recipes/cpu_30min.sh: the student trains for up to $student_minutes minutes"
python train.py configs/cpu/recipe.yaml configs/cpu/student.yaml --distill_from "$OUT/teacher" \
    --output_dir "$OUT/student" --max_train_minutes "$student_minutes" "$@"

python eval.py --model "$OUT/student" --tokenizer_name data/gpt2-tokenizer --test_file "$TEST_FILE" \
    --methods blocks --output_file "$OUT/test.json"
python - "$OUT/test.json" "$start" "$student_minutes" <<'PY'
import json, sys, time
report = json.load(open(sys.argv[1]))
ppl = report["metrics"]["perplexity"]["value"]
minutes = (time.time() - int(sys.argv[2])) / 60
print(f"recipes/cpu_30min.sh: test perplexity {ppl:.1f} in {minutes:.1f} minutes "
      f"(student budget {sys.argv[3]} minutes)")
PY
