#!/usr/bin/env bash
# Regenerates docs/cli.md from the commands' own --help (run from the repository root).
set -euo pipefail
EB=${EB:-.venv/bin/equalbits}
{
  echo "# CLI reference"
  echo
  echo "Generated from \`equalbits COMMAND --help\` by \`docs/gen_cli.sh\`. Every command exits 0 on success,"
  echo "2 on bad input (one line on stderr, no output file), 1 on an internal error (rerun with --debug),"
  echo "130 when interrupted by Ctrl-C, 143 by SIGTERM."
  for cmd in "" binarize inspect finetune eval export sweep quickstart data; do
    echo
    echo "## equalbits ${cmd}"
    echo
    echo '```'
    COLUMNS=110 NO_COLOR=1 TERM=dumb $EB $cmd --help | sed 's/[[:space:]]*$//'
    echo '```'
  done
} > docs/cli.md
