//! The CAs pullcache signs with: an ECDSA P-256 key (file mode 0600) and a self-signed
//! certificate. The intercept CA (`--ca-dir`), which nodes trust, signs leaf certificates for
//! intercepted hosts, made once per host, cached, and made again long before they expire. The
//! cluster CA (`--peer-ca-dir`) signs each node's peer certificate, for mutual TLS between
//! peers.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

pub const KEY_FILE: &str = "ca.key";
pub const CERT_FILE: &str = "ca.crt";
const CA_NAME: &str = "pullcache CA";
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Leaves are valid this long...
const LEAF_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
/// ...and replaced after this long, so no client ever sees one near its end.
const LEAF_RENEW_AFTER: Duration = Duration::from_secs(24 * 3600);
/// Leaves may start slightly in the past, for clients whose clocks run behind.
const CLOCK_SKEW: Duration = Duration::from_secs(3600);
const MAX_CACHED_LEAVES: u64 = 10_000;
/// A node's peer certificate is made when it starts; pods restart long before a year is out.
const PEER_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("CA in {dir}: {message}")]
    Files { dir: PathBuf, message: String },
    #[error("CA: {0}")]
    Certificate(String),
    #[error("CA: {0}")]
    Kube(String),
}

fn files(dir: &Path, message: impl std::fmt::Display) -> CaError {
    CaError::Files {
        dir: dir.to_owned(),
        message: message.to_string(),
    }
}

/// Creates a new CA in `dir`. Refuses to replace one that exists.
pub fn init(dir: &Path) -> Result<(), CaError> {
    if dir.join(KEY_FILE).exists() || dir.join(CERT_FILE).exists() {
        return Err(files(dir, "a CA exists already; remove it first to make a new one"));
    }
    fs::create_dir_all(dir).map_err(|e| files(dir, e))?;
    let (key_pem, cert_pem) = generate()?;
    write_new(&dir.join(KEY_FILE), key_pem.as_bytes(), 0o600).map_err(|e| files(dir, e))?;
    write_new(&dir.join(CERT_FILE), cert_pem.as_bytes(), 0o644).map_err(|e| files(dir, e))?;
    Ok(())
}

/// A new CA: its key and certificate, in PEM.
pub fn generate() -> Result<(String, String), CaError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| CaError::Certificate(e.to_string()))?;
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, CA_NAME);
    name.push(DnType::OrganizationName, "pullcache");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + CA_LIFETIME;
    let cert = params
        .self_signed(&key)
        .map_err(|e| CaError::Certificate(e.to_string()))?;
    Ok((key.serialize_pem(), cert.pem()))
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// The CA certificate in PEM, for node trust stores.
pub fn cert_pem(dir: &Path) -> Result<String, CaError> {
    fs::read_to_string(dir.join(CERT_FILE)).map_err(|e| files(dir, format!("{CERT_FILE}: {e}")))
}

pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    leaves: moka::sync::Cache<String, Arc<CertifiedKey>>,
}

impl Ca {
    /// Loads the CA in `dir`, creating it first if there is none.
    pub fn load_or_create(dir: &Path) -> Result<Ca, CaError> {
        if !dir.join(KEY_FILE).exists() && !dir.join(CERT_FILE).exists() {
            init(dir)?;
            tracing::info!(dir = %dir.display(), "created a new intercept CA; distribute {CERT_FILE} to node trust stores");
        }
        Ca::load(dir)
    }

    /// Loads the CA in `dir`; its key must be readable by the owner only.
    pub fn load(dir: &Path) -> Result<Ca, CaError> {
        let key_path = dir.join(KEY_FILE);
        let mode = fs::metadata(&key_path).map_err(|e| files(dir, format!("{KEY_FILE}: {e}")))?;
        if std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o077 != 0 {
            return Err(files(dir, format!("{KEY_FILE} is readable by others; chmod 600 it")));
        }
        let key_pem = fs::read_to_string(&key_path).map_err(|e| files(dir, format!("{KEY_FILE}: {e}")))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| files(dir, format!("{KEY_FILE}: {e}")))?;
        let cert_pem = cert_pem(dir)?;
        let cert_der =
            CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| files(dir, format!("{CERT_FILE}: {e}")))?;
        // rcgen pairs them without a check; a certificate for another key would make every
        // leaf one that clients refuse.
        let (_, cert) =
            x509_parser::parse_x509_certificate(&cert_der).map_err(|e| files(dir, format!("{CERT_FILE}: {e}")))?;
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(files(dir, format!("{CERT_FILE} is not the certificate of {KEY_FILE}")));
        }
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| files(dir, format!("{CERT_FILE}: {e}")))?;
        Ok(Ca {
            issuer,
            cert_der,
            leaves: moka::sync::Cache::builder()
                .max_capacity(MAX_CACHED_LEAVES)
                .time_to_live(LEAF_RENEW_AFTER)
                .build(),
        })
    }

    /// A certificate and key for `host` (a DNS name or an IP address), with the CA behind it.
    pub fn leaf(&self, host: &str) -> Result<Arc<CertifiedKey>, CaError> {
        if let Some(leaf) = self.leaves.get(host) {
            return Ok(leaf);
        }
        let leaf = Arc::new(self.issue(host)?);
        self.leaves.insert(host.to_owned(), leaf.clone());
        Ok(leaf)
    }

    /// The CA's own certificate.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// A certificate for a node's peer port at `ip`, good as server and as client, with the CA
    /// behind it, and its key.
    pub fn peer_certificate(
        &self,
        ip: std::net::IpAddr,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CaError> {
        let usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let (chain, key) = self.sign(&ip.to_string(), usages, PEER_LIFETIME)?;
        Ok((chain, key))
    }

    /// A new key and a certificate for `name`, signed by the CA, with the CA behind it.
    fn sign(
        &self,
        name: &str,
        usages: Vec<ExtendedKeyUsagePurpose>,
        lifetime: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CaError> {
        let err = |e: rcgen::Error| CaError::Certificate(format!("certificate for {name}: {e}"));
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(err)?;
        let mut params = CertificateParams::new(vec![name.to_owned()]).map_err(err)?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = usages;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + lifetime;
        let cert = params.signed_by(&key, &self.issuer).map_err(err)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((vec![cert.der().clone(), self.cert_der.clone()], key_der))
    }

    fn issue(&self, host: &str) -> Result<CertifiedKey, CaError> {
        let (chain, key_der) = self.sign(host, vec![ExtendedKeyUsagePurpose::ServerAuth], LEAF_LIFETIME)?;
        let signing_key = rustls::crypto::ring::sign::any_supported_type(&key_der)
            .map_err(|e| CaError::Certificate(format!("leaf key for {host}: {e}")))?;
        Ok(CertifiedKey::new(chain, signing_key))
    }
}

use rustls_pki_types::pem::PemObject as _;

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use rustls::client::danger::ServerCertVerifier as _;

    use super::*;

    /// A certificate of another key is refused: every leaf it signed would be refused too.
    #[test]
    fn a_certificate_of_another_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        init(&a).unwrap();
        init(&b).unwrap();
        fs::copy(b.join(CERT_FILE), a.join(CERT_FILE)).unwrap();
        let e = Ca::load(&a).err().expect("refused");
        assert!(e.to_string().contains("is not the certificate of"), "{e}");
        assert!(Ca::load(&b).is_ok());

        // Nor is one that only carries the key's public point elsewhere (attack review).
        let key_a = KeyPair::from_pem(&fs::read_to_string(a.join(KEY_FILE)).unwrap()).unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.custom_extensions.push(rcgen::CustomExtension::from_oid_content(
            &[1, 2, 3, 4, 5],
            key_a.public_key_raw().to_vec(),
        ));
        let other = params.self_signed(&KeyPair::generate().unwrap()).unwrap();
        fs::write(a.join(CERT_FILE), other.pem()).unwrap();
        let e = Ca::load(&a).err().expect("refused");
        assert!(e.to_string().contains("is not the certificate of"), "{e}");
    }

    #[test]
    fn init_writes_a_private_key_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path()).unwrap();
        let mode = fs::metadata(dir.path().join(KEY_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(cert_pem(dir.path()).unwrap().starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(init(dir.path()).unwrap_err().to_string().contains("exists already"));
    }

    #[test]
    fn leaves_chain_to_the_ca_and_are_cached() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(&dir.path().join("new")).unwrap();
        let leaf = ca.leaf("registry.test").unwrap();
        assert_eq!(leaf.cert.len(), 2, "leaf and CA");
        assert!(Arc::ptr_eq(&leaf, &ca.leaf("registry.test").unwrap()));
        assert!(!Arc::ptr_eq(&leaf, &ca.leaf("other.test").unwrap()));
        ca.leaf("127.0.0.1").unwrap();

        // A client trusting the CA accepts the leaf for that name, and only for that name.
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der.clone()).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let now = rustls_pki_types::UnixTime::now();
        let name = rustls_pki_types::ServerName::try_from("registry.test").unwrap();
        verifier
            .verify_server_cert(&leaf.cert[0], &leaf.cert[1..], &name, &[], now)
            .unwrap();
        let other = rustls_pki_types::ServerName::try_from("evil.test").unwrap();
        assert!(
            verifier
                .verify_server_cert(&leaf.cert[0], &leaf.cert[1..], &other, &[], now)
                .is_err()
        );
    }

    #[test]
    fn a_world_readable_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path()).unwrap();
        fs::set_permissions(dir.path().join(KEY_FILE), fs::Permissions::from_mode(0o644)).unwrap();
        let e = Ca::load_or_create(dir.path())
            .err()
            .expect("loaded a world-readable key");
        assert!(e.to_string().contains("chmod 600"), "{e}");
    }
}
