//! Every `serve` setting from each of its three sources (flag, `PULLCACHE_*` variable, key in
//! the `--config` file), once with a valid value, which `serve --check-config` must report as
//! the value it runs with, and once with an invalid one, which must fail with exit 64 and name
//! the setting. Run on the real binary, so each case has its own environment.

mod support;

use std::path::Path;
use std::process::Output;

use support::binary::BIN;

/// One setting: its name (`max_connections`: the file key; the flag and variable follow from
/// it), a valid value with the text `--check-config` shows for it, and an invalid value.
struct Setting {
    name: &'static str,
    /// The flag, when it is not `--` and the name with `-` (`--pin` for `pins`).
    flag: Option<&'static str>,
    /// The variable, when it is not `PULLCACHE_` and the name in capitals.
    env: Option<&'static str>,
    /// The valid value as flag and variable text.
    valid: &'static str,
    /// The same value in TOML.
    valid_toml: &'static str,
    /// What the summary line for `shown_as` must contain.
    shown_as: (&'static str, &'static str),
    invalid: &'static str,
    invalid_toml: &'static str,
}

const SETTINGS: &[Setting] = &[
    Setting {
        name: "listen",
        flag: None,
        env: None,
        valid: "127.0.0.1:6001",
        valid_toml: r#""127.0.0.1:6001""#,
        shown_as: ("listen", "127.0.0.1:6001"),
        invalid: "nowhere",
        invalid_toml: r#""nowhere""#,
    },
    Setting {
        name: "metrics_listen",
        flag: None,
        env: None,
        valid: "127.0.0.1:6002",
        valid_toml: r#""127.0.0.1:6002""#,
        shown_as: ("metrics_listen", "127.0.0.1:6002"),
        // The same address as the registry API's default: serve could not bind both.
        invalid: "127.0.0.1:5000",
        invalid_toml: r#""127.0.0.1:5000""#,
    },
    Setting {
        name: "cache_dir",
        flag: None,
        env: None,
        valid: "/tmp/pullcache-config-test-cache",
        valid_toml: r#""/tmp/pullcache-config-test-cache""#,
        shown_as: ("cache_dir", "/tmp/pullcache-config-test-cache"),
        invalid: "",
        invalid_toml: r#""""#,
    },
    Setting {
        name: "upstream",
        flag: None,
        env: None,
        valid: "registry.test=http://127.0.0.1:5001",
        valid_toml: r#"["registry.test=http://127.0.0.1:5001"]"#,
        shown_as: ("registries", "registry.test"),
        invalid: "registry.test",
        invalid_toml: r#"["registry.test"]"#,
    },
    Setting {
        name: "tag_ttl",
        flag: None,
        env: None,
        valid: "90s",
        valid_toml: r#""90s""#,
        shown_as: ("tag_ttl", "1m 30s"),
        invalid: "soon",
        invalid_toml: r#""soon""#,
    },
    Setting {
        name: "upstream_ca",
        flag: None,
        env: None,
        valid: "{dir}/ca.pem",
        valid_toml: r#"["{dir}/ca.pem"]"#,
        shown_as: ("upstream_ca", "1 certificates"),
        invalid: "{dir}/missing.pem",
        invalid_toml: r#"["{dir}/missing.pem"]"#,
    },
    Setting {
        name: "docker_config",
        flag: None,
        env: None,
        valid: "{dir}/docker.json",
        valid_toml: r#""{dir}/docker.json""#,
        shown_as: ("docker_config", "1 registries with credentials"),
        invalid: "{dir}/not-json.json",
        invalid_toml: r#""{dir}/not-json.json""#,
    },
    Setting {
        name: "ca_dir",
        flag: None,
        env: None,
        valid: "{dir}/ca",
        valid_toml: r#""{dir}/ca""#,
        shown_as: ("intercept", "CA in {dir}/ca"),
        invalid: "{dir}/ca.pem",
        invalid_toml: r#""{dir}/ca.pem""#,
    },
    Setting {
        name: "cache_max_size",
        flag: None,
        env: None,
        valid: "2MiB",
        valid_toml: r#""2MiB""#,
        shown_as: ("cache_max_size", "2097152 bytes"),
        invalid: "lots",
        invalid_toml: r#""lots""#,
    },
    Setting {
        name: "cache_min_free",
        flag: None,
        env: None,
        valid: "15%",
        valid_toml: r#""15%""#,
        shown_as: ("cache_min_free", "15%"),
        invalid: "150%",
        invalid_toml: r#""150%""#,
    },
    Setting {
        name: "pins",
        flag: Some("--pin"),
        env: Some("PULLCACHE_PIN"),
        valid: "alpine:3.20",
        valid_toml: r#"["alpine:3.20"]"#,
        shown_as: ("pins", "docker.io/library/alpine:3.20"),
        invalid: "Not An Image",
        invalid_toml: r#"["Not An Image"]"#,
    },
    Setting {
        name: "offline",
        flag: None,
        env: None,
        valid: "true",
        valid_toml: "true",
        shown_as: ("offline", "true"),
        invalid: "maybe",
        invalid_toml: r#""maybe""#,
    },
    Setting {
        name: "max_connections",
        flag: None,
        env: None,
        valid: "77",
        valid_toml: "77",
        shown_as: ("max_connections", "77"),
        invalid: "0",
        invalid_toml: "0",
    },
];

/// Settings that only matter with `ca_dir`; each case adds `ca_dir` from the same source.
const INTERCEPT_SETTINGS: &[Setting] = &[
    Setting {
        name: "tunnel_allow",
        flag: None,
        env: None,
        valid: "auth.example.com",
        valid_toml: r#"["auth.example.com"]"#,
        shown_as: ("intercept", "tunnel auth.example.com;"),
        invalid: "*.",
        invalid_toml: r#"["*."]"#,
    },
    Setting {
        name: "intercept",
        flag: None,
        env: None,
        valid: "quay.io",
        valid_toml: r#"["quay.io"]"#,
        shown_as: ("intercept", "also intercept quay.io"),
        invalid: "Bad Name",
        invalid_toml: r#"["Bad Name"]"#,
    },
];

#[derive(Debug, Clone, Copy)]
enum Source {
    Flag,
    Env,
    File,
}

impl Setting {
    fn flag(&self) -> String {
        self.flag
            .map_or_else(|| format!("--{}", self.name.replace('_', "-")), str::to_owned)
    }

    fn env(&self) -> String {
        self.env
            .map_or_else(|| format!("PULLCACHE_{}", self.name.to_uppercase()), str::to_owned)
    }
}

/// `pullcache serve --check-config` with `settings` (name, flag text, TOML text) from `source`.
fn check_config(dir: &Path, source: Source, settings: &[(&Setting, &str, &str)]) -> Output {
    let fill = |s: &str| s.replace("{dir}", &dir.display().to_string());
    let mut command = std::process::Command::new(BIN);
    command.args(["serve", "--check-config"]);
    // Nothing from the machine's environment may count as a source.
    for (key, _) in std::env::vars() {
        if key.starts_with("PULLCACHE_") {
            command.env_remove(key);
        }
    }
    let mut toml = String::new();
    for (setting, text, toml_text) in settings {
        match source {
            Source::Flag => {
                command.arg(format!("{}={}", setting.flag(), fill(text)));
            }
            Source::Env => {
                command.env(setting.env(), fill(text));
            }
            Source::File => toml.push_str(&format!("{} = {}\n", setting.name, fill(toml_text))),
        }
    }
    if let Source::File = source {
        let file = dir.join("pullcache.toml");
        std::fs::write(&file, toml).unwrap();
        command.arg("--config").arg(file);
    }
    command.output().expect("running pullcache")
}

fn fixtures(dir: &Path) {
    let ca = rcgen::generate_simple_self_signed(vec!["ca.test".into()]).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.cert.pem()).unwrap();
    std::fs::write(dir.join("docker.json"), r#"{"auths":{"ghcr.io":{"auth":"dTpw"}}}"#).unwrap();
    std::fs::write(dir.join("not-json.json"), "{not json").unwrap();
}

fn describe(output: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn every_setting_from_every_source() {
    let dir = tempfile::tempdir().unwrap();
    fixtures(dir.path());
    let ca_dir = &SETTINGS.iter().find(|s| s.name == "ca_dir").unwrap();
    let cases = SETTINGS
        .iter()
        .map(|s| (s, None))
        .chain(INTERCEPT_SETTINGS.iter().map(|s| (s, Some(ca_dir))));
    for (setting, needs) in cases {
        for source in [Source::Flag, Source::Env, Source::File] {
            let with = |text, toml| {
                let mut all = vec![(setting, text, toml)];
                if let Some(ca_dir) = needs {
                    all.push((ca_dir, ca_dir.valid, ca_dir.valid_toml));
                }
                check_config(dir.path(), source, &all)
            };
            let what = format!("{} from {source:?}", setting.name);

            let ok = with(setting.valid, setting.valid_toml);
            assert_eq!(ok.status.code(), Some(0), "{what}, valid: {}", describe(&ok));
            let stdout = String::from_utf8_lossy(&ok.stdout);
            let (key, shown) = setting.shown_as;
            let shown = shown.replace("{dir}", &dir.path().display().to_string());
            let line = stdout.lines().find(|l| l.split_whitespace().next() == Some(key));
            assert!(
                line.is_some_and(|l| l.contains(&shown)),
                "{what}: expected {key} … {shown}: {}",
                describe(&ok)
            );

            let bad = with(setting.invalid, setting.invalid_toml);
            assert_eq!(bad.status.code(), Some(64), "{what}, invalid: {}", describe(&bad));
            let stderr = String::from_utf8_lossy(&bad.stderr).to_lowercase();
            let named = [setting.name.to_owned(), setting.flag(), setting.env().to_lowercase()];
            assert!(
                named.iter().any(|n| stderr.contains(n.as_str())),
                "{what}, invalid: the error does not name the setting: {}",
                describe(&bad)
            );
        }
    }
}

/// Flags and variables win over the file both ways: a boolean the file sets can be unset.
#[test]
fn flags_and_variables_win_over_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pullcache.toml");
    std::fs::write(&file, "offline = true\nmax_connections = 5\n").unwrap();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let output = std::process::Command::new(BIN)
            .args(["serve", "--check-config", "--config"])
            .arg(&file)
            .args(args)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(0), "{}", describe(&output));
        String::from_utf8(output.stdout).unwrap()
    };
    let line = |out: &str, key: &str| {
        out.lines()
            .find(|l| l.split_whitespace().next() == Some(key))
            .map(|l| l.split_whitespace().nth(1).unwrap_or_default().to_owned())
            .unwrap_or_default()
    };
    let from_file = run(&[], &[]);
    assert_eq!(line(&from_file, "offline"), "true");
    assert_eq!(line(&from_file, "max_connections"), "5");
    assert_eq!(line(&run(&["--offline=false"], &[]), "offline"), "false");
    assert_eq!(line(&run(&[], &[("PULLCACHE_OFFLINE", "false")]), "offline"), "false");
    assert_eq!(line(&run(&["--max-connections", "6"], &[]), "max_connections"), "6");
    // A flag beats its variable.
    let both = run(&["--max-connections=8"], &[("PULLCACHE_MAX_CONNECTIONS", "7")]);
    assert_eq!(line(&both, "max_connections"), "8");
}
