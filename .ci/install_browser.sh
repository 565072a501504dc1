#!/usr/bin/env bash
# Idempotently install Debian's headless Chromium + chromedriver for the MLflow UI browser test
# (tests/test_mlflow_ui.py). Does nothing when both binaries are already present.
set -euo pipefail

if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  echo "install_browser: chromium and chromedriver already present"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver

/usr/bin/chromium --version
/usr/bin/chromedriver --version
