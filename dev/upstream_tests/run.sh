#!/usr/bin/env bash
# transformers' own common tests against STORM (issue #14): the testers in this folder, dropped into an unpacked
# transformers source distribution of the installed version, run with its ModelTesterMixin, GenerationTesterMixin,
# ProcessorTesterMixin and VideoProcessingTestMixin. Not part of CI: the sdist lacks tests/generation/test_utils.py.
#
# usage: dev/upstream_tests/run.sh [PYTHON] [GENERATION_TEST_UTILS]
#   PYTHON: the interpreter of a venv with storm-transformers[test] installed (default .venv/bin/python)
#   GENERATION_TEST_UTILS: a copy of transformers' tests/generation/test_utils.py (from the GitHub repository at the
#     installed version, or the closest one); without it the modeling file runs without GenerationTesterMixin.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
python=${1:-$repo/.venv/bin/python}
python=$(cd "$(dirname "$python")" && pwd)/$(basename "$python")  # absolute, links kept (a venv)
version=$("$python" -c "import transformers; print(transformers.__version__)")
work=${STORM_UPSTREAM_DIR:-/tmp/storm-upstream-tests}
mkdir -p "$work"
if [ ! -d "$work/transformers-$version" ]; then
  "$python" -m pip download -q --no-deps --no-binary :all: "transformers==$version" -d "$work"
  tar xzf "$work/transformers-$version.tar.gz" -C "$work"
fi
tests=$work/transformers-$version/tests
mkdir -p "$tests/models/storm" "$tests/generation" "$tests/exporters"
cp "$repo"/dev/upstream_tests/test_*.py "$tests/models/storm/" && touch "$tests/models/storm/__init__.py"
mkdir -p "$work/transformers-$version/utils"
cp "$repo/dev/upstream_tests/fetch_hub_objects_for_ci.py" "$work/transformers-$version/utils/"
touch "$tests/__init__.py" "$tests/models/__init__.py" "$tests/generation/__init__.py" "$tests/exporters/__init__.py"
# the export mixins, which the generation mixin and some versions' test_modeling_common import (all @slow upstream;
# tests/exporters is not in the sdist)
[ -f "$tests/exporters/test_export.py" ] || printf 'class ExportTesterMixin:\n    pass\n\n\nclass ExportGenerateTesterMixin(ExportTesterMixin):\n    pass\n' > "$tests/exporters/test_export.py"
if [ -n "${2:-}" ]; then
  cp "$2" "$tests/generation/test_utils.py"
elif [ ! -f "$tests/generation/test_utils.py" ]; then
  echo "no GENERATION_TEST_UTILS: GenerationTesterMixin is replaced by an empty class" >&2
  printf 'class GenerationTesterMixin:\n    pass\n' > "$tests/generation/test_utils.py"
fi
# what transformers' test files import beyond our test extra, kept out of the venv
[ -d "$work/site/parameterized" ] || "$python" -m pip install -q --target "$work/site" parameterized timeout-decorator
cd "$work/transformers-$version"
export STORM_ASSETS=$repo/assets STORM_UPSTREAM_DIR=$work PYTHONPATH=$repo:$work/site
"$python" -m pytest -q -p no:cacheprovider -rs tests/models/storm/
