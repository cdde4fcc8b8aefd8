//! Mutual TLS between peers. Each node signs itself a certificate for its peer address with
//! the cluster CA (`--peer-ca-dir`, the chart's Secret) when it starts, kept in memory only.
//! The peer port asks every client for a certificate from that CA and refuses those without
//! one; a node checks that the peer it dials presents one for the address it dialed.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::ca::{Ca, CaError};

/// This node's certificate and key, and the CA it trusts peers by.
pub struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Identity {
    /// Loads the cluster CA from `ca_dir` (it must exist: every node needs the same one) and
    /// issues this node's certificate for `ip`.
    pub fn issue(ca_dir: &Path, ip: IpAddr) -> Result<Identity, CaError> {
        let ca = Ca::load(ca_dir)?;
        let (chain, key) = ca.peer_certificate(ip)?;
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.cert_der().clone())
            .map_err(|e| CaError::Certificate(format!("cluster CA: {e}")))?;
        Ok(Identity {
            chain,
            key,
            roots: Arc::new(roots),
        })
    }

    /// For dialing peers: verifies their certificate against the CA, presents this node's.
    /// (The connector sets ALPN.)
    pub fn client_config(&self) -> rustls::ClientConfig {
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .expect("a certificate this node just issued is usable")
    }

    /// For the peer port: requires a client certificate from the CA.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, CaError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .map_err(|e| CaError::Certificate(format!("client verifier: {e}")))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| CaError::Certificate(format!("peer certificate: {e}")))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}
