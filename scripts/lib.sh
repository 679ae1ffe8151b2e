# shellcheck shell=bash disable=SC2154  # root and tmp come from the sourcing script
# Shared by the benchmark scripts (source it; it defines functions only).
# Each script sets: root (the repository) and functions say and die; it
# calls scratch_dir for tmp and fg_pid, or sets them itself.

# A command run in the background and waited for, so that a signal ends the
# script (and its cleanup ends the command) at once.
run_fg() {
  local rc=0
  "$@" &
  fg_pid=$!
  wait "$fg_pid" || rc=$?
  fg_pid=""
  return "$rc"
}

# A private copy of livemig in $tmp: $LIVEMIG, or a release build found
# through cargo metadata (which honours CARGO_TARGET_DIR). livemig
# re-executes itself to start guests, so a concurrent rebuild would
# otherwise break a run mid-way. Prints its path.
private_livemig() {
  if [[ -n ${LIVEMIG:-} ]]; then
    [[ -x $LIVEMIG ]] || die "LIVEMIG=$LIVEMIG is not an executable"
    cp "$LIVEMIG" "$tmp/livemig"
  else
    say "building livemig (cargo build --release)"
    (cd "$root" && cargo build --release --quiet)
    local target_dir
    target_dir=$(cd "$root" && cargo metadata --no-deps --format-version 1 |
      python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
    cp "$target_dir/release/livemig" "$tmp/livemig"
  fi
  echo "$tmp/livemig"
}

# A temporary directory $tmp for script NAME, removed on exit, when the
# command run_fg waits for ($fg_pid) is killed too; INT, TERM and HUP end
# the script as those signals do.
scratch_dir() {
  tmp=$(mktemp -d "${TMPDIR:-/tmp}/$1.$$.XXXXXX")
  fg_pid=""
  trap 'if [[ -n $fg_pid ]]; then kill "$fg_pid" 2>/dev/null || true; fi; rm -rf "$tmp"' EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM HUP
}
