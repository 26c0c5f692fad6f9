#!/bin/sh
# The notes server: serves its own directory over HTTP.
exec python3 -m http.server "$1"
