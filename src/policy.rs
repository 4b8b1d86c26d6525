//! Who may do what: check strings in the style of OpenStack's oslo.policy.
//!
//! Every request names an action (`volume:reimage`, `image:upload_image`, ...) and a target, the
//! resource it acts on. [`Policy::enforce`] evaluates the action's check string for the caller
//! and the target. Each action has a built-in default (see [`ACTIONS`]); the `[policy]` table of
//! `daemon.toml` overrides actions and defines or overrides rule aliases:
//!
//! ```toml
//! [policy]
//! # Only administrators re-image, even volumes they own.
//! "volume:reimage" = "role:admin"
//! # An alias: a key without ":", used elsewhere as rule:storage_team.
//! storage_team = "group:storage"
//! "volume:delete" = "rule:admin_api or (rule:owner and not rule:storage_team)"
//! ```
//!
//! # Check strings
//!
//! | check                          | true when                                                 |
//! |--------------------------------|-----------------------------------------------------------|
//! | `@`                            | always                                                    |
//! | `!`                            | never                                                     |
//! | `rule:NAME`                    | the check string of alias or action `NAME` is true        |
//! | `role:admin`, `is_admin:True`  | the caller is an administrator (see below)                |
//! | `is_admin:False`               | the caller is not an administrator                        |
//! | `role:member`                  | always: every caller holds it; other roles never match    |
//! | `uid:N`, `user:NAME`           | the caller's uid is `N`, or that of user `NAME`           |
//! | `uid:%(owner_uid)s`            | the caller owns the target; false for unowned targets     |
//! | `gid:N`, `group:NAME`          | the caller is in the group, as primary or supplementary   |
//!
//! Checks combine with `not`, `and`, `or` (any case) and parentheses. `not` binds tightest, then
//! `and`, then `or`: `a or b and not c` means `a or (b and (not c))`. An empty string means `@`.
//!
//! Administrators are root (uid 0) and the members of `admin_group`. User and group names are
//! looked up when the policy is loaded (at start and on reload); a name the system does not know
//! matches nobody, so a group can be named before it is created, but it takes a reload to count.
//!
//! Built-in aliases: `admin_api` = `role:admin`, `owner` = `uid:%(owner_uid)s`,
//! `admin_or_owner` = `rule:admin_api or rule:owner`.
//!
//! # Errors at load
//!
//! oslo.policy denies at request time whatever it cannot understand; this engine refuses to
//! load instead, with a one-line message naming the key: an unknown action (typos would
//! otherwise silently keep the default), an alias name other than letters, digits, `_`, `-`
//! and `.`, a syntax error (with its position), an unknown kind of check, a `rule:` naming no
//! alias or action, aliases or actions that refer to each other in a loop, and nesting deep
//! enough to threaten the evaluator's stack (32 levels of `(` and `not` in one string, 256
//! levels in all through `rule:` references).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::error::{Error, ErrorKind, Result};
use crate::identity::{self, Caller};

/// Every action the daemon checks: (name, default check string, what it allows).
pub const ACTIONS: &[(&str, &str, &str)] = &[
    ("volume:create", "@", "Create a volume."),
    (
        "volume:get",
        "rule:admin_or_owner",
        "Show a volume and its attachments.",
    ),
    (
        "volume:get_all",
        "@",
        "List volumes; a listing holds only the volumes volume:get allows.",
    ),
    ("volume:delete", "rule:admin_or_owner", "Delete a volume."),
    ("volume:extend", "rule:admin_or_owner", "Grow a volume."),
    (
        "volume:reimage",
        "rule:admin_or_owner",
        "Write an image over an available or failed volume.",
    ),
    (
        "volume:reimage_reserved",
        "rule:admin_or_owner",
        "Write an image over a volume reserved for an attachment.",
    ),
    (
        "volume_extension:volume_admin_actions:reset_status",
        "rule:admin_api",
        "Force the status fields of a volume.",
    ),
    (
        "volume:attachment_create",
        "rule:admin_or_owner",
        "Reserve a volume for an attachment.",
    ),
    (
        "volume:attachment_update",
        "rule:admin_or_owner",
        "Give an attachment its connector.",
    ),
    (
        "volume:attachment_complete",
        "rule:admin_or_owner",
        "Mark an attachment as in use.",
    ),
    (
        "volume:attachment_delete",
        "rule:admin_or_owner",
        "Detach: remove an attachment.",
    ),
    ("image:add_image", "@", "Create an image record."),
    ("image:get_image", "@", "Show or list images."),
    (
        "image:upload_image",
        "rule:admin_or_owner",
        "Store the data of an image.",
    ),
    (
        "image:delete_image",
        "rule:admin_or_owner",
        "Delete an image and its data.",
    ),
    (
        "image:deactivate",
        "rule:admin_api",
        "Stop an image from being read or used.",
    ),
    (
        "image:reactivate",
        "rule:admin_api",
        "Let a deactivated image be used again.",
    ),
    (
        "volumed:metrics",
        "rule:admin_api",
        "Read GET /metrics: counters of every volume, names and ids included.",
    ),
];

/// Built-in rule aliases: (name, check string).
const ALIASES: &[(&str, &str)] = &[
    ("admin_api", "role:admin"),
    ("owner", "uid:%(owner_uid)s"),
    ("admin_or_owner", "rule:admin_api or rule:owner"),
];

/// The one substitution a check may take from the target.
const OWNER_UID: &str = "%(owner_uid)s";

/// Deepest nesting of `(` and `not` within one check string; bounds the parser's recursion.
const MAX_NESTING: usize = 32;

/// Deepest evaluation, counting tree levels through `rule:` references; bounds the evaluator's
/// recursion on any thread's stack.
const MAX_DEPTH: usize = 256;

/// The resource a check is about.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct Target {
    /// Owner of the volume or image; `None` when the request is about no single owned
    /// resource (a create or a listing).
    pub owner_uid: Option<u32>,
}

impl Target {
    /// A resource owned by `uid`.
    pub fn owned_by(uid: u32) -> Self {
        Self {
            owner_uid: Some(uid),
        }
    }
}

/// Loaded rules: every action and alias, parsed, with names already resolved to ids.
#[derive(Clone)]
pub struct Policy {
    admin_group: String,
    /// `None` when the admin group does not exist: then only root is an administrator.
    admin_gid: Option<u32>,
    /// Sorted by name; `Check::Rule` holds indices into this.
    rules: Vec<Rule>,
}

/// One action or alias.
#[derive(Clone, Debug)]
struct Rule {
    name: String,
    /// The check string as written, for reload logs and dumps.
    source: String,
    check: Check,
}

/// A parsed check string.
#[derive(Clone, Debug)]
enum Check {
    Always,
    Never,
    Admin,
    Uid(u32),
    /// The caller owns the target.
    Owner,
    /// The caller is in this group.
    Group(u32),
    /// Index of another rule.
    Rule(usize),
    Not(Box<Check>),
    And(Vec<Check>),
    Or(Vec<Check>),
}

/// What one evaluation needs to know about the request.
struct Request<'a> {
    caller: &'a Caller,
    target: &'a Target,
    is_admin: bool,
}

impl Policy {
    /// Loads the built-in defaults overridden by `rules`, the `[policy]` table of
    /// `daemon.toml`: keys with a `:` are actions, keys without are rule aliases.
    ///
    /// `admin_group` names the group whose members are administrators besides root; a group
    /// the system does not know simply has no members.
    ///
    /// # Errors
    ///
    /// A one-line message naming the offending key; see the module documentation.
    pub fn new(admin_group: &str, rules: &BTreeMap<String, String>) -> Result<Policy, String> {
        Self::load(admin_group, rules, &SystemDirectory)
    }

    fn load(
        admin_group: &str,
        overrides: &BTreeMap<String, String>,
        directory: &dyn Directory,
    ) -> Result<Policy, String> {
        for key in overrides.keys() {
            check_key(key)?;
        }

        let mut sources: BTreeMap<&str, &str> = ACTIONS
            .iter()
            .map(|(action, default, _)| (*action, *default))
            .chain(ALIASES.iter().copied())
            .collect();
        for (name, source) in overrides {
            sources.insert(name, source);
        }

        // The map is sorted, so a name's place in `names` is its index in `rules`.
        let names: Vec<&str> = sources.keys().copied().collect();
        let mut rules = Vec::with_capacity(names.len());
        for (name, source) in &sources {
            let check = Parser::new(source, &names, directory)
                .parse()
                .map_err(|e| e.describe(name, source, &names))?;
            rules.push(Rule {
                name: name.to_string(),
                source: source.to_string(),
                check,
            });
        }

        check_references(&rules)?;

        Ok(Policy {
            admin_group: admin_group.to_string(),
            admin_gid: directory.group_id(admin_group),
            rules,
        })
    }

    /// Whether `caller` is an administrator: root or a member of the admin group.
    pub fn is_admin(&self, caller: &Caller) -> bool {
        caller.uid == 0 || self.admin_gid.is_some_and(|gid| caller.in_group(gid))
    }

    /// Succeeds if the policy allows `caller` to perform `action` on `target`.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Forbidden`] with the message Cinder gives.
    pub fn enforce(&self, action: &str, caller: &Caller, target: &Target) -> Result<()> {
        if self.allows(action, caller, target) {
            return Ok(());
        }

        tracing::debug!(action, uid = caller.uid, "denied by policy");
        Err(Error::new(
            ErrorKind::Forbidden,
            format!("Policy doesn't allow {action} to be performed."),
        ))
    }

    /// Whether the policy allows `caller` to perform `action` on `target`.
    pub fn allows(&self, action: &str, caller: &Caller, target: &Target) -> bool {
        let Some(index) = self.index_of(action) else {
            // A caller bug, not a request's fault: deny, loudly.
            tracing::error!(action = ?action, "policy check for an action with no rule; denied");
            return false;
        };

        let request = Request {
            caller,
            target,
            is_admin: self.is_admin(caller),
        };
        // Each rule is evaluated at most once per request, so a rule reached through many
        // references costs no more than one reached through one.
        let mut known = vec![None; self.rules.len()];
        self.evaluate(&Check::Rule(index), &request, &mut known)
    }

    /// Human-readable differences from `old`, one line per changed rule, for the reload log:
    /// `volume:reimage: "rule:admin_or_owner" -> "role:admin"`.
    pub fn changes_from(&self, old: &Policy) -> Vec<String> {
        let mut changes = Vec::new();
        if self.admin_group != old.admin_group {
            changes.push(format!(
                "admin_group: {:?} -> {:?}",
                old.admin_group, self.admin_group
            ));
        }

        let before = old.effective_rules();
        let after = self.effective_rules();
        let names: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
        for name in names {
            let (was, is) = (before.get(name), after.get(name));
            if was != is {
                changes.push(format!("{name}: {} -> {}", quoted(was), quoted(is)));
            }
        }
        changes
    }

    /// The check string in force for every action and alias, as written.
    pub fn effective_rules(&self) -> BTreeMap<String, String> {
        self.rules
            .iter()
            .map(|rule| (rule.name.clone(), rule.source.clone()))
            .collect()
    }

    fn index_of(&self, name: &str) -> Option<usize> {
        self.rules
            .binary_search_by(|rule| rule.name.as_str().cmp(name))
            .ok()
    }

    /// Evaluates `check`; `known` caches the result of each rule for this request.
    fn evaluate(&self, check: &Check, request: &Request, known: &mut [Option<bool>]) -> bool {
        match check {
            Check::Always => true,
            Check::Never => false,
            Check::Admin => request.is_admin,
            Check::Uid(uid) => request.caller.uid == *uid,
            Check::Owner => request.target.owner_uid == Some(request.caller.uid),
            Check::Group(gid) => request.caller.in_group(*gid),
            Check::Rule(index) => {
                if let Some(Some(result)) = known.get(*index) {
                    return *result;
                }
                let result = self
                    .rules
                    .get(*index)
                    .is_some_and(|rule| self.evaluate(&rule.check, request, known));
                if let Some(slot) = known.get_mut(*index) {
                    *slot = Some(result);
                }
                result
            }
            Check::Not(inner) => !self.evaluate(inner, request, known),
            Check::And(all) => all.iter().all(|c| self.evaluate(c, request, known)),
            Check::Or(any) => any.iter().any(|c| self.evaluate(c, request, known)),
        }
    }
}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Policy")
            .field("admin_group", &self.admin_group)
            .field("admin_gid", &self.admin_gid)
            .field("rules", &self.effective_rules())
            .finish()
    }
}

/// A check string for a log line, or `(none)` for a rule that does not exist on that side.
fn quoted(source: Option<&String>) -> String {
    source.map_or_else(|| "(none)".to_string(), |s| format!("{s:?}"))
}

/// Rejects unknown actions and alias names that no `rule:` check could spell.
fn check_key(key: &str) -> Result<(), String> {
    if key.contains(':') {
        if ACTIONS.iter().any(|(action, ..)| *action == key) {
            return Ok(());
        }
        let hint = did_you_mean(key, ACTIONS.iter().map(|(action, ..)| *action));
        return Err(format!("unknown policy {key:?}{hint}"));
    }

    let spellable = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if !spellable {
        return Err(format!(
            "{key:?}: a rule alias may hold only letters, digits, \"_\", \"-\" and \".\""
        ));
    }
    Ok(())
}

/// Rejects rules that refer to each other in a loop, or nest so deeply through `rule:`
/// references that evaluating them could exhaust a thread's stack.
fn check_references(rules: &[Rule]) -> Result<(), String> {
    let mut visits = vec![Visit::New; rules.len()];
    let mut path = Vec::new();
    for index in 0..rules.len() {
        measure_rule(rules, index, 0, &mut visits, &mut path)?;
    }
    Ok(())
}

/// Where the reference walk stands with one rule.
#[derive(Clone, Copy)]
enum Visit {
    New,
    /// On the current path: reaching it again closes a loop.
    Open,
    /// Measured: evaluating it recurses this many levels.
    Done(usize),
}

/// The evaluation depth of rule `index`, reached at `depth` levels below some other rule.
fn measure_rule(
    rules: &[Rule],
    index: usize,
    depth: usize,
    visits: &mut [Visit],
    path: &mut Vec<usize>,
) -> Result<usize, String> {
    let (Some(visit), Some(rule)) = (visits.get(index).copied(), rules.get(index)) else {
        return Ok(0);
    };

    let height = match visit {
        Visit::Done(height) => height,
        Visit::Open => {
            let start = path.iter().position(|i| *i == index).unwrap_or(0);
            let mut cycle: Vec<&str> = path[start..].iter().map(|i| rule_name(rules, *i)).collect();
            cycle.push(&rule.name);
            return Err(format!(
                "{:?}: rules refer to each other in a loop: {}",
                rule.name,
                cycle.join(" -> ")
            ));
        }
        Visit::New => {
            // Stop before walking further: the path alone already exceeds the limit.
            if depth > MAX_DEPTH {
                return Err(too_deep(rules, path, index));
            }

            visits[index] = Visit::Open;
            path.push(index);
            let height = measure_check(rules, &rule.check, depth, visits, path)?;
            path.pop();
            visits[index] = Visit::Done(height);
            height
        }
    };

    if depth + height > MAX_DEPTH {
        return Err(too_deep(rules, path, index));
    }
    Ok(height)
}

fn rule_name(rules: &[Rule], index: usize) -> &str {
    rules.get(index).map_or("?", |rule| rule.name.as_str())
}

/// Names the rule whose evaluation would go too deep: the first on the path.
fn too_deep(rules: &[Rule], path: &[usize], index: usize) -> String {
    let top = path.first().copied().unwrap_or(index);
    format!(
        "{:?}: rules nest more than {MAX_DEPTH} levels deep through \"rule:\" checks",
        rule_name(rules, top)
    )
}

/// The evaluation depth of `check`, reached at `depth` levels below some rule.
fn measure_check(
    rules: &[Rule],
    check: &Check,
    depth: usize,
    visits: &mut [Visit],
    path: &mut Vec<usize>,
) -> Result<usize, String> {
    let children = match check {
        Check::Rule(index) => return Ok(1 + measure_rule(rules, *index, depth + 1, visits, path)?),
        Check::Not(inner) => std::slice::from_ref(inner.as_ref()),
        Check::And(checks) | Check::Or(checks) => checks.as_slice(),
        _ => return Ok(1),
    };

    let mut height = 0;
    for child in children {
        height = height.max(measure_check(rules, child, depth + 1, visits, path)?);
    }
    Ok(height + 1)
}

/// A hint naming the candidate closest to a misspelt `word`, or nothing if none is close.
fn did_you_mean<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> String {
    // Long keys are not typos of short names, and the distance costs length squared.
    if word.len() > 64 {
        return String::new();
    }

    candidates
        .map(|candidate| (edit_distance(word, candidate), candidate))
        .filter(|(distance, _)| *distance <= 2 && distance * 3 <= word.chars().count())
        .min_by_key(|(distance, _)| *distance)
        .map_or_else(String::new, |(_, candidate)| {
            format!(" (did you mean {candidate:?}?)")
        })
}

/// Levenshtein distance in characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, a_char) in a.chars().enumerate() {
        let mut diagonal = i;
        row[0] = i + 1;
        for (j, b_char) in b.iter().enumerate() {
            let above = row[j + 1];
            let substitute = diagonal + usize::from(a_char != *b_char);
            row[j + 1] = substitute.min(above + 1).min(row[j] + 1);
            diagonal = above;
        }
    }
    row[b.len()]
}

/// Where user and group names are resolved; the tests use their own.
trait Directory {
    fn user_id(&self, name: &str) -> Option<u32>;
    fn group_id(&self, name: &str) -> Option<u32>;
}

/// The system's password and group databases.
struct SystemDirectory;

impl Directory for SystemDirectory {
    fn user_id(&self, name: &str) -> Option<u32> {
        identity::user_id(name)
    }

    fn group_id(&self, name: &str) -> Option<u32> {
        identity::group_id(name)
    }
}

/// Why a check string did not load.
#[derive(Debug)]
enum ParseError {
    /// `problem` found at byte offset `at`.
    Syntax { at: usize, problem: String },
    /// `rule:NAME` names no alias or action.
    UnknownRule(String),
}

impl ParseError {
    /// The one-line message for the operator, naming the key.
    fn describe(&self, key: &str, source: &str, names: &[&str]) -> String {
        match self {
            ParseError::Syntax { at, problem } => {
                // Characters, not bytes, so the position matches what an editor shows.
                let place = match source.get(..*at) {
                    Some(before) if *at < source.len() => {
                        format!("at character {}", before.chars().count() + 1)
                    }
                    _ => "at the end".to_string(),
                };
                format!("{key:?}: {problem} {place} in {source:?}")
            }
            ParseError::UnknownRule(name) => {
                let hint = did_you_mean(name, names.iter().copied());
                format!("{key:?}: unknown rule {name:?} in {source:?}{hint}")
            }
        }
    }
}

fn syntax(at: usize, problem: impl Into<String>) -> ParseError {
    ParseError::Syntax {
        at,
        problem: problem.into(),
    }
}

/// A piece of a check string.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum Token<'a> {
    Open,
    Close,
    And,
    Or,
    Not,
    /// A check such as `role:admin` or `@`.
    Atom(&'a str),
    End,
}

impl fmt::Display for Token<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Token::Open => f.write_str("\"(\""),
            Token::Close => f.write_str("\")\""),
            Token::And => f.write_str("\"and\""),
            Token::Or => f.write_str("\"or\""),
            Token::Not => f.write_str("\"not\""),
            Token::Atom(text) => write!(f, "{text:?}"),
            Token::End => f.write_str("the end"),
        }
    }
}

/// Splits a check string into tokens, each with its byte offset.
struct Lexer<'a> {
    source: &'a str,
    pos: usize,
}

impl<'a> Lexer<'a> {
    fn next_token(&mut self) -> Result<(usize, Token<'a>), ParseError> {
        let rest = self.source.get(self.pos..).unwrap_or("");
        let text = rest.trim_start();
        let start = self.pos + (rest.len() - text.len());

        let (len, token) = match text.chars().next() {
            None => (0, Token::End),
            Some('(') => (1, Token::Open),
            Some(')') => (1, Token::Close),
            Some(_) => {
                let len = atom_len(text)
                    .map_err(|offset| syntax(start + offset, "\"%(\" without its closing \")\""))?;
                let word = &text[..len];
                let token = if word.eq_ignore_ascii_case("and") {
                    Token::And
                } else if word.eq_ignore_ascii_case("or") {
                    Token::Or
                } else if word.eq_ignore_ascii_case("not") {
                    Token::Not
                } else {
                    Token::Atom(word)
                };
                (len, token)
            }
        };

        self.pos = start + len;
        Ok((start, token))
    }
}

/// Byte length of the check at the start of `text`: up to whitespace or a parenthesis, except
/// that a substitution such as `%(owner_uid)s` keeps its parentheses. `Err` holds the offset of
/// a `%(` that is never closed.
fn atom_len(text: &str) -> Result<usize, usize> {
    let mut pos = 0;
    while let Some(c) = text[pos..].chars().next() {
        if c.is_whitespace() || c == '(' || c == ')' {
            break;
        }
        if text[pos..].starts_with("%(") {
            match text[pos..].find(')') {
                Some(close) => pos += close + 1,
                None => return Err(pos),
            }
            continue;
        }
        pos += c.len_utf8();
    }
    Ok(pos)
}

/// Recursive descent over `or` (loosest), `and`, then `not` and parentheses.
struct Parser<'a> {
    lexer: Lexer<'a>,
    peeked: Option<(usize, Token<'a>)>,
    /// All alias and action names, sorted: `rule:` checks resolve to indices here.
    names: &'a [&'a str],
    directory: &'a dyn Directory,
    /// Open `(` and `not` around the current position.
    nesting: usize,
}

impl<'a> Parser<'a> {
    fn new(source: &'a str, names: &'a [&'a str], directory: &'a dyn Directory) -> Self {
        Self {
            lexer: Lexer { source, pos: 0 },
            peeked: None,
            names,
            directory,
            nesting: 0,
        }
    }

    fn parse(mut self) -> Result<Check, ParseError> {
        // oslo.policy treats an empty rule as "anyone".
        if self.peek()?.1 == Token::End {
            return Ok(Check::Always);
        }

        let check = self.any_of()?;
        match self.next()? {
            (_, Token::End) => Ok(check),
            (at, Token::Close) => Err(syntax(at, "\")\" without its \"(\"")),
            (at, token) => Err(syntax(
                at,
                format!("expected \"and\" or \"or\", found {token}"),
            )),
        }
    }

    fn next(&mut self) -> Result<(usize, Token<'a>), ParseError> {
        match self.peeked.take() {
            Some(peeked) => Ok(peeked),
            None => self.lexer.next_token(),
        }
    }

    fn peek(&mut self) -> Result<(usize, Token<'a>), ParseError> {
        let token = self.next()?;
        self.peeked = Some(token);
        Ok(token)
    }

    /// `a or b or ...`
    fn any_of(&mut self) -> Result<Check, ParseError> {
        let first = self.all_of()?;
        let mut checks = Vec::new();
        while self.peek()?.1 == Token::Or {
            self.next()?;
            checks.push(self.all_of()?);
        }

        if checks.is_empty() {
            return Ok(first);
        }
        checks.insert(0, first);
        Ok(Check::Or(checks))
    }

    /// `a and b and ...`
    fn all_of(&mut self) -> Result<Check, ParseError> {
        let first = self.single()?;
        let mut checks = Vec::new();
        while self.peek()?.1 == Token::And {
            self.next()?;
            checks.push(self.single()?);
        }

        if checks.is_empty() {
            return Ok(first);
        }
        checks.insert(0, first);
        Ok(Check::And(checks))
    }

    /// `not a`, `(...)` or one check.
    fn single(&mut self) -> Result<Check, ParseError> {
        let (at, token) = self.next()?;
        match token {
            Token::Not => {
                let inner = self.nested(at, Self::single)?;
                Ok(Check::Not(Box::new(inner)))
            }
            Token::Open => {
                let inner = self.nested(at, Self::any_of)?;
                match self.next()? {
                    (_, Token::Close) => Ok(inner),
                    (_, Token::End) => Err(syntax(at, "\"(\" without its \")\"")),
                    (found_at, found) => Err(syntax(
                        found_at,
                        format!("expected \"and\", \"or\" or \")\", found {found}"),
                    )),
                }
            }
            Token::Atom(text) => self.atom(at, text),
            other => Err(syntax(at, format!("expected a check, found {other}"))),
        }
    }

    /// Runs `parse` one nesting level deeper, refusing to go past [`MAX_NESTING`].
    fn nested(
        &mut self,
        at: usize,
        parse: fn(&mut Self) -> Result<Check, ParseError>,
    ) -> Result<Check, ParseError> {
        if self.nesting >= MAX_NESTING {
            return Err(syntax(
                at,
                format!("more than {MAX_NESTING} levels of \"(\" and \"not\""),
            ));
        }

        self.nesting += 1;
        let check = parse(self);
        self.nesting -= 1;
        check
    }

    /// One check such as `role:admin`, found at byte offset `at`.
    fn atom(&self, at: usize, text: &str) -> Result<Check, ParseError> {
        match text {
            "@" => return Ok(Check::Always),
            "!" => return Ok(Check::Never),
            _ => {}
        }
        let Some((kind, value)) = text.split_once(':') else {
            return Err(syntax(
                at,
                format!("expected a check like \"role:admin\", found {text:?}"),
            ));
        };
        if value.is_empty() {
            return Err(syntax(at, format!("{text:?} has nothing after \":\"")));
        }
        if value.contains("%(") && !(kind == "uid" && value == OWNER_UID) {
            return Err(syntax(
                at,
                format!("cannot substitute {value:?}; the only substitution is uid:{OWNER_UID}"),
            ));
        }

        let check = match kind {
            "rule" => match self.names.binary_search(&value) {
                Ok(index) => Check::Rule(index),
                Err(_) => return Err(ParseError::UnknownRule(value.to_string())),
            },
            // Roles compare without case, as in oslo.policy.
            "role" if value.eq_ignore_ascii_case("admin") => Check::Admin,
            "role" if value.eq_ignore_ascii_case("member") => Check::Always,
            "role" => Check::Never,
            "is_admin" if value.eq_ignore_ascii_case("true") => Check::Admin,
            "is_admin" if value.eq_ignore_ascii_case("false") => Check::Not(Box::new(Check::Admin)),
            "is_admin" => {
                return Err(syntax(
                    at,
                    format!("is_admin takes True or False, found {value:?}"),
                ));
            }
            "uid" if value == OWNER_UID => Check::Owner,
            "uid" => Check::Uid(parse_id(at, kind, value)?),
            "gid" => Check::Group(parse_id(at, kind, value)?),
            "user" => self
                .directory
                .user_id(value)
                .map_or(Check::Never, Check::Uid),
            "group" => self
                .directory
                .group_id(value)
                .map_or(Check::Never, Check::Group),
            _ => return Err(syntax(at, format!("unknown kind of check {kind:?}"))),
        };
        Ok(check)
    }
}

/// A numeric uid or gid.
fn parse_id(at: usize, kind: &str, value: &str) -> Result<u32, ParseError> {
    value
        .parse()
        .map_err(|_| syntax(at, format!("{kind} {value:?} is not a number")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fixed directory, so the tests do not depend on the host's users and groups.
    struct FakeDirectory;

    const ADMIN_GID: u32 = 900;
    const OPS_GID: u32 = 4242;
    const ALICE: u32 = 1001;

    impl Directory for FakeDirectory {
        fn user_id(&self, name: &str) -> Option<u32> {
            (name == "alice").then_some(ALICE)
        }

        fn group_id(&self, name: &str) -> Option<u32> {
            match name {
                "volumed-admin" => Some(ADMIN_GID),
                "ops" => Some(OPS_GID),
                _ => None,
            }
        }
    }

    fn table(rules: &[(&str, &str)]) -> BTreeMap<String, String> {
        rules
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn load(rules: &[(&str, &str)]) -> Result<Policy, String> {
        Policy::load("volumed-admin", &table(rules), &FakeDirectory)
    }

    fn policy(rules: &[(&str, &str)]) -> Policy {
        load(rules).unwrap()
    }

    fn load_error(rules: &[(&str, &str)]) -> String {
        load(rules).unwrap_err()
    }

    fn user(uid: u32) -> Caller {
        Caller::new(uid, 100)
    }

    fn member_of(uid: u32, gid: u32) -> Caller {
        Caller {
            uid,
            gid: 100,
            groups: vec![100, gid],
        }
    }

    /// Whether `check`, set as `volume:extend`, allows `caller` on `target`.
    fn check_allows(check: &str, caller: &Caller, target: Target) -> bool {
        policy(&[("volume:extend", check)]).allows("volume:extend", caller, &target)
    }

    fn check_allows_uid(check: &str, uid: u32) -> bool {
        check_allows(check, &user(uid), Target::default())
    }

    #[test]
    fn defaults_let_owners_and_admins_act() {
        let policy = policy(&[]);
        let mine = Target::owned_by(1000);

        assert!(policy.allows("volume:reimage", &user(1000), &mine));
        assert!(!policy.allows("volume:reimage", &user(1001), &mine));
        assert!(policy.allows("volume:reimage", &user(0), &mine));
        assert!(policy.allows("volume:reimage", &member_of(1001, ADMIN_GID), &mine));
        assert!(policy.allows("volume:create", &user(1001), &Target::default()));
        assert!(!policy.allows("image:deactivate", &user(1000), &mine));
        assert!(policy.allows("image:deactivate", &user(0), &mine));
    }

    #[test]
    fn every_action_and_alias_has_its_default() {
        let rules = policy(&[]).effective_rules();

        for (action, default, description) in ACTIONS {
            assert_eq!(
                rules.get(*action).map(String::as_str),
                Some(*default),
                "{action}"
            );
            assert!(action.contains(':') && !description.is_empty(), "{action}");
        }
        for (alias, default) in ALIASES {
            assert!(check_key(alias).is_ok(), "{alias}");
            assert_eq!(
                rules.get(*alias).map(String::as_str),
                Some(*default),
                "{alias}"
            );
        }
        assert_eq!(rules.len(), ACTIONS.len() + ALIASES.len());
    }

    #[test]
    fn system_policy_loads_with_a_missing_admin_group() {
        let policy = Policy::new("no-such-group-volumed", &BTreeMap::new()).unwrap();

        assert!(policy.is_admin(&user(0)));
        assert!(!policy.is_admin(&member_of(1000, 0)));
    }

    #[test]
    fn system_admin_group_makes_members_admins() {
        // Group "root" (gid 0) exists on every Unix system.
        let policy = Policy::new("root", &table(&[("volume:extend", "group:root")])).unwrap();

        assert!(policy.is_admin(&member_of(1000, 0)));
        assert!(!policy.is_admin(&user(1000)));
        assert!(policy.allows("volume:extend", &member_of(1000, 0), &Target::default()));
        assert!(!policy.allows("volume:extend", &user(1000), &Target::default()));
    }

    #[test]
    fn root_is_admin_without_any_group() {
        let policy = policy(&[]);

        assert!(policy.is_admin(&Caller::daemon()));
        assert!(policy.is_admin(&Caller::new(0, 1234)));
        assert!(!policy.is_admin(&Caller::new(1000, 0)));
    }

    #[test]
    fn always_never_and_empty() {
        assert!(check_allows_uid("@", 5));
        assert!(!check_allows_uid("!", 0));
        assert!(check_allows_uid("", 5));
        assert!(check_allows_uid("   ", 5));
    }

    #[test]
    fn and_binds_tighter_than_or() {
        // uid:1 or (uid:2 and !)
        assert!(check_allows_uid("uid:1 or uid:2 and !", 1));
        assert!(!check_allows_uid("uid:1 or uid:2 and !", 2));
        // (! and uid:1) or uid:2
        assert!(check_allows_uid("! and uid:1 or uid:2", 2));
    }

    #[test]
    fn not_binds_tighter_than_and() {
        // (not uid:1) and @
        assert!(!check_allows_uid("not uid:1 and @", 1));
        assert!(check_allows_uid("not uid:1 and @", 2));
        // (not @) or uid:1
        assert!(check_allows_uid("not @ or uid:1", 1));
        assert!(!check_allows_uid("not @ or uid:1", 2));
    }

    #[test]
    fn parentheses_group() {
        assert!(!check_allows_uid("(uid:1 or uid:2) and !", 1));
        assert!(check_allows_uid("not (uid:1 or uid:2)", 3));
        assert!(!check_allows_uid("not (uid:1 or uid:2)", 2));
        assert!(check_allows_uid("((uid:1))", 1));
        assert!(check_allows_uid("(uid:1)or(uid:2)", 2));
    }

    #[test]
    fn not_not_cancels() {
        assert!(check_allows_uid("not not uid:1", 1));
        assert!(!check_allows_uid("not not uid:1", 2));
    }

    #[test]
    fn keywords_ignore_case() {
        assert!(check_allows_uid("uid:1 OR uid:2", 2));
        assert!(!check_allows_uid("uid:1 And NOT uid:1", 1));
    }

    #[test]
    fn owner_substitution_needs_an_owner() {
        let check = "uid:%(owner_uid)s";

        assert!(check_allows(check, &user(7), Target::owned_by(7)));
        assert!(!check_allows(check, &user(8), Target::owned_by(7)));
        assert!(!check_allows(check, &user(0), Target::default()));
        assert!(check_allows(
            "(uid:%(owner_uid)s)",
            &user(7),
            Target::owned_by(7)
        ));
    }

    #[test]
    fn groups_count_primary_and_supplementary() {
        assert!(check_allows(
            "group:ops",
            &member_of(5, OPS_GID),
            Target::default()
        ));
        assert!(check_allows(
            "group:ops",
            &Caller::new(5, OPS_GID),
            Target::default()
        ));
        assert!(!check_allows("group:ops", &user(5), Target::default()));
        assert!(check_allows(
            "gid:4242",
            &member_of(5, OPS_GID),
            Target::default()
        ));
    }

    #[test]
    fn unknown_group_and_user_match_nobody() {
        assert!(!check_allows(
            "group:nobody-here",
            &user(0),
            Target::default()
        ));
        assert!(!check_allows(
            "user:nobody-here",
            &user(0),
            Target::default()
        ));
        assert!(check_allows(
            "group:nobody-here or @",
            &user(0),
            Target::default()
        ));
    }

    #[test]
    fn user_names_resolve_to_uids() {
        assert!(check_allows_uid("user:alice", ALICE));
        assert!(!check_allows_uid("user:alice", ALICE + 1));
    }

    #[test]
    fn roles_and_is_admin() {
        let admin = member_of(5, ADMIN_GID);

        assert!(check_allows("role:admin", &admin, Target::default()));
        assert!(check_allows("role:Admin", &admin, Target::default()));
        assert!(!check_allows("role:admin", &user(5), Target::default()));
        assert!(check_allows("role:member", &user(5), Target::default()));
        assert!(!check_allows("role:reader", &admin, Target::default()));
        assert!(check_allows("is_admin:True", &admin, Target::default()));
        assert!(!check_allows("is_admin:False", &admin, Target::default()));
        assert!(check_allows("is_admin:False", &user(5), Target::default()));
    }

    #[test]
    fn rules_reach_aliases_and_actions() {
        let policy = policy(&[
            ("ops_team", "group:ops"),
            ("admin_api", "rule:ops_team"),
            ("volume:extend", "rule:volume:delete"),
        ]);
        let ops = member_of(5, OPS_GID);

        // Overriding an alias changes every rule built on it.
        assert!(policy.allows(
            "volume_extension:volume_admin_actions:reset_status",
            &ops,
            &Target::default()
        ));
        assert!(!policy.allows(
            "volume_extension:volume_admin_actions:reset_status",
            &user(0),
            &Target::default()
        ));
        assert!(policy.allows("volume:extend", &user(6), &Target::owned_by(6)));
        assert!(!policy.allows("volume:extend", &user(6), &Target::owned_by(7)));
    }

    #[test]
    fn shared_references_are_evaluated_once() {
        // Without the per-request cache this doubles at each level: 2^40 evaluations.
        let mut rules: Vec<(String, String)> = (0..40)
            .map(|i| {
                (
                    format!("a{i}"),
                    format!("rule:a{} and rule:a{}", i + 1, i + 1),
                )
            })
            .collect();
        rules.push(("a40".to_string(), "@".to_string()));
        rules.push(("volume:extend".to_string(), "rule:a0".to_string()));
        let rules: Vec<(&str, &str)> = rules.iter().map(|(k, v)| (&k[..], &v[..])).collect();

        assert!(policy(&rules).allows("volume:extend", &user(1), &Target::default()));
    }

    #[test]
    fn enforce_refuses_with_cinders_message() {
        let policy = policy(&[]);

        let err = policy
            .enforce("volume:delete", &user(1), &Target::owned_by(2))
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Forbidden);
        assert_eq!(
            err.message(),
            "Policy doesn't allow volume:delete to be performed."
        );
        assert!(policy
            .enforce("volume:delete", &user(2), &Target::owned_by(2))
            .is_ok());
    }

    #[test]
    fn unregistered_action_is_denied() {
        let policy = policy(&[]);

        assert!(!policy.allows("volume:no_such_thing", &user(0), &Target::default()));
        assert!(policy
            .enforce("volume:no_such_thing", &user(0), &Target::default())
            .is_err());
    }

    #[test]
    fn unknown_action_is_named_with_a_hint() {
        let err = load_error(&[("volume:reimag", "@")]);

        assert_eq!(
            err,
            "unknown policy \"volume:reimag\" (did you mean \"volume:reimage\"?)"
        );
        assert_eq!(
            load_error(&[("disk:wipe", "@")]),
            "unknown policy \"disk:wipe\""
        );
    }

    #[test]
    fn unknown_rule_is_named() {
        let err = load_error(&[("volume:reimage", "rule:nope")]);

        assert_eq!(
            err,
            "\"volume:reimage\": unknown rule \"nope\" in \"rule:nope\""
        );
        let err = load_error(&[("volume:get", "rule:admin_or_ownr")]);
        assert!(err.ends_with("(did you mean \"admin_or_owner\"?)"), "{err}");
    }

    #[test]
    fn unspellable_alias_names_are_refused() {
        for key in ["", "two words", "a(b)", "%(owner_uid)s"] {
            let err = load_error(&[(key, "@")]);
            assert!(err.contains("rule alias"), "{key:?}: {err}");
        }
    }

    #[test]
    fn syntax_errors_name_key_and_position() {
        let cases = [
            ("uid:1 and", "expected a check, found the end at the end"),
            (
                "uid:1 uid:2",
                "expected \"and\" or \"or\", found \"uid:2\" at character 7",
            ),
            ("(uid:1", "\"(\" without its \")\" at character 1"),
            ("uid:1)", "\")\" without its \"(\" at character 6"),
            (
                "(uid:1 @)",
                "expected \"and\", \"or\" or \")\", found \"@\" at character 8",
            ),
            ("()", "expected a check, found \")\" at character 2"),
            ("and", "expected a check, found \"and\" at character 1"),
            ("not", "expected a check, found the end"),
            (
                "admin",
                "expected a check like \"role:admin\", found \"admin\"",
            ),
            ("tenant:x", "unknown kind of check \"tenant\""),
            ("Role:admin", "unknown kind of check \"Role\""),
            ("uid:abc", "uid \"abc\" is not a number at character 1"),
            ("uid:-1", "uid \"-1\" is not a number"),
            ("gid:4294967296", "gid \"4294967296\" is not a number"),
            ("role:", "has nothing after \":\""),
            (
                "is_admin:maybe",
                "is_admin takes True or False, found \"maybe\"",
            ),
            ("uid:%(project_id)s", "cannot substitute \"%(project_id)s\""),
            ("group:%(owner_uid)s", "the only substitution"),
            (
                "uid:%(owner_uid",
                "\"%(\" without its closing \")\" at character 5",
            ),
            (
                "é and uid:x",
                "expected a check like \"role:admin\", found \"é\" at character 1",
            ),
            ("@ and é:x", "unknown kind of check \"é\" at character 7"),
        ];
        for (source, expected) in cases {
            let err = load_error(&[("volume:extend", source)]);
            assert!(err.starts_with("\"volume:extend\": "), "{source:?}: {err}");
            assert!(err.contains(expected), "{source:?}: {err}");
            assert!(err.contains(&format!("{source:?}")), "{source:?}: {err}");
        }
    }

    #[test]
    fn errors_stay_on_one_line() {
        let err = load_error(&[("volume:extend", "uid:1\nand\n")]);

        assert!(!err.contains('\n'), "{err}");
        assert!(err.contains("at the end"), "{err}");
    }

    #[test]
    fn deep_nesting_is_refused() {
        let deep = format!(
            "{}@{}",
            "(".repeat(MAX_NESTING + 1),
            ")".repeat(MAX_NESTING + 1)
        );
        let err = load_error(&[("volume:extend", deep.as_str())]);
        assert!(err.contains("levels of \"(\" and \"not\""), "{err}");

        let nots = format!("{}@", "not ".repeat(100_000));
        assert!(load(&[("volume:extend", nots.as_str())]).is_err());

        let fine = format!("{}@{}", "(".repeat(MAX_NESTING), ")".repeat(MAX_NESTING));
        assert!(check_allows_uid(&fine, 1));
    }

    #[test]
    fn long_flat_chains_are_fine() {
        let long = vec!["uid:1"; 10_000].join(" or ");

        assert!(check_allows_uid(&long, 1));
        assert!(!check_allows_uid(&long, 2));
    }

    #[test]
    fn loops_are_refused() {
        let err = load_error(&[("a", "rule:a")]);
        assert_eq!(err, "\"a\": rules refer to each other in a loop: a -> a");

        let err = load_error(&[("a", "rule:b"), ("b", "@ and rule:a")]);
        assert_eq!(
            err,
            "\"a\": rules refer to each other in a loop: a -> b -> a"
        );

        let err = load_error(&[
            ("volume:get", "rule:volume:delete"),
            ("volume:delete", "rule:x"),
        ]);
        assert!(err.contains("unknown rule \"x\""), "{err}");

        let err = load_error(&[("owner", "rule:admin_or_owner")]);
        assert!(
            err.contains("admin_or_owner -> owner -> admin_or_owner"),
            "{err}"
        );
    }

    #[test]
    fn long_reference_chains_are_refused() {
        let mut rules: Vec<(String, String)> = (0..10_000)
            .map(|i| (format!("r{i}"), format!("rule:r{}", i + 1)))
            .collect();
        rules.push(("r10000".to_string(), "@".to_string()));
        let rules: Vec<(&str, &str)> = rules.iter().map(|(k, v)| (&k[..], &v[..])).collect();

        let err = load_error(&rules);
        assert!(err.contains("levels deep"), "{err}");
        assert!(!err.contains('\n'));
    }

    #[test]
    fn changes_name_each_changed_rule() {
        let old = policy(&[]);
        let new = policy(&[("volume:reimage", "role:admin"), ("ops_team", "group:ops")]);

        assert_eq!(
            new.changes_from(&old),
            vec![
                "ops_team: (none) -> \"group:ops\"".to_string(),
                "volume:reimage: \"rule:admin_or_owner\" -> \"role:admin\"".to_string(),
            ]
        );
        assert_eq!(old.changes_from(&new).len(), 2);
        assert!(old.changes_from(&old).is_empty());

        let other_admins = Policy::load("ops", &BTreeMap::new(), &FakeDirectory).unwrap();
        assert_eq!(
            other_admins.changes_from(&old),
            vec!["admin_group: \"volumed-admin\" -> \"ops\"".to_string()]
        );
    }

    #[test]
    fn effective_rules_show_overrides_as_written() {
        let rules = policy(&[("volume:get", "  role:admin  ")]).effective_rules();

        assert_eq!(rules["volume:get"], "  role:admin  ");
        assert_eq!(rules["volume:delete"], "rule:admin_or_owner");
    }

    #[test]
    fn debug_shows_rules_not_internals() {
        let shown = format!("{:?}", policy(&[]));

        assert!(shown.contains("admin_or_owner"), "{shown}");
        assert!(!shown.contains("Check"), "{shown}");
    }

    /// xorshift64: deterministic, so a failure reproduces.
    struct Random(u64);

    impl Random {
        fn below(&mut self, bound: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % bound as u64) as usize
        }

        fn pick<'a>(&mut self, choices: &[&'a str]) -> &'a str {
            choices[self.below(choices.len())]
        }
    }

    #[test]
    fn garbage_never_panics() {
        const PIECES: &[&str] = &[
            "(",
            ")",
            " ",
            "and",
            "or",
            "not",
            "AND",
            "@",
            "!",
            ":",
            "%(",
            ")s",
            "%(owner_uid)s",
            "uid:",
            "uid:1",
            "gid:4242",
            "role:admin",
            "role:",
            "rule:",
            "rule:owner",
            "rule:volume:get",
            "rule:volume:extend",
            "group:ops",
            "user:alice",
            "is_admin:",
            "True",
            "é",
            "\n",
            "\t",
            "\u{a0}",
            "\0",
            "x",
            "0",
            "%",
            "s",
            "rule:a",
            "rule:b",
        ];
        const VALID: &[&str] = &["@", "!", "uid:1", "role:admin", "rule:owner", "rule:b"];
        let mut random = Random(0x9e37_79b9_7f4a_7c15);
        let callers = [
            user(0),
            user(1),
            member_of(1, OPS_GID),
            member_of(1, ADMIN_GID),
        ];

        for _ in 0..5_000 {
            let mut source = String::new();
            for _ in 0..random.below(12) {
                if random.below(8) == 0 {
                    let c = char::from_u32(random.below(0x3000) as u32);
                    source.push(c.unwrap_or('?'));
                } else {
                    source.push_str(random.pick(PIECES));
                }
            }
            let alias = random.pick(VALID);

            let loaded = load(&[
                ("volume:extend", source.as_str()),
                ("a", alias),
                ("b", "rule:a or rule:owner"),
            ]);
            match loaded {
                Ok(policy) => {
                    for caller in &callers {
                        policy.allows("volume:extend", caller, &Target::owned_by(1));
                        policy.allows("volume:extend", caller, &Target::default());
                    }
                }
                Err(err) => assert!(!err.contains('\n'), "{source:?}: {err}"),
            }
        }
    }

    /// A check tree for the reference evaluator: `Uid` atoms only.
    enum Expr {
        Uid(u32),
        Not(Box<Expr>),
        And(Box<Expr>, Box<Expr>),
        Or(Box<Expr>, Box<Expr>),
    }

    impl Expr {
        fn generate(random: &mut Random, depth: usize) -> Expr {
            let choice = if depth == 0 { 0 } else { random.below(4) };
            let mut child = || Box::new(Expr::generate(random, depth - 1));
            match choice {
                0 => Expr::Uid(1 + random.below(3) as u32),
                1 => Expr::Not(child()),
                2 => Expr::And(child(), child()),
                _ => Expr::Or(child(), child()),
            }
        }

        fn holds_for(&self, uid: u32) -> bool {
            match self {
                Expr::Uid(want) => *want == uid,
                Expr::Not(inner) => !inner.holds_for(uid),
                Expr::And(a, b) => a.holds_for(uid) && b.holds_for(uid),
                Expr::Or(a, b) => a.holds_for(uid) || b.holds_for(uid),
            }
        }

        /// Writes the tree with only the parentheses precedence requires.
        fn render(&self, outer: u8) -> String {
            let (own, text) = match self {
                Expr::Uid(uid) => (3, format!("uid:{uid}")),
                Expr::Not(inner) => (3, format!("not {}", inner.render(3))),
                Expr::And(a, b) => (2, format!("{} and {}", a.render(2), b.render(2))),
                Expr::Or(a, b) => (1, format!("{} or {}", a.render(1), b.render(1))),
            };
            if own < outer {
                format!("({text})")
            } else {
                text
            }
        }
    }

    #[test]
    fn precedence_matches_a_reference_evaluator() {
        let mut random = Random(0x2545_f491_4f6c_dd1d);

        for _ in 0..500 {
            let expr = Expr::generate(&mut random, 4);
            let source = expr.render(0);
            let policy = policy(&[("volume:extend", source.as_str())]);

            for uid in 1..=3 {
                let allowed = policy.allows("volume:extend", &user(uid), &Target::default());
                assert_eq!(allowed, expr.holds_for(uid), "{source:?} for uid {uid}");
            }
        }
    }
}
