//! Where content came from, and so to whom it may be served. The store is keyed by digest
//! across every registry, while a client names any registry and repository it likes; a
//! digest is therefore served by where its bytes came from, not by the name asked for.
//!
//! Content is *public* when any of its origins was readable anonymously: anyone can fetch it
//! there, so serving it under any name reveals nothing. Otherwise it is *private to its
//! origins*: served only under one of them, to a client who passes that origin's check.
//! Content whose provenance is unknown (no record, or a record lost) is private to nobody,
//! and every name treats it as a miss.

use std::fmt;

use super::{Registry, Repository};

/// The most private origins recorded for one digest; the oldest is dropped past it, which
/// only makes the content a miss under that name again.
pub const MAX_PRIVATE_ORIGINS: usize = 16;

/// A repository in a registry: what a request names, and where bytes come from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Location {
    pub registry: Registry,
    pub repository: Repository,
}

impl Location {
    pub fn new(registry: &Registry, repository: &Repository) -> Location {
        Location {
            registry: registry.clone(),
            repository: repository.clone(),
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)
    }
}

/// Whether a location lets anyone read what it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Visibility {
    /// An anonymous client was answered with the content (a clear 2xx).
    Public,
    /// Anything else: credentials were needed, or it could not be learned.
    Private,
}

impl Visibility {
    /// For a `pullcache-visibility` header and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Visibility::Public => "public",
            Visibility::Private => "private",
        }
    }

    pub fn parse(s: &str) -> Option<Visibility> {
        match s {
            "public" => Some(Visibility::Public),
            "private" => Some(Visibility::Private),
            _ => None,
        }
    }
}

/// Where some verified bytes came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A location that served them to an anonymous request, or a bundle the operator
    /// imported for every workload on the node.
    Public,
    /// A location that needed credentials, or whose visibility could not be learned.
    Private(Location),
}

impl Origin {
    pub fn new(location: &Location, visibility: Visibility) -> Origin {
        match visibility {
            Visibility::Public => Origin::Public,
            Visibility::Private => Origin::Private(location.clone()),
        }
    }
}

/// Every origin recorded for one digest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Provenance {
    /// Some origin was public.
    pub public: bool,
    /// Private origins, oldest first; empty once public (they no longer matter).
    pub private: Vec<Location>,
}

impl Provenance {
    /// Whether the content may be served under `location`: it is public, or `location` is
    /// one of its private origins and `may_read_private` (the client passed that origin's
    /// check, or a peer vouches that its client did).
    pub fn serves(&self, location: &Location, may_read_private: bool) -> bool {
        self.public || (may_read_private && self.private.contains(location))
    }

    pub fn is_private_to(&self, location: &Location) -> bool {
        !self.public && self.private.contains(location)
    }

    /// Adds an origin; returns whether anything changed.
    pub fn add(&mut self, origin: &Origin) -> bool {
        if self.public {
            return false;
        }
        match origin {
            Origin::Public => {
                self.public = true;
                self.private.clear();
            }
            Origin::Private(location) if self.private.contains(location) => return false,
            Origin::Private(location) => {
                if self.private.len() >= MAX_PRIVATE_ORIGINS {
                    self.private.remove(0);
                }
                self.private.push(location.clone());
            }
        }
        true
    }

    /// The visibility a reader is told (a peer records it in turn).
    pub fn visibility(&self) -> Visibility {
        if self.public {
            Visibility::Public
        } else {
            Visibility::Private
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(registry: &str, repository: &str) -> Location {
        Location::new(
            &Registry::parse(registry).unwrap(),
            &Repository::parse(repository).unwrap(),
        )
    }

    fn private(location: &Location) -> Origin {
        Origin::Private(location.clone())
    }

    #[test]
    fn private_content_is_served_only_under_its_origins_to_readers_who_passed() {
        let (alice, other) = (at("reg.test", "team-a/app"), at("reg.test", "team-b/app"));
        let mut provenance = Provenance::default();
        assert!(!provenance.serves(&alice, true), "unknown provenance served");
        assert!(provenance.add(&private(&alice)));
        assert!(!provenance.add(&private(&alice)), "a second record of the same origin");
        assert!(provenance.serves(&alice, true));
        assert!(!provenance.serves(&alice, false), "served without the origin's check");
        assert!(!provenance.serves(&other, true), "served under another repository");
        assert!(!provenance.serves(&at("docker.io", "team-a/app"), true));
        assert!(provenance.is_private_to(&alice));

        assert!(provenance.add(&Origin::new(&other, Visibility::Public)));
        assert!(
            provenance.serves(&at("any.test", "x"), false),
            "public content is anyone's"
        );
        assert!(provenance.private.is_empty());
        assert!(!provenance.add(&private(&alice)), "public stays public");
        assert_eq!(provenance.visibility(), Visibility::Public);
    }

    #[test]
    fn origins_are_bounded_and_the_oldest_goes() {
        let mut provenance = Provenance::default();
        for i in 0..=MAX_PRIVATE_ORIGINS {
            provenance.add(&private(&at("reg.test", &format!("r{i}"))));
        }
        assert_eq!(provenance.private.len(), MAX_PRIVATE_ORIGINS);
        assert!(!provenance.serves(&at("reg.test", "r0"), true));
        assert!(provenance.serves(&at("reg.test", &format!("r{MAX_PRIVATE_ORIGINS}")), true));
    }
}
