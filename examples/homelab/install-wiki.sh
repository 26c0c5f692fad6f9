#!/bin/sh
# Deploy step of the wiki: writes its pages into the bundle directory it serves.
set -eu
mkdir -p www
cat > www/index.html <<HTML
<!doctype html>
<title>Home wiki</title>
<h1>Home wiki</h1>
<p>Served by P2F on node <b>$P2F_NODE</b> as process <code>$P2F_PROCESS_ID</code>
(generation $P2F_GENERATION), port $PORT.</p>
HTML
echo "wiki pages written to $P2F_BUNDLE/www"
