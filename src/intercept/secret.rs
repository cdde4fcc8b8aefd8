//! The cluster CA as a Kubernetes Secret: `pullcache ca init --k8s-secret NAME` creates it
//! once (a pre-install Job runs it), with the same `ca.key` and `ca.crt` keys that `--ca-dir`
//! reads when the Secret is mounted. An existing Secret is never replaced.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};

use crate::ca::{CERT_FILE, CaError, KEY_FILE, generate};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretOutcome {
    Created,
    /// It was there already (perhaps made by another node's Job a moment before).
    Exists,
}

/// `pullcache ca init --k8s-secret NAME`: with the in-cluster service account or
/// `$KUBECONFIG`, creates the Secret in `namespace` (default: the client's own) unless it
/// exists, and says which happened.
pub async fn init_secret_command(name: &str, namespace: Option<String>) -> Result<String, CaError> {
    let client = kube::Client::try_default()
        .await
        .map_err(|e| CaError::Kube(format!("no Kubernetes client configuration: {e}")))?;
    let namespace = namespace.unwrap_or_else(|| client.default_namespace().to_owned());
    Ok(match init_secret(client, &namespace, name).await? {
        SecretOutcome::Created => format!("created secret {namespace}/{name}"),
        SecretOutcome::Exists => format!("secret {namespace}/{name} exists; left as it is"),
    })
}

/// Creates Secret `name` in `namespace` holding a new CA, unless it exists.
pub async fn init_secret(client: kube::Client, namespace: &str, name: &str) -> Result<SecretOutcome, CaError> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let kube_err = |e: kube::Error| CaError::Kube(format!("secret {namespace}/{name}: {e}"));
    if api.get_opt(name).await.map_err(kube_err)?.is_some() {
        return Ok(SecretOutcome::Exists);
    }
    let (key_pem, cert_pem) = generate()?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_owned(),
                "pullcache".to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_owned()),
        data: Some(BTreeMap::from([
            (KEY_FILE.to_owned(), ByteString(key_pem.into_bytes())),
            (CERT_FILE.to_owned(), ByteString(cert_pem.into_bytes())),
        ])),
        ..Secret::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok(SecretOutcome::Created),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(SecretOutcome::Exists),
        Err(e) => Err(kube_err(e)),
    }
}
