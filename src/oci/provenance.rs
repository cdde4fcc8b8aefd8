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

/// What an answer proved about who may read what it carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Visibility {
    /// An anonymous request was answered with the content (a clear 2xx).
    Public,
    /// pullcache's own credentials were needed (or visibility could not be learned).
    Private,
    /// Only a client's own credential read it (intercept mode, pullcache holding none): never
    /// served to others by `share`.
    Client,
}

impl Visibility {
    /// For the peer header and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Visibility::Public => "public",
            Visibility::Private => "private",
            Visibility::Client => "client",
        }
    }

    pub fn parse(s: &str) -> Option<Visibility> {
        match s {
            "public" => Some(Visibility::Public),
            "private" => Some(Visibility::Private),
            "client" => Some(Visibility::Client),
            _ => None,
        }
    }

    /// Of two answers about the same bytes at one location, the one that proves more:
    /// public over pullcache's credentials over a client's.
    pub fn widest(self, other: Visibility) -> Visibility {
        let rank = |v| match v {
            Visibility::Public => 0,
            Visibility::Private => 1,
            Visibility::Client => 2,
        };
        if rank(other) < rank(self) { other } else { self }
    }
}

/// What a requester was cleared for at the location it named, by that location's check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Clearance {
    /// The location is readable anonymously: anyone may read what is private to it.
    Public,
    /// Mirror mode's `share`: what pullcache's own credentials read there, and nothing a
    /// client's credential alone brought in.
    Shared,
    /// The registry accepted the client's own credential for the location.
    Client,
}

impl Clearance {
    /// For the peer header.
    pub fn as_str(self) -> &'static str {
        match self {
            Clearance::Public => "public",
            Clearance::Shared => "shared",
            Clearance::Client => "client",
        }
    }

    pub fn parse(s: &str) -> Option<Clearance> {
        match s {
            "public" => Some(Clearance::Public),
            "shared" => Some(Clearance::Shared),
            "client" => Some(Clearance::Client),
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
    /// A location read with pullcache's own credentials, or whose visibility could not be
    /// learned.
    Private(Location),
    /// A location read only with a client's own credential.
    Client(Location),
}

impl Origin {
    pub fn new(location: &Location, visibility: Visibility) -> Origin {
        match visibility {
            Visibility::Public => Origin::Public,
            Visibility::Private => Origin::Private(location.clone()),
            Visibility::Client => Origin::Client(location.clone()),
        }
    }
}

/// Every origin recorded for one digest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Provenance {
    /// Some origin was public.
    pub public: bool,
    /// Private origins, oldest first, each `Private` or `Client`; empty once public (they no
    /// longer matter).
    pub private: Vec<(Location, Visibility)>,
}

impl Provenance {
    /// Whether the content could be served under `location` to someone: it is public, or
    /// private to `location`.
    pub fn serves(&self, location: &Location) -> bool {
        self.public || self.is_private_to(location)
    }

    /// Whether a requester with `clearance` at `location` may be served it.
    pub fn clears(&self, location: &Location, clearance: Clearance) -> bool {
        if self.public {
            return true;
        }
        match (self.at(location), clearance) {
            (None, _) => false,
            (Some(_), Clearance::Public | Clearance::Client) => true,
            (Some(visibility), Clearance::Shared) => visibility == Visibility::Private,
        }
    }

    pub fn is_private_to(&self, location: &Location) -> bool {
        !self.public && self.at(location).is_some()
    }

    /// What is known of the content at `location`, when it is private to it.
    fn at(&self, location: &Location) -> Option<Visibility> {
        self.private.iter().find(|(l, _)| l == location).map(|(_, v)| *v)
    }

    /// Adds an origin; returns whether anything changed.
    pub fn add(&mut self, origin: &Origin) -> bool {
        if self.public {
            return false;
        }
        let (location, visibility) = match origin {
            Origin::Public => {
                self.public = true;
                self.private.clear();
                return true;
            }
            Origin::Private(location) => (location, Visibility::Private),
            Origin::Client(location) => (location, Visibility::Client),
        };
        if let Some(entry) = self.private.iter_mut().find(|(l, _)| l == location) {
            // pullcache's own credentials reading it widens what a client's did.
            if entry.1 == Visibility::Client && visibility == Visibility::Private {
                entry.1 = Visibility::Private;
                return true;
            }
            return false;
        }
        if self.private.len() >= MAX_PRIVATE_ORIGINS {
            self.private.remove(0);
        }
        self.private.push((location.clone(), visibility));
        true
    }

    /// What a reader under `location` is told (a peer records it in turn).
    pub fn visibility_at(&self, location: &Location) -> Visibility {
        if self.public {
            return Visibility::Public;
        }
        self.at(location).unwrap_or(Visibility::Client)
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
    fn private_content_is_served_only_under_its_origins() {
        let (alice, other) = (at("reg.test", "team-a/app"), at("reg.test", "team-b/app"));
        let mut provenance = Provenance::default();
        assert!(!provenance.serves(&alice), "unknown provenance served");
        assert!(!provenance.clears(&alice, Clearance::Client));
        assert!(provenance.add(&private(&alice)));
        assert!(!provenance.add(&private(&alice)), "a second record of the same origin");
        assert!(provenance.serves(&alice));
        for clearance in [Clearance::Public, Clearance::Shared, Clearance::Client] {
            assert!(provenance.clears(&alice, clearance), "{clearance:?}");
            assert!(!provenance.clears(&other, clearance), "served under another repository");
        }
        assert!(!provenance.serves(&other));
        assert!(!provenance.serves(&at("docker.io", "team-a/app")));
        assert!(provenance.is_private_to(&alice));
        assert_eq!(provenance.visibility_at(&alice), Visibility::Private);

        assert!(provenance.add(&Origin::new(&other, Visibility::Public)));
        assert!(
            provenance.clears(&at("any.test", "x"), Clearance::Shared),
            "public content is anyone's"
        );
        assert!(provenance.private.is_empty());
        assert!(!provenance.add(&private(&alice)), "public stays public");
        assert_eq!(provenance.visibility_at(&alice), Visibility::Public);
    }

    /// What only a client's own credential read is never shared with pullcache's clearance,
    /// until pullcache's own credentials read it too.
    #[test]
    fn share_serves_only_what_pullcaches_credentials_read() {
        let alice = at("reg.test", "team-a/app");
        let mut provenance = Provenance::default();
        provenance.add(&Origin::Client(alice.clone()));
        assert!(provenance.clears(&alice, Clearance::Client));
        assert!(!provenance.clears(&alice, Clearance::Shared));
        assert_eq!(provenance.visibility_at(&alice), Visibility::Client);
        assert!(!provenance.add(&Origin::Client(alice.clone())));
        assert!(provenance.add(&private(&alice)));
        assert!(provenance.clears(&alice, Clearance::Shared));
        assert!(!provenance.add(&Origin::Client(alice.clone())), "narrowed again");
        assert_eq!(
            Visibility::Client
                .widest(Visibility::Private)
                .widest(Visibility::Public),
            Visibility::Public
        );
        for v in [Visibility::Public, Visibility::Private, Visibility::Client] {
            assert_eq!(Visibility::parse(v.as_str()), Some(v));
        }
        for c in [Clearance::Public, Clearance::Shared, Clearance::Client] {
            assert_eq!(Clearance::parse(c.as_str()), Some(c));
        }
    }

    #[test]
    fn origins_are_bounded_and_the_oldest_goes() {
        let mut provenance = Provenance::default();
        for i in 0..=MAX_PRIVATE_ORIGINS {
            provenance.add(&private(&at("reg.test", &format!("r{i}"))));
        }
        assert_eq!(provenance.private.len(), MAX_PRIVATE_ORIGINS);
        assert!(!provenance.serves(&at("reg.test", "r0")));
        assert!(provenance.serves(&at("reg.test", &format!("r{MAX_PRIVATE_ORIGINS}"))));
    }
}
