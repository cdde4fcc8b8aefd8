//! A throwaway test CA (rcgen, ECDSA P-256) that issues server certificates for TLS upstreams.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A self-signed CA. Every certificate it issues chains to [`TestCa::ca_pem`].
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

impl TestCa {
    /// A fresh CA with a new P-256 key (panics only if rcgen itself fails).
    pub fn new() -> TestCa {
        let key = KeyPair::generate().expect("generating CA key");
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "pullcache test CA");
        dn.push(DnType::OrganizationName, "pullcache tests");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("self-signing CA");
        TestCa {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// Writes the CA certificate to `dir/ca.pem` and returns that path.
    pub fn write_ca(&self, dir: &Path) -> PathBuf {
        let path = dir.join("ca.pem");
        std::fs::write(&path, &self.cert_pem).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path
    }

    /// Issues a server certificate for `names` (DNS names and/or IP addresses,
    /// e.g. `["127.0.0.1", "localhost"]`, all put in the SAN; the first is also the CN).
    /// Writes `dir/<first name>.crt` (leaf only) and `dir/<first name>.key`
    /// (PKCS#8 PEM, mode 0600); returns `(cert_path, key_path)`.
    pub fn issue_server(&self, dir: &Path, names: &[&str]) -> (PathBuf, PathBuf) {
        assert!(!names.is_empty(), "a server certificate needs at least one name");
        let key = KeyPair::generate().expect("generating server key");
        let sans: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(sans).expect("server cert SANs");
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, names[0]);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).expect("signing server cert");

        let stem: String = names[0]
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let cert_path = dir.join(format!("{stem}.crt"));
        let key_path = dir.join(format!("{stem}.key"));
        std::fs::write(&cert_path, cert.pem()).unwrap_or_else(|e| panic!("writing {}: {e}", cert_path.display()));
        std::fs::write(&key_path, key.serialize_pem())
            .unwrap_or_else(|e| panic!("writing {}: {e}", key_path.display()));
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", key_path.display()));
        (cert_path, key_path)
    }
}

impl TestCa {
    /// A TLS server config for `name` (a DNS name), its certificate issued by this CA in
    /// memory (HTTP/1.1 only: no ALPN).
    pub fn acceptor_for(&self, name: &str) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
        use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![name.to_owned()])?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.issuer)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key)?;
        Ok(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls)))
    }
}

/// A TLS client that trusts the CA certificate in `ca_pem` only and presents no certificate.
pub fn connector_trusting(ca_pem: &Path) -> anyhow::Result<tokio_rustls::TlsConnector> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(ca_pem)?)?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls)))
}

/// What [`get_through_proxy`] got back.
pub struct Proxied {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: bytes::Bytes,
}

/// `CONNECT HOST:443` through the HTTPS proxy at `proxy`, as containerd sends it with
/// `HTTPS_PROXY`, then TLS to `host` inside the tunnel with `tls`. A refused CONNECT is an
/// error.
pub async fn connect_through_proxy(
    proxy: std::net::SocketAddr,
    host: &str,
    tls: &tokio_rustls::TlsConnector,
) -> anyhow::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(proxy).await?;
    tcp.set_nodelay(true)?;
    tcp.write_all(format!("CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n").as_bytes())
        .await?;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8];
        anyhow::ensure!(tcp.read(&mut byte).await? == 1, "the proxy closed during CONNECT");
        head.push(byte[0]);
    }
    anyhow::ensure!(
        head.starts_with(b"HTTP/1.1 200"),
        "CONNECT {host}: {}",
        String::from_utf8_lossy(&head)
    );
    let name = rustls_pki_types::ServerName::try_from(host.to_owned())?;
    Ok(tls.connect(name, tcp).await?)
}

/// `GET https://HOST{path}` through the HTTPS proxy at `proxy` ([`connect_through_proxy`]),
/// trusting `ca_pem` only, with `authorization` if given.
pub async fn get_through_proxy(
    proxy: std::net::SocketAddr,
    host: &str,
    ca_pem: &Path,
    path: &str,
    authorization: Option<&str>,
) -> anyhow::Result<Proxied> {
    use http_body_util::BodyExt;
    let tls = connect_through_proxy(proxy, host, &connector_trusting(ca_pem)?).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    let mut req = hyper::Request::get(path).header("host", host);
    if let Some(authorization) = authorization {
        req = req.header("authorization", authorization);
    }
    let resp = sender
        .send_request(req.body(http_body_util::Empty::<bytes::Bytes>::new())?)
        .await?;
    let (parts, body) = resp.into_parts();
    Ok(Proxied {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: body.collect().await?.to_bytes(),
    })
}
