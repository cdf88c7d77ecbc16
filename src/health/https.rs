//! TLS under an HTTP check (`kind = "http"`, `tls = true`): the handshake that turns the
//! check's connection into an HTTPS one, with rustls.
//!
//! The certificate is not verified, as HAProxy's `check-ssl` is usually run (`verify none`):
//! the check asks whether the app behind the port answers well; ringlb relays TCP and never
//! terminates its clients' TLS, so those clients verify the certificate themselves, end to
//! end. One client config, built on first use, serves every check.

use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::probe::{os_error_text, CheckResult, Layer};
use super::proto::printable;

/// Accepts any certificate (see the module's comment).
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn connector() -> Result<TlsConnector, String> {
    static CONFIG: OnceLock<Result<Arc<ClientConfig>, String>> = OnceLock::new();
    let config = CONFIG.get_or_init(|| {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth();
        Ok(Arc::new(config))
    });
    config.clone().map(TlsConnector::from)
}

/// The name sent as SNI: the check's `host` (without a port) when it is a DNS name, else the
/// backend's IP address (which rustls does not send as SNI).
pub fn server_name(host: Option<&str>, ip: std::net::IpAddr) -> ServerName<'static> {
    let name = host.map(|h| match h.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => h,
    });
    name.and_then(|n| ServerName::try_from(n.to_string()).ok())
        .unwrap_or_else(|| ServerName::IpAddress(ip.into()))
}

/// The TLS handshake on the check's connection; a failure is the check's result in Layer6
/// words (HAProxy's for a failed check-ssl handshake).
pub async fn handshake(
    stream: TcpStream,
    name: ServerName<'static>,
) -> Result<TlsStream<TcpStream>, CheckResult> {
    let connector = connector().map_err(|e| CheckResult::InvalidResponse(Layer::L6, e))?;
    connector.connect(name, stream).await.map_err(|e| {
        if let Some(tls) = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            CheckResult::InvalidResponse(
                Layer::L6,
                format!("TLS handshake: {}", printable(tls.to_string().as_bytes())),
            )
        } else if e.kind() == std::io::ErrorKind::UnexpectedEof {
            CheckResult::InvalidResponse(
                Layer::L6,
                "connection closed during the TLS handshake".into(),
            )
        } else {
            CheckResult::ConnectionProblem(os_error_text(&e))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_names_the_server_without_its_port_and_an_ip_is_the_fallback() {
        let ip = "127.0.0.1".parse().unwrap();
        assert_eq!(
            server_name(Some("app.internal:8443"), ip),
            ServerName::try_from("app.internal").unwrap()
        );
        assert_eq!(server_name(None, ip), ServerName::IpAddress(ip.into()));
        assert!(connector().is_ok());
    }
}
