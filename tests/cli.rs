//! volumectl as people and scripts meet it: shell completions and manual pages generated from
//! its clap definition (and volumed's), progress on a terminal and on a pipe, error messages
//! with hints and exit codes, `--json` on every command, and the exit-code table of
//! docs/cli.md. Everything runs the real binaries; the client tests talk to a real daemon.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const VOLUMECTL: &str = env!("CARGO_BIN_EXE_volumectl");

/// setpriv credentials of uid nobody with only its primary group.
const AS_NOBODY: &str = "setpriv --reuid=65534 --regid=65534 --clear-groups";

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs volumectl without a daemon (for completions, pages, help).
fn volumectl(args: &[&str]) -> Output {
    Command::new("timeout")
        .args(["-k", "5", "60", VOLUMECTL])
        .args(args)
        .output()
        .expect("run volumectl")
}

fn volumectl_ok(args: &[&str]) -> String {
    let out = volumectl(args);
    assert!(
        out.status.success(),
        "volumectl {args:?} failed ({}): {}",
        out.status,
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Quotes `word` for sh.
fn quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// The names under `Commands:` in a help text, without `help`.
fn commands_in_help(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|line| line.trim() != "Commands:")
        .skip(1)
        .take_while(|line| line.starts_with("  "))
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_owned)
        .collect()
}

/// Every command path of volumectl as its `--help` lists them: `["list"]`, `["image",
/// "import"]`, ... (groups such as `image` themselves are left out).
fn every_command() -> Vec<Vec<String>> {
    let mut commands = Vec::new();
    for name in commands_in_help(&volumectl_ok(&["--help"])) {
        let nested = commands_in_help(&volumectl_ok(&[&name, "--help"]));
        if nested.is_empty() {
            commands.push(vec![name]);
            continue;
        }
        for inner in nested {
            commands.push(vec![name.clone(), inner]);
        }
    }
    commands
}

/// Asserts a failed run: its exit code, stderr's first line and its hint line.
fn assert_failure(out: &Output, code: i32, message: &str, hint: &str) {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {stderr}");
    let mut lines = stderr.lines();
    let first = lines.next().unwrap_or_default();
    assert!(
        first.starts_with("volumectl: ") && first.contains(message),
        "wanted `{message}` in: {stderr}"
    );
    let hint_line = lines
        .find(|line| line.starts_with("hint: "))
        .unwrap_or_default();
    assert!(
        hint_line.contains(hint),
        "wanted hint `{hint}` in: {stderr}"
    );
    assert!(out.stdout.is_empty(), "stdout: {}", text(&out.stdout));
}

/// Runs `script` on a pseudo-terminal; returns what the terminal showed and the exit status.
fn on_terminal(command: &str) -> (String, Output) {
    require("script");
    let out = sh(&format!(
        "script --quiet --return --command {} /dev/null",
        quote(command)
    ));
    (text(&out.stdout), out)
}

/// An imported raw image of `mib` MiB of random data; returns its id.
fn import_random_image(daemon: &Daemon, name: &str, mib: usize) -> String {
    let file = daemon.dir.path().join(format!("{name}.raw"));
    random_file(&file, mib << 20, 7);
    daemon.import_image(&file, name)
}

/// Attaches `volume` fully (reserve, connector, complete): it becomes `in-use`.
fn attach(daemon: &Daemon, volume: &Value) -> String {
    let id = daemon.reserve(&volume["id"], None);
    let r = daemon.api(
        "PUT",
        &format!("/v3/attachments/{id}"),
        Some(json!({"attachment": {"connector": {"host": "h1"}}})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = daemon.api(
        "POST",
        &format!("/v3/attachments/{id}/action"),
        Some(json!({"os-complete": null})),
    );
    assert_eq!(r.status, 204, "{}", r.text());
    id
}

/// The bash, zsh and fish scripts of both programs pass each shell's own syntax check.
#[test]
fn completion_scripts_pass_each_shells_syntax_check() {
    for shell in ["bash", "zsh", "fish"] {
        require(shell);
    }
    let dir = tempfile::tempdir().expect("temp dir");

    for program in ["volumectl", "volumed"] {
        for (shell, check) in [
            ("bash", "bash -n"),
            ("zsh", "zsh -n"),
            ("fish", "fish --no-execute"),
        ] {
            let script = volumectl_ok(&["completions", shell, "--for", program]);
            assert!(
                script.contains(program),
                "{shell} script for {program}: {script}"
            );
            let path = dir.path().join(format!("{program}.{shell}"));
            std::fs::write(&path, &script).expect("write script");

            let out = sh(&format!("{check} {}", path.display()));
            assert!(
                out.status.success(),
                "{check} refuses the {program} script: {}",
                text(&out.stderr)
            );
        }
    }
}

/// Sourced in bash, the completion function offers subcommands, nested subcommands and
/// options for the word being typed.
#[test]
fn bash_completion_completes_commands_and_options() {
    require("bash");
    let dir = tempfile::tempdir().expect("temp dir");
    let script = dir.path().join("volumectl.bash");
    std::fs::write(&script, volumectl_ok(&["completions", "bash"])).expect("write script");

    let complete = |words: &[&str]| -> Vec<String> {
        let quoted: Vec<String> = words.iter().map(|word| quote(word)).collect();
        let program = format!(
            "source {}\nCOMP_WORDS=({})\nCOMP_CWORD={}\nCOMP_LINE={}\nCOMP_POINT=${{#COMP_LINE}}\n\
             _volumectl volumectl {} {}\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"",
            script.display(),
            quoted.join(" "),
            words.len() - 1,
            quote(&words.join(" ")),
            quote(words[words.len() - 1]),
            quote(words[words.len().saturating_sub(2)]),
        );
        let out = Command::new("timeout")
            .args(["-k", "5", "30", "bash", "-c", &program])
            .output()
            .expect("run bash");
        assert!(out.status.success(), "bash: {}", text(&out.stderr));
        text(&out.stdout).lines().map(str::to_owned).collect()
    };

    assert_eq!(complete(&["volumectl", "rei"]), ["reimage"]);
    assert_eq!(complete(&["volumectl", "image", "imp"]), ["import"]);
    assert_eq!(complete(&["volumectl", "attachment", "com"]), ["complete"]);
    let options = complete(&["volumectl", "reimage", "vol1", "cirros", "--w"]);
    assert_eq!(options, ["--wait"]);
    let everything = complete(&["volumectl", ""]);
    for command in [
        "list",
        "show",
        "create",
        "reimage",
        "image",
        "completions",
        "man",
    ] {
        assert!(
            everything.iter().any(|word| word == command),
            "{command} not offered: {everything:?}"
        );
    }
}

/// `volumectl man` writes a page per command and volumed.8; each renders without groff
/// warnings, volumectl.1 names every command, and volumed.8 documents the daemon's options.
#[test]
fn manual_pages_render_and_name_every_command() {
    require("groff");
    require("man");
    let dir = tempfile::tempdir().expect("temp dir");
    let pages = dir.path().join("man");

    let listed = volumectl_ok(&["man", "--dir", pages.to_str().expect("utf-8 path")]);

    let written: BTreeSet<String> = std::fs::read_dir(&pages)
        .expect("pages written")
        .map(|entry| {
            entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert_eq!(listed.lines().count(), written.len(), "{listed}");
    let top = sh_ok(&format!("man -l {}", pages.join("volumectl.1").display()));
    for command in every_command() {
        let page = format!("volumectl-{}.1", command.join("-"));
        assert!(written.contains(&page), "no {page} in {written:?}");
        let group = format!("volumectl-{}(1)", command[0]);
        assert!(
            top.contains(&group),
            "volumectl.1 does not name {group}:\n{top}"
        );
    }
    assert!(top.contains("Exit codes:"), "{top}");

    for page in &written {
        let path = pages.join(page);
        let out = sh(&format!("groff -man -Tascii -ww -z {}", path.display()));
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "groff warns about {page}: {}",
            text(&out.stderr)
        );
    }
    let import = sh_ok(&format!(
        "man -l {}",
        pages.join("volumectl-image-import.1").display()
    ));
    assert!(import.contains("--disk-format"), "{import}");
    let daemon = sh_ok(&format!("man -l {}", pages.join("volumed.8").display()));
    for wanted in [
        "volumed(8)",
        "--config",
        "--check-config",
        "SIGHUP",
        "Exit status:",
    ] {
        assert!(
            daemon.contains(wanted),
            "volumed.8 lacks {wanted}:\n{daemon}"
        );
    }
}

/// `make docs-gen` lays out completions and pages where the install step picks them up.
#[test]
fn make_docs_gen_writes_completions_and_pages() {
    require("make");
    let dir = tempfile::tempdir().expect("temp dir");
    let gen = dir.path().join("gen");

    // `-o build` takes the binaries as built: the test runs the debug volumectl.
    sh_ok(&format!(
        "cd {} && make -o build docs-gen VOLUMECTL={VOLUMECTL} GEN_DIR={}",
        env!("CARGO_MANIFEST_DIR"),
        gen.display()
    ));

    for file in [
        "completions/bash/volumectl",
        "completions/bash/volumed",
        "completions/zsh/_volumectl",
        "completions/zsh/_volumed",
        "completions/fish/volumectl.fish",
        "completions/fish/volumed.fish",
        "man/volumectl.1",
        "man/volumectl-reimage.1",
        "man/volumed.8",
    ] {
        let path = gen.join(file);
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        assert!(size > 0, "{} missing or empty", path.display());
    }
}

/// `reimage --wait` draws a bar with rate and time left on a terminal, and prints plain
/// progress lines, without control characters, into a pipe.
#[test]
fn reimage_progress_is_a_bar_on_a_terminal_and_lines_on_a_pipe() {
    // 24 MiB at 6 MiB/s: about four seconds, long enough for a rate.
    let daemon = Daemon::start_with("refill_rate_limit = 6");
    let image = import_random_image(&daemon, "base", 24);
    daemon.create_volume("vol1", 1);
    daemon.create_volume("vol2", 1);
    let socket = daemon.socket.display().to_string();

    let command = format!("{VOLUMECTL} --socket {socket} reimage vol1 {image} --wait");
    let (screen, out) = on_terminal(&command);

    assert!(out.status.success(), "{screen}");
    assert!(screen.contains('\r'), "no redraw: {screen:?}");
    let frames: Vec<&str> = screen.split(['\r', '\n']).collect();
    let with_rate = frames
        .iter()
        .find(|frame| {
            frame.starts_with("vol1 [") && frame.contains(" MiB/s ") && !frame.contains("-- MiB/s")
        })
        .unwrap_or_else(|| panic!("no bar with a rate: {screen:?}"));
    assert!(with_rate.contains(" left"), "{with_rate}");
    assert!(!with_rate.contains("--:-- left"), "{with_rate}");
    assert!(screen.contains("100%"), "{screen:?}");
    assert!(
        screen.contains("vol1: re-imaged with image base"),
        "{screen:?}"
    );

    let out = daemon.volumectl(&["reimage", "vol2", &image, "--wait"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let progress = text(&out.stderr);
    assert!(
        !progress.contains('\r') && !progress.contains('\x1b'),
        "{progress:?}"
    );
    let lines: Vec<&str> = progress.lines().collect();
    assert!(lines.len() >= 2, "{progress}");
    for line in &lines {
        assert!(
            line.starts_with("vol2: ") && line.contains(" of 24.0 MiB (") && line.ends_with("%)"),
            "not a progress line: {line}"
        );
    }
    assert_eq!(lines.last(), Some(&"vol2: 24.0 MiB of 24.0 MiB (100%)"));
    assert!(
        lines.windows(2).all(|pair| pair[0] != pair[1]),
        "a line repeated: {progress}"
    );
    assert!(text(&out.stdout).starts_with("vol2: re-imaged with image base"));
}

/// `image import` draws a bar on a terminal and prints plain lines into a pipe.
#[test]
fn import_progress_is_a_bar_on_a_terminal_and_lines_on_a_pipe() {
    let daemon = Daemon::start();
    let file = daemon.dir.path().join("disk.raw");
    random_file(&file, 64 << 20, 3);
    let socket = daemon.socket.display().to_string();

    let command = format!(
        "{VOLUMECTL} --socket {socket} image import {} --name tty-image",
        file.display()
    );
    let (screen, out) = on_terminal(&command);

    assert!(out.status.success(), "{screen}");
    assert!(screen.contains("\rtty-image ["), "no bar: {screen:?}");
    assert!(
        screen.contains("100%  64.0 MiB of 64.0 MiB"),
        "no final frame: {screen:?}"
    );
    assert!(screen.contains(" left"), "{screen:?}");
    assert!(screen.contains("status:   active"), "{screen:?}");

    let out = daemon.volumectl(&["image", "import", file.to_str().unwrap(), "--name", "piped"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let progress = text(&out.stderr);
    assert!(
        !progress.contains('\r') && !progress.contains('\x1b'),
        "{progress:?}"
    );
    assert!(progress.starts_with("piped: "), "{progress}");
    assert!(
        progress.ends_with("piped: 64.0 MiB of 64.0 MiB (100%)\n"),
        "{progress}"
    );
}

/// A re-image refused because the volume is in-use or reserved says so and names the way
/// out, with exit code 1.
#[test]
fn reimage_refusals_by_status_hint_at_the_way_out() {
    let daemon = Daemon::start();
    let image = import_random_image(&daemon, "base", 1);
    let used = daemon.create_volume("used", 1);
    let held = daemon.create_volume("held", 1);
    attach(&daemon, &used);
    daemon.reserve(&held["id"], None);

    let in_use = daemon.volumectl(&["reimage", "used", "base"]);
    let reserved = daemon.volumectl(&["reimage", "held", &image]);

    assert_failure(
        &in_use,
        1,
        "cannot re-image used: Invalid volume",
        "used is in-use: detach it, or re-image a reserved volume with --reserved",
    );
    assert_failure(
        &reserved,
        1,
        "cannot re-image held: Invalid volume",
        "held is reserved: add --reserved to re-image it anyway",
    );
    let allowed = daemon.volumectl(&["reimage", "held", "base", "--reserved", "--wait"]);
    assert!(allowed.status.success(), "{}", text(&allowed.stderr));
}

/// Delete of an open volume, delete and extend of a volume in the wrong status, a name taken
/// and a bad status value each get a hint; nothing exits with a bare status code.
#[test]
fn refusals_name_the_cause_and_the_next_step() {
    require("losetup");
    let daemon = Daemon::start();
    let held = daemon.create_volume("held", 1);
    daemon.reserve(&held["id"], None);
    daemon.create_volume("looped", 1);
    let device = sh_ok(&format!(
        "losetup -f --show {}",
        daemon.vol("looped").display()
    ));

    let open = daemon.volumectl(&["delete", "looped"]);
    sh_ok(&format!("losetup -d {}", device.trim()));
    let delete = daemon.volumectl(&["delete", "held"]);
    let extend = daemon.volumectl(&["extend", "held", "2"]);
    let taken = daemon.volumectl(&["create", "held", "--size", "1"]);
    let bad_status = daemon.volumectl(&["reset-status", "held", "--status", "bogus"]);

    assert_failure(
        &open,
        1,
        "cannot delete volume looped: volume looped is open",
        "`losetup -l` lists loop devices",
    );
    let detach = "held is reserved: to delete it, detach it first";
    assert_failure(
        &delete,
        1,
        "cannot delete volume held: Invalid volume",
        detach,
    );
    let detach = "held is reserved: to extend it, detach it first";
    assert_failure(
        &extend,
        1,
        "cannot extend held to 2 GiB: Invalid volume",
        detach,
    );
    assert_failure(
        &taken,
        1,
        "cannot create volume held: a volume named held already exists",
        "choose another name",
    );
    assert_failure(
        &bad_status,
        1,
        "cannot reset the status of held: Invalid input for field/attribute status",
        "--status takes one of: creating, available, error",
    );
}

/// Unknown volumes, images and attachments say so and point at the listing; exit code 1.
#[test]
fn not_found_points_at_the_listing() {
    let daemon = Daemon::start();

    let volume = daemon.volumectl(&["show", "ghost"]);
    let image = daemon.volumectl(&["image", "show", "ghost"]);
    let attachment = daemon.volumectl(&["attachment", "delete", "ghost"]);
    daemon.create_volume("vol1", 1);
    let reimage = daemon.volumectl(&["reimage", "vol1", "ghost"]);

    let message = "cannot show volume ghost: Volume ghost could not be found.";
    assert_failure(&volume, 1, message, "see `volumectl list` for what exists");
    let message = "cannot show image ghost: Image ghost could not be found.";
    assert_failure(&image, 1, message, "see `volumectl image list`");
    let message = "cannot delete attachment ghost: Attachment ghost could not be found.";
    assert_failure(&attachment, 1, message, "see `volumectl attachment list`");
    let message = "cannot re-image vol1: Image ghost could not be found.";
    assert_failure(&reimage, 1, message, "see `volumectl image list`");
}

/// A user the policy refuses gets exit 1 and who may do it; a user the socket's mode keeps
/// out, or a daemon that is not there, gets exit 3 and what to check.
#[test]
fn permission_and_reachability_failures_say_what_to_check() {
    require("setpriv");
    let daemon = Daemon::start();
    let r = daemon.api(
        "POST",
        "/v3/volumes",
        Some(json!({"volume": {"name": "mine", "size": 1, "owner": 65534}})),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let socket = daemon.socket.display().to_string();
    let as_nobody = |args: &str| sh(&format!("{AS_NOBODY} {VOLUMECTL} --socket {socket} {args}"));

    let denied = as_nobody("reset-status mine --status error");
    sh_ok(&format!("chmod 0600 {socket}"));
    let locked_out = as_nobody("list");
    sh_ok(&format!("chmod 0666 {socket}"));
    let missing = volumectl(&["--socket", "/nonexistent/volumed.sock", "list"]);

    assert_failure(
        &denied,
        1,
        "cannot reset the status of mine: Policy doesn't allow",
        "by default only administrators",
    );
    assert_failure(
        &locked_out,
        3,
        &format!("cannot connect to volumed: permission denied on {socket}"),
        "ask an administrator to add you to it",
    );
    assert_failure(
        &missing,
        3,
        "cannot connect to volumed: no socket at /nonexistent/volumed.sock",
        "is volumed running?",
    );
}

/// Every command of volumectl prints JSON with `--json`, and the list of commands tried here
/// is the list `--help` shows, so a new command cannot go untested.
#[test]
fn every_command_prints_json() {
    let daemon = Daemon::start();
    let file = daemon.dir.path().join("base.raw");
    random_file(&file, 1 << 20, 5);
    let pages = daemon.dir.path().join("man");
    let instance = "0e3c2a6e-5c4a-4a47-8bd9-2f1b7b0b9c11";
    let mut tried: BTreeSet<String> = BTreeSet::new();

    let mut json_of = |args: &[&str]| -> Value {
        let mut full = vec!["--json"];
        full.extend_from_slice(args);
        let out = daemon.volumectl(&full);
        assert!(
            out.status.success(),
            "volumectl {full:?}: {}",
            text(&out.stderr)
        );
        let command = if ["image", "attachment"].contains(&args[0]) {
            format!("{} {}", args[0], args[1])
        } else {
            args[0].to_owned()
        };
        tried.insert(command);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|err| {
            panic!(
                "volumectl {full:?} printed no JSON ({err}): {}",
                text(&out.stdout)
            )
        })
    };

    let image = json_of(&["image", "import", file.to_str().unwrap(), "--name", "base"]);
    assert_eq!(image["status"], "active");
    assert_eq!(json_of(&["image", "list"])["images"][0]["name"], "base");
    assert_eq!(json_of(&["image", "show", "base"])["name"], "base");
    json_of(&["image", "deactivate", "base"]);
    json_of(&["image", "reactivate", "base"]);
    let created = json_of(&["create", "vol1", "--size", "1"]);
    assert_eq!(created["volume"]["name"], "vol1");
    assert_eq!(json_of(&["list"])["volumes"][0]["name"], "vol1");
    assert_eq!(json_of(&["show", "vol1"])["volume"]["status"], "available");
    assert_eq!(json_of(&["extend", "vol1", "2"])["accepted"], true);
    let accepted = json_of(&["reimage", "vol1", "base"]);
    assert_eq!(accepted["accepted"], true);
    daemon.wait_reimage("vol1", Duration::from_secs(60));
    let reimaged = json_of(&["reimage", "vol1", "base", "--wait"]);
    assert_eq!(reimaged["volume"]["reimage"]["state"], "succeeded");
    json_of(&["reset-status", "vol1", "--status", "available"]);
    let attachment = json_of(&["attachment", "create", "vol1", "--instance", instance]);
    let id = attachment["attachment"]["id"]
        .as_str()
        .expect("id")
        .to_owned();
    assert_eq!(
        json_of(&["attachment", "list"])["attachments"][0]["id"],
        id.as_str()
    );
    let updated = json_of(&[
        "attachment",
        "update",
        &id,
        "--connector",
        r#"{"host": "h"}"#,
    ]);
    assert_eq!(updated["attachment"]["status"], "attaching");
    json_of(&["attachment", "complete", &id]);
    json_of(&["attachment", "delete", &id]);
    json_of(&["delete", "vol1"]);
    json_of(&["image", "delete", "base"]);
    let script = json_of(&["completions", "bash"]);
    assert!(script["script"]
        .as_str()
        .is_some_and(|s| s.contains("_volumectl")));
    let written = json_of(&["man", "--dir", pages.to_str().unwrap()]);
    assert!(written["written"]
        .as_array()
        .is_some_and(|files| files.len() > 20));

    // `events --json` prints one object per line until the daemon stops; the stream's own
    // tests (tests/observability.rs) parse every line of it.
    tried.insert("events".to_owned());
    let listed: BTreeSet<String> = every_command().iter().map(|path| path.join(" ")).collect();
    assert_eq!(tried, listed, "commands tried here vs. `volumectl --help`");
}

/// The exit-code table of docs/cli.md says what `volumectl --help` says, code by code.
#[test]
fn exit_code_table_in_the_docs_matches_the_help() {
    let docs = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/cli.md"))
        .expect("docs/cli.md");
    let help = volumectl_ok(&["--help"]);

    let documented: Vec<(String, String)> = docs
        .lines()
        .skip_while(|line| !line.starts_with("## Exit codes"))
        .filter_map(|line| {
            let cells: Vec<&str> = line.trim().trim_matches('|').split('|').collect();
            let code = cells.first()?.trim();
            code.parse::<u8>().ok()?;
            Some((code.to_owned(), cells.get(1)?.trim().replace('`', "")))
        })
        .collect();
    // The help's rows, with continuation lines joined to their code.
    let mut helped: Vec<(String, String)> = Vec::new();
    for line in help
        .lines()
        .skip_while(|line| line.trim() != "Exit codes:")
        .skip(1)
    {
        let trimmed = line.trim();
        match trimmed.split_once(char::is_whitespace) {
            Some((code, meaning)) if code.parse::<u8>().is_ok() => {
                helped.push((code.to_owned(), meaning.trim().to_owned()));
            }
            _ if !trimmed.is_empty() => {
                let last = helped.last_mut().expect("a row before a continuation");
                last.1 = format!("{} {trimmed}", last.1);
            }
            _ => break,
        }
    }

    assert!(documented.len() >= 7, "{documented:?}");
    assert_eq!(documented, helped);
}

/// With `--json` a failure still prints words on stderr, nothing on stdout, and the
/// documented exit code.
#[test]
fn json_mode_failures_keep_messages_and_exit_codes() {
    let daemon = Daemon::start();

    let out = daemon.volumectl(&["--json", "show", "ghost"]);

    assert_failure(
        &out,
        1,
        "Volume ghost could not be found.",
        "volumectl list",
    );
}
