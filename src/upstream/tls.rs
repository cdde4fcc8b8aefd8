//! TLS for upstream connections: the Mozilla roots, the system's, and the operator's CA files,
//! always verified; HTTP/2 by ALPN where the registry offers it. One pooled client per trust
//! set, shared by every flight.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::resolve::{GuardedResolver, Reach};

/// Giving up on a TCP connect to a registry after this long.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads every certificate of a PEM file; a file with none is an error.
pub fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificates in it", path.display()));
    }
    Ok(certs)
}

/// A client trusting the public roots plus `extra`, connecting only where `reach` allows.
pub(super) fn client<B>(extra: &[CertificateDer<'static>], reach: Reach) -> crate::wire::Client<GuardedResolver, B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
{
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    let (added, ignored) = roots.add_parsable_certificates(extra.iter().cloned());
    if ignored > 0 {
        tracing::warn!(added, ignored, "some configured CA certificates could not be used");
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let options = crate::wire::ClientOptions {
        tls,
        connect_timeout: UPSTREAM_CONNECT_TIMEOUT,
        plain_http: true,
        http2: true,
    };
    crate::wire::client(GuardedResolver(reach), options)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_files_must_hold_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        assert!(load_certificates(&empty).unwrap_err().contains("no PEM certificates"));
        assert!(load_certificates(&dir.path().join("missing.pem")).is_err());
        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".into()]).unwrap();
        let good = dir.path().join("ca.pem");
        std::fs::write(&good, ca.cert.pem()).unwrap();
        assert_eq!(load_certificates(&good).unwrap().len(), 1);
    }
}
