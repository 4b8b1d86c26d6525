# Developer and packaging entry points. Everything here runs as root: the daemon mounts FUSE
# and the tests use loop devices.

PREFIX ?= /usr/local
DESTDIR ?=
CARGO ?= cargo

# Debian packages the daemon, the tests and the benchmark use.
APT_PACKAGES = e2fsprogs xfsprogs util-linux mount fio curl qemu-utils jq zsh fish groff-base \
               man-db bsdutils

# Where `docs-gen` writes shell completions and manual pages, and the volumectl that makes them.
GEN_DIR ?= target/gen
VOLUMECTL ?= target/release/volumectl

.PHONY: deps build run test lint install uninstall docs-gen

## deps: install what a fresh Debian machine lacks (apt packages).
deps:
	@missing=""; \
	for pair in mkfs.ext4:e2fsprogs mkfs.xfs:xfsprogs xfs_repair:xfsprogs setpriv:util-linux \
	            losetup:mount fio:fio curl:curl qemu-img:qemu-utils qemu-io:qemu-utils \
	            qemu-storage-daemon:qemu-utils jq:jq zsh:zsh fish:fish groff:groff-base \
	            man:man-db script:bsdutils; do \
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

## docs-gen: shell completions and manual pages, generated from the command-line definitions:
##   $(GEN_DIR)/completions/{bash/volumectl,zsh/_volumectl,fish/volumectl.fish} (and volumed's),
##   $(GEN_DIR)/man/volumectl.1, volumectl-COMMAND.1 for each command, volumed.8.
docs-gen: build
	rm -rf $(GEN_DIR)/completions $(GEN_DIR)/man
	mkdir -p $(GEN_DIR)/completions/bash $(GEN_DIR)/completions/zsh $(GEN_DIR)/completions/fish
	$(VOLUMECTL) man --dir $(GEN_DIR)/man
	for prog in volumectl volumed; do \
		$(VOLUMECTL) completions bash --for $$prog > $(GEN_DIR)/completions/bash/$$prog && \
		$(VOLUMECTL) completions zsh --for $$prog > $(GEN_DIR)/completions/zsh/_$$prog && \
		$(VOLUMECTL) completions fish --for $$prog > $(GEN_DIR)/completions/fish/$$prog.fish \
		|| exit 1; \
	done

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
