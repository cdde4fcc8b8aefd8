//! The README held to the binary, so that neither can drift from the other: its flag table
//! against `serve --help` (every flag has a row, every row a flag, and the defaults agree), the
//! metrics the docs name against `/metrics` at start (both ways), every `pullcache ...` command
//! line in the docs' code blocks through the binary's own argument parser, and the config file
//! example through `--check-config`.

use crate::support;

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::path::Path;

use support::binary::BIN;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// Metrics the README says appear later, with why: a rate-limit gauge at 0 before the
/// registry's first header would be a false alarm.
const LATER: &[&str] = &[
    "pullcache_upstream_ratelimit_remaining",
    "pullcache_upstream_ratelimit_limit",
];
/// The documents an operator reads.
const DOCS: &[&str] = &["README.md", "charts/pullcache/README.md", "deploy/README.md"];
/// The subcommands, as a command line in the docs starts.
const SUBCOMMANDS: &[&str] = &[
    "serve",
    "ca",
    "verify",
    "prefetch",
    "export",
    "import",
    "containerd-config",
];

fn read(doc: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(doc)).unwrap_or_else(|e| panic!("{doc}: {e}"))
}

/// The fenced code blocks of a Markdown text: (language, body).
fn code_blocks(text: &str) -> Vec<(String, String)> {
    let mut blocks = Vec::new();
    let mut open: Option<(String, String)> = None;
    for line in text.lines() {
        let fence = line.trim_start().strip_prefix("```");
        match (&mut open, fence) {
            (None, Some(lang)) => open = Some((lang.trim().to_owned(), String::new())),
            (Some(_), Some(_)) => blocks.extend(open.take()),
            (Some((_, body)), None) => {
                body.push_str(line);
                body.push('\n');
            }
            (None, None) => {}
        }
    }
    blocks
}

/// The rows of the flag table under "## Run it": (flag, default cell).
fn flag_table(readme: &str) -> Vec<(String, String)> {
    let section = readme
        .split("\n## Run it")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("a \"## Run it\" section");
    section
        .lines()
        .filter(|l| l.starts_with("| `--"))
        .map(|row| {
            // `\|` is a bar inside a cell.
            let row = row.replace("\\|", "\u{1}");
            let cells: Vec<String> = row
                .trim_matches('|')
                .split('|')
                .map(|c| c.trim().replace('\u{1}', "|"))
                .collect();
            let flag = cells[0]
                .trim_matches('`')
                .split([' ', '['])
                .next()
                .expect("a flag")
                .to_owned();
            (flag, cells.get(1).cloned().unwrap_or_default())
        })
        .collect()
}

/// `serve --help`'s flags, each with its paragraph.
fn help_flags(help: &str) -> Vec<(String, String)> {
    let mut flags: Vec<(String, String)> = Vec::new();
    for line in help.lines() {
        let trimmed = line.trim_start();
        let flag = trimmed
            .strip_prefix("-h, ")
            .unwrap_or(trimmed)
            .strip_prefix("--")
            .filter(|_| line.starts_with("  ") && !line.starts_with("          "));
        match flag {
            Some(flag) => {
                let name = flag.split(['[', ' ', '=']).next().unwrap_or_default();
                flags.push((format!("--{name}"), String::new()));
            }
            None => {
                if let Some((_, paragraph)) = flags.last_mut() {
                    paragraph.push_str(trimmed);
                    paragraph.push(' ');
                }
            }
        }
    }
    flags.retain(|(flag, _)| flag != "--help");
    flags
}

/// Whether `value` occurs in `text` as a whole word: not inside a longer number or name.
fn has_word(text: &str, value: &str) -> bool {
    let inside = |c: char| c.is_alphanumeric() || matches!(c, '.' | ':' | '%' | '/' | '_' | '-');
    text.match_indices(value).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + value.len()..].chars().next();
        // A sentence may end right after the value.
        let after_ok = after.is_none_or(|c| !inside(c) || (c == '.' && text[at + value.len() + 1..].starts_with(' ')));
        before.is_none_or(|c| !inside(c)) && after_ok
    })
}

/// The backticked values of a table cell.
fn backticked(cell: &str) -> Vec<&str> {
    cell.split('`').skip(1).step_by(2).collect()
}

fn serve_help() -> String {
    let out = std::process::Command::new(BIN)
        .args(["serve", "--help"])
        .env_clear()
        .output()
        .expect("pullcache runs");
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

/// The table and `serve --help` name the same flags, each with the default the table gives and
/// the variable the README promises.
fn flags_disagree(readme: &str, help: &str) -> Vec<String> {
    let table = flag_table(readme);
    let help = help_flags(help);
    let mut wrong = Vec::new();
    let in_table: BTreeSet<&str> = table.iter().map(|(f, _)| f.as_str()).collect();
    let in_help: BTreeSet<&str> = help.iter().map(|(f, _)| f.as_str()).collect();
    for flag in in_help.difference(&in_table) {
        wrong.push(format!(
            "{flag} is in `serve --help` but has no row in the README's flag table"
        ));
    }
    for flag in in_table.difference(&in_help) {
        wrong.push(format!(
            "{flag} has a row in the README's flag table but `serve` has no such flag"
        ));
    }
    for (flag, default) in &table {
        let Some((_, paragraph)) = help.iter().find(|(f, _)| f == flag) else {
            continue;
        };
        let values = backticked(default);
        let states_default = ["default", "unmapped"]
            .iter()
            .any(|w| paragraph.to_lowercase().contains(w));
        if !values.is_empty() && !states_default {
            wrong.push(format!("{flag}: the table gives a default, `--help` none"));
        }
        for value in values {
            if !has_word(paragraph, value) {
                wrong.push(format!(
                    "{flag}: the table's default {value} is not in `--help`: {paragraph}"
                ));
            }
        }
        if flag != "--check-config" && !paragraph.contains("[env: PULLCACHE_") {
            wrong.push(format!("{flag} has no environment variable"));
        }
    }
    wrong
}

#[test]
fn the_flag_table_is_serve_help() {
    let wrong = flags_disagree(&read("README.md"), &serve_help());
    assert!(
        wrong.is_empty(),
        "the README and the binary disagree:\n{}",
        wrong.join("\n")
    );
}

/// The check is not vacuous: a flag added without a row, a row for no flag, and a default
/// changed on one side only are each caught.
#[test]
fn the_flag_table_check_catches_drift() {
    let readme = read("README.md");
    let help = serve_help();
    let new_flag = help.replacen(
        "  -h, --help",
        "      --shiny-new-thing <N>\n          Something new (default 3) [env: PULLCACHE_SHINY_NEW_THING=]\n  -h, --help",
        1,
    );
    let wrong = flags_disagree(&readme, &new_flag);
    assert!(
        wrong
            .iter()
            .any(|w| w.starts_with("--shiny-new-thing is in `serve --help` but has no row")),
        "{wrong:?}"
    );
    let gone = readme.replacen(
        "| `--peer-refresh DUR` | `10s` |",
        "| `--peer-refreshes DUR` | `10s` |",
        1,
    );
    assert_ne!(gone, readme, "the row to change is not in the README");
    let wrong = flags_disagree(&gone, &help);
    assert!(
        wrong.iter().any(|w| w.starts_with("--peer-refreshes has a row")),
        "{wrong:?}"
    );
    let changed = help.replacen("(default 4096)", "(default 8192)", 1);
    assert_ne!(changed, help);
    let wrong = flags_disagree(&readme, &changed);
    assert!(
        wrong
            .iter()
            .any(|w| w.starts_with("--max-connections: the table's default 4096")),
        "{wrong:?}"
    );
}

/// Every metric the docs name is in `/metrics` as soon as pullcache starts (in intercept and
/// cluster mode, so that every family is on), and every family there is in the README.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_metrics_are_exported_from_the_start() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    pullcache::ca::init(&dir.path().join("cluster-ca"))?;
    let path = |name: &str| dir.path().join(name).into_os_string();
    let args = [
        "--cache-dir".into(),
        path("cache"),
        "--ca-dir".into(),
        path("intercept-ca"),
        "--peer-listen".into(),
        "127.0.0.1:0".into(),
        "--peer-ca-dir".into(),
        path("cluster-ca"),
    ];
    let mut served = support::binary::serve(args.iter().map(|a| a.as_os_str()), "info").await?;
    served.wait_ready().await?;
    let text = support::http_client()
        .get(format!("http://{}/metrics", served.metrics_addr))
        .send()
        .await?
        .text()
        .await?;
    let _ = served.child.start_kill();
    let exported: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    assert!(exported.len() > 30, "{text}");
    let mut wrong = Vec::new();
    for doc in DOCS {
        for name in metric_names(&read(doc)) {
            if !exported.contains(&name) && !LATER.contains(&name.as_str()) {
                wrong.push(format!("{doc} names {name}, which /metrics does not have at start"));
            }
        }
    }
    let documented = metric_names(&read("README.md"));
    for name in &exported {
        if !documented.contains(name) {
            wrong.push(format!(
                "/metrics has {name}, which the README's metrics table does not name"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    Ok(())
}

/// The `pullcache_*` names in a text, histogram suffixes taken off.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (at, _) in text.match_indices("pullcache_") {
        if text[..at].ends_with(|c: char| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let name: String = text[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        let name = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .map_or(name.clone(), str::to_owned);
        names.insert(name.trim_end_matches('_').to_owned());
    }
    names
}

/// Splits a shell command line into words: quotes, and nothing fancier.
fn shell_words(line: &str) -> Vec<String> {
    let (mut words, mut word, mut quote, mut any) = (Vec::new(), String::new(), None, false);
    for c in line.chars() {
        match (quote, c) {
            (None, '\'' | '"') => (quote, any) = (Some(c), true),
            (Some(q), c) if c == q => quote = None,
            (None, c) if c.is_whitespace() => {
                if any {
                    words.push(std::mem::take(&mut word));
                    any = false;
                }
            }
            (_, c) => (word, any) = (word + &c.to_string(), true),
        }
    }
    if any {
        words.push(word);
    }
    words
}

/// The `pullcache ...` command lines of a document's code blocks, comments included (an
/// example there is an example too), continuation lines joined; `cargo run ... --` stands for
/// the binary.
fn command_lines(text: &str) -> Vec<Vec<String>> {
    let mut commands = Vec::new();
    for (lang, body) in code_blocks(text) {
        if !matches!(lang.as_str(), "sh" | "bash" | "console" | "") {
            continue;
        }
        let joined = body.replace("\\\n", " ");
        for line in joined.lines() {
            let line = line.replace("cargo run --release -- ", "pullcache ");
            let Some(at) = line.find("pullcache ").filter(|&at| {
                let rest = &line[at + "pullcache ".len()..];
                SUBCOMMANDS.iter().any(|s| rest.split_whitespace().next() == Some(s))
            }) else {
                continue;
            };
            let commented = line[..at].trim_start().starts_with('#');
            let mut command = &line[at..];
            if !commented && let Some(comment) = command.find(" #") {
                command = &command[..comment];
            }
            let mut words = shell_words(command);
            // `...` stands for the rest of a command line, `…` for the rest of a digest.
            words.retain(|w| w != "...");
            for word in &mut words {
                *word = word.replace("sha256:…", &format!("sha256:{}", "0".repeat(64)));
            }
            commands.push(words);
        }
    }
    commands
}

#[test]
fn every_command_line_in_the_docs_parses() {
    let mut parsed = 0;
    let mut wrong = Vec::new();
    for doc in DOCS {
        for words in command_lines(&read(doc)) {
            if let Err(e) = pullcache::config::Cli::parse_args(&words) {
                wrong.push(format!("{doc}: {}\n{e}", words.join(" ")));
            }
            parsed += 1;
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n\n"));
    assert!(parsed >= 10, "only {parsed} command lines found");
    // And the parser refuses what it should, so a parse is worth something.
    assert!(pullcache::config::Cli::parse_args(["pullcache", "serve", "--no-such-flag"]).is_err());
    assert!(pullcache::config::Cli::parse_args(shell_words("pullcache export alpine:3")).is_err());
}

/// Each `# pullcache.toml` example, with the files it names stood in for, passes
/// `serve --check-config`.
#[test]
fn the_config_file_example_loads() {
    let mut checked = 0;
    for doc in DOCS {
        for (lang, body) in code_blocks(&read(doc)) {
            if lang != "toml" || !body.starts_with("# pullcache.toml") {
                continue;
            }
            let dir = tempfile::tempdir().unwrap();
            for file in body
                .split('"')
                .skip(1)
                .step_by(2)
                .filter(|s| s.ends_with(".pem") || s.ends_with(".json"))
            {
                let content = match file.ends_with(".pem") {
                    true => rcgen::generate_simple_self_signed(vec!["ca.test".into()])
                        .unwrap()
                        .cert
                        .pem(),
                    false => r#"{"auths": {}}"#.to_owned(),
                };
                std::fs::write(dir.path().join(file), content).unwrap();
            }
            let file = dir.path().join("pullcache.toml");
            std::fs::write(&file, &body).unwrap();
            let out = std::process::Command::new(BIN)
                .args([
                    OsStr::new("serve"),
                    OsStr::new("--check-config"),
                    OsStr::new("--config"),
                ])
                .arg(&file)
                .env_clear()
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{doc}: the example config fails --check-config:\n{body}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
    }
    assert!(checked >= 1, "no `# pullcache.toml` example found");
}
