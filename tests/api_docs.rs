//! docs/api.md cannot drift from the daemon: every `sh` example of the page runs, in order,
//! against a real daemon, and each answer must match the `# → STATUS {json}` comment that
//! follows its request (the convention is stated at the top of the page). Every route and
//! method of the API's route table must have an example.
//!
//! How: the blocks are joined into one bash script in which each request (a command that
//! starts with `curl`) goes through a shell function that also records the status, the
//! method and the URL curl used, and the body. The script runs in a temporary directory that
//! holds the `cirros.raw` the page asks for, with the page's socket path replaced by the test
//! daemon's. Commands without a comment (`IMAGE=$(...)`, a waiting loop) run as they are.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::*;
use serde_json::Value;
use volumed::api::Route;

/// The socket path the page's examples use.
const DOC_SOCKET: &str = "/run/volumed/volumed.sock";

/// What marks the expected answer of the request before it.
const EXPECT: &str = "# → ";

/// Routes allowed to lack an example, as `(method, template)` of [`Route::template`]. Each
/// entry must be a route of the table that the page does not cover yet; the test fails once
/// the page covers it, so the list only shrinks.
const NOT_YET_DOCUMENTED: &[(&str, &str)] = &[];

/// One shell command of the page, and the answer stated for it if it is a request.
#[derive(Debug)]
struct Step {
    /// Where it is in docs/api.md, for messages.
    line: usize,
    command: String,
    expected: Option<Expected>,
}

#[derive(Debug)]
struct Expected {
    status: u16,
    body: Option<Value>,
}

/// What one request answered, as recorded by the script.
#[derive(Debug)]
struct Answer {
    status: u16,
    method: String,
    path: String,
    body: Vec<u8>,
}

/// The commands of every `sh` block, in order, with continuation lines joined.
fn steps(page: &str) -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    let mut in_block = false;
    let mut pending: Option<Step> = None;

    for (index, line) in page.lines().enumerate() {
        let number = index + 1;
        if !in_block {
            in_block = line.trim_end() == "```sh";
            continue;
        }
        if line.trim_end() == "```" {
            in_block = false;
            continue;
        }

        if let Some(step) = pending.as_mut() {
            step.command.push('\n');
            step.command.push_str(line);
            if !line.ends_with('\\') {
                steps.extend(pending.take());
            }
            continue;
        }
        if let Some(expectation) = line.strip_prefix(EXPECT) {
            let step = steps
                .last_mut()
                .unwrap_or_else(|| panic!("docs/api.md:{number}: an answer without a request"));
            assert!(
                step.expected.is_none(),
                "docs/api.md:{number}: two answers for one request"
            );
            step.expected = Some(parse_expected(expectation, number));
            continue;
        }
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let step = Step {
            line: number,
            command: line.to_owned(),
            expected: None,
        };
        if line.ends_with('\\') {
            pending = Some(step);
        } else {
            steps.push(step);
        }
    }
    assert!(!in_block, "docs/api.md: an `sh` block is not closed");
    steps
}

fn parse_expected(text: &str, line: usize) -> Expected {
    let (status, body) = match text.trim().split_once(' ') {
        Some((status, body)) => (status, Some(body.trim())),
        None => (text.trim(), None),
    };
    let status = status
        .parse()
        .unwrap_or_else(|_| panic!("docs/api.md:{line}: `{status}` is not an HTTP status"));
    let body = body.map(|body| {
        serde_json::from_str(body)
            .unwrap_or_else(|err| panic!("docs/api.md:{line}: the body is not JSON ({err})"))
    });
    Expected { status, body }
}

fn is_request(step: &Step) -> bool {
    step.command.starts_with("curl ")
}

/// The bash script that runs every step, recording each request's answer in `out`.
fn script(steps: &[Step], socket: &Path, out: &Path) -> String {
    let mut text = format!(
        "set -eo pipefail\n\
         doc_request() {{\n\
         \x20   local n=$1; shift\n\
         \x20   : > {out}/$n.body\n\
         \x20   command curl --silent --show-error --output {out}/$n.body \\\n\
         \x20       --write-out '%{{http_code}} %{{method}} %{{url_effective}}' \"$@\" \\\n\
         \x20       > {out}/$n.meta\n\
         \x20   cat {out}/$n.body\n\
         }}\n",
        out = out.display()
    );
    for (index, step) in steps.iter().enumerate() {
        let command = step
            .command
            .replace(DOC_SOCKET, &socket.display().to_string());
        let command = match command.strip_prefix("curl ") {
            Some(rest) if is_request(step) => format!("doc_request {index} {rest}"),
            _ => command,
        };
        text.push_str(&format!("# docs/api.md:{}\n{command}\n", step.line));
    }
    text
}

fn answer(out: &Path, index: usize) -> Option<Answer> {
    let meta = std::fs::read_to_string(out.join(format!("{index}.meta"))).ok()?;
    let mut fields = meta.splitn(3, ' ');
    let status = fields.next()?.parse().ok()?;
    let method = fields.next()?.to_owned();
    let url = fields.next()?;
    let path = url.strip_prefix("http://localhost")?;
    let path = path.split('?').next().unwrap_or(path).to_owned();
    let body = std::fs::read(out.join(format!("{index}.body"))).unwrap_or_default();
    Some(Answer {
        status,
        method,
        path,
        body,
    })
}

/// Checks that `actual` has everything `expected` shows: the same scalars, every key of an
/// object, and lists of the same length whose items match in order.
fn matches(actual: &Value, expected: &Value, at: &str) -> Result<(), String> {
    match (actual, expected) {
        (Value::Object(actual), Value::Object(expected)) => {
            for (key, wanted) in expected {
                let here = format!("{at}.{key}");
                let found = actual
                    .get(key)
                    .ok_or_else(|| format!("{here} is missing"))?;
                matches(found, wanted, &here)?;
            }
            Ok(())
        }
        (Value::Array(actual), Value::Array(expected)) => {
            if actual.len() != expected.len() {
                return Err(format!(
                    "{at} has {} items, the page shows {}",
                    actual.len(),
                    expected.len()
                ));
            }
            for (index, (found, wanted)) in actual.iter().zip(expected).enumerate() {
                matches(found, wanted, &format!("{at}[{index}]"))?;
            }
            Ok(())
        }
        _ if actual == expected => Ok(()),
        _ => Err(format!("{at} is {actual}, the page shows {expected}")),
    }
}

/// Every example of docs/api.md answers as the page says, run top to bottom against a
/// fresh daemon, and together they cover every route and method of the API.
#[test]
fn api_reference_examples_answer_as_documented() {
    for tool in ["bash", "curl", "jq"] {
        require(tool);
    }
    let page = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/api.md"))
        .expect("read docs/api.md");
    let steps = steps(&page);
    for step in &steps {
        assert_eq!(
            is_request(step),
            step.expected.is_some(),
            "docs/api.md:{}: a request needs a `{EXPECT}STATUS` line after it, and only a \
             request has one:\n{}",
            step.line,
            step.command
        );
    }
    assert!(
        steps.iter().filter(|step| is_request(step)).count() >= 20,
        "too few examples found: {steps:?}"
    );

    let daemon = Daemon::start();
    let work = daemon.dir.path().join("examples");
    let out = daemon.dir.path().join("answers");
    std::fs::create_dir_all(&work).expect("work dir");
    std::fs::create_dir_all(&out).expect("answers dir");
    random_file(&work.join("cirros.raw"), 4 << 20, 11);
    let script_path = daemon.dir.path().join("examples.sh");
    std::fs::write(&script_path, script(&steps, &daemon.socket, &out)).expect("write script");

    let run = sh(&format!(
        "cd {} && bash {}",
        work.display(),
        script_path.display()
    ));
    let printed = format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );

    let mut wrong = Vec::new();
    let mut covered = BTreeSet::new();
    for (index, step) in steps.iter().enumerate() {
        let Some(expected) = &step.expected else {
            continue;
        };
        let Some(answer) = answer(&out, index) else {
            wrong.push(format!("docs/api.md:{}: did not run", step.line));
            continue;
        };
        let route = Route::parse(&answer.path).ok().flatten();
        match &route {
            Some(route) => {
                covered.insert((answer.method.clone(), route.template()));
            }
            None => wrong.push(format!(
                "docs/api.md:{}: {} is no route of the API",
                step.line, answer.path
            )),
        }
        if answer.status != expected.status {
            wrong.push(format!(
                "docs/api.md:{}: {} {} answered {}, the page says {}: {}",
                step.line,
                answer.method,
                answer.path,
                answer.status,
                expected.status,
                String::from_utf8_lossy(&answer.body)
            ));
            continue;
        }
        if let Some(body) = &expected.body {
            let found: Value = serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
            if let Err(difference) = matches(&found, body, "body") {
                wrong.push(format!(
                    "docs/api.md:{}: {} {}: {difference}; the answer: {found}",
                    step.line, answer.method, answer.path
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "the page and the daemon disagree:\n{}\n{printed}",
        wrong.join("\n")
    );
    assert!(run.status.success(), "the examples failed: {printed}");

    let table: BTreeSet<(String, &str)> = Route::table()
        .into_iter()
        .map(|(method, template)| (method.to_owned(), template))
        .collect();
    let exempt: BTreeSet<(String, &str)> = NOT_YET_DOCUMENTED
        .iter()
        .map(|(method, template)| ((*method).to_owned(), *template))
        .collect();
    let missing: Vec<_> = table
        .difference(&covered)
        .filter(|route| !exempt.contains(*route))
        .collect();
    assert!(
        missing.is_empty(),
        "routes without an example in docs/api.md: {missing:?}"
    );
    let stale: Vec<_> = exempt
        .iter()
        .filter(|route| covered.contains(*route) || !table.contains(*route))
        .collect();
    assert!(
        stale.is_empty(),
        "NOT_YET_DOCUMENTED lists routes that have an example or do not exist: {stale:?}"
    );
}

/// The page's blocks are read as the convention says: continuation lines join, and an
/// answer belongs to the request before it.
#[test]
fn steps_join_continuations_and_attach_answers() {
    let page = "text\n```sh\nX=$(curl -s a | jq -r .id)\ncurl b \\\n  -d '{}'\n\
                # → 202 {\"a\": [1]}\n```\n```json\n{}\n```\n";

    let steps = steps(page);

    assert_eq!(steps.len(), 2, "{steps:?}");
    assert!(!is_request(&steps[0]) && steps[0].expected.is_none());
    assert_eq!(steps[1].command, "curl b \\\n  -d '{}'");
    let expected = steps[1].expected.as_ref().expect("an answer");
    assert_eq!(expected.status, 202);
    assert_eq!(expected.body, Some(serde_json::json!({"a": [1]})));
}

/// A shown body matches an answer with more fields, not one with other values or another
/// number of list items.
#[test]
fn shown_bodies_match_as_a_part_of_the_answer() {
    let answer = serde_json::json!({"a": 1, "b": {"c": "x", "d": [1, {"e": 2, "f": 3}]}});

    assert!(matches(
        &answer,
        &serde_json::json!({"b": {"d": [1, {"e": 2}]}}),
        "body"
    )
    .is_ok());
    assert!(matches(&answer, &serde_json::json!({"b": {"c": "y"}}), "body").is_err());
    assert!(matches(&answer, &serde_json::json!({"b": {"d": [1]}}), "body").is_err());
    assert!(matches(&answer, &serde_json::json!({"z": null}), "body").is_err());
}
