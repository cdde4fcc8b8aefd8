//! The container image builds from exactly what its `Dockerfile` copies: the build stage's
//! `COPY` lines are read, what they name is copied (as `.dockerignore` leaves it) into an
//! empty directory, and Cargo builds it there, offline and `--locked`, as `docker build`
//! would. No Docker engine runs here, and none is needed for the question that broke the
//! image: whether those files are a crate Cargo accepts (a `[[bench]]` whose file was not
//! copied made it refuse the manifest).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The build stage's `COPY` lines (up to the second `FROM`), as (sources, destination).
fn build_stage_copies(dockerfile: &str) -> Result<Vec<(Vec<String>, String)>> {
    let mut copies = Vec::new();
    let mut stages = 0;
    for line in dockerfile.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("FROM") => stages += 1,
            Some("COPY") if stages == 1 => {
                let mut args: Vec<String> = words.map(str::to_owned).collect();
                ensure!(
                    !args.iter().any(|a| a.starts_with("--")),
                    "COPY with flags in the build stage: {line}"
                );
                let dest = args.pop().context("COPY without a destination")?;
                ensure!(!args.is_empty(), "COPY without a source: {line}");
                copies.push((args, dest));
            }
            _ => {}
        }
    }
    ensure!(
        stages >= 1 && !copies.is_empty(),
        "no build stage COPY lines in the Dockerfile"
    );
    Ok(copies)
}

/// `.dockerignore` as the build context sees it: rules in order, the last that matches a path
/// deciding. A rule is `*` (every top-level entry), a top-level name, or `**/*.EXT`; `!` lets
/// back in what it matches.
struct Ignore {
    rules: Vec<(Pattern, bool)>,
}

enum Pattern {
    Everything,
    Name(String),
    Extension(String),
}

impl Ignore {
    fn read() -> Result<Ignore> {
        let text = std::fs::read_to_string(Path::new(ROOT).join(".dockerignore"))?;
        let mut rules = Vec::new();
        for line in text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let (line, excludes) = match line.strip_prefix('!') {
                Some(rest) => (rest, false),
                None => (line, true),
            };
            let pattern = match line {
                "*" => Pattern::Everything,
                _ => match line.strip_prefix("**/*.") {
                    Some(ext) => Pattern::Extension(ext.to_owned()),
                    None if line.contains(['*', '?', '!', '[']) => {
                        bail!("a .dockerignore pattern this test does not read: {line}")
                    }
                    None => Pattern::Name(line.trim_matches('/').to_owned()),
                },
            };
            rules.push((pattern, excludes));
        }
        Ok(Ignore { rules })
    }

    fn excludes(&self, relative: &Path) -> bool {
        let top = relative
            .components()
            .next()
            .map(|c| c.as_os_str().to_string_lossy().into_owned());
        let matches = |pattern: &Pattern| match pattern {
            Pattern::Everything => true,
            Pattern::Name(name) => top.as_deref() == Some(name.as_str()),
            Pattern::Extension(ext) => relative.extension().is_some_and(|e| e == ext.as_str()),
        };
        self.rules
            .iter()
            .rev()
            .find(|(pattern, _)| matches(pattern))
            .is_some_and(|(_, excludes)| *excludes)
    }
}

/// Copies `relative` (a file or a directory) from the repository into `into`, leaving out what
/// `.dockerignore` keeps from the context.
fn copy(relative: &Path, to: &Path, ignore: &Ignore) -> Result<()> {
    let from = Path::new(ROOT).join(relative);
    if ignore.excludes(relative) {
        return Ok(());
    }
    if from.is_dir() {
        std::fs::create_dir_all(to)?;
        for entry in std::fs::read_dir(&from)? {
            let name = entry?.file_name();
            copy(&relative.join(&name), &to.join(&name), ignore)?;
        }
    } else {
        std::fs::copy(&from, to).with_context(|| format!("{}", from.display()))?;
    }
    Ok(())
}

/// The build context `dockerfile`'s build stage sees: what its `COPY` lines name, in an empty
/// directory.
fn context_of(dockerfile: &str) -> Result<tempfile::TempDir> {
    let ignore = Ignore::read()?;
    let context = tempfile::tempdir()?;
    for (sources, dest) in build_stage_copies(dockerfile)? {
        for source in sources {
            let relative = PathBuf::from(&source);
            ensure!(
                !ignore.excludes(&relative),
                "the Dockerfile copies {source}, which .dockerignore keeps out of the context"
            );
            ensure!(
                Path::new(ROOT).join(&relative).exists(),
                "the Dockerfile copies {source}, which does not exist"
            );
            // `COPY a b ./` puts each into the directory; `COPY src src` names the target.
            let to = if dest.ends_with('/') {
                context
                    .path()
                    .join(&dest)
                    .join(relative.file_name().context("a source name")?)
            } else {
                context.path().join(&dest)
            };
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent)?;
            }
            copy(&relative, &to, &ignore)?;
        }
    }
    Ok(context)
}

/// The Dockerfile's `cargo build --release --locked`, checked rather than compiled (the
/// manifest and the sources are the question, not the code generation), offline, in a target
/// directory of its own (one shared with the running tests could wait on their lock).
fn cargo_check(context: &Path) -> Result<std::process::Output> {
    Ok(Command::new(env!("CARGO"))
        .args(["check", "--locked", "--offline", "--quiet"])
        .current_dir(context)
        .env(
            "CARGO_TARGET_DIR",
            Path::new(env!("CARGO_TARGET_TMPDIR")).join("image-check"),
        )
        .output()?)
}

#[test]
fn the_image_builds_from_what_the_dockerfile_copies() -> Result<()> {
    let dockerfile = std::fs::read_to_string(Path::new(ROOT).join("Dockerfile"))?;
    let context = context_of(&dockerfile)?;
    let out = cargo_check(context.path())?;
    ensure!(
        out.status.success(),
        "Cargo refuses what the Dockerfile copies:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The check fails where the image did: the Dockerfile as it was, which copied the manifest
/// and `src/` but not the benches the manifest names.
#[test]
fn the_dockerfile_as_it_was_is_refused() -> Result<()> {
    let old = "FROM rust:1.95-bookworm AS build\nWORKDIR /src\n\
               COPY Cargo.toml Cargo.lock rust-toolchain.toml ./\nCOPY src src\n\
               RUN cargo build --release --locked\nFROM debian:bookworm-slim\n\
               COPY --from=build /src/target/release/pullcache /usr/local/bin/pullcache\n";
    let context = context_of(old)?;
    let out = cargo_check(context.path())?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the old copy passed");
    assert!(stderr.contains("can't find"), "{stderr}");
    Ok(())
}

/// The context holds what the build stage copies and nothing more: every other entry at the
/// top of the repository (the fuzz targets, the bench scripts, target/) stays out.
#[test]
fn the_context_is_what_the_dockerfile_copies() -> Result<()> {
    let dockerfile = std::fs::read_to_string(Path::new(ROOT).join("Dockerfile"))?;
    let copied: Vec<String> = build_stage_copies(&dockerfile)?
        .into_iter()
        .flat_map(|(sources, _)| sources)
        .collect();
    let ignore = Ignore::read()?;
    let mut sent = Vec::new();
    for entry in std::fs::read_dir(ROOT)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if !copied.contains(&name) && !ignore.excludes(Path::new(&name)) {
            sent.push(name);
        }
    }
    sent.sort();
    ensure!(sent.is_empty(), "sent to the build context but never copied: {sent:?}");
    Ok(())
}

/// The image's user can write the cache directory its command names: the final stage creates
/// it owned by that user.
#[test]
fn the_image_user_owns_its_cache_dir() -> Result<()> {
    let dockerfile = std::fs::read_to_string(Path::new(ROOT).join("Dockerfile"))?;
    let last_stage = dockerfile.rsplit("\nFROM ").next().context("a final stage")?;
    let user = last_stage
        .lines()
        .find_map(|l| l.trim().strip_prefix("USER "))
        .context("the final stage sets no USER")?
        .trim();
    let cmd = last_stage
        .lines()
        .find_map(|l| l.trim().strip_prefix("CMD "))
        .context("no CMD")?;
    let cmd: Vec<String> = serde_json::from_str(cmd)?;
    let cache_dir = cmd
        .iter()
        .skip_while(|a| *a != "--cache-dir")
        .nth(1)
        .context("the CMD names no --cache-dir")?;
    let created = format!("install -d -o {user} -g {user} -m 0750 {cache_dir}");
    ensure!(
        last_stage.contains(&created),
        "the final stage does not create {cache_dir} for user {user} ({created:?})"
    );
    Ok(())
}
