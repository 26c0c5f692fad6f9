#!/bin/sh
# Deploy step for the backup service: make sure its target directory exists.
set -eu
mkdir -p "${BACKUP_DIR:-/tmp/p2f-backups}"
echo "backup target ready: ${BACKUP_DIR:-/tmp/p2f-backups}"
