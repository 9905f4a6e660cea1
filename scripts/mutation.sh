#!/usr/bin/env bash
# Mutation testing of the core with mutmut 3 (not part of CI: too slow).
#
#   bash scripts/mutation.sh                 # every module below, in order (well under an hour on 2 cores)
#   bash scripts/mutation.sh acceptance tree # only these (names from the table below)
#   MUTATION_JOBS=1 MUTATION_REV=HEAD bash scripts/mutation.sh ...
#       MUTATION_JOBS: mutants run in parallel (default 2); MUTATION_REV: take src/ and tests/ from that git
#       revision (`git archive`, read-only; new untracked test files are added) instead of the working
#       tree, e.g. while someone else edits src/
#
# Each module runs in its own scratch copy (.mutation/<name>/: src/, tests/ and a pyproject.toml with a
# [tool.mutmut] section naming that one file), so src/ is never touched and modules do not share state.
# mutmut records which tests reach each mutated function and runs each mutant against only those, from
# the test files listed for the module; real-model and slow tests are excluded. Results:
# .mutation/<name>/summary.txt (counts) and survivors.txt (`mutmut show` of each survivor); the
# curated report, with a one-line reason for each equivalent survivor, is docs/mutation.md.
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
jobs=${MUTATION_JOBS:-2}

# name | file to mutate (under src/draftheads) | test files that cover it | tests left out (pytest -k)
#      | functions to mutate (mutmut name globs; empty: all of the file)
# The chi-square tests of `exact` (2,500 sampled decodes each) would make acceptance alone take 40 min;
# mutation runs use the deterministic pins of test_mutation_pins.py instead (same seed, same token).
slow_k="not matches_backbone_distribution and not rejects_a_biased_rule"
# The trainer's targets and losses, not its run loop (that is what the training tests exercise end to end).
trainer_fns="x_lr_factor* x_medusa_loss* x_soft_targets* x_next_hidden* x_path_tokens* x_sequence_batch* x_flat_examples*"
# The batch's chi-square test (1,500 batched decodes) would dominate every kvcache / batch mutant.
batch_chi2="not sigkill and not keeps_the_backbones_distribution"
# The server's validation and error objects (request checks, middleware, error mapping), not its
# worker threads and streaming (a mutant there hangs a request until the timeout, not a test).
server_fns="x_create_app* x__unicode* x__param* x__from_worker* x__finish* x__usage* x__ours* xǁGuardǁ* xǁAPIErrorǁ* xǁWorkerǁsubmit*"
# calibrate's lookup decision and measurements (stop 59), not its search (treesearch) or its timing loops.
calibrate_fns="x_decide_lookup* x_lookup_finalists* x_measure_trees* x_with_lookup* x_lookup_depths* x_lookup_summary*"
# What a heads config's calibration gives load() with prompt lookup on and off (stop 60), and what writes it.
draftmodel_fns="x_calibrated_trees* x_without_lookup* xǁDraftModelǁtree_for*"
calibration_io_fns="x__write_tree_to_heads* x__trees_said*"
modules=(
  "acceptance|acceptance.py|test_acceptance.py test_properties.py test_mutation_pins.py|$slow_k"
  "tree|tree.py|test_tree_and_heads.py test_properties.py test_mutation_pins.py test_batch.py|$batch_chi2"
  "kvcache|kvcache.py|test_loop.py test_llama_forward.py test_families.py test_lookup.py test_batch.py test_properties.py test_mutation_pins.py test_mutation_pins2.py test_row_exact.py test_hydra.py test_prompt_cache.py test_decoder_stack.py|$batch_chi2"
  "data|train/data.py|test_train.py test_medusa2.py test_properties.py test_mutation_pins.py"
  "vocab|heads/vocab.py|test_properties.py test_mutation_pins.py test_train.py test_hydra.py"
  "trainer|train/trainer.py|test_train.py test_mutation_pins.py||$trainer_fns"
  "medusa|heads/medusa.py|test_tree_and_heads.py test_export.py test_hydra.py test_mutation_pins2.py test_batch.py|$batch_chi2"
  "hydra|heads/hydra.py|test_hydra.py test_mutation_pins2.py"
  "checkpoint|heads/checkpoint.py|test_tree_and_heads.py test_export.py test_hydra.py test_mutation_pins2.py"
  "treesearch|treesearch.py|test_treesearch.py test_mutation_pins2.py"
  "batch|batch.py|test_batch.py test_mutation_pins2.py test_row_exact.py test_hydra.py|$batch_chi2"
  "round_costs|round_costs.py|test_round_costs.py test_batch.py|$batch_chi2"
  "server|server.py|test_server.py test_server_validation.py test_mutation_pins2.py||$server_fns"
  "generate|generate.py|test_loop.py test_families.py test_lookup.py test_mutation_pins2.py"
  "decoder_stack|decoder_stack.py|test_decoder_stack.py test_llama_forward.py test_cpu_matmul.py"
  "ngrams|ngrams.py|test_ngrams.py test_lookup.py"
  "lookup|lookup.py|test_lookup.py test_ngrams.py test_mutation_pins2.py test_batch.py|$batch_chi2"
  "calibrate|calibrate.py|test_lookup.py test_treesearch.py||$calibrate_fns"
  "draftmodel|draftmodel.py|test_lookup.py test_batch.py test_row_exact.py test_llamacpp.py|$batch_chi2|$draftmodel_fns"
  "calibration_io|bench.py|test_lookup.py test_treesearch.py test_row_exact.py test_bench.py||$calibration_io_fns"
)

want=("$@")
selected() { [ ${#want[@]} -eq 0 ] && return 0; for w in "${want[@]}"; do [ "$w" = "$1" ] && return 0; done; return 1; }

set -f  # the function globs below are mutmut's patterns, not file names
for row in "${modules[@]}"; do
  IFS='|' read -r name file tests deselect fns <<<"$row"
  selected "$name" || continue
  work=.mutation/$name
  rm -rf "$work" && mkdir -p "$work"
  if [ -n "${MUTATION_REV:-}" ]; then  # src/ and tests/ as committed, plus test files not yet added
    git archive "$MUTATION_REV" src tests | tar -x -C "$work"
    for t in $(git ls-files --others --exclude-standard tests); do cp "$t" "$work/$t"; done
  else
    cp -r src tests "$work"/
  fi
  find "$work" -name __pycache__ -prune -exec rm -rf {} +
  # mutmut 3 skips every decorated function, so the decoding loops (`@torch.inference_mode()`) and the
  # heads' drafting (`@torch.no_grad()`) would never be mutated. In the scratch copy of the mutated file
  # those two decorators go: they change no result, only whether autograd records (the tests' models
  # need no gradients). Other decorated functions (@property, @cached_property, routes) stay unmutated.
  sed -i -E '/^[[:space:]]*@torch\.(inference_mode|no_grad)\(\)[[:space:]]*$/d' "$work/src/draftheads/$file"
  sel=""
  for t in $tests; do [ -f "tests/$t" ] && sel+="\"tests/$t\", "; done
  { cat pyproject.toml; cat <<EOF

[tool.mutmut]
source_paths = ["src"]
only_mutate = ["src/draftheads/$file"]
pytest_add_cli_args_test_selection = [$sel]
pytest_add_cli_args = ["-m", "not real_model and not slow", "-p", "no:cacheprovider", "-k", "${deselect:-not mutation_none}"]
use_git_change_detection = false
EOF
  } >"$work/pyproject.toml"
  echo "== $name ($file) against: $tests" >&2
  start=$(date +%s)
  # `mutmut run` exits non-zero when mutants survive; the summary below is what counts.
  mod=draftheads.$(echo "${file%.py}" | tr / .)
  names=(); for f in $fns; do names+=("$mod.$f"); done
  (cd "$work" && "../../$py" -m mutmut run --max-children "$jobs" "${names[@]}" >run.log 2>&1) || true
  (cd "$work" && "../../$py" -m mutmut results --all true >results.txt 2>&1) || true
  if [ -n "$fns" ]; then  # score only the functions asked for
    keep=$(for f in $fns; do printf '%s\n' "$mod.${f%\*}"; done)
    grep -F "$keep" "$work/results.txt" >"$work/results.sel" || true; mv "$work/results.sel" "$work/results.txt"
  fi
  count() { grep -c ": $1\$" "$work/results.txt" || true; }
  total=$(grep -c ': ' "$work/results.txt" || true)
  killed=$(count killed); timeout=$(count timeout); survived=$(count survived); untested=$(count "no tests")
  # Score: killed or timed out (an infinite loop is caught too) over all mutants; untested ones count as missed.
  score=$(awk -v k="$killed" -v t="$timeout" -v n="$total" 'BEGIN { printf "%.1f", n ? 100 * (k + t) / n : 0 }')
  echo "$name $file score=$score% total=$total killed=$killed timeout=$timeout survived=$survived" \
    "no_tests=$untested other=$((total - killed - timeout - survived - untested)) seconds=$(( $(date +%s) - start ))" \
    | tee "$work/summary.txt" >&2
  grep -E ': no tests$' "$work/results.txt" >"$work/untested.txt" || true  # names only: no test reaches them
  # `mutmut show` of each survivor, in one process (a `mutmut show` per mutant takes seconds each)
  (cd "$work" && "../../$py" - >survivors.txt 2>&1 <<'PY'
from mutmut.__main__ import find_mutant, get_diff_for_mutant, status_by_exit_code
for line in open("results.txt"):
    name, _, status = line.strip().rpartition(": ")
    if status == "survived":
        m = find_mutant(name)
        print(f"# {name}: {status_by_exit_code[m.exit_code_by_key[name]]}")
        print(get_diff_for_mutant(name, path=m.path))
PY
  ) || true
done
set +f
cat .mutation/*/summary.txt 2>/dev/null || true
