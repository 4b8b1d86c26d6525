# Developer and packaging entry points. Everything here runs as root: the daemon mounts FUSE
# and the tests use loop devices.

PREFIX ?= /usr/local
DESTDIR ?=
CARGO ?= cargo
BINDIR ?= $(PREFIX)/bin
UNITDIR ?= $(PREFIX)/lib/systemd/system
TMPFILESDIR ?= $(PREFIX)/lib/tmpfiles.d
SYSUSERSDIR ?= $(PREFIX)/lib/sysusers.d
DOCDIR ?= $(PREFIX)/share/doc/volumed
SYSCONFDIR ?= /etc
# Where install-files takes the binaries from (`install` builds them there first).
BUILD_DIR ?= target/release

# Debian packages the daemon, the tests and the benchmark use.
APT_PACKAGES = e2fsprogs xfsprogs util-linux mount fio curl qemu-utils systemd dpkg-dev

.PHONY: deps build run test lint install install-files uninstall deb

## deps: install what a fresh Debian machine lacks (apt packages, cargo-deb).
deps:
	@missing=""; \
	for pair in mkfs.ext4:e2fsprogs mkfs.xfs:xfsprogs xfs_repair:xfsprogs setpriv:util-linux \
	            losetup:mount fio:fio curl:curl qemu-img:qemu-utils qemu-io:qemu-utils \
	            qemu-storage-daemon:qemu-utils systemd-analyze:systemd \
	            systemd-socket-activate:systemd systemd-tmpfiles:systemd systemd-sysusers:systemd \
	            dpkg-shlibdeps:dpkg-dev; do \
		command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair##*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@test -e /dev/fuse || modprobe fuse
	@command -v cargo-deb >/dev/null 2>&1 || $(CARGO) install --locked cargo-deb

build:
	$(CARGO) build --release --locked

## run: set up and run the daemon in the foreground with the repository's daemon.toml.
run: deps build
	./target/release/volumed --config daemon.toml

## test: every test (unit and integration, real mounts); needs root and /dev/fuse.
test: deps
	$(CARGO) test --locked -- --test-threads=2

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

## install: build, then install-files (DESTDIR and PREFIX as usual; /etc stays /etc).
install: build install-files

## install-files: install the binaries in BUILD_DIR, the units (their paths adjusted to
## PREFIX), tmpfiles.d and sysusers.d files, the docs, and daemon.toml unless one exists.
install-files:
	install -D -m 0755 $(BUILD_DIR)/volumed $(DESTDIR)$(BINDIR)/volumed
	install -D -m 0755 $(BUILD_DIR)/volumectl $(DESTDIR)$(BINDIR)/volumectl
	install -d -m 0755 $(DESTDIR)$(UNITDIR)
	for unit in volumed.service volumed.socket; do \
		sed -e 's|/usr/bin/volumed|$(BINDIR)/volumed|' -e 's|/etc/volumed/|$(SYSCONFDIR)/volumed/|' \
		    -e 's|/usr/share/doc/volumed|$(DOCDIR)|' systemd/$$unit > $(DESTDIR)$(UNITDIR)/$$unit; \
		chmod 0644 $(DESTDIR)$(UNITDIR)/$$unit; \
	done
	install -D -m 0644 systemd/volumed.tmpfile $(DESTDIR)$(TMPFILESDIR)/volumed.conf
	install -D -m 0644 systemd/volumed.sysusers $(DESTDIR)$(SYSUSERSDIR)/volumed.conf
	install -d -m 0755 $(DESTDIR)$(DOCDIR)
	install -m 0644 README.md docs/*.md $(DESTDIR)$(DOCDIR)/
	@# The configuration belongs to the operator once installed: never overwritten.
	@if [ -e $(DESTDIR)$(SYSCONFDIR)/volumed/daemon.toml ]; then \
		echo "keeping $(DESTDIR)$(SYSCONFDIR)/volumed/daemon.toml"; \
	else \
		install -D -m 0644 daemon.toml $(DESTDIR)$(SYSCONFDIR)/volumed/daemon.toml; \
	fi

## uninstall: remove what install-files installed, except the configuration.
uninstall:
	rm -f $(DESTDIR)$(BINDIR)/volumed $(DESTDIR)$(BINDIR)/volumectl
	rm -f $(DESTDIR)$(UNITDIR)/volumed.service $(DESTDIR)$(UNITDIR)/volumed.socket
	rm -f $(DESTDIR)$(TMPFILESDIR)/volumed.conf $(DESTDIR)$(SYSUSERSDIR)/volumed.conf
	rm -rf $(DESTDIR)$(DOCDIR)

## deb: the Debian package (cargo-deb, see [package.metadata.deb] in Cargo.toml) in
## target/debian/, with the debug symbols in a separate -dbgsym package.
deb: deps
	$(CARGO) deb --locked --dbgsym
