# Sourced by the project's scripts: creates or reuses the virtual env and installs the project
# (with its test extra) whenever pyproject.toml or the package layout changed since the last install
# (an editable install maps the packages it found at install time).
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.installed-$( (cat pyproject.toml; find secu pipelines jobs -name __init__.py | sort) | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "== installing the project and its test extra into $VENV (first run: a few minutes)"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -e '.[test]'
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi
export PATH="$PWD/$VENV/bin:$PATH"
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
export RAY_USAGE_STATS_ENABLED=0
