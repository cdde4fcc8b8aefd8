//! Registry hosts, repository names, tags and references, validated against the grammar of
//! the distribution spec (`distribution/reference`). A value of these types is safe to place in
//! a URL path, and the tag index hashes them before they name a file.

use std::fmt;
use std::net::IpAddr;

use super::Digest;

/// Longest repository name distribution accepts.
const MAX_NAME_LEN: usize = 255;
const MAX_TAG_LEN: usize = 128;
const MAX_HOST_LEN: usize = 253;

/// Docker Hub: the registry named by references with no host, and the one whose
/// single-component names live under `library/`.
pub const DOCKER_HUB: &str = "docker.io";
/// Docker Hub's names besides [`DOCKER_HUB`]: each is Docker Hub, with the same content and
/// the same credentials, so each is read as `docker.io`.
pub const DOCKER_HUB_ALIASES: &[&str] = &["registry-1.docker.io", "index.docker.io"];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error(
        "repository name {0:?} is not valid (lowercase components of [a-z0-9] joined by '.', '_', '__' or '-', separated by '/', at most 255 characters)"
    )]
    Repository(String),
    #[error("tag {0:?} is not valid ([A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})")]
    Tag(String),
    #[error("registry {0:?} is not a valid host[:port]")]
    Registry(String),
}

/// A registry as containerd names it: `docker.io`, `ghcr.io`, `registry.local:5000`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Registry(String);

impl std::str::FromStr for Registry {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Registry, NameError> {
        Registry::parse(s)
    }
}

impl Registry {
    pub fn docker_hub() -> Self {
        Registry(DOCKER_HUB.to_owned())
    }

    /// Parses `host[:port]` where host is a DNS name or an IPv4 address. Names are lowercased,
    /// as DNS is case-insensitive and the cache must not split on case.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        let err = || NameError::Registry(s.chars().take(100).collect());
        let (host, port) = match s.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (s, None),
        };
        if let Some(port) = port
            && (port.is_empty()
                || port.len() > 5
                || !port.bytes().all(|b| b.is_ascii_digit())
                || port.parse::<u16>().is_err())
        {
            return Err(err());
        }
        if host.is_empty() || host.len() > MAX_HOST_LEN || !host.split('.').all(is_domain_label) {
            return Err(err());
        }
        let name = s.to_ascii_lowercase();
        if DOCKER_HUB_ALIASES.contains(&name.as_str()) {
            return Ok(Registry::docker_hub());
        }
        Ok(Registry(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_docker_hub(&self) -> bool {
        self.0 == DOCKER_HUB
    }

    /// The host without the port.
    pub fn host(&self) -> &str {
        self.0.rsplit_once(':').map_or(&self.0, |(h, _)| h)
    }

    /// The host as an IP address, when it is one.
    pub fn ip(&self) -> Option<IpAddr> {
        self.host().parse().ok()
    }

    /// Whether a first path component names a registry rather than a namespace, by the rule
    /// docker and containerd use: it contains a `.` or a `:`, or is `localhost`.
    pub fn looks_like_host(component: &str) -> bool {
        component.contains('.') || component.contains(':') || component == "localhost"
    }
}

fn is_domain_label(label: &str) -> bool {
    let bytes = label.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

impl fmt::Display for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A repository name inside a registry: `library/alpine`, `org/team/app`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Repository(String);

impl Repository {
    /// Parses a name against the path grammar:
    /// `component ('/' component)*`, `component = [a-z0-9]+ (separator [a-z0-9]+)*`,
    /// `separator = '.' | '_' | '__' | '-'+`.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        if s.is_empty() || s.len() > MAX_NAME_LEN || !s.split('/').all(is_path_component) {
            return Err(NameError::Repository(s.chars().take(MAX_NAME_LEN + 1).collect()));
        }
        Ok(Repository(s.to_owned()))
    }

    /// Applies Docker Hub's implicit `library/` namespace to single-component names. The
    /// result must still fit the length limit.
    pub fn normalize_for(self, registry: &Registry) -> Result<Self, NameError> {
        if registry.is_docker_hub() && !self.0.contains('/') {
            Repository::parse(&format!("library/{}", self.0))
        } else {
            Ok(self)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_path_component(c: &str) -> bool {
    let bytes = c.as_bytes();
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let (Some(first), Some(last)) = (bytes.first(), bytes.last()) else {
        return false;
    };
    if !alnum(first) || !alnum(last) {
        return false;
    }
    // Walk the runs of separators between alphanumeric runs.
    let mut i = 0;
    while i < bytes.len() {
        if alnum(&bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(&bytes[i]) {
            i += 1;
        }
        let ok = match &bytes[start..i] {
            b"." | b"_" | b"__" => true,
            run => run.iter().all(|b| *b == b'-'),
        };
        if !ok {
            return false;
        }
    }
    true
}

impl fmt::Display for Repository {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Repository {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A tag: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

impl Tag {
    pub fn parse(s: &str) -> Result<Self, NameError> {
        let word = |b: &u8| b.is_ascii_alphanumeric() || *b == b'_';
        let bytes = s.as_bytes();
        let ok = !bytes.is_empty()
            && bytes.len() <= MAX_TAG_LEN
            && word(&bytes[0])
            && bytes.iter().all(|b| word(b) || *b == b'.' || *b == b'-');
        if !ok {
            return Err(NameError::Tag(s.chars().take(MAX_TAG_LEN + 1).collect()));
        }
        Ok(Tag(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// What a manifest request names: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

impl Reference {
    /// The image it names in `repository` of `registry`, as people write it:
    /// `ghcr.io/org/app:v9`, `ghcr.io/org/app@sha256:...`.
    pub fn image(&self, registry: &Registry, repository: &Repository) -> String {
        match self {
            Reference::Tag(tag) => format!("{registry}/{repository}:{tag}"),
            Reference::Digest(digest) => format!("{registry}/{repository}@{digest}"),
        }
    }
}

/// An image reference as people write it: `[registry/]repository[:tag][@digest]`, with
/// docker's defaults (`docker.io`, `library/`, `latest`). A digest wins over a tag.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    pub registry: Registry,
    pub repository: Repository,
    pub reference: Reference,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("image reference {input:?}: {reason}")]
pub struct ImageRefError {
    input: String,
    reason: String,
}

impl std::str::FromStr for ImageRef {
    type Err = ImageRefError;

    fn from_str(s: &str) -> Result<ImageRef, ImageRefError> {
        ImageRef::parse(s)
    }
}

impl ImageRef {
    pub fn parse(s: &str) -> Result<ImageRef, ImageRefError> {
        let fail = |reason: String| ImageRefError {
            input: s.chars().take(300).collect(),
            reason,
        };
        let (rest, digest) = match s.split_once('@') {
            Some((rest, digest)) => (rest, Some(digest.parse::<Digest>().map_err(|e| fail(e.to_string()))?)),
            None => (s, None),
        };
        // A ':' after the last '/' starts the tag; one before it belongs to a registry port.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].find(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        let (registry, path) = match name.split_once('/') {
            Some((first, path)) if Registry::looks_like_host(first) => {
                (Registry::parse(first).map_err(|e| fail(e.to_string()))?, path)
            }
            _ => (Registry::docker_hub(), name),
        };
        let repository = Repository::parse(path)
            .map_err(|e| fail(e.to_string()))?
            .normalize_for(&registry)
            .map_err(|e| fail(e.to_string()))?;
        let reference = match (digest, tag) {
            (Some(digest), _) => Reference::Digest(digest),
            (None, Some(tag)) => Reference::Tag(Tag::parse(tag).map_err(|e| fail(e.to_string()))?),
            (None, None) => Reference::Tag(Tag::parse("latest").expect("latest is a tag")),
        };
        if let (Some(tag), Reference::Digest(_)) = (tag, &reference) {
            Tag::parse(tag).map_err(|e| fail(e.to_string()))?;
        }
        Ok(ImageRef {
            registry,
            repository,
            reference,
        })
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sep = match self.reference {
            Reference::Tag(_) => ':',
            Reference::Digest(_) => '@',
        };
        write!(f, "{}/{}{sep}{}", self.registry, self.repository, self.reference)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_grammar() {
        for good in [
            "a",
            "library/alpine",
            "a/b/c",
            "foo.bar",
            "foo_bar",
            "foo__bar",
            "foo---bar",
            "0/1-2",
        ] {
            assert!(Repository::parse(good).is_ok(), "{good} rejected");
        }
        for bad in [
            "",
            "/a",
            "a/",
            "a//b",
            "..",
            "a/../b",
            "%2e%2e",
            "a/%2e%2e/b",
            "A",
            "a_",
            "-a",
            "a...b",
            "a___b",
            "a._b",
            "/etc/passwd",
            "a b",
            "a\0b",
            "a\\b",
        ] {
            assert!(Repository::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(Repository::parse(&"a".repeat(256)).is_err());
        assert!(Repository::parse(&"a".repeat(255)).is_ok());
    }

    #[test]
    fn docker_hubs_names_are_one_registry() {
        for alias in ["docker.io", "registry-1.docker.io", "INDEX.docker.io"] {
            assert_eq!(Registry::parse(alias).unwrap(), Registry::docker_hub(), "{alias}");
        }
        // Another port is another server.
        assert_eq!(
            Registry::parse("registry-1.docker.io:5000").unwrap().as_str(),
            "registry-1.docker.io:5000"
        );
    }

    #[test]
    fn docker_hub_library_prefix() {
        let hub = Registry::docker_hub();
        let other = Registry::parse("ghcr.io").unwrap();
        assert_eq!(
            Repository::parse("alpine")
                .unwrap()
                .normalize_for(&hub)
                .unwrap()
                .as_str(),
            "library/alpine"
        );
        assert_eq!(
            Repository::parse("a/b").unwrap().normalize_for(&hub).unwrap().as_str(),
            "a/b"
        );
        // Found by the reference fuzz target: `library/` must not push a name past 255.
        let long = Repository::parse(&"a".repeat(250)).unwrap();
        assert!(long.clone().normalize_for(&hub).is_err());
        assert!(long.normalize_for(&other).is_ok());
        assert_eq!(
            Repository::parse("alpine")
                .unwrap()
                .normalize_for(&other)
                .unwrap()
                .as_str(),
            "alpine"
        );
    }

    #[test]
    fn tag_grammar() {
        for good in ["latest", "v1.2.3", "_x", "A-b_c.d", &"t".repeat(128)] {
            assert!(Tag::parse(good).is_ok(), "{good} rejected");
        }
        for bad in ["", ".x", "-x", "a/b", "a:b", "a@b", &"t".repeat(129)] {
            assert!(Tag::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn registry_grammar() {
        for good in [
            "docker.io",
            "localhost:5000",
            "127.0.0.1:1234",
            "a-b.example.com",
            "Quay.IO",
        ] {
            assert!(Registry::parse(good).is_ok(), "{good} rejected");
        }
        assert_eq!(Registry::parse("Quay.IO").unwrap().as_str(), "quay.io");
        for bad in [
            "",
            ":5000",
            "a:",
            "a:99999",
            "a:5x",
            "-a.com",
            "a..b",
            "a/b",
            "a@b",
            "[::1]:5000",
            "a b",
        ] {
            assert!(Registry::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(Registry::looks_like_host("ghcr.io"));
        assert!(Registry::looks_like_host("localhost"));
        assert!(Registry::looks_like_host("host:5000"));
        assert!(!Registry::looks_like_host("library"));
    }

    #[test]
    fn image_references() {
        let d = format!("sha256:{}", "a".repeat(64));
        for (input, want) in [
            ("alpine", "docker.io/library/alpine:latest"),
            ("alpine:3.20", "docker.io/library/alpine:3.20"),
            ("org/app:v1", "docker.io/org/app:v1"),
            ("ghcr.io/org/app", "ghcr.io/org/app:latest"),
            ("localhost:5000/app:v1", "localhost:5000/app:v1"),
            ("registry.local:5000/a/b", "registry.local:5000/a/b:latest"),
            (&format!("alpine:3.20@{d}"), &format!("docker.io/library/alpine@{d}")),
            (&format!("127.0.0.1:5000/x@{d}"), &format!("127.0.0.1:5000/x@{d}")),
        ] {
            assert_eq!(ImageRef::parse(input).unwrap().to_string(), want, "{input}");
        }
        for bad in [
            "",
            "Alpine",
            "alpine:",
            "alpine:-x",
            "alpine@sha256:abc",
            "ghcr.io/",
            "ghcr.io/../etc",
            "a//b",
            "bad host:5000/x",
            "x:5000:6000/y",
        ] {
            assert!(ImageRef::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
