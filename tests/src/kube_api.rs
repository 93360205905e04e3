//! A fake Kubernetes API server for tests: the list and watch protocol of the real one for
//! `services`, `endpointslices` (discovery.k8s.io/v1) and `nodes`, over HTTP/1.1 or HTTPS.
//!
//! What it does like the real server:
//! - one resourceVersion counter shared by all objects (like etcd); lists return it in
//!   `metadata.resourceVersion`, items without `kind`/`apiVersion`;
//! - `?watch=true&resourceVersion=N` streams (chunked) `{"type":"ADDED|MODIFIED|DELETED",
//!   "object":{...}}` lines for every change after N, then follows new changes; a watch from
//!   a compacted resourceVersion gets one `ERROR` event with a 410 `Expired` Status, and
//!   `BOOKMARK` events carry only `metadata.resourceVersion`;
//! - `labelSelector` (`k`, `!k`, `k=v`, `k!=v`) and `fieldSelector` (`metadata.name=`,
//!   `metadata.namespace=`) filter lists and watches; an object that stops (starts) matching a
//!   watch's selector is sent as DELETED (ADDED);
//! - `limit` and `continue` page lists: every page of one list comes from the snapshot at the
//!   first page's resourceVersion (the token carries it and the next key, in the API server's
//!   format); a token whose snapshot was compacted gets a 410 `Expired` Status;
//! - bearer-token authentication (401 Status otherwise), over plain HTTP or HTTPS
//!   ([`FakeApi::serve_tls`] with a [`Pki`] made for the test).
//!
//! Controls for tests: [`FakeApi::drop_watches`] (connections cut mid-stream),
//! [`FakeApi::expire_watches`] (410 on every open watch and compaction, forcing a re-list),
//! [`FakeApi::bookmark`], [`FakeApi::expire_next_continues`] (410 on the next paged list
//! continuations), and [`FakeApi::requests`] (every request, for asserting what the
//! client called). The listener is created by the caller (e.g. inside a network namespace).

use std::{
    collections::BTreeMap,
    io::{self, BufRead, BufReader, Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use rustls::{
    ServerConfig, ServerConnection, StreamOwned,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
};
use serde_json::{Value, json};

/// The bearer token the fake server accepts (written into generated kubeconfigs).
pub const TOKEN: &str = "svc-lb-test-token";

/// The resources served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Res {
    Services,
    EndpointSlices,
    Nodes,
}

impl Res {
    pub const ALL: [Res; 3] = [Res::Services, Res::EndpointSlices, Res::Nodes];

    /// (group, plural) as RBAC rules name them.
    pub fn rbac(self) -> (&'static str, &'static str) {
        match self {
            Res::Services => ("", "services"),
            Res::EndpointSlices => ("discovery.k8s.io", "endpointslices"),
            Res::Nodes => ("", "nodes"),
        }
    }

    fn path(self) -> &'static str {
        match self {
            Res::Services => "/api/v1/services",
            Res::EndpointSlices => "/apis/discovery.k8s.io/v1/endpointslices",
            Res::Nodes => "/api/v1/nodes",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Res::EndpointSlices => "discovery.k8s.io/v1",
            _ => "v1",
        }
    }

    pub fn kind(self) -> &'static str {
        match self {
            Res::Services => "Service",
            Res::EndpointSlices => "EndpointSlice",
            Res::Nodes => "Node",
        }
    }

    fn of_kind(kind: &str) -> Option<Res> {
        Res::ALL.into_iter().find(|r| r.kind() == kind)
    }
}

/// One request as received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
    /// The resource, when the path is one of the served collections.
    pub res: Option<Res>,
}

impl Request {
    pub fn is_watch(&self) -> bool {
        self.query
            .get("watch")
            .is_some_and(|w| w == "true" || w == "1")
    }
}

type Key = (Res, String, String);

struct Change {
    rv: u64,
    res: Res,
    /// The object before and after (None = did not exist / deleted).
    old: Option<Value>,
    new: Option<Value>,
}

#[derive(Default)]
struct State {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    history: Vec<Change>,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted: u64,
    drop_gen: u64,
    expire_gen: u64,
    bookmark_gen: u64,
    bookmarks_sent: usize,
    requests: Vec<Request>,
    /// Continue requests still to be answered 410 Expired ([`FakeApi::expire_next_continues`]).
    expire_continues: usize,
    /// Continue requests answered 410 Expired so far.
    continues_expired: usize,
}

struct Shared {
    state: Mutex<State>,
    cond: Condvar,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The server. Objects can be changed before or while it serves; [`FakeApi::serve`] can be
/// called later than [`FakeApi::new`] (an API server that comes up late).
pub struct FakeApi {
    shared: Arc<Shared>,
    addr: Mutex<Option<SocketAddr>>,
}

impl Default for FakeApi {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeApi {
    pub fn new() -> FakeApi {
        FakeApi {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    // Real clusters never start at 0; neither does this one.
                    rv: 1000,
                    ..State::default()
                }),
                cond: Condvar::new(),
                stop: AtomicBool::new(false),
            }),
            addr: Mutex::new(None),
        }
    }

    /// Serves on `listener` (one thread per connection) until the FakeApi is dropped.
    pub fn serve(&self, listener: TcpListener) {
        self.serve_with(listener, None);
    }

    /// Serves HTTPS on `listener` with `pki`'s server certificate, like a real API server.
    pub fn serve_tls(&self, listener: TcpListener, pki: &Pki) {
        self.serve_with(listener, Some(pki.server_config()));
    }

    fn serve_with(&self, listener: TcpListener, tls: Option<Arc<ServerConfig>>) {
        let addr = listener.local_addr().expect("listener address");
        *self.addr.lock().unwrap() = Some(addr);
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let shared = self.shared.clone();
        thread::spawn(move || {
            while !shared.stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let shared = shared.clone();
                        let tls = tls.clone();
                        thread::spawn(move || {
                            let _ = conn.set_nonblocking(false);
                            let _ = match tls {
                                None => handle_conn(&shared, conn),
                                Some(config) => ServerConnection::new(config)
                                    .map_err(io::Error::other)
                                    // The handshake runs on the first read; a client that
                                    // rejects the certificate just ends the connection.
                                    .and_then(|tls| {
                                        handle_conn(&shared, StreamOwned::new(tls, conn))
                                    }),
                            };
                        });
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(10))
                    }
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        });
    }

    /// Where it serves (after [`Self::serve`]).
    pub fn addr(&self) -> SocketAddr {
        self.addr.lock().unwrap().expect("not serving yet")
    }

    /// Creates or replaces an object (a full object with `kind`); sets its resourceVersion,
    /// uid and creationTimestamp like the API server. Returns the new resourceVersion.
    pub fn apply(&self, mut obj: Value) -> u64 {
        let res = Res::of_kind(obj["kind"].as_str().unwrap_or_default())
            .unwrap_or_else(|| panic!("fake API: unsupported kind in {obj}"));
        let key = key_of(res, &obj);
        let mut st = self.shared.lock();
        st.rv += 1;
        let rv = st.rv;
        let old = st.objects.get(&key).cloned();
        let meta = obj["metadata"].as_object_mut().expect("metadata");
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        let uid = old
            .as_ref()
            .and_then(|o| o["metadata"]["uid"].as_str().map(str::to_owned))
            .unwrap_or_else(|| format!("6f1c2a3e-0000-4000-8000-{rv:012}"));
        meta.insert("uid".into(), json!(uid));
        meta.entry("creationTimestamp")
            .or_insert(json!("2026-11-25T14:00:00Z"));
        st.objects.insert(key, obj.clone());
        st.history.push(Change {
            rv,
            res,
            old,
            new: Some(obj),
        });
        drop(st);
        self.shared.cond.notify_all();
        rv
    }

    /// Deletes an object (no-op if absent). Returns the new resourceVersion.
    pub fn delete(&self, kind: &str, namespace: Option<&str>, name: &str) -> u64 {
        let res = Res::of_kind(kind).expect("kind");
        let key = (res, namespace.unwrap_or("").to_owned(), name.to_owned());
        let mut st = self.shared.lock();
        let Some(mut obj) = st.objects.remove(&key) else {
            return st.rv;
        };
        st.rv += 1;
        let rv = st.rv;
        // The DELETED event carries the object at the deletion's resourceVersion.
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        st.history.push(Change {
            rv,
            res,
            old: Some(obj),
            new: None,
        });
        drop(st);
        self.shared.cond.notify_all();
        rv
    }

    /// Cuts every open watch connection mid-stream (no final chunk), like a restarted API
    /// server or a broken connection. Clients resume from their last resourceVersion.
    pub fn drop_watches(&self) {
        self.shared.lock().drop_gen += 1;
        self.shared.cond.notify_all();
    }

    /// Compacts all history and sends `410 Gone` on every open watch: clients must re-list.
    pub fn expire_watches(&self) {
        let mut st = self.shared.lock();
        st.compacted = st.rv + 1;
        st.expire_gen += 1;
        drop(st);
        self.shared.cond.notify_all();
    }

    /// Compacts history up to the current resourceVersion (watches from older ones get 410),
    /// without touching open watches.
    pub fn compact(&self) {
        let mut st = self.shared.lock();
        st.compacted = st.rv;
        drop(st);
    }

    /// The next `n` list requests that carry a `continue` token find their snapshot compacted
    /// (410 Expired), as when etcd compacts between two pages of a list: clients must start
    /// the list again.
    pub fn expire_next_continues(&self, n: usize) {
        self.shared.lock().expire_continues += n;
    }

    /// List requests answered 410 Expired because of their continue token, so far.
    pub fn continues_expired(&self) -> usize {
        self.shared.lock().continues_expired
    }

    /// Sends a BOOKMARK with the current resourceVersion on every open watch that asked for
    /// bookmarks.
    pub fn bookmark(&self) {
        self.shared.lock().bookmark_gen += 1;
        self.shared.cond.notify_all();
    }

    /// BOOKMARK events written so far (over all watches).
    pub fn bookmarks_sent(&self) -> usize {
        self.shared.lock().bookmarks_sent
    }

    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.lock().requests.clone()
    }

    /// List requests (not watches) for `res` so far.
    pub fn lists(&self, res: Res) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.res == Some(res) && !r.is_watch())
            .count()
    }

    /// Writes a kubeconfig pointing at `server` (e.g. `http://127.0.0.1:6443`) with [`TOKEN`].
    /// Extra contexts `(name, server)` are added after the current one.
    pub fn write_kubeconfig(path: &Path, server: &str, extra: &[(&str, &str)]) -> PathBuf {
        let mut clusters = format!("- name: fake\n  cluster:\n    server: {server}\n");
        let mut contexts =
            "- name: fake\n  context:\n    cluster: fake\n    user: test\n".to_string();
        for (name, srv) in extra {
            clusters.push_str(&format!("- name: {name}\n  cluster:\n    server: {srv}\n"));
            contexts.push_str(&format!(
                "- name: {name}\n  context:\n    cluster: {name}\n    user: test\n"
            ));
        }
        let text = format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\nclusters:\n{clusters}\
             contexts:\n{contexts}users:\n- name: test\n  user:\n    token: {TOKEN}\n"
        );
        std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path.to_path_buf()
    }
}

/// A test CA and an API server certificate it signed (ECDSA P-256, made fresh per test), for
/// [`FakeApi::serve_tls`] and kubeconfigs' `certificate-authority-data`.
pub struct Pki {
    /// The CA certificate, PEM (what a kubeconfig or a service account's ca.crt holds).
    pub ca_pem: String,
    cert: CertificateDer<'static>,
    key: Vec<u8>,
}

impl Pki {
    /// A CA and a server certificate for `ip` plus the names a cluster's API server
    /// certificate carries (kube checks the address the client dials against these).
    pub fn new(ip: IpAddr) -> Pki {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
            KeyUsagePurpose, SanType,
        };
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "svc-lb test kubernetes CA");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = ca.self_signed(&ca_key).expect("self-sign CA");
        let key = KeyPair::generate().expect("server key");
        let mut params = CertificateParams::new(vec![
            "kubernetes".to_string(),
            "kubernetes.default.svc".to_string(),
            "localhost".to_string(),
        ])
        .expect("server params");
        params.subject_alt_names.push(SanType::IpAddress(ip));
        params
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params
            .signed_by(&key, &ca, &ca_key)
            .expect("sign server cert");
        Pki {
            ca_pem: ca.pem(),
            cert: cert.der().clone(),
            key: key.serialize_der(),
        }
    }

    fn server_config(&self) -> Arc<ServerConfig> {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.clone()));
        // An explicit provider: no process-wide default needs installing.
        let config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("TLS versions")
                .with_no_client_auth()
                .with_single_cert(vec![self.cert.clone()], key)
                .expect("server certificate");
        Arc::new(config)
    }
}

/// One context of a kubeconfig written by [`write_kubeconfig_contexts`]: its own cluster
/// (server, CA) and user (bearer token).
pub struct KubeContext<'a> {
    pub name: &'a str,
    pub server: &'a str,
    /// `certificate-authority-data` (PEM, written base64-encoded); None for http servers.
    pub ca_pem: Option<&'a str>,
    pub token: &'a str,
}

/// Writes a kubeconfig with `contexts` (the first is the current-context), each with its own
/// cluster and user, as `kubectl config` writes them.
pub fn write_kubeconfig_contexts(path: &Path, contexts: &[KubeContext<'_>]) -> PathBuf {
    let (mut clusters, mut ctxs, mut users) = (String::new(), String::new(), String::new());
    for c in contexts {
        clusters.push_str(&format!("- name: {}\n  cluster:\n", c.name));
        if let Some(ca) = c.ca_pem {
            clusters.push_str(&format!(
                "    certificate-authority-data: {}\n",
                base64(ca.as_bytes())
            ));
        }
        clusters.push_str(&format!("    server: {}\n", c.server));
        ctxs.push_str(&format!(
            "- name: {0}\n  context:\n    cluster: {0}\n    user: {0}-user\n",
            c.name
        ));
        users.push_str(&format!(
            "- name: {}-user\n  user:\n    token: {}\n",
            c.name, c.token
        ));
    }
    let current = contexts.first().map_or("", |c| c.name);
    let text = format!(
        "apiVersion: v1\nkind: Config\npreferences: {{}}\ncurrent-context: {current}\n\
         clusters:\n{clusters}contexts:\n{ctxs}users:\n{users}"
    );
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path.to_path_buf()
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.cond.notify_all();
    }
}

fn key_of(res: Res, obj: &Value) -> Key {
    let m = &obj["metadata"];
    let ns = match res {
        Res::Nodes => String::new(),
        _ => m["namespace"].as_str().unwrap_or("default").to_owned(),
    };
    (
        res,
        ns,
        m["name"].as_str().expect("metadata.name").to_owned(),
    )
}

fn route(path: &str) -> Option<Res> {
    Res::ALL.into_iter().find(|r| r.path() == path)
}

fn parse_query(q: &str) -> BTreeMap<String, String> {
    q.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// Percent-decoding (selectors arrive as `%21service.kubernetes.io%2F...`).
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Label selector semantics of the API server for the forms clients send.
pub fn labels_match(selector: &str, obj: &Value) -> bool {
    let labels = &obj["metadata"]["labels"];
    let get = |k: &str| labels.get(k).and_then(Value::as_str);
    selector
        .split(',')
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .all(|req| {
            if let Some((k, v)) = req.split_once("!=") {
                get(k.trim()) != Some(v.trim())
            } else if let Some((k, v)) = req.split_once("==").or_else(|| req.split_once('=')) {
                get(k.trim()) == Some(v.trim())
            } else if let Some(k) = req.strip_prefix('!') {
                get(k.trim()).is_none()
            } else {
                get(req).is_some()
            }
        })
}

fn fields_match(selector: &str, obj: &Value) -> bool {
    selector
        .split(',')
        .filter(|r| !r.is_empty())
        .all(|req| match req.split_once('=') {
            Some(("metadata.name", v)) => obj["metadata"]["name"].as_str() == Some(v),
            Some(("metadata.namespace", v)) => obj["metadata"]["namespace"].as_str() == Some(v),
            // The real server rejects unknown field selectors; so does this one (no match).
            _ => false,
        })
}

fn matches(q: &BTreeMap<String, String>, obj: &Value) -> bool {
    q.get("labelSelector").is_none_or(|s| labels_match(s, obj))
        && q.get("fieldSelector").is_none_or(|s| fields_match(s, obj))
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code
    })
}

/// A client connection: plain TCP or TLS over it.
trait Conn: Read + Write {
    /// Cuts the connection mid-stream (no TLS close_notify, no final chunk).
    fn cut(&mut self);
}

impl Conn for TcpStream {
    fn cut(&mut self) {
        let _ = self.shutdown(Shutdown::Both);
    }
}

impl Conn for StreamOwned<ServerConnection, TcpStream> {
    fn cut(&mut self) {
        let _ = self.sock.shutdown(Shutdown::Both);
    }
}

fn respond(conn: &mut impl Write, code: u16, body: &Value) -> io::Result<()> {
    let text = body.to_string();
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        410 => "Gone",
        _ => "Error",
    };
    write!(
        conn,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{text}",
        text.len()
    )?;
    conn.flush()
}

fn handle_conn(shared: &Shared, conn: impl Conn) -> io::Result<()> {
    // Requests are read through the buffer, answers written to the stream under it.
    let mut reader = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_owned();
        let target = parts.next().unwrap_or("").to_owned();
        let mut auth = None;
        let mut content_length = 0usize;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 {
                return Ok(());
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                match k.trim().to_ascii_lowercase().as_str() {
                    "authorization" => auth = Some(v.trim().to_owned()),
                    "content-length" => content_length = v.trim().parse().unwrap_or(0),
                    _ => {}
                }
            }
        }
        if content_length > 0 {
            let mut body = vec![0; content_length];
            io::Read::read_exact(&mut reader, &mut body)?;
        }
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let req = Request {
            method: method.clone(),
            path: path.to_owned(),
            query: parse_query(query),
            res: route(path),
        };
        shared.lock().requests.push(req.clone());
        if auth.as_deref() != Some(&format!("Bearer {TOKEN}")) {
            respond(
                reader.get_mut(),
                401,
                &status(401, "Unauthorized", "Unauthorized"),
            )?;
            continue;
        }
        let Some(res) = req.res.filter(|_| method == "GET") else {
            respond(
                reader.get_mut(),
                404,
                &status(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                ),
            )?;
            continue;
        };
        if req.is_watch() {
            return watch(shared, reader.into_inner(), res, &req.query);
        }
        let mut st = shared.lock();
        let (code, body) = match list(&mut st, res, &req.query) {
            Ok(body) => (200, body),
            Err(status) => (status["code"].as_u64().unwrap_or(500) as u16, status),
        };
        drop(st);
        respond(reader.get_mut(), code, &body)?;
    }
}

/// The real server's message for a continue token whose snapshot was compacted.
const CONTINUE_EXPIRED: &str = "The provided continue parameter is too old to display a \
    consistent list result. You can start a new list without the continue parameter, or use \
    the continue token in this response to retrieve the remainder of the results. Continuing \
    with the provided token results in an inconsistent list - objects that were created, \
    modified, or deleted between the time the first chunk was returned and now may show up in \
    the list.";

/// One list request, paged like the API server: with `limit`, a page of at most that many
/// items (in key order) and a `continue` token carrying the snapshot's resourceVersion and the
/// next key; pages after the first come from that same snapshot (rebuilt from history), so a
/// paged list is consistent. A token whose resourceVersion was compacted gets 410 Expired.
fn list(st: &mut State, res: Res, q: &BTreeMap<String, String>) -> Result<Value, Value> {
    let limit: usize = q.get("limit").and_then(|l| l.parse().ok()).unwrap_or(0);
    let (rv, start, objects) = match q.get("continue").filter(|c| !c.is_empty()) {
        None => (st.rv, None, st.objects.clone()),
        Some(token) => {
            let (rv, start) = decode_continue(token).ok_or_else(|| {
                status(
                    400,
                    "BadRequest",
                    &format!("continue key is not valid: {token}"),
                )
            })?;
            if st.expire_continues > 0 || rv < st.compacted || rv > st.rv {
                st.expire_continues = st.expire_continues.saturating_sub(1);
                st.continues_expired += 1;
                return Err(status(410, "Expired", CONTINUE_EXPIRED));
            }
            (rv, Some(start), snapshot(st, rv))
        }
    };
    let mut items = objects
        .iter()
        .filter(|((r, _, _), o)| *r == res && matches(q, o))
        .filter(|((_, ns, name), _)| start.as_ref().is_none_or(|s| object_key(ns, name) >= *s));
    let mut page = Vec::new();
    let mut next = None;
    for ((_, ns, name), o) in items.by_ref() {
        if limit > 0 && page.len() == limit {
            next = Some(object_key(ns, name));
            break;
        }
        let mut o = o.clone();
        // List items come without kind/apiVersion from the real server too.
        if let Some(m) = o.as_object_mut() {
            m.remove("kind");
            m.remove("apiVersion");
        }
        page.push(o);
    }
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if let Some(next) = next {
        metadata["continue"] = json!(encode_continue(rv, &next));
        // Like the API server: how many items the rest of the list holds.
        metadata["remainingItemCount"] = json!(items.count() + 1);
    }
    Ok(json!({
        "kind": format!("{}List", res.kind()),
        "apiVersion": res.api_version(),
        "metadata": metadata,
        "items": page,
    }))
}

/// Every object as it was at resourceVersion `rv`, replayed from history (the fake server
/// keeps all of it; `compacted` only says which versions clients may still ask for).
fn snapshot(st: &State, rv: u64) -> BTreeMap<Key, Value> {
    let mut objects = BTreeMap::new();
    for c in st.history.iter().take_while(|c| c.rv <= rv) {
        match (&c.new, &c.old) {
            (Some(o), _) => {
                objects.insert(key_of(c.res, o), o.clone());
            }
            (None, Some(o)) => {
                objects.remove(&key_of(c.res, o));
            }
            (None, None) => {}
        }
    }
    objects
}

/// The storage key the API server pages by (`<namespace>/<name>`, or `<name>`).
fn object_key(ns: &str, name: &str) -> String {
    if ns.is_empty() {
        name.to_owned()
    } else {
        format!("{ns}/{name}")
    }
}

/// A continue token in the API server's format: base64 of
/// `{"v":"meta.k8s.io/v1","rv":<rv>,"start":"<key>\u0000"}`.
fn encode_continue(rv: u64, start: &str) -> String {
    let text = json!({"v": "meta.k8s.io/v1", "rv": rv, "start": format!("{start}\u{0}")});
    base64(text.to_string().as_bytes())
}

fn decode_continue(token: &str) -> Option<(u64, String)> {
    let v: Value = serde_json::from_slice(&unbase64(token)?).ok()?;
    if v["v"] != "meta.k8s.io/v1" {
        return None;
    }
    let start = v["start"].as_str()?.strip_suffix('\u{0}')?.to_owned();
    Some((v["rv"].as_u64()?, start))
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (continue tokens, kubeconfig `*-data` fields).
pub fn base64(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = c
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | (b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= c.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn unbase64(text: &str) -> Option<Vec<u8>> {
    let text = text.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for &ch in text {
        acc = acc << 6 | B64.iter().position(|&b| b == ch)? as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

fn chunk(conn: &mut impl Write, v: &Value) -> io::Result<()> {
    let line = format!("{v}\n");
    write!(conn, "{:x}\r\n{line}\r\n", line.len())?;
    conn.flush()
}

fn watch(
    shared: &Shared,
    mut conn: impl Conn,
    res: Res,
    q: &BTreeMap<String, String>,
) -> io::Result<()> {
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    write!(
        conn,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )?;
    conn.flush()?;
    let mut st = shared.lock();
    if from < st.compacted {
        let rv_now = st.rv;
        drop(st);
        let msg = format!("too old resource version: {from} ({rv_now})");
        chunk(
            &mut conn,
            &json!({"type": "ERROR", "object": status(410, "Expired", &msg)}),
        )?;
        return conn.write_all(b"0\r\n\r\n");
    }
    let (drop_gen, expire_gen, mut bookmark_gen) = (st.drop_gen, st.expire_gen, st.bookmark_gen);
    let mut sent = from;
    loop {
        if shared.stop.load(Ordering::Relaxed) || st.drop_gen != drop_gen {
            drop(st);
            // Cut mid-stream: no terminating chunk.
            conn.cut();
            return Ok(());
        }
        if st.expire_gen != expire_gen {
            drop(st);
            let msg = format!("too old resource version: {sent}");
            chunk(
                &mut conn,
                &json!({"type": "ERROR", "object": status(410, "Expired", &msg)}),
            )?;
            return conn.write_all(b"0\r\n\r\n");
        }
        let mut out = Vec::new();
        for c in st.history.iter().filter(|c| c.rv > sent && c.res == res) {
            let was = c.old.as_ref().is_some_and(|o| matches(q, o));
            let is = c.new.as_ref().is_some_and(|o| matches(q, o));
            let ev = match (was, is, &c.new) {
                (false, true, Some(o)) => Some(("ADDED", o.clone())),
                (true, true, Some(o)) => Some(("MODIFIED", o.clone())),
                (true, false, Some(o)) => Some(("DELETED", o.clone())),
                (true, false, None) => c.old.clone().map(|o| ("DELETED", o)),
                _ => None,
            };
            if let Some((ty, o)) = ev {
                out.push(json!({"type": ty, "object": o}));
            }
        }
        if let Some(last) = st.history.last() {
            sent = sent.max(last.rv);
        }
        let bookmark = (bookmarks && st.bookmark_gen != bookmark_gen).then(|| {
            bookmark_gen = st.bookmark_gen;
            json!({"type": "BOOKMARK", "object": {
                "kind": res.kind(), "apiVersion": res.api_version(),
                "metadata": {"resourceVersion": st.rv.to_string()}
            }})
        });
        if out.is_empty() && bookmark.is_none() {
            st = shared
                .cond
                .wait_timeout(st, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
            continue;
        }
        drop(st);
        for ev in out.iter().chain(bookmark.iter()) {
            chunk(&mut conn, ev)?;
        }
        st = shared.lock();
        if bookmark.is_some() {
            st.bookmarks_sent += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors() {
        let o = json!({"metadata": {"name": "a", "namespace": "ns", "labels": {"k": "v"}}});
        assert!(labels_match("k", &o));
        assert!(labels_match("k=v,!x", &o));
        assert!(!labels_match("!k", &o));
        assert!(!labels_match("k!=v", &o));
        assert!(fields_match("metadata.name=a", &o));
        assert!(!fields_match("metadata.name=b", &o));
        assert_eq!(decode("%21a.b%2Fc%3Dd"), "!a.b/c=d");
    }

    #[test]
    fn base64_round_trip() {
        for s in ["", "a", "ab", "abc", "abcd", "{\"rv\":1}\u{0}"] {
            assert_eq!(unbase64(&base64(s.as_bytes())).unwrap(), s.as_bytes());
        }
        assert_eq!(base64(b"svc-lb"), "c3ZjLWxi");
        assert_eq!(base64(b"ab"), "YWI=");
    }

    fn svc(name: &str) -> Value {
        json!({"kind": "Service", "metadata": {"name": name, "namespace": "default"}})
    }

    fn names(list: &Value) -> Vec<String> {
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["metadata"]["name"].as_str().unwrap().to_owned())
            .collect()
    }

    fn page(api: &FakeApi, query: &[(&str, &str)]) -> Result<Value, Value> {
        let q = query
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        list(&mut api.shared.lock(), Res::Services, &q)
    }

    #[test]
    fn paged_lists_are_consistent_snapshots_until_compacted() {
        let api = FakeApi::new();
        for n in ["a", "b", "c", "d", "e"] {
            api.apply(svc(n));
        }
        let rv = api.resource_version().to_string();
        let p1 = page(&api, &[("limit", "2")]).unwrap();
        assert_eq!(names(&p1), ["a", "b"]);
        assert_eq!(p1["metadata"]["resourceVersion"], rv.as_str());
        assert_eq!(p1["metadata"]["remainingItemCount"], 3);
        let token = p1["metadata"]["continue"].as_str().unwrap().to_owned();

        // Changes after the first page are not seen by the rest of that list.
        api.apply(svc("bb"));
        api.delete("Service", Some("default"), "d");
        let p2 = page(&api, &[("limit", "2"), ("continue", &token)]).unwrap();
        assert_eq!(names(&p2), ["c", "d"]);
        assert_eq!(p2["metadata"]["resourceVersion"], rv.as_str());
        let last = p2["metadata"]["continue"].as_str().unwrap().to_owned();
        let p3 = page(&api, &[("limit", "2"), ("continue", &last)]).unwrap();
        assert_eq!(names(&p3), ["e"]);
        assert!(p3["metadata"].get("continue").is_none());

        // A new list sees the changes; no limit = everything.
        assert_eq!(names(&page(&api, &[]).unwrap()), ["a", "b", "bb", "c", "e"]);

        // Compaction past the snapshot: 410 Expired, like etcd compaction between pages.
        api.compact();
        let err = page(&api, &[("limit", "2"), ("continue", &last)]).unwrap_err();
        assert_eq!(
            (err["code"].as_u64(), err["reason"].as_str()),
            (Some(410), Some("Expired"))
        );
        let err = page(&api, &[("continue", "bm90IGEgdG9rZW4=")]).unwrap_err();
        assert_eq!(err["code"], 400);

        // The test control expires the next continue even without compaction.
        let p1 = page(&api, &[("limit", "4")]).unwrap();
        let token = p1["metadata"]["continue"].as_str().unwrap().to_owned();
        api.expire_next_continues(1);
        assert_eq!(
            page(&api, &[("continue", &token)]).unwrap_err()["code"],
            410
        );
        assert_eq!(names(&page(&api, &[("continue", &token)]).unwrap()), ["e"]);
        assert_eq!(api.continues_expired(), 2);
    }
}
