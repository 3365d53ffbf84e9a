//! TLS on both sides, with rustls and its `ring` provider only.
//!
//! Client side: a second listener (`[server.tls]`) whose acceptor
//! configuration lives behind a lock, so SIGHUP / `PROXY CONFIG RELOAD`
//! swap certificates for new handshakes while established connections keep
//! going. Upstream side: a connector for `rediss://` (`[upstream.tls]`).

use crate::config::{Config, ServerTlsConfig, UpstreamTlsConfig};
use std::sync::{Arc, RwLock};
use tokio_rustls::rustls::{
    self, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
    server::WebPkiClientVerifier,
};

/// Installs ring as the process-wide rustls provider (once; a provider
/// already installed is fine). The builders below name ring explicitly too.
pub fn init() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn load_certs(what: &str, path: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{what} {path}: {}", pem_err(e)))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{what} {path}: {}", pem_err(e)))?;
    if certs.is_empty() {
        return Err(format!("{what} {path}: no PEM certificate in it"));
    }
    Ok(certs)
}

pub fn load_key(what: &str, path: &str) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("{what} {path}: {}", pem_err(e)))
}

fn pem_err(e: rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(e) => format!("cannot read: {e}"),
        rustls::pki_types::pem::Error::NoItemsFound => "no PEM item of the expected kind".into(),
        other => format!("invalid PEM: {other:?}"),
    }
}

fn roots(what: &str, path: &str) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    for c in load_certs(what, path)? {
        store
            .add(c)
            .map_err(|e| format!("{what} {path}: unusable CA certificate: {e}"))?;
    }
    Ok(store)
}

/// The acceptor configuration for `[server.tls]`: certificate and key
/// (checked to match), client certificates required when `client_ca_file`
/// is set; TLS 1.2 and 1.3.
pub fn server_config(t: &ServerTlsConfig) -> Result<Arc<ServerConfig>, String> {
    if t.cert_file.is_empty() || t.key_file.is_empty() {
        return Err("server.tls: listen needs cert_file and key_file".into());
    }
    let certs = load_certs("server.tls.cert_file", &t.cert_file)?;
    let key = load_key("server.tls.key_file", &t.key_file)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("server.tls: {e}"))?;
    let builder = if t.client_ca_file.is_empty() {
        builder.with_no_client_auth()
    } else {
        let store = roots("server.tls.client_ca_file", &t.client_ca_file)?;
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider())
            .build()
            .map_err(|e| format!("server.tls.client_ca_file: {e}"))?;
        builder.with_client_cert_verifier(verifier)
    };
    let mut cfg = builder.with_single_cert(certs, key).map_err(|e| {
        format!(
            "server.tls: key_file {} does not fit cert_file {}: {e}",
            t.key_file, t.cert_file
        )
    })?;
    cfg.alpn_protocols.clear();
    Ok(Arc::new(cfg))
}

/// The connector configuration for a `rediss://` upstream.
pub fn client_config(t: &UpstreamTlsConfig) -> Result<Arc<ClientConfig>, String> {
    if t.cert_file.is_empty() != t.key_file.is_empty() {
        return Err("upstream.tls: cert_file and key_file go together".into());
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("upstream.tls: {e}"))?;
    let builder = if t.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider())))
    } else if !t.ca_file.is_empty() {
        builder.with_root_certificates(roots("upstream.tls.ca_file", &t.ca_file)?)
    } else {
        let mut store = RootCertStore::empty();
        for c in rustls_native_certs::load_native_certs().certs {
            let _ = store.add(c);
        }
        if store.is_empty() {
            return Err(
                "upstream.tls: no system CA certificates found; set upstream.tls.ca_file".into(),
            );
        }
        builder.with_root_certificates(store)
    };
    let cfg = if t.cert_file.is_empty() {
        builder.with_no_client_auth()
    } else {
        let certs = load_certs("upstream.tls.cert_file", &t.cert_file)?;
        let key = load_key("upstream.tls.key_file", &t.key_file)?;
        builder.with_client_auth_cert(certs, key).map_err(|e| {
            format!(
                "upstream.tls: key_file {} does not fit cert_file {}: {e}",
                t.key_file, t.cert_file
            )
        })?
    };
    Ok(Arc::new(cfg))
}

/// Everything a `rediss://` connection needs.
#[derive(Clone)]
pub struct Upstream {
    pub connector: tokio_rustls::TlsConnector,
    pub name: ServerName<'static>,
}

impl Upstream {
    pub fn new(cfg: &Config, host: &str) -> Result<Self, String> {
        let t = &cfg.upstream.tls;
        if t.insecure_skip_verify {
            tracing::warn!(
                "upstream.tls.insecure_skip_verify = true: the upstream's certificate is NOT VERIFIED; \
                 anyone on the network path can impersonate Redis. Never use this in production."
            );
        }
        let name = if t.server_name.is_empty() {
            host
        } else {
            &t.server_name
        };
        let name = ServerName::try_from(name.to_string())
            .map_err(|e| format!("upstream.tls.server_name '{name}': {e}"))?;
        Ok(Upstream {
            connector: tokio_rustls::TlsConnector::from(client_config(t)?),
            name,
        })
    }
}

/// The client-side acceptor, swappable at runtime.
pub struct Acceptor {
    cfg: RwLock<Arc<ServerConfig>>,
}

impl Acceptor {
    pub fn new(t: &ServerTlsConfig) -> Result<Self, String> {
        Ok(Acceptor {
            cfg: RwLock::new(server_config(t)?),
        })
    }

    /// The acceptor for the next handshake.
    pub fn current(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.cfg.read().unwrap().clone())
    }

    /// Re-reads the certificate files; established connections are untouched.
    pub fn reload(&self, t: &ServerTlsConfig) -> Result<(), String> {
        let new = server_config(t)?;
        *self.cfg.write().unwrap() = new;
        Ok(())
    }
}

/// Loads every TLS file a configuration names, so a bad certificate or key
/// is a configuration error.
pub fn validate(cfg: &Config) -> Result<(), String> {
    let t = &cfg.server.tls;
    if !t.listen.is_empty() {
        t.listen
            .parse::<std::net::SocketAddr>()
            .map_err(|e| format!("server.tls.listen '{}': {e}", t.listen))?;
        server_config(t)?;
    } else if !t.cert_file.is_empty() || !t.key_file.is_empty() || !t.client_ca_file.is_empty() {
        return Err("server.tls: cert_file/key_file/client_ca_file set but listen is empty".into());
    }
    let u = &cfg.upstream.tls;
    let tls_up = cfg.upstream_url().map(|u| u.tls).unwrap_or(false);
    if tls_up
        || !u.ca_file.is_empty()
        || !u.cert_file.is_empty()
        || !u.key_file.is_empty()
        || !u.server_name.is_empty()
    {
        if !tls_up {
            return Err("upstream.tls is configured but upstream.url is not rediss://".into());
        }
        if u.ca_file.is_empty() && !u.insecure_skip_verify {
            // System roots are looked up when connecting; only files here.
            if u.cert_file.is_empty() != u.key_file.is_empty() {
                return Err("upstream.tls: cert_file and key_file go together".into());
            }
            if !u.cert_file.is_empty() {
                load_certs("upstream.tls.cert_file", &u.cert_file)?;
                load_key("upstream.tls.key_file", &u.key_file)?;
            }
        } else {
            client_config(u)?;
        }
        if !u.server_name.is_empty() {
            ServerName::try_from(u.server_name.clone())
                .map_err(|e| format!("upstream.tls.server_name '{}': {e}", u.server_name))?;
        }
    }
    Ok(())
}

/// `insecure_skip_verify`: accepts any certificate, still checks the
/// handshake signatures.
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
