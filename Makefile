# `make serve`: virtualenv + core + every plugin (editable) + run on elemta.toml.
# `make test`:  the same, plus test tools (swaks, Postfix's smtp-source, PostgreSQL), then the suite.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PLUGINS := $(wildcard plugins/*/pyproject.toml)

.PHONY: serve sink test test-tools venv bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(PLUGINS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q -e '.[test]' $(foreach p,$(PLUGINS),-e $(dir $(p)))
	touch $@

serve: venv
	$(BIN)/elemta serve --config elemta.toml

# Elemta as a mail sink for development (sink.toml): SMTP on 127.0.0.1:1025, every
# message kept, the web UI on http://127.0.0.1:8025/ (docs/how-to/sink.md).
sink: venv
	$(BIN)/elemta serve --config sink.toml

# Debian packages the tests drive: swaks (a real SMTP client), jq, curl and
# sqlite3 (the how-to guides use them), systemd-analyze and logrotate (the files in contrib/), Postfix's
# smtp-source (load generator), PostgreSQL, OpenLDAP's slapd and Dovecot (the
# datasource plugin's tests start their own servers from these binaries, on
# loopback and in temporary folders), OpenDKIM's tools (DKIM interoperability),
# redis-server (shared greylist and rate-limit state), pebble (Let's Encrypt's test CA),
# the filters the milter and policy clients are tested against (opendkim, rspamd,
# postgrey, spamass-milter), HAProxy (a load balancer sending the PROXY protocol),
# Chromium and its WebDriver (the sink's web UI is tested in a headless browser).
# Installed only when running as root;
# policy-rc.d keeps the packages' own services from starting.
test-tools:
	@missing=""; \
	command -v swaks >/dev/null || missing="$$missing swaks"; \
	command -v jq >/dev/null || missing="$$missing jq"; \
	command -v curl >/dev/null || missing="$$missing curl"; \
	command -v sqlite3 >/dev/null || missing="$$missing sqlite3"; \
	command -v systemd-analyze >/dev/null || missing="$$missing systemd"; \
	[ -x /usr/sbin/logrotate ] || missing="$$missing logrotate"; \
	command -v smtp-source >/dev/null || [ -x /usr/sbin/smtp-source ] || missing="$$missing postfix"; \
	command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	[ -x /usr/sbin/slapd ] || missing="$$missing slapd"; \
	command -v ldapadd >/dev/null || missing="$$missing ldap-utils"; \
	[ -x /usr/sbin/dovecot ] || missing="$$missing dovecot-core"; \
	[ -x /usr/lib/dovecot/lmtp ] || missing="$$missing dovecot-lmtpd"; \
	[ -x /usr/lib/dovecot/imap ] || missing="$$missing dovecot-imapd"; \
	command -v opendkim-testmsg >/dev/null || missing="$$missing opendkim-tools"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v pebble >/dev/null || [ -x /usr/bin/pebble ] || missing="$$missing pebble"; \
	[ -x /usr/sbin/opendkim ] || missing="$$missing opendkim"; \
	[ -x /usr/bin/rspamd ] || missing="$$missing rspamd"; \
	[ -x /usr/sbin/postgrey ] || missing="$$missing postgrey"; \
	[ -x /usr/sbin/spamass-milter ] || missing="$$missing spamass-milter"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	[ -x /usr/bin/chromedriver ] || missing="$$missing chromium-driver"; \
	[ -x /usr/sbin/spamd ] || missing="$$missing spamd"; \
	[ -x /usr/sbin/haproxy ] || missing="$$missing haproxy"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			echo "installing:$$missing"; \
			policy=""; \
			if [ ! -e /usr/sbin/policy-rc.d ]; then \
				printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; policy=1; \
			fi; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
			status=$$?; [ -n "$$policy" ] && rm -f /usr/sbin/policy-rc.d; [ $$status = 0 ]; \
		else \
			echo "not root: cannot install$$missing (tests needing them skip, or fail under CI=true)"; \
		fi; \
	fi

test: venv test-tools
	PATH="$$PATH:/usr/sbin" $(BIN)/pytest -q -p no:cacheprovider

bench: venv test-tools
	PATH="$$PATH:/usr/sbin" $(BIN)/python bench/accept.py

clean:
	rm -rf $(VENV) .elemta build *.egg-info
