//! The HTTP layer under the routes. The accept loop caps open connections (refusing extra ones with a
//! readable 503), closes a connection whose request head does not arrive in time (which is also the
//! idle keep-alive timeout), and drains gracefully: idle connections close at once, in-flight ones
//! finish. The middleware gives every request an id and a span, checks `Host` (when bound to
//! loopback, against DNS rebinding) and `Content-Type`, and puts OpenAI's error body on every error
//! the HTTP layer itself produces.
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use futures_util::StreamExt;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use rand::distr::{Alphanumeric, SampleString};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tower_http::request_id::{MakeRequestId, RequestId};

use super::error::ApiError;

/// Limits of the HTTP layer.
#[derive(Debug)]
pub struct HttpConfig {
    /// Time a client has to send a request head; also how long an idle keep-alive connection lives.
    pub header_read_timeout: Duration,
    /// Time a client has to send a request body.
    pub body_read_timeout: Duration,
    /// Open connections; more are refused with 503.
    pub max_connections: usize,
    /// Largest request body; a larger one is a 413 (read and dropped up to `drain_bytes` more, so
    /// the client can finish sending and read the answer).
    pub max_body_bytes: usize,
    pub drain_bytes: usize,
    /// Host names (no port) requests may address. Empty: any when bound to a non-loopback address,
    /// and only localhost names when bound to loopback.
    pub allowed_hosts: Vec<String>,
    /// The address the server is bound to.
    pub bound: IpAddr,
    /// Serve HTTPS with this certificate and key (plain HTTP when None); a reload swaps in a
    /// renewed certificate for the connections accepted after it.
    pub tls: Option<std::sync::RwLock<Arc<rustls::ServerConfig>>>,
}

/// The TLS settings for a PEM certificate chain and private key; ALPN offers HTTP/2 and HTTP/1.1.
pub fn tls_config(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> crate::Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |what: &std::path::Path, e: &dyn std::fmt::Display| {
        crate::HearthError::Config(format!("TLS {}: {e}", what.display()))
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad(cert, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(cert, &e))?;
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(cert, &e))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| bad(cert, &e))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

impl HttpConfig {
    fn host_allowed(&self, host: &str) -> bool {
        let name = host_name(host);
        if self
            .allowed_hosts
            .iter()
            .any(|h| h.eq_ignore_ascii_case(name))
        {
            return true;
        }
        if !self.bound.is_loopback() {
            return self.allowed_hosts.is_empty();
        }
        name.eq_ignore_ascii_case("localhost")
            || name
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }
}

/// The host part of a `Host` header value (`name`, `name:port`, `[v6]:port`).
fn host_name(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_inclusive(']').next().unwrap_or(host);
    }
    host.rsplit_once(':')
        .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
        .map_or(host, |(name, _)| name)
}

/// Raise the open-file limit to its hard maximum (as Go and nginx do), and return the soft limit
/// in force; None where it cannot be read.
pub fn raise_fd_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
                return None;
            }
            if lim.rlim_cur < lim.rlim_max {
                let want = libc::rlimit {
                    rlim_cur: lim.rlim_max.min(1 << 20),
                    rlim_max: lim.rlim_max,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                    lim = want;
                }
            }
        }
        // rlim_t is u64 on Linux but not on every unix.
        #[allow(clippy::unnecessary_cast)]
        Some(lim.rlim_cur as u64)
    }
    #[cfg(not(unix))]
    None
}

/// The default connection cap: well above typical client pools, and below the file-descriptor
/// limit with room for model files, logs and the engine.
pub fn default_max_connections(fd_limit: Option<u64>) -> usize {
    match fd_limit {
        Some(n) => (n.saturating_sub(256) as usize).clamp(64, 16_384),
        None => 4096,
    }
}

/// A client's `x-request-id` is kept when it is short and plain; anything else is replaced.
fn well_formed_id(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    (1..=128).contains(&b.len())
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.:".contains(c))
}

#[derive(Clone, Copy, Default)]
pub struct RandomId;

impl MakeRequestId for RandomId {
    fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<RequestId> {
        let id = Alphanumeric.sample_string(&mut rand::rng(), 24);
        HeaderValue::from_str(&id).ok().map(RequestId::new)
    }
}

/// Drop a malformed client request id, so that a fresh one is made.
pub async fn drop_malformed_request_id(mut req: Request, next: Next) -> Response {
    if req
        .headers()
        .get("x-request-id")
        .is_some_and(|v| !well_formed_id(v))
    {
        req.headers_mut().remove("x-request-id");
    }
    next.run(req).await
}

/// `Host` and `Content-Type` checks.
pub async fn guard(State(cfg): State<Arc<HttpConfig>>, req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(String::from)
        .or_else(|| req.uri().authority().map(|a| a.as_str().to_string()));
    match host {
        Some(h) if cfg.host_allowed(&h) => {}
        Some(h) => {
            return ApiError::http(
                StatusCode::FORBIDDEN,
                format!("requests for host `{h}` are not served here (see `allowed_hosts`)"),
            )
            .into_response()
        }
        None => {
            return ApiError::http(StatusCode::BAD_REQUEST, "the request has no Host header")
                .into_response()
        }
    }
    if req.method() == Method::POST {
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return ApiError::http(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "the request body must be JSON, sent with `Content-Type: application/json`",
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// Errors made below the handlers (no route, wrong method, a timeout) come back with OpenAI's
/// error body instead of an empty or plain-text one.
pub async fn json_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let message = match status {
        StatusCode::METHOD_NOT_ALLOWED => "this endpoint does not take that method".to_string(),
        s => s.canonical_reason().unwrap_or("error").to_string(),
    };
    let mut out = ApiError::http(status, message).into_response();
    for name in [header::ALLOW, header::RETRY_AFTER] {
        if let Some(v) = resp.headers().get(&name) {
            out.headers_mut().insert(name, v.clone());
        }
    }
    out
}

/// Read a JSON body of at most `cfg.max_body_bytes`. A larger one is a 413, after reading and
/// dropping up to `cfg.drain_bytes` more so that the client gets to read the answer rather than a
/// reset; a body that does not arrive within the body timeout is a 408.
pub async fn read_body(
    cfg: &HttpConfig,
    headers: &axum::http::HeaderMap,
    body: Body,
) -> Result<Vec<u8>, ApiError> {
    let limit = cfg.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = || {
        ApiError::too_large(format!(
            "the request body is larger than {limit} bytes (`max_body_bytes`)"
        ))
    };
    let mut stream = body.into_data_stream();
    if declared.is_some_and(|n| n > (limit + cfg.drain_bytes) as u64) {
        return Err(too_large());
    }
    let mut buf = Vec::with_capacity(declared.map_or(0, |n| (n as usize).min(limit)));
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(body_error)?;
        if buf.len() + chunk.len() > limit {
            let mut drained = buf.len() + chunk.len() - limit;
            while drained < cfg.drain_bytes {
                match stream.next().await {
                    Some(Ok(c)) => drained += c.len(),
                    _ => break,
                }
            }
            return Err(too_large());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

fn body_error(e: axum::Error) -> ApiError {
    let e = e.into_inner();
    if e.downcast_ref::<tower_http::timeout::TimeoutError>()
        .is_some()
    {
        ApiError::http(
            StatusCode::REQUEST_TIMEOUT,
            "the request body did not arrive in time",
        )
    } else {
        ApiError::invalid(format!("cannot read the request body: {e}"), None)
    }
}

/// A connection's socket, with one rewrite: the answers hyper writes by itself to requests it cannot
/// parse (400 malformed, 414 URI too long, 431 headers too large) have no body; they get OpenAI's
/// error body like every other error. The app's own errors always have a body, so a bodiless 4xx or
/// 5xx head can only be hyper's.
struct ErrorBodyIo<S> {
    inner: S,
    /// Rewritten bytes still to send, and how many are sent.
    pending: Vec<u8>,
    sent: usize,
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> ErrorBodyIo<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            pending: Vec::new(),
            sent: 0,
        }
    }

    /// The head with a JSON error body, if `buf` is a bodiless error head written by hyper.
    fn rewrite(buf: &[u8]) -> Option<Vec<u8>> {
        if !(buf.starts_with(b"HTTP/1.1 4") || buf.starts_with(b"HTTP/1.1 5")) || buf.len() > 1024 {
            return None;
        }
        let head = std::str::from_utf8(buf).ok()?;
        let rest = head.strip_prefix("HTTP/1.1 ")?;
        let code: u16 = rest.get(..3)?.parse().ok()?;
        let status = StatusCode::from_u16(code).ok()?;
        if !(status.is_client_error() || status.is_server_error())
            || !head.ends_with("\r\n\r\n")
            || !head.contains("\r\ncontent-length: 0\r\n")
        {
            return None;
        }
        let message = match status {
            StatusCode::URI_TOO_LONG => "the request URI is too long",
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => "the request headers are too large",
            _ => "the request is not valid HTTP",
        };
        let body = serde_json::to_string(&ApiError::http(status, message).body()).ok()?;
        let head = head.trim_end_matches("\r\n").replace(
            "\r\ncontent-length: 0",
            &format!(
                "\r\ncontent-type: application/json\r\ncontent-length: {}",
                body.len()
            ),
        );
        Some(format!("{head}\r\n\r\n{body}").into_bytes())
    }

    fn poll_pending(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        while self.sent < self.pending.len() {
            match std::pin::Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.sent..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()))
                }
                Poll::Ready(Ok(n)) => self.sent += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        self.pending.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> tokio::io::AsyncRead
    for ErrorBodyIo<S>
{
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite
    for ErrorBodyIo<S>
{
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::task::Poll;
        let this = self.get_mut();
        if let Poll::Ready(Err(e)) = this.poll_pending(cx) {
            return Poll::Ready(Err(e));
        }
        if !this.pending.is_empty() {
            return Poll::Pending;
        }
        if let Some(bytes) = Self::rewrite(buf) {
            this.pending = bytes;
            // The whole head is taken; the rewritten bytes go out on this and later polls.
            if let Poll::Ready(Err(e)) = this.poll_pending(cx) {
                return Poll::Ready(Err(e));
            }
            return Poll::Ready(Ok(buf.len()));
        }
        std::pin::Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        // An error head hyper writes by itself travels alone (its body is empty): route it
        // through `poll_write`, everything else straight to the socket.
        let first = bufs.iter().find(|b| !b.is_empty());
        if !self.pending.is_empty() || first.is_some_and(|b| Self::rewrite(b).is_some()) {
            let first: &[u8] = first.map_or(&[], |b| b);
            return self.poll_write(cx, first);
        }
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_pending(cx))?;
        std::pin::Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_pending(cx))?;
        std::pin::Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// Answer a connection over the cap with a 503 and close it.
async fn refuse(mut stream: TcpStream) {
    let body = serde_json::to_string(
        &ApiError::unavailable(
            "too_many_connections",
            "too many open connections; retry later",
        )
        .body(),
    )
    .unwrap_or_default();
    let resp = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(resp.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Accept and serve connections until `stop` resolves, then drain: stop accepting, close idle
/// connections, and return once the in-flight ones have finished.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    cfg: Arc<HttpConfig>,
    stop: impl std::future::Future<Output = ()>,
) {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout)
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    let conns = Arc::new(Semaphore::new(cfg.max_connections));
    tokio::pin!(stop);
    loop {
        let (stream, peer): (TcpStream, SocketAddr) = tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors or similar: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            tracing::warn!(%peer, max = cfg.max_connections, "connection refused: at the cap");
            tokio::spawn(refuse(stream));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let svc = TowerToHyperService::new(app.clone());
        let tls = cfg.tls.as_ref().map(|t| {
            t.read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone()
        });
        let Some(tls) = tls else {
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(ErrorBodyIo::new(stream)), svc)
                .into_owned();
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                drop(permit);
            });
            continue;
        };
        // The handshake runs in the connection's task (a slow client holds up no one else), bounded
        // by the header timeout like a slow request head.
        let (builder, watcher) = (builder.clone(), graceful.watcher());
        let handshake_timeout = cfg.header_read_timeout;
        tokio::spawn(async move {
            let accept = tokio_rustls::TlsAcceptor::from(tls).accept(stream);
            let stream = match tokio::time::timeout(handshake_timeout, accept).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(ErrorBodyIo::new(stream)), svc)
                .into_owned();
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(bound: &str, allowed: &[&str]) -> HttpConfig {
        HttpConfig {
            header_read_timeout: Duration::from_secs(1),
            body_read_timeout: Duration::from_secs(1),
            max_connections: 1,
            max_body_bytes: 1,
            drain_bytes: 1,
            allowed_hosts: allowed.iter().map(|s| s.to_string()).collect(),
            bound: bound.parse().unwrap(),
            tls: None,
        }
    }

    #[test]
    fn hosts_are_checked_only_where_they_should_be() {
        let local = cfg("127.0.0.1", &[]);
        for ok in [
            "localhost",
            "localhost:8080",
            "127.0.0.1:80",
            "[::1]:8080",
            "LOCALHOST",
        ] {
            assert!(local.host_allowed(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8080",
            "127.0.0.1.evil.example",
            "10.0.0.1",
        ] {
            assert!(!local.host_allowed(bad), "{bad}");
        }
        assert!(cfg("127.0.0.1", &["hearth.internal"]).host_allowed("hearth.internal:8080"));
        assert!(cfg("0.0.0.0", &[]).host_allowed("anything.example"));
        let pinned = cfg("0.0.0.0", &["hearth.internal"]);
        assert!(pinned.host_allowed("hearth.internal"));
        assert!(!pinned.host_allowed("evil.example"));
    }

    #[test]
    fn request_ids_from_clients_are_kept_only_when_plain() {
        for ok in ["abc", "req-123_4.5:6"] {
            assert!(well_formed_id(&HeaderValue::from_static(ok)));
        }
        let long = "a".repeat(129);
        for bad in ["", "has space", "new\u{7f}line", long.as_str()] {
            assert!(
                !HeaderValue::from_str(bad).is_ok_and(|v| well_formed_id(&v)),
                "{bad:?}"
            );
        }
    }
}
