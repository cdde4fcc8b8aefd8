//! The kubelet's path: containerd's CRI image service (`runtime.v1.ImageService`) over its
//! socket, with the bindings of the `k8s-cri` crate on tonic. Start the daemon with the CRI
//! plugin on ([`super::containerd::ContainerdOptions::cri`]), then [`Cri::pull_image`] with an
//! [`Auth`] as the kubelet passes a pod's pull secret.
//!
//! Verified with containerd 1.6.20 (Debian), the distribution registry with token auth and
//! the token service (tests/harness/cri.rs pins each point):
//! * The CRI plugin loads with no CNI config and no runc: it logs "failed to load cni during
//!   init" and its image service works. It serves `runtime.v1` on containerd's own gRPC socket
//!   and initialises after that socket serves, so startup waits for `ImageFsInfo` to answer.
//! * Images land in namespace `k8s.io`, unpacked with the configured snapshotter. `PullImage`
//!   answers the image id, `sha256:<config digest>`; `ImageStatus` gives that id, the tag
//!   and `name@sha256:<manifest digest>`, and an empty answer (not an error) for an unknown
//!   image. `RemoveImage` is idempotent.
//! * The mirror hosts and their request shapes are `ctr`'s (see containerd.rs): `?ns=<registry>`,
//!   hosts in order for every request. A mirror answering 404 or 401 is skipped per request;
//!   the mirror never gets `Authorization` unless it challenges.
//! * Credentials follow the challenge, not the host: `AuthConfig.server_address` empty (as
//!   here), containerd offers them to any host whose 401 carries `WWW-Authenticate: Bearer`,
//!   a mirror included. With a password it POSTs the OAuth2 form (`grant_type=password`,
//!   `username`, `password`, `client_id=containerd-client`, `scope`, `service`; no
//!   `Authorization`) to the realm; without one it GETs `realm?scope=..&service=..`
//!   anonymously. `registry_token` is ignored by 1.6 (the pull goes anonymous).
//! * One pull fetches two tokens: the tag HEAD is challenged, then repeated with `Bearer`; the
//!   manifest GET by digest starts without a token again, is challenged, and fetches its own;
//!   blob GETs carry `Bearer` from their first request.
//! * A refused pull is gRPC `Unknown` with `failed to pull and unpack image "REF": failed to
//!   resolve reference "REF": ...`, ending with the FIRST host's failure: a skipped 404
//!   mirror leaves `failed to authorize: failed to fetch anonymous token: unexpected status:
//!   401 Unauthorized`; a mirror's other status leaves `pulling from host H failed with
//!   status code [manifests TAG]: 401 ...` though the registry was tried after it.
//! * Intercept mode (daemon env `HTTPS_PROXY` + `SSL_CERT_FILE`, empty certs.d): `CONNECT
//!   host:443` with only `Host` and `User-Agent: Go-http-client/1.1`; inside, `Host:
//!   <registry>`, no `?ns=`. The token fetch goes through the proxy too, in a tunnel of its
//!   own to the realm's host (`CONNECT auth.host:443`), unless the realm is a loopback URL:
//!   Go never proxies loopback, so a `http://127.0.0.1:PORT/token` realm is fetched directly.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::{
    AuthConfig, ImageFsInfoRequest, ImageSpec, ImageStatusRequest, PullImageRequest, RemoveImageRequest,
};
use tonic::transport::{Channel, Endpoint, Uri};

/// The containerd namespace the CRI plugin keeps its images in.
pub const CRI_NAMESPACE: &str = "k8s.io";
/// A CRI pull's bound (a `ctr` pull has the same).
pub const PULL_TIMEOUT: Duration = super::containerd::PULL_TIMEOUT;
/// Every other call's bound.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A pod's pull secret, as the kubelet hands it to `PullImage` in `AuthConfig`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    /// `username` + `password` (a dockerconfigjson entry's `auth`, decoded).
    Basic { username: String, password: String },
    /// `registry_token`: a bearer token sent to the registry as is.
    RegistryToken(String),
}

impl Auth {
    pub fn basic(username: &str, password: &str) -> Auth {
        Auth::Basic {
            username: username.to_owned(),
            password: password.to_owned(),
        }
    }

    fn to_config(&self) -> AuthConfig {
        match self {
            Auth::Basic { username, password } => AuthConfig {
                username: username.clone(),
                password: password.clone(),
                ..AuthConfig::default()
            },
            Auth::RegistryToken(token) => AuthConfig {
                registry_token: token.clone(),
                ..AuthConfig::default()
            },
        }
    }
}

/// A refused CRI call: the gRPC status containerd answered (or a transport failure, as
/// `Unavailable`, or our own bound, as `DeadlineExceeded`).
#[derive(Debug, Clone, thiserror::Error)]
#[error("CRI {call} {image}: {code:?}: {message}")]
pub struct CriError {
    pub call: &'static str,
    pub image: String,
    pub code: tonic::Code,
    /// containerd's message, e.g. `failed to pull and unpack image "...": ...`.
    pub message: String,
}

/// What `ImageStatus` knows of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageStatus {
    /// The image id: the config's digest.
    pub id: String,
    pub repo_tags: Vec<String>,
    /// `name@sha256:<manifest digest>` for each repository it came from.
    pub repo_digests: Vec<String>,
    pub size: u64,
}

/// A CRI image service client on one containerd socket.
#[derive(Clone)]
pub struct Cri {
    images: ImageServiceClient<Channel>,
    socket: PathBuf,
}

impl Cri {
    /// Connects over the unix socket (gRPC over h2c, as the kubelet talks to it).
    pub async fn connect(socket: &Path) -> Result<Cri> {
        let path = socket.to_owned();
        // The URI is unused: every connection goes to the socket.
        let channel = Endpoint::from_static("http://[::1]:1")
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
            }))
            .await
            .with_context(|| format!("connecting to the CRI at {}", socket.display()))?;
        Ok(Cri {
            images: ImageServiceClient::new(channel),
            socket: socket.to_owned(),
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `PullImage` of `image` with `auth` as the pod's pull secret; the image ref containerd
    /// answers (`sha256:<config digest>`), or containerd's refusal.
    pub async fn pull_image(&self, image: &str, auth: Option<&Auth>) -> Result<String, CriError> {
        let request = PullImageRequest {
            image: Some(spec(image)),
            auth: auth.map(Auth::to_config),
            sandbox_config: None,
        };
        let mut images = self.images.clone();
        let answer = bounded("PullImage", image, PULL_TIMEOUT, images.pull_image(request)).await?;
        Ok(answer.image_ref)
    }

    /// `ImageStatus`: None when containerd does not know `image` (a ref or an id).
    pub async fn image_status(&self, image: &str) -> Result<Option<ImageStatus>, CriError> {
        let request = ImageStatusRequest {
            image: Some(spec(image)),
            verbose: false,
        };
        let mut images = self.images.clone();
        let answer = bounded("ImageStatus", image, CALL_TIMEOUT, images.image_status(request)).await?;
        Ok(answer.image.map(|i| ImageStatus {
            id: i.id,
            repo_tags: i.repo_tags,
            repo_digests: i.repo_digests,
            size: i.size,
        }))
    }

    /// `RemoveImage`: every name of the image goes (idempotent, as the CRI requires). The
    /// content is collected by containerd's GC, asynchronously.
    pub async fn remove_image(&self, image: &str) -> Result<(), CriError> {
        let request = RemoveImageRequest {
            image: Some(spec(image)),
        };
        let mut images = self.images.clone();
        bounded("RemoveImage", image, CALL_TIMEOUT, images.remove_image(request)).await?;
        Ok(())
    }

    /// `ImageFsInfo`: answers once the CRI plugin has initialised (a readiness probe).
    pub async fn image_fs_info(&self) -> Result<(), CriError> {
        let mut images = self.images.clone();
        bounded(
            "ImageFsInfo",
            "",
            CALL_TIMEOUT,
            images.image_fs_info(ImageFsInfoRequest {}),
        )
        .await?;
        Ok(())
    }
}

fn spec(image: &str) -> ImageSpec {
    ImageSpec {
        image: image.to_owned(),
        ..ImageSpec::default()
    }
}

/// Awaits one call within `timeout`; its message, or its status as a [`CriError`].
async fn bounded<T>(
    call: &'static str,
    image: &str,
    timeout: Duration,
    response: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, CriError> {
    let error = |code, message: String| CriError {
        call,
        image: image.to_owned(),
        code,
        message,
    };
    match tokio::time::timeout(timeout, response).await {
        Ok(Ok(answer)) => Ok(answer.into_inner()),
        Ok(Err(status)) => Err(error(status.code(), status.message().to_owned())),
        Err(_) => Err(error(
            tonic::Code::DeadlineExceeded,
            format!("no answer within {timeout:?}"),
        )),
    }
}
