#!/bin/sh
# A CD pipeline step without a GitOps controller: move a Fleet to a new image only once the image
# is on every node the Fleet targets. Needs kubectl (with the image-syncer plugin on PATH:
# `pip install image-syncer` installs kubectl-image_syncer) and a kubeconfig whose identity may
# get and patch the Fleet, plus NATS_URL and NATS_USER=reader / NATS_PASSWORD: deploy/nats's
# read-only user, which is all the command needs of NATS (docs/features.md, "Staged rollouts").
#
#   FLEET=game-servers/simple-game-server IMAGE=registry.example/game:1.39 ./rollout.sh
#
# The one command annotates the Fleet (image-syncer.octops.io/next-images), waits for the nodes
# (progress on stderr), then patches the image and removes the annotation. Exit codes: 0 done,
# 1 unreachable, 2 bad input, 3 no such Fleet, 4 forbidden, 5 timed out (the annotation stays:
# run again to resume), 6 someone else changed the Fleet meanwhile.
set -eu
: "${FLEET:?set FLEET=NAMESPACE/NAME}"
: "${IMAGE:?set IMAGE=[CONTAINER=]IMAGE}"
exec kubectl image-syncer rollout "$FLEET" --image "$IMAGE" --timeout "${TIMEOUT:-30m}"
