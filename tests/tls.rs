//! HTTPS: with `tls_cert` / `tls_key` the server speaks TLS only (a plain-HTTP request gets no
//! answer), the API works over it with a key, and a missing key file is a start-up error.
mod common;

use std::sync::Arc;

use common::TestServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A self-signed certificate for `localhost`, written as PEM files; returns (cert, key, DER cert).
fn self_signed(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, Vec<u8>) {
    self_signed_as(dir, "")
}

/// `self_signed` with the files named `cert{tag}.pem` and `key{tag}.pem`.
fn self_signed_as(
    dir: &std::path::Path,
    tag: &str,
) -> (std::path::PathBuf, std::path::PathBuf, Vec<u8>) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert, key) = (
        dir.join(format!("cert{tag}.pem")),
        dir.join(format!("key{tag}.pem")),
    );
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    (cert, key, ck.cert.der().to_vec())
}

/// A TLS connection that trusts only `ca`.
async fn connect(
    addr: std::net::SocketAddr,
    ca: &[u8],
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(ca.to_vec()))
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
}

/// One HTTP/1.1 request over TLS (trusting only `ca`); the raw response.
async fn https(addr: std::net::SocketAddr, ca: &[u8], request: &str) -> String {
    let mut tls = connect(addr, ca).await.unwrap();
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn the_api_is_served_over_tls_and_only_over_tls() {
    let dir = std::env::temp_dir().join(format!("hearth-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key, der) = self_signed(&dir);
    let s = TestServer::named("tls", |c| {
        c.tls_cert = Some(cert.clone());
        c.tls_key = Some(key.clone());
        c.tenants = vec![hearth::tenancy::TenantConfig::new("team-a", &["sk-a"])];
    });
    let addr = s.server.as_ref().unwrap().addr;
    let health = s.rt.block_on(https(
        addr,
        &der,
        "GET /health HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n",
    ));
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let body = r#"{"model": "tls", "prompt": "The capital of France is", "max_tokens": 2}"#;
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\nauthorization: Bearer sk-a\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let resp = s.rt.block_on(https(addr, &der, &req));
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("\"text_completion\""), "{resp}");
    // Plain HTTP on the TLS port gets no HTTP answer.
    let plain = common::agent().get(&format!("http://{addr}/health")).call();
    assert!(plain.is_err() || plain.is_ok_and(|r| r.status().as_u16() != 200));

    let mut missing = hearth::config::Config {
        tls_cert: Some(cert),
        tls_key: Some(dir.join("absent.pem")),
        port: 0,
        ..Default::default()
    };
    missing.models.clear();
    let err = s.rt.block_on(hearth::server::Server::start(
        missing,
        candle_core::Device::Cpu,
    ));
    assert!(
        matches!(err, Err(hearth::HearthError::Config(_))),
        "a missing key file is a start-up error"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_renewed_certificate_is_served_after_a_reload() {
    let dir = std::env::temp_dir().join(format!("hearth-tls-renew-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key, old) = self_signed_as(&dir, "-old");
    let (new_cert, new_key, new) = self_signed_as(&dir, "-new");
    let tenants = vec![hearth::tenancy::TenantConfig::new("team-a", &["sk-a"])];
    let s = TestServer::named("tlsrenew", |c| {
        c.tls_cert = Some(cert.clone());
        c.tls_key = Some(key.clone());
        c.tenants = tenants.clone();
    });
    let server = s.server.as_ref().unwrap();
    let addr = server.addr;
    assert!(s.rt.block_on(connect(addr, &old)).is_ok());
    assert!(s.rt.block_on(connect(addr, &new)).is_err());
    // What SIGHUP does with the config file, here with the renewed certificate's files.
    let renewed = hearth::config::Config {
        tls_cert: Some(new_cert),
        tls_key: Some(new_key),
        tenants: tenants.clone(),
        ..Default::default()
    };
    server.state.reload(&renewed).unwrap();
    assert!(
        s.rt.block_on(connect(addr, &new)).is_ok(),
        "renewed certificate served"
    );
    assert!(s.rt.block_on(connect(addr, &old)).is_err(), "old one gone");
    // A broken certificate file is refused and the renewed one stays.
    let broken = hearth::config::Config {
        tls_cert: Some(dir.join("absent.pem")),
        tls_key: Some(dir.join("key-new.pem")),
        tenants,
        ..Default::default()
    };
    assert!(server.state.reload(&broken).is_err());
    assert!(s.rt.block_on(connect(addr, &new)).is_ok());
    let _ = std::fs::remove_dir_all(&dir);
}
