//! A Kubernetes API server on loopback for tests: list and watch (from a resource version, so a
//! reconnecting watcher misses nothing; equality label selectors applied), create (POST),
//! server-side apply (PATCH `application/apply-patch+yaml`), DELETE, merge-patch of `/status`;
//! objects are also put and removed by the test, and every request is recorded. A collection
//! may instead replay a recorded list and watch (`replay`), as the pod cache's tests do.
//!
//! It speaks what kube's client and watcher use, nothing more: no auth, no field selectors
//! (they are recorded, not applied), no pagination, and apply replaces the applied object's
//! labels, annotations, data and spec (no field ownership).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

type Body = BoxBody<Bytes, Infallible>;

/// The server; dropping it stops accepting connections.
pub struct FakeApiServer {
    url: String,
    state: Arc<Mutex<State>>,
    changed: watch::Sender<u64>,
    accept: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct State {
    resource_version: u64,
    collections: BTreeMap<String, Collection>,
    requests: Vec<String>,
    /// (path, body) of each PATCH.
    patches: Vec<(String, Value)>,
}

#[derive(Default)]
struct Collection {
    /// By (namespace, name); cluster-scoped objects have namespace "".
    objects: BTreeMap<(String, String), Value>,
    /// (resource version, type, object), in order.
    events: Vec<(u64, &'static str, Value)>,
    watchers: Vec<Watcher>,
    /// A recorded list and watch served verbatim (the first watch, then nothing).
    replay: Option<(&'static str, &'static str)>,
    watches: usize,
}

impl FakeApiServer {
    /// Listens on 127.0.0.1 (an ephemeral port). Needs a tokio runtime.
    pub async fn start() -> FakeApiServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind the fake API server: {e}"));
        let url = format!(
            "http://{}",
            listener
                .local_addr()
                .unwrap_or_else(|e| panic!("its address: {e}"))
        );
        let state = Arc::new(Mutex::new(State::default()));
        let changed = watch::Sender::new(0);
        let (shared, notify) = (state.clone(), changed.clone());
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (state, notify) = (shared.clone(), notify.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let (state, notify) = (state.clone(), notify.clone());
                        async move { Ok::<_, Infallible>(handle(&state, &notify, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FakeApiServer {
            url,
            state,
            changed,
            accept,
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// A client of this server (plain HTTP, no credentials).
    pub fn client(&self) -> kube::Client {
        let uri = self
            .url
            .parse()
            .unwrap_or_else(|e| panic!("the server's url: {e}"));
        kube::Client::try_from(kube::Config::new(uri))
            .unwrap_or_else(|e| panic!("a client of the fake API server: {e}"))
    }

    /// A kubeconfig file in `dir` whose current context reaches this server.
    pub fn kubeconfig(&self, dir: &std::path::Path) -> std::path::PathBuf {
        kubeconfig(dir, &self.url)
    }

    /// `collection` (like `/api/v1/pods`) serves `list` to every list and `watch` (JSON lines)
    /// to the first watch; later watches stay open with nothing to say.
    pub fn replay(&self, collection: &str, list: &'static str, watch: &'static str) {
        self.lock().collection(collection).replay = Some((list, watch));
    }

    /// Creates or replaces an object of `collection` (like `/apis/tessera.dev/v1alpha1/
    /// tesserapolicies`): the server sets its uid, resourceVersion and generation (bumped when
    /// the spec changes), keeps its status, and tells the watchers.
    pub fn put(&self, collection: &str, object: Value) {
        store(&mut self.lock(), collection, object);
        self.changed.send_modify(|v| *v += 1);
    }

    /// Deletes an object (namespace "" for a cluster-scoped one) and tells the watchers.
    pub fn delete(&self, collection: &str, namespace: &str, name: &str) {
        remove(&mut self.lock(), collection, namespace, name);
        self.changed.send_modify(|v| *v += 1);
    }

    /// Ends every open watch (as an API server does on a timeout or a restart).
    pub fn end_watches(&self) {
        for coll in self.lock().collections.values_mut() {
            coll.watchers.clear();
        }
    }

    /// The object as the server has it now.
    pub fn get(&self, collection: &str, namespace: &str, name: &str) -> Option<Value> {
        self.lock()
            .collections
            .get(collection)?
            .objects
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Every request's path and query, in order.
    pub fn requests(&self) -> Vec<String> {
        self.lock().requests.clone()
    }

    /// Every PATCH: path and body.
    pub fn patches(&self) -> Vec<(String, Value)> {
        self.lock().patches.clone()
    }

    /// Waits until `pred` holds (checked after every request and change).
    pub async fn wait_until(&self, pred: impl Fn(&FakeApiServer) -> bool) {
        let mut rx = self.changed.subscribe();
        while !pred(self) {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
}

/// A kubeconfig file in `dir` whose current context reaches `url` (plain HTTP, no credentials).
pub fn kubeconfig(dir: &std::path::Path, url: &str) -> std::path::PathBuf {
    let path = dir.join("kubeconfig");
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n  - name: loopback\n    cluster: {{ server: \"{url}\" }}\n\
         users:\n  - name: anonymous\n    user: {{}}\ncontexts:\n  - name: loopback\n    \
         context: {{ cluster: loopback, user: anonymous }}\ncurrent-context: loopback\n"
    );
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("write the kubeconfig: {e}"));
    path
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Creates or replaces `object` in `collection` (see [`FakeApiServer::put`]); answers it as
/// stored, and whether it is new.
fn store(state: &mut State, collection: &str, mut object: Value) -> (Value, bool) {
    state.resource_version += 1;
    let rv = state.resource_version;
    let key = object_key(&object);
    let coll = state.collection(collection);
    let old = coll.objects.get(&key).cloned();
    let generation = match &old {
        Some(old) if old.get("spec") == object.get("spec") => {
            old["metadata"]["generation"].as_i64().unwrap_or(1)
        }
        Some(old) => old["metadata"]["generation"].as_i64().unwrap_or(1) + 1,
        None => 1,
    };
    let uid = old
        .as_ref()
        .and_then(|o| o["metadata"]["uid"].as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("00000000-0000-4000-8000-{rv:012}"));
    object["metadata"]["uid"] = json!(uid);
    object["metadata"]["generation"] = json!(generation);
    object["metadata"]["resourceVersion"] = json!(rv.to_string());
    if let Some(status) = old.as_ref().and_then(|o| o.get("status")) {
        object["status"] = status.clone();
    }
    let kind = if old.is_some() { "MODIFIED" } else { "ADDED" };
    coll.objects.insert(key, object.clone());
    coll.publish(rv, kind, object.clone());
    (object, old.is_none())
}

/// Removes an object and tells the watchers; answers it.
fn remove(state: &mut State, collection: &str, namespace: &str, name: &str) -> Option<Value> {
    state.resource_version += 1;
    let rv = state.resource_version;
    let coll = state.collection(collection);
    let mut object = coll
        .objects
        .remove(&(namespace.to_owned(), name.to_owned()))?;
    object["metadata"]["resourceVersion"] = json!(rv.to_string());
    coll.publish(rv, "DELETED", object.clone());
    Some(object)
}

impl State {
    fn collection(&mut self, path: &str) -> &mut Collection {
        self.collections.entry(path.to_owned()).or_default()
    }
}

/// An open watch: what it selects, where its events go.
struct Watcher {
    tx: mpsc::UnboundedSender<Bytes>,
    namespace: String,
    selector: Vec<(String, Option<String>, bool)>,
}

impl Collection {
    fn publish(&mut self, rv: u64, kind: &'static str, object: Value) {
        let line = event_line(kind, &object);
        self.watchers.retain(|w| {
            let route = Route {
                collection: String::new(),
                namespace: w.namespace.clone(),
                name: None,
                sub: None,
            };
            !selected(&object, &route, &w.selector) || w.tx.send(line.clone()).is_ok()
        });
        self.events.push((rv, kind, object));
    }
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({ "type": kind, "object": object }).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn object_key(object: &Value) -> (String, String) {
    let meta = &object["metadata"];
    (
        meta["namespace"].as_str().unwrap_or_default().to_owned(),
        meta["name"].as_str().unwrap_or_default().to_owned(),
    )
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// Collection, namespace ("" for all, or cluster-scoped), object name, subresource.
struct Route {
    collection: String,
    namespace: String,
    name: Option<String>,
    sub: Option<String>,
}

impl Route {
    fn key(&self) -> Option<(String, String)> {
        Some((self.namespace.clone(), self.name.clone()?))
    }
}

/// What a request's path names: the collection, its namespace, and the object's name and
/// subresource if any. `/apis/G/V[/namespaces/NS]/PLURAL[/NAME[/SUB]]`, `/api/v1/...` alike.
fn route(path: &str) -> Option<Route> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (prefix, rest) = match segments.first() {
        Some(&"api") if segments.len() >= 3 => (segments[..2].join("/"), &segments[2..]),
        Some(&"apis") if segments.len() >= 4 => (segments[..3].join("/"), &segments[3..]),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => ((*ns).to_owned(), rest),
        rest => (String::new(), rest),
    };
    Some(Route {
        collection: format!("/{prefix}/{}", rest.first()?),
        namespace,
        name: rest.get(1).map(|s| (*s).to_owned()),
        sub: rest.get(2).map(|s| (*s).to_owned()),
    })
}

async fn handle(
    state: &Mutex<State>,
    changed: &watch::Sender<u64>,
    req: Request<Incoming>,
) -> Response<Body> {
    let uri = req.uri().to_string();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or_default().to_owned();
    let apply = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .is_some_and(|t| t.as_bytes().starts_with(b"application/apply-patch"));
    lock(state).requests.push(uri.clone());
    let Some(route) = route(&path) else {
        changed.send_modify(|v| *v += 1);
        return not_found();
    };
    let body = req.into_body().collect().await.map(|b| b.to_bytes());
    let body: Value = body
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null);
    let response = match (method, &route) {
        (Method::GET, Route { name: None, .. }) if query.contains("watch=true") => {
            watch_response(state, &route, &query)
        }
        (Method::GET, Route { name: None, .. }) => list_response(state, &route, &query),
        (Method::GET, Route { sub: None, .. }) => {
            match lock(state)
                .collections
                .get(&route.collection)
                .and_then(|c| c.objects.get(&route.key()?))
            {
                Some(object) => json_response(200, object),
                None => not_found(),
            }
        }
        (Method::POST, Route { name: None, .. }) => create(state, &route, body),
        (Method::PATCH, Route { sub: None, .. }) if apply => {
            server_side_apply(state, &route, &uri, body)
        }
        (Method::PATCH, Route { sub: Some(sub), .. }) if sub == "status" => {
            patch_status(state, &route, &path, body)
        }
        (
            Method::DELETE,
            Route {
                sub: None,
                name: Some(name),
                ..
            },
        ) => match remove(&mut lock(state), &route.collection, &route.namespace, name) {
            Some(object) => json_response(200, &object),
            None => not_found(),
        },
        _ => not_found(),
    };
    changed.send_modify(|v| *v += 1);
    response
}

/// POST: the object, in the path's namespace, unless one of its name exists (409).
fn create(state: &Mutex<State>, route: &Route, mut object: Value) -> Response<Body> {
    if !route.namespace.is_empty() {
        object["metadata"]["namespace"] = json!(route.namespace);
    }
    let mut state = lock(state);
    let key = object_key(&object);
    if state
        .collection(&route.collection)
        .objects
        .contains_key(&key)
    {
        return status_response(409, "AlreadyExists");
    }
    let (object, _) = store(&mut state, &route.collection, object);
    json_response(201, &object)
}

/// Server-side apply: creates the object, or replaces what the applied configuration sets
/// (labels, annotations, data, spec); the request (with its `fieldManager`) is recorded.
fn server_side_apply(
    state: &Mutex<State>,
    route: &Route,
    uri: &str,
    applied: Value,
) -> Response<Body> {
    let Some((namespace, name)) = route.key() else {
        return not_found();
    };
    if applied["metadata"]["name"].as_str() != Some(name.as_str()) {
        return status_response(400, "BadRequest");
    }
    let mut state = lock(state);
    state.patches.push((uri.to_owned(), applied.clone()));
    let existing = state
        .collection(&route.collection)
        .objects
        .get(&(namespace.clone(), name))
        .cloned();
    let mut object = existing.unwrap_or_else(|| applied.clone());
    for field in ["labels", "annotations"] {
        object["metadata"][field] = applied["metadata"][field].clone();
    }
    for field in ["data", "spec"] {
        if let Some(value) = applied.get(field) {
            object[field] = value.clone();
        }
    }
    if !namespace.is_empty() {
        object["metadata"]["namespace"] = json!(namespace);
    }
    let (object, created) = store(&mut state, &route.collection, object);
    json_response(if created { 201 } else { 200 }, &object)
}

/// The equality terms of a `labelSelector` (`k=v`, `k==v`, `k!=v`, `k`, `!k`) in a query.
fn label_selector(query: &str) -> Vec<(String, Option<String>, bool)> {
    let Some(raw) = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("labelSelector="))
    else {
        return Vec::new();
    };
    percent_decode(raw)
        .split(',')
        .filter(|t| !t.is_empty())
        .map(|term| {
            if let Some((k, v)) = term.split_once("!=") {
                (k.to_owned(), Some(v.to_owned()), false)
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (k.to_owned(), Some(v.to_owned()), true)
            } else if let Some(k) = term.strip_prefix('!') {
                (k.to_owned(), None, false)
            } else {
                (term.to_owned(), None, true)
            }
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| {
            std::str::from_utf8(h)
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        });
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `object` is in the route's namespace (any, when it names none) and matches the
/// selector.
fn selected(object: &Value, route: &Route, selector: &[(String, Option<String>, bool)]) -> bool {
    let meta = &object["metadata"];
    if !route.namespace.is_empty() && meta["namespace"].as_str() != Some(&route.namespace) {
        return false;
    }
    selector.iter().all(|(key, value, equal)| {
        let has = meta["labels"][key].as_str();
        match value {
            Some(v) => (has == Some(v.as_str())) == *equal,
            None => has.is_some() == *equal,
        }
    })
}

fn list_response(state: &Mutex<State>, route: &Route, query: &str) -> Response<Body> {
    let selector = label_selector(query);
    let mut state = lock(state);
    let rv = state.resource_version;
    let coll = state.collection(&route.collection);
    if let Some((list, _)) = coll.replay {
        return text_response(list);
    }
    let items: Vec<&Value> = coll
        .objects
        .values()
        .filter(|o| selected(o, route, &selector))
        .collect();
    json_response(
        200,
        &json!({
            "apiVersion": "v1",
            "kind": "List",
            "metadata": { "resourceVersion": rv.to_string() },
            "items": items,
        }),
    )
}

fn watch_response(state: &Mutex<State>, route: &Route, query: &str) -> Response<Body> {
    let selector = label_selector(query);
    let since: u64 = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("resourceVersion="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut state = lock(state);
    let coll = state.collection(&route.collection);
    coll.watches += 1;
    if let Some((_, recorded)) = coll.replay {
        if coll.watches == 1 {
            return text_response(recorded);
        }
        // Nothing more to say, and the watch stays open.
        let (tx, rx) = mpsc::unbounded_channel();
        coll.watchers.push(Watcher {
            tx,
            namespace: String::new(),
            selector: Vec::new(),
        });
        return stream_response(rx);
    }
    let (tx, rx) = mpsc::unbounded_channel();
    for (rv, kind, object) in &coll.events {
        if *rv > since && selected(object, route, &selector) {
            let _ = tx.send(event_line(kind, object));
        }
    }
    coll.watchers.push(Watcher {
        tx,
        namespace: route.namespace.clone(),
        selector,
    });
    stream_response(rx)
}

fn patch_status(state: &Mutex<State>, route: &Route, path: &str, patch: Value) -> Response<Body> {
    let Some(key) = route.key() else {
        return not_found();
    };
    let mut state = lock(state);
    state.patches.push((path.to_owned(), patch.clone()));
    state.resource_version += 1;
    let rv = state.resource_version;
    let coll = state.collection(&route.collection);
    let Some(object) = coll.objects.get_mut(&key) else {
        return not_found();
    };
    merge_patch(&mut object["status"], &patch["status"]);
    object["metadata"]["resourceVersion"] = json!(rv.to_string());
    let object = object.clone();
    coll.publish(rv, "MODIFIED", object.clone());
    json_response(200, &object)
}

/// RFC 7386.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(fields) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    for (key, value) in fields {
        if value.is_null() {
            if let Some(t) = target.as_object_mut() {
                t.remove(key);
            }
        } else {
            merge_patch(&mut target[key], value);
        }
    }
}

fn stream_response(rx: mpsc::UnboundedReceiver<Bytes>) -> Response<Body> {
    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
        let line = rx.recv().await?;
        Some((Ok::<_, Infallible>(Frame::data(line)), rx))
    });
    response(200, StreamBody::new(frames).boxed())
}

fn json_response(status: u16, value: &Value) -> Response<Body> {
    response(status, Full::new(Bytes::from(value.to_string())).boxed())
}

fn text_response(text: &'static str) -> Response<Body> {
    response(200, Full::new(Bytes::from_static(text.as_bytes())).boxed())
}

fn not_found() -> Response<Body> {
    status_response(404, "NotFound")
}

fn status_response(code: u16, reason: &str) -> Response<Body> {
    json_response(
        code,
        &json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code }),
    )
}

fn response(status: u16, body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}
