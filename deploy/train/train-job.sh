#!/bin/sh
# Train one model version from a data volume and publish it into a model repository, in one rename:
#
#   <REPO>/<MODEL_NAME>/<version>/                        the bundle (the worker's repository layout)
#   <REPO>/<MODEL_NAME>/<MODEL_NAME>-<version>.tar.gz     the same bundle packed (plcsense pack), and
#   <REPO>/<MODEL_NAME>/<MODEL_NAME>-<version>.tar.gz.sha256   its sha256, as a site's model.yaml pins it
#
# so that REPO served over HTTPS is also the store sites fetch from (<store>/<name>/<name>-<version>.tar.gz).
# Environment:
#   MODEL_NAME     required: the repository entry
#   MODEL_VERSION  default: one more than the highest numeric version there (a version is never overwritten)
#   KIND           images (default) or sensors
#   DATA           default /data: the data folder (or, for a sensor anomaly detector, CSV files separated by spaces)
#   REPO           default /models
#   TRAIN_ARGS     more `plcsense train` options, separated by spaces (e.g. "--task classify --epochs 80")
#   PACK           1 (default) packs the archive; 0 publishes the bundle folder only
# Until the final rename the bundle lives in the hidden folder .<version>.training, which the worker never reads.
set -eu
set -f  # DATA and TRAIN_ARGS are split on spaces, never globbed

: "${MODEL_NAME:?set MODEL_NAME, the repository entry <REPO>/<MODEL_NAME>/}"
KIND=${KIND:-images}
DATA=${DATA:-/data}
REPO=${REPO:-/models}
TRAIN_ARGS=${TRAIN_ARGS:-}
PACK=${PACK:-1}

case "$MODEL_NAME" in
  "" | .* | */*) echo "train-job: MODEL_NAME '$MODEL_NAME' must be a plain folder name" >&2; exit 2 ;;
esac
entry="$REPO/$MODEL_NAME"
mkdir -p "$entry"
if [ -z "${MODEL_VERSION:-}" ]; then
  last=$(find "$entry" -mindepth 1 -maxdepth 1 -type d -printf '%f\n' | grep -E '^[0-9]+$' | sort -n | tail -n 1 || true)
  MODEL_VERSION=$((${last:-0} + 1))
fi
case "$MODEL_VERSION" in
  "" | .* | */*) echo "train-job: MODEL_VERSION '$MODEL_VERSION' must be a plain folder name" >&2; exit 2 ;;
esac
target="$entry/$MODEL_VERSION"
if [ -e "$target" ]; then
  echo "train-job: $target exists; a published version is never replaced: choose another MODEL_VERSION" >&2
  exit 2
fi
work="$entry/.$MODEL_VERSION.training"
rm -rf "$work" "$work.partial" "$entry/.$MODEL_VERSION.tar.gz" "$entry/.$MODEL_VERSION.sha256"  # an interrupted run's

# shellcheck disable=SC2086  # DATA and TRAIN_ARGS are lists
plcsense train "$KIND" $DATA --name "$MODEL_NAME" --model-version "$MODEL_VERSION" --out "$work" $TRAIN_ARGS
archive="$entry/$MODEL_NAME-$MODEL_VERSION.tar.gz"
if [ "$PACK" = 1 ]; then  # packed before the rename, published after it
  plcsense pack "$work" --out "$entry/.$MODEL_VERSION.tar.gz" > "$entry/.$MODEL_VERSION.sha256"
fi
# rename(2) within one volume: the repository has the whole version or none of it
mv -T "$work" "$target"
echo "train-job: published $target"
if [ "$PACK" = 1 ]; then
  sha256=$(cut -d' ' -f1 "$entry/.$MODEL_VERSION.sha256")
  mv "$entry/.$MODEL_VERSION.tar.gz" "$archive"
  echo "$sha256  $MODEL_NAME-$MODEL_VERSION.tar.gz" > "$archive.sha256"  # sha256sum -c checks it
  rm "$entry/.$MODEL_VERSION.sha256"
  echo "train-job: pin it on a site: MODEL_NAME=$MODEL_NAME MODEL_VERSION=$MODEL_VERSION MODEL_SHA256=$sha256"
fi
