# Developer and packaging entry points. Everything here runs as root: the daemon mounts FUSE
# and the tests use loop devices.

PREFIX ?= /usr/local
DESTDIR ?=
CARGO ?= cargo

# Debian packages the daemon, the tests and the benchmark use.
APT_PACKAGES = e2fsprogs xfsprogs util-linux mount fio curl qemu-utils

.PHONY: deps build run test lint install uninstall

## deps: install what a fresh Debian machine lacks (apt packages).
deps:
	@missing=""; \
	for pair in mkfs.ext4:e2fsprogs mkfs.xfs:xfsprogs xfs_repair:xfsprogs setpriv:util-linux \
	            losetup:mount fio:fio curl:curl qemu-img:qemu-utils qemu-io:qemu-utils \
	            qemu-storage-daemon:qemu-utils; do \
		command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair##*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@test -e /dev/fuse || modprobe fuse

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

install: build
	install -D -m 0755 target/release/volumed $(DESTDIR)$(PREFIX)/bin/volumed
	install -D -m 0755 target/release/volumectl $(DESTDIR)$(PREFIX)/bin/volumectl
	install -D -m 0644 daemon.toml $(DESTDIR)/etc/volumed/daemon.toml
	install -D -m 0644 systemd/volumed.service $(DESTDIR)/lib/systemd/system/volumed.service

uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/volumed $(DESTDIR)$(PREFIX)/bin/volumectl
	rm -f $(DESTDIR)/lib/systemd/system/volumed.service
