# shellcheck shell=bash
# Helpers shared by the jaxpref launch scripts (tpu_vm.sh, gpu_slurm.sh). Source it; do not run it.
#
# Written for bash 3.2 too (macOS /bin/bash, where many people run gcloud): no associative arrays,
# no namerefs, and possibly-empty arrays are expanded as ${arr[@]+"${arr[@]}"} because bash < 4.4
# treats "${arr[@]}" of an empty array as unbound under `set -u`.

# 1 after --dry-run: commands are printed with DRY_RUN_PREFIX and nothing runs.
DRY_RUN=0
DRY_RUN_PREFIX='[dry-run] '

# Set by take_value: the option's value and how many words the option used (1 or 2).
VALUE=''
SHIFT_BY=1

PROG=${0##*/}

die() {
  # One line on stderr, exit 2 (the usage-error status of most CLIs).
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 2
}

warn() {
  printf '%s: warning: %s\n' "$PROG" "$*" >&2
}

# VALUE and SHIFT_BY are read by the scripts that source this file.
# shellcheck disable=SC2034
take_value() {
  # Reads the value of an option given as `--opt=value` or `--opt value`.
  # Usage: take_value "$@"; then use $VALUE and `shift "$SHIFT_BY"`.
  case $1 in
    *=*)
      VALUE=${1#*=}
      SHIFT_BY=1
      ;;
    *)
      if (($# < 2)) || [[ $2 == --* ]]; then
        die "option $1 needs a value (see --help)"
      fi
      VALUE=$2
      SHIFT_BY=2
      ;;
  esac
}

require_value() {
  # Usage: require_value "$value" "--opt" [ENV_VAR]
  if [[ -z $1 ]]; then
    if [[ -n ${3:-} ]]; then
      die "missing $2 (or set $3)"
    fi
    die "missing $2"
  fi
}

require_positive_int() {
  # Usage: require_positive_int "$value" "--opt"
  local int_re='^[1-9][0-9]*$'
  [[ $1 =~ $int_re ]] || die "$2 must be a positive integer, got '$1'"
}

require_cmd() {
  # A dry run needs none of the tools it prints, so it is checked only for real runs.
  if ((DRY_RUN == 0)) && ! command -v "$1" >/dev/null 2>&1; then
    die "$1 not found on PATH: $2 (or use --dry-run to only print the commands)"
  fi
}

quote_arg() {
  # Prints one word so that a POSIX shell reads it back unchanged, as plainly as possible.
  # In `--flag=value` and `KEY=value` only the value is quoted (`--config.name="a b"`): a shell
  # reads that identically and people read it more easily.
  local word=$1
  local safe_re='^[A-Za-z0-9_./:=@%+,-]+$'
  local assign_re='^(-{0,2}[A-Za-z_][A-Za-z0-9_.-]*=)(.*)$'
  if [[ ! $word =~ $safe_re && $word =~ $assign_re ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    word=${BASH_REMATCH[2]}
  fi
  quote_word "$word"
}

quote_word() {
  # Bare when safe, else "double" quotes, else 'single' quotes, else 'single' with '\'' escapes.
  local word=$1
  local safe_re='^[A-Za-z0-9_./:=@%+,-]+$'
  if [[ $word =~ $safe_re ]]; then
    printf '%s' "$word"
  elif [[ $word != *[\"\$\`\\!]* ]]; then
    printf '"%s"' "$word"
  elif [[ $word != *\'* ]]; then
    printf "'%s'" "$word"
  else
    printf "'%s'" "${word//\'/\'\\\'\'}"
  fi
}

shell_join() {
  # Prints its arguments as one shell command line (each word quoted by quote_arg).
  local word sep=''
  for word in "$@"; do
    printf '%s' "$sep"
    quote_arg "$word"
    sep=' '
  done
}

# The ~ below is meant literally: it is printed for the remote shell to expand.
# shellcheck disable=SC2088
remote_path() {
  # Quotes a path for a remote shell but keeps a leading ~ unquoted so that the remote shell
  # expands it to the remote home (local and remote homes differ).
  local path=$1
  case $path in
    '~') printf '~' ;;
    '~/'*)
      printf '~/'
      quote_arg "${path#\~/}"
      ;;
    *) quote_arg "$path" ;;
  esac
}

join_by() {
  # Usage: join_by SEPARATOR PART... Builds one remote command line from readable pieces.
  local separator=$1 out=$2
  shift 2
  local part
  for part in "$@"; do
    out+=$separator$part
  done
  printf '%s' "$out"
}

run_cmd() {
  # Runs a command, echoing it first; under --dry-run only prints it (on stdout, prefixed).
  if ((DRY_RUN)); then
    printf '%s%s\n' "$DRY_RUN_PREFIX" "$(shell_join "$@")"
    return 0
  fi
  printf '+ %s\n' "$(shell_join "$@")" >&2
  "$@"
}

config_file() {
  # configs/x.py:tiny -> configs/x.py (ml_collections config files take a `:argument`).
  printf '%s' "${1%%:*}"
}

config_stem() {
  # configs/x.py:tiny -> x-tiny, a default name for logs and jobs.
  local file=${1%%:*} stem
  stem=${file##*/}
  stem=${stem%.py}
  if [[ $1 == *:* ]]; then
    stem+=-${1#*:}
  fi
  printf '%s' "$stem"
}

check_env_assignment() {
  # Usage: check_env_assignment "KEY=value" "--env"
  local env_re='^[A-Za-z_][A-Za-z0-9_]*='
  [[ $1 =~ $env_re ]] || die "$2 needs KEY=VALUE, got '$1'"
}

check_override() {
  # absl flags also accept `--config.key value`, but a launcher cannot tell that value from a
  # stray word, so overrides must be written as one word.
  local override_re='^--config\.[A-Za-z0-9_.]+='
  [[ $1 =~ $override_re ]] || die "override '$1' must have the form --config.key=value"
}
