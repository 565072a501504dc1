#!/usr/bin/env bash
# Idempotently install Debian's PostgreSQL server binaries for the real-service tests
# (tests/test_services_*.py): they initdb a throw-away cluster in a temporary folder, start it on
# 127.0.0.1 at a free port as the unprivileged `postgres` user, and stop it at the end.
# No cluster is created or started here (create_main_cluster = false). Does nothing when
# initdb and pg_ctl are already present.
set -euo pipefail

if compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null && compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null \
   && id postgres >/dev/null 2>&1; then
  echo "install_postgres: $(ls -d /usr/lib/postgresql/*/bin | head -1) already present"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi

# The tests make their own clusters: keep the package from creating and starting a default one on :5432.
$SUDO mkdir -p /etc/postgresql-common/createcluster.d
echo "create_main_cluster = false" | $SUDO tee /etc/postgresql-common/createcluster.d/ijepa-tests.conf >/dev/null

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends postgresql

ls -d /usr/lib/postgresql/*/bin
