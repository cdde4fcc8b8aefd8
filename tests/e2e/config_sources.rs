//! Every `serve` setting from each of its three sources (flag, `PULLCACHE_*` variable, key in
//! the `--config` file), once with a valid value, which `serve --check-config` must report as
//! the value it runs with, and once with an invalid one, which must fail with exit 64 and name
//! the setting. Run on the real binary, so each case has its own environment.

use crate::support;

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

/// A setting whose flag and variable follow from its name: `(text, TOML)` for the valid and
/// the invalid value, and what the summary shows for the valid one.
const fn setting(
    name: &'static str,
    (valid, valid_toml): (&'static str, &'static str),
    shown_as: (&'static str, &'static str),
    (invalid, invalid_toml): (&'static str, &'static str),
) -> Setting {
    Setting {
        name,
        flag: None,
        env: None,
        valid,
        valid_toml,
        shown_as,
        invalid,
        invalid_toml,
    }
}

const SETTINGS: &[Setting] = &[
    setting(
        "listen",
        ("127.0.0.1:6001", r#""127.0.0.1:6001""#),
        ("listen", "127.0.0.1:6001"),
        ("nowhere", r#""nowhere""#),
    ),
    // The same address as the registry API's default: serve could not bind both.
    setting(
        "metrics_listen",
        ("127.0.0.1:6002", r#""127.0.0.1:6002""#),
        ("metrics_listen", "127.0.0.1:6002"),
        ("127.0.0.1:5000", r#""127.0.0.1:5000""#),
    ),
    setting(
        "cache_dir",
        (
            "/tmp/pullcache-config-test-cache",
            r#""/tmp/pullcache-config-test-cache""#,
        ),
        ("cache_dir", "/tmp/pullcache-config-test-cache"),
        ("", r#""""#),
    ),
    setting(
        "upstream",
        (
            "registry.test=http://127.0.0.1:5001",
            r#"["registry.test=http://127.0.0.1:5001"]"#,
        ),
        ("registries", "registry.test"),
        ("registry.test", r#"["registry.test"]"#),
    ),
    setting(
        "tag_ttl",
        ("90s", r#""90s""#),
        ("tag_ttl", "1m 30s"),
        ("soon", r#""soon""#),
    ),
    setting(
        "private_images",
        ("share", r#""share""#),
        ("private_images", "share"),
        ("open", r#""open""#),
    ),
    setting(
        "auth_ttl",
        ("90s", r#""90s""#),
        ("auth_ttl", "1m 30s"),
        ("0s", r#""0s""#),
    ),
    setting(
        "upstream_ca",
        ("{dir}/ca.pem", r#"["{dir}/ca.pem"]"#),
        ("upstream_ca", "1 certificates"),
        ("{dir}/missing.pem", r#"["{dir}/missing.pem"]"#),
    ),
    setting(
        "docker_config",
        ("{dir}/docker.json", r#""{dir}/docker.json""#),
        ("docker_config", "1 registries with credentials"),
        ("{dir}/not-json.json", r#""{dir}/not-json.json""#),
    ),
    setting(
        "ca_dir",
        ("{dir}/ca", r#""{dir}/ca""#),
        ("intercept", "CA in {dir}/ca"),
        ("{dir}/ca.pem", r#""{dir}/ca.pem""#),
    ),
    setting(
        "cache_max_size",
        ("2MiB", r#""2MiB""#),
        ("cache_max_size", "2097152 bytes"),
        ("lots", r#""lots""#),
    ),
    setting(
        "cache_min_free",
        ("15%", r#""15%""#),
        ("cache_min_free", "15%"),
        ("150%", r#""150%""#),
    ),
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
    setting(
        "offline",
        ("true", "true"),
        ("offline", "true"),
        ("maybe", r#""maybe""#),
    ),
    setting("max_connections", ("77", "77"), ("max_connections", "77"), ("0", "0")),
];

/// Cluster mode's settings; each case adds `peer_listen` and `peer_ca_dir` from the same source.
const CLUSTER_SETTINGS: &[Setting] = &[
    setting(
        "peer_listen",
        ("127.0.0.1:7443", r#""127.0.0.1:7443""#),
        ("cluster", "peer port 127.0.0.1:7443"),
        ("0.0.0.0:7443", r#""0.0.0.0:7443""#),
    ),
    setting(
        "peer_ca_dir",
        ("{dir}/cluster-ca", r#""{dir}/cluster-ca""#),
        ("cluster", "CA in {dir}/cluster-ca"),
        ("{dir}/no-ca", r#""{dir}/no-ca""#),
    ),
    Setting {
        flag: Some("--peer"),
        env: Some("PULLCACHE_PEER"),
        ..setting(
            "peers",
            ("10.0.0.2:7443", r#"["10.0.0.2:7443"]"#),
            ("cluster", "peers 10.0.0.2:7443;"),
            ("no-port", r#"["no-port"]"#),
        )
    },
    setting(
        "peer_max_uploads",
        ("2", "2"),
        ("cluster", "at most 2 uploads"),
        ("0", "0"),
    ),
    setting(
        "peer_refresh",
        ("30s", r#""30s""#),
        ("cluster", "refreshed every 30s"),
        ("soon", r#""soon""#),
    ),
];

/// Settings that only matter with `ca_dir`; each case adds `ca_dir` from the same source.
const INTERCEPT_SETTINGS: &[Setting] = &[
    setting(
        "tunnel_allow",
        ("auth.example.com", r#"["auth.example.com"]"#),
        // Added to Docker Hub's hosts, which stay.
        (
            "intercept",
            "tunnel auth.docker.io, production.cloudflare.docker.com, *.cloudflare.docker.com, auth.example.com;",
        ),
        ("*.", r#"["*."]"#),
    ),
    setting(
        "intercept",
        ("quay.io", r#"["quay.io"]"#),
        ("intercept", "also intercept quay.io"),
        ("Bad Name", r#"["Bad Name"]"#),
    ),
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
    pullcache::ca::init(&dir.join("cluster-ca")).unwrap();
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
    let named = |name: &str| {
        SETTINGS
            .iter()
            .chain(CLUSTER_SETTINGS)
            .find(|s| s.name == name)
            .unwrap()
    };
    let intercept = [named("ca_dir")];
    let cluster = [named("peer_listen"), named("peer_ca_dir")];
    let cases = SETTINGS
        .iter()
        .map(|s| (s, &[][..]))
        .chain(INTERCEPT_SETTINGS.iter().map(|s| (s, &intercept[..])))
        .chain(CLUSTER_SETTINGS.iter().map(|s| (s, &cluster[..])));
    for (setting, needs) in cases {
        for source in [Source::Flag, Source::Env, Source::File] {
            let with = |text, toml| {
                let mut all = vec![(setting, text, toml)];
                for needed in needs.iter().filter(|n| n.name != setting.name) {
                    all.push((needed, needed.valid, needed.valid_toml));
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

/// `--check-config` reads what `serve` reads: an intercept CA whose key others can read, or
/// whose files are not PEM, fails it as it fails `serve`; a missing one is to be created.
#[test]
fn check_config_reads_the_intercept_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let run = || {
        std::process::Command::new(BIN)
            .args(["serve", "--check-config", "--ca-dir"])
            .arg(&ca)
            .output()
            .unwrap()
    };
    let absent = run();
    assert_eq!(absent.status.code(), Some(0), "{}", describe(&absent));
    assert!(String::from_utf8_lossy(&absent.stdout).contains("(created at start)"));
    pullcache::ca::init(&ca).unwrap();
    let ok = run();
    assert_eq!(ok.status.code(), Some(0), "{}", describe(&ok));
    assert!(!String::from_utf8_lossy(&ok.stdout).contains("created at start"));

    use std::os::unix::fs::PermissionsExt;
    let key = ca.join(pullcache::ca::KEY_FILE);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let open = run();
    assert_eq!(open.status.code(), Some(64), "{}", describe(&open));
    assert!(String::from_utf8_lossy(&open.stderr).contains("readable by others"));
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(ca.join(pullcache::ca::CERT_FILE), "garbage\n").unwrap();
    let garbage = run();
    assert_eq!(garbage.status.code(), Some(64), "{}", describe(&garbage));
    assert!(String::from_utf8_lossy(&garbage.stderr).contains("ca.crt"));
}

/// Each registry a setting names gets its own lines, defaults filled in; credentials are
/// shown by kind, never their secret; a credential helper in the docker config is warned of.
#[test]
fn check_config_prints_each_registry() {
    let dir = tempfile::tempdir().unwrap();
    fixtures(dir.path());
    std::fs::write(
        dir.path().join("helper.json"),
        r#"{"auths":{"ghcr.io":{"auth":"dTpw"}},"credsStore":"desktop"}"#,
    )
    .unwrap();
    let file = dir.path().join("pullcache.toml");
    std::fs::write(
        &file,
        r#"docker_config = "helper.json"
[registries."registry.example.com:5000"]
url = "https://10.0.0.5:5000"
ca = ["ca.pem"]
username = "robot"
password = "hunter2"
tag_ttl = "1h"
mirrors = ["https://mirror.example.com"]
private = "share"
"#,
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .args(["serve", "--check-config", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let block = |name: &str| -> Vec<String> {
        let header = format!("[registries.\"{name}\"]");
        stdout
            .lines()
            .skip_while(|l| l.trim() != header)
            .skip(1)
            .take_while(|l| !l.trim_start().starts_with('['))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect()
    };
    assert_eq!(
        block("registry.example.com:5000"),
        [
            "url https://10.0.0.5:5000",
            "mirrors https://mirror.example.com/",
            "ca 1 certificates",
            "credentials user \"robot\" (config file)",
            "tag_ttl 1h",
            "private share",
        ],
        "{}",
        describe(&out)
    );
    assert_eq!(
        block("docker.io"),
        [
            "url https://registry-1.docker.io (default)",
            "mirrors none",
            "ca 0 certificates",
            "credentials none",
            "tag_ttl 5m",
            "private bypass",
        ],
        "{}",
        describe(&out)
    );
    assert!(!stdout.contains("hunter2"));
    assert!(
        stdout.contains("docker_config    1 registries with credentials (ghcr.io)"),
        "{stdout}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning: docker_config: \"credsStore\": \"desktop\""),
        "{stderr}"
    );
}
