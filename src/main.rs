//! The `pullcache` binary: parse the command line, set up logging and TLS, bind, and hand over
//! to the library.

mod bundle;

use std::io::IsTerminal;
use std::process::ExitCode;

use pullcache::config::{CaCommand, Cli, Command, ContainerdCommand, LogFormat};
use tracing_subscriber::EnvFilter;

/// sysexits' EX_USAGE, for configuration the program cannot run with.
const EXIT_USAGE: u8 = 64;

fn main() -> ExitCode {
    let cli = match Cli::parse_args(std::env::args_os()) {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            let _ = e.print();
            return ExitCode::from(EXIT_USAGE);
        }
        Err(e) => e.exit(),
    };
    // The one-shot commands print what they did; their logs are for when something goes wrong.
    let quiet = !matches!(cli.command, Command::Serve(_));
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(if quiet { "warn" } else { "info" }));
    match cli.log_format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::stdout().is_terminal())
            .init(),
        LogFormat::Json => tracing_subscriber::fmt().json().with_env_filter(filter).init(),
    }
    let _ = rustls::crypto::ring::default_provider().install_default();

    let args = match cli.command {
        Command::Serve(args) => args,
        Command::Ca(command) => return ca(command),
        Command::ContainerdConfig(command) => return containerd_config(command),
        Command::Verify { cache_dir } => return verify(cache_dir.unwrap_or_else(pullcache::config::default_cache_dir)),
        Command::Prefetch(args) => return one_shot(bundle::prefetch_command(&args)),
        Command::Export(args) => return one_shot(bundle::export_command(&args)),
        Command::Import(args) => return report(bundle::import_command(&args)),
    };
    let config = match args.resolve() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("pullcache: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if args.check_config {
        for warning in config.warnings() {
            eprintln!("pullcache: warning: {warning}");
        }
        print!("{}", config.summary());
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let bind = |addr| async move {
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("listen on {addr}: {e}"))
        };
        let peer = match &config.peers {
            Some(peers) => Some(bind(peers.listen).await?),
            None => None,
        };
        let listeners = pullcache::Listeners {
            api: bind(config.listen).await?,
            admin: Some(bind(config.metrics_listen).await?),
            peer,
        };
        pullcache::run(listeners, config, shutdown_signal()).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "pullcache failed");
            ExitCode::FAILURE
        }
    }
}

/// `pullcache verify`.
fn verify(cache_dir: std::path::PathBuf) -> ExitCode {
    let report = pullcache::store::Store::open(&cache_dir).and_then(|store| store.verify());
    match report {
        Ok(report) => {
            for (from, to) in &report.quarantined {
                println!("quarantined {} -> {}", from.display(), to.display());
            }
            println!(
                "checked {} blobs ({} bytes) in {}: {} quarantined",
                report.checked,
                report.bytes,
                cache_dir.display(),
                report.quarantined.len()
            );
            if report.quarantined.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("pullcache: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `pullcache containerd-config install|uninstall`.
fn containerd_config(command: ContainerdCommand) -> ExitCode {
    use pullcache::containerd::{self, Change, Survey};
    let result = match command {
        ContainerdCommand::Install {
            certs_dir,
            mirror,
            registries,
            bypass,
            containerd_config,
            containerd_bin,
            strict,
        } => Survey::take(containerd_config.as_deref(), &containerd_bin).and_then(|survey| {
            let certs_dir = certs_dir.unwrap_or_else(|| survey.certs_dir());
            if let Some(advice) = survey.advice(&certs_dir) {
                if strict {
                    eprintln!("pullcache: --strict: nothing written: {advice}");
                    return Ok(None);
                }
                eprintln!("pullcache: warning: {advice}");
            }
            containerd::install(&certs_dir, &mirror, &registries, &bypass).map(Some)
        }),
        ContainerdCommand::Uninstall {
            certs_dir,
            containerd_config,
        } => match certs_dir {
            Some(certs_dir) => containerd::uninstall(&certs_dir),
            None => Survey::take(containerd_config.as_deref(), std::path::Path::new("containerd"))
                .and_then(|survey| containerd::uninstall(&survey.certs_dir())),
        }
        .map(Some),
    };
    match result {
        Ok(Some(changes)) => {
            for change in changes {
                match change {
                    Change::Written(p) => println!("wrote {}", p.display()),
                    Change::Merged(p) => println!(
                        "merged {}: pullcache first, then what was there (its settings, hosts and certificates)",
                        p.display()
                    ),
                    Change::Unchanged(p) => println!("unchanged {}", p.display()),
                    Change::Restored(p) => println!("restored {}", p.display()),
                    Change::Removed(p) => println!("removed {}", p.display()),
                    Change::Skipped(p, why) => {
                        eprintln!("pullcache: warning: left {} as it is: {why}", p.display())
                    }
                }
            }
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("pullcache: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `pullcache ca init|cert`.
fn ca(command: CaCommand) -> ExitCode {
    let result = match command {
        CaCommand::Init {
            dir: Some(dir),
            k8s_secret: None,
            ..
        } => pullcache::ca::init(&dir).map(|()| {
            println!("{}", dir.join(pullcache::ca::CERT_FILE).display());
        }),
        CaCommand::Init {
            k8s_secret: Some(name),
            namespace,
            ..
        } => {
            let created = pullcache::intercept::init_secret_command(&name, namespace);
            return one_shot(async { Ok(created.await?) });
        }
        CaCommand::Init { .. } => unreachable!("clap requires exactly one of --dir and --k8s-secret"),
        CaCommand::Cert { dir } => pullcache::ca::cert_pem(&dir).map(|pem| print!("{pem}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pullcache: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a command that needs the runtime and prints its summary.
fn one_shot(command: impl std::future::Future<Output = anyhow::Result<String>>) -> ExitCode {
    match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => report(runtime.block_on(command)),
        Err(e) => report(Err(e.into())),
    }
}

/// Prints a command's summary, or its error: exit 64 for configuration it cannot run with,
/// 1 for anything else.
fn report(result: anyhow::Result<String>) -> ExitCode {
    match result {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(e) if e.is::<pullcache::config::ConfigError>() || e.is::<pullcache::oci::ImageRefError>() => {
            eprintln!("pullcache: {e:#}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(e) => {
            eprintln!("pullcache: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM (what Kubernetes sends) or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}
