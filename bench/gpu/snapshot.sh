#!/bin/bash
# Freeze the committed capbalancer (package + profiles/) into .vwcb/ (ignored by /.vw*/), for carrying to the GPU
# machine: run.sh then imports capbalancer from there, so edits in progress in the shared checkout cannot break a run.
#   bench/gpu/snapshot.sh [REV]        (default HEAD)
set -e
R=$(cd "$(dirname "$0")/../.." && pwd); cd "$R"
REV=${1:-HEAD}
rm -rf .vwcb && mkdir -p .vwcb
# pyproject.toml marks it a source tree, so capbalancer reads profiles/ and deploy/ beside it (capbalancer/shipped.py)
git archive "$REV" capbalancer profiles deploy pyproject.toml | tar -x -C .vwcb
# EXTRA="path ...": working-tree files laid over the commit (e.g. a module not yet committed); recorded in COMMIT
for f in $EXTRA; do mkdir -p .vwcb/$(dirname $f); cp $f .vwcb/$f; done
echo "$(git rev-parse --short "$REV")${EXTRA:+ + working-tree $EXTRA ($(date -u +%H:%M:%SZ))} $(git log -1 --format=%cI "$REV") $(git log -1 --format=%s "$REV" | cut -c1-80)" > .vwcb/COMMIT
cat .vwcb/COMMIT; du -sh .vwcb
