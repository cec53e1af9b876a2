//! A NATS JetStream cluster of the test's own: three nats-server processes (`n1`, `n2`, `n3`)
//! that a test kills, restarts and cuts off from one another, to show that the sagas survive
//! what a clustered deployment meets (a node lost, the JetStream meta leader or a stream's
//! leader lost, a node partitioned from its peers). The shared server on 4222 is never touched.
//!
//! Two layouts:
//! - [`NatsCluster::start`]: the nodes on loopback, each on free client, route and monitoring
//!   ports;
//! - [`NatsCluster::start_in_netns`]: each node in a network namespace of its own, so that a
//!   node can be partitioned from its peers ([`NatsCluster::partition`]). The three namespaces
//!   hang off a Linux bridge living in a fourth namespace; the root namespace (where the test,
//!   the orchestrators and the workers run) reaches the nodes through one veth into that bridge
//!   namespace, on a private /29 of 10.213.0.0/16 found unused first. Nothing is routed or
//!   forwarded through the root namespace, whose only change is that veth and its address.
//!   Needs root (`ip netns`); everything is deleted again when the cluster is dropped, after a
//!   panic too, and the leftovers of a test process that was killed are swept at the next start.
//!
//! Nodes are numbered from 0: node `i` is the server named `n{i+1}`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The nodes of a cluster: the smallest that keeps a quorum with one node lost.
pub const NODES: usize = 3;

const IP: &str = "/usr/sbin/ip";
/// The prefix of every namespace and root-namespace link this module creates.
const NETNS_PREFIX: &str = "saga-nc-";
const LINK_PREFIX: &str = "sgnc";

/// Clusters started by this process (their names must differ when tests share it).
static STARTED: AtomicUsize = AtomicUsize::new(0);

struct Node {
    /// `n1`, `n2`, `n3`.
    name: String,
    /// The address it listens on (client, routes, monitoring).
    host: String,
    client_port: u16,
    monitor_port: u16,
    config: PathBuf,
    log: PathBuf,
    /// The namespace it runs in, in the netns layout.
    netns: Option<String>,
    child: Option<Child>,
}

/// The namespaces, links and addresses of the netns layout.
struct Network {
    /// The nodes' namespaces, by node.
    nodes: Vec<String>,
    /// The namespace of the bridge.
    hub: String,
    /// The root namespace's end of its veth into the hub.
    root_link: String,
    /// Pairs of nodes (lower first) cut off from each other: a blackhole route each way.
    cut: BTreeSet<(usize, usize)>,
}

pub struct NatsCluster {
    nodes: Vec<Node>,
    network: Option<Network>,
    /// The nodes' stores (deleted on drop); the logs are kept beside the apps' logs.
    store: PathBuf,
    /// Where the nodes' logs are.
    pub logs: PathBuf,
    http: reqwest::Client,
}

impl NatsCluster {
    /// Three nodes on loopback, started and healthy (a meta leader elected).
    pub async fn start() -> NatsCluster {
        let hosts = vec!["127.0.0.1".to_owned(); NODES];
        let ports = (0..NODES)
            .map(|_| (crate::free_port(), crate::free_port(), crate::free_port()))
            .collect();
        Self::launch(hosts, ports, None).await
    }

    /// Three nodes, each in a network namespace of its own (see the module's documentation),
    /// started and healthy. Needs root.
    pub async fn start_in_netns() -> NatsCluster {
        sweep_leftovers();
        let id = format!(
            "{}-{}",
            std::process::id(),
            STARTED.fetch_add(1, Ordering::Relaxed)
        );
        let subnet = unused_subnet();
        let hub = format!("{NETNS_PREFIX}{id}-hub");
        let root_link = format!("{LINK_PREFIX}{id}");
        assert!(root_link.len() <= 15, "link name {root_link} too long");
        let network = Network {
            nodes: (1..=NODES)
                .map(|i| format!("{NETNS_PREFIX}{id}-n{i}"))
                .collect(),
            hub: hub.clone(),
            root_link: root_link.clone(),
            cut: BTreeSet::new(),
        };
        // Once built, the cluster's Drop tears it down; if building fails, this does.
        let setup = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            ip(&["netns", "add", &hub]);
            ip(&["-n", &hub, "link", "set", "lo", "up"]);
            ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"]);
            ip(&["-n", &hub, "link", "set", "br0", "up"]);
            for (i, ns) in network.nodes.iter().enumerate() {
                let port = format!("p{}", i + 1);
                ip(&["netns", "add", ns]);
                ip(&["-n", ns, "link", "set", "lo", "up"]);
                ip(&[
                    "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", &port,
                    "netns", &hub,
                ]);
                ip(&[
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("{}/29", subnet.host(i + 2)),
                    "dev",
                    "eth0",
                ]);
                ip(&["-n", ns, "link", "set", "eth0", "up"]);
                ip(&["-n", &hub, "link", "set", &port, "master", "br0", "up"]);
            }
            ip(&[
                "link", "add", &root_link, "type", "veth", "peer", "name", "uplink", "netns", &hub,
            ]);
            ip(&["-n", &hub, "link", "set", "uplink", "master", "br0", "up"]);
            ip(&[
                "addr",
                "add",
                &format!("{}/29", subnet.host(1)),
                "dev",
                &root_link,
            ]);
            ip(&["link", "set", &root_link, "up"]);
        }));
        if let Err(panic) = setup {
            teardown_network(&hub, &network.nodes, &root_link);
            std::panic::resume_unwind(panic);
        }
        let hosts = (0..NODES).map(|i| subnet.host(i + 2)).collect();
        // Each node has its namespace to itself: the usual ports are free there.
        let ports = vec![(4222, 6222, 8222); NODES];
        let namespaces = network.nodes.clone();
        let mut cluster = Self::prepare(hosts, ports, Some(network));
        for (node, ns) in cluster.nodes.iter_mut().zip(namespaces) {
            node.netns = Some(ns);
        }
        cluster.boot().await;
        cluster
    }

    async fn launch(
        hosts: Vec<String>,
        ports: Vec<(u16, u16, u16)>,
        network: Option<Network>,
    ) -> NatsCluster {
        let mut cluster = Self::prepare(hosts, ports, network);
        cluster.boot().await;
        cluster
    }

    /// Write the nodes' configurations; nothing runs yet.
    fn prepare(
        hosts: Vec<String>,
        ports: Vec<(u16, u16, u16)>,
        network: Option<Network>,
    ) -> NatsCluster {
        let id = uuid::Uuid::now_v7().simple().to_string();
        let cluster_name = format!("saga-{}", &id[20..]);
        let store = std::env::temp_dir().join(format!("saga-nats-cluster-{id}"));
        let logs = std::env::current_exe()
            .expect("exe")
            .parent()
            .and_then(|d| d.parent())
            .expect("target dir")
            .join("e2e-logs")
            .join(format!("nats-cluster-{}", &id[20..]));
        std::fs::create_dir_all(&logs).expect("log dir");
        let routes: Vec<String> = hosts
            .iter()
            .zip(&ports)
            .map(|(h, (_, route, _))| format!("nats-route://{h}:{route}"))
            .collect();
        let nodes = hosts
            .iter()
            .zip(&ports)
            .enumerate()
            .map(|(i, (host, &(client, route, monitor)))| {
                let name = format!("n{}", i + 1);
                let dir = store.join(&name);
                std::fs::create_dir_all(&dir).expect("store dir");
                let config = dir.join("nats.conf");
                // Pings every two seconds: a route or client whose peer went silent (a
                // partition drops packets, it sends no reset) is closed within seconds and
                // connected again as soon as the network lets it.
                let text = format!(
                    r#"server_name: {name}
listen: "{host}:{client}"
http: "{host}:{monitor}"
ping_interval: "2s"
ping_max: 2
jetstream {{
  store_dir: "{store}"
  max_memory_store: 256MB
  max_file_store: 4GB
}}
cluster {{
  name: "{cluster_name}"
  listen: "{host}:{route}"
  routes: [{routes}]
}}
"#,
                    store = dir.join("store").display(),
                    routes = routes.join(", "),
                );
                std::fs::write(&config, text).expect("write nats.conf");
                Node {
                    log: logs.join(format!("{name}.log")),
                    name,
                    host: host.clone(),
                    client_port: client,
                    monitor_port: monitor,
                    config,
                    netns: None,
                    child: None,
                }
            })
            .collect();
        NatsCluster {
            nodes,
            network,
            store,
            logs,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .no_proxy()
                .build()
                .expect("client"),
        }
    }

    async fn boot(&mut self) {
        for i in 0..NODES {
            self.spawn(i);
        }
        for i in 0..NODES {
            self.wait_listening(i).await;
        }
        self.wait_healthy(Duration::from_secs(60)).await;
    }

    /// The servers, as `NATS_URL` takes them: a comma-separated list.
    pub fn urls(&self) -> String {
        (0..NODES)
            .map(|i| self.url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The client URL of node `i`.
    pub fn url(&self, i: usize) -> String {
        let n = &self.nodes[i];
        format!("nats://{}:{}", n.host, n.client_port)
    }

    /// The server name of node `i` (`n{i+1}`).
    pub fn name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// The node of a server name.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    fn spawn(&mut self, i: usize) {
        let bin = crate::nats_server_binary();
        let node = &mut self.nodes[i];
        let mut cmd = match &node.netns {
            Some(ns) => {
                // `ip netns exec` enters the namespace and execs the server in its own
                // process: the child is the server.
                let mut c = Command::new(IP);
                c.args(["netns", "exec", ns]).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        cmd.arg("-c").arg(&node.config);
        let log = File::options()
            .create(true)
            .append(true)
            .open(&node.log)
            .expect("log");
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("nats-server {} does not start: {e}", node.name));
        node.child = Some(child);
    }

    /// Wait until node `i` takes client connections.
    async fn wait_listening(&mut self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let (host, port) = (self.nodes[i].host.clone(), self.nodes[i].client_port);
        while tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .is_err()
        {
            assert!(
                self.is_running(i),
                "nats-server {} exited; see {}",
                self.nodes[i].name,
                self.nodes[i].log.display()
            );
            assert!(
                Instant::now() < deadline,
                "nats-server {} did not listen within 20 s; see {}",
                self.nodes[i].name,
                self.nodes[i].log.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn is_running(&mut self, i: usize) -> bool {
        self.nodes[i]
            .child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL node `i`, as a crash would.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start node `i` again (killing it first if it runs), on the same ports and store, and
    /// wait until it takes connections. It is not current yet: see [`NatsCluster::wait_healthy`].
    pub async fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
        self.wait_listening(i).await;
    }

    /// `GET` a monitoring endpoint of node `i` (e.g. `/jsz`); `None` if it does not answer
    /// with JSON.
    pub async fn monitor(&self, i: usize, path: &str) -> Option<Value> {
        let n = &self.nodes[i];
        let r = self
            .http
            .get(format!("http://{}:{}{path}", n.host, n.monitor_port))
            .send()
            .await
            .ok()?;
        r.json().await.ok()
    }

    /// The names of the clients connected to node `i` (`/connz`), sorted.
    pub async fn clients(&self, i: usize) -> Vec<String> {
        let connz = self.monitor(i, "/connz?limit=4096").await;
        let mut names: Vec<String> = connz
            .as_ref()
            .and_then(|c| c["connections"].as_array())
            .into_iter()
            .flatten()
            .map(|c| c["name"].as_str().unwrap_or_default().to_owned())
            .collect();
        names.sort();
        names
    }

    /// What each node that answers says of the JetStream meta leader (`/jsz`'s
    /// `meta_cluster.leader`): server name, or `None` when it knows of none.
    async fn meta_views(&self) -> BTreeMap<usize, Option<String>> {
        let mut views = BTreeMap::new();
        for i in 0..NODES {
            if let Some(jsz) = self.monitor(i, "/jsz").await {
                views.insert(i, jsz["meta_cluster"]["leader"].as_str().map(str::to_owned));
            }
        }
        views
    }

    /// The JetStream meta leader, as a majority of the nodes sees it. (A node cut off from
    /// the others goes on calling itself the leader for a while: it is outvoted.)
    pub async fn meta_leader(&self) -> Option<usize> {
        let mut votes: BTreeMap<String, usize> = BTreeMap::new();
        for leader in self.meta_views().await.into_values().flatten() {
            *votes.entry(leader).or_default() += 1;
        }
        votes
            .into_iter()
            .find(|(_, n)| *n > NODES / 2)
            .and_then(|(name, _)| self.index_of(&name))
    }

    /// Wait until a majority agrees on a meta leader.
    pub async fn wait_meta_leader(&self, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            if let Some(i) = self.meta_leader().await {
                return i;
            }
            assert!(
                Instant::now() < deadline,
                "no JetStream meta leader within {within:?}: {:?}; logs in {}",
                self.meta_views().await,
                self.logs.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Wait until a majority agrees on a meta leader other than node `old` (which died, or was
    /// cut off: the others go on naming it until they miss its heartbeats).
    pub async fn wait_new_meta_leader(&self, old: usize, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            if let Some(i) = self.meta_leader().await
                && i != old
            {
                return i;
            }
            assert!(
                Instant::now() < deadline,
                "no JetStream meta leader but {} within {within:?}: {:?}; logs in {}",
                self.nodes[old].name,
                self.meta_views().await,
                self.logs.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A JetStream client of the cluster (any node).
    pub async fn jetstream(&self) -> Option<async_nats::jetstream::Context> {
        let urls: Vec<String> = (0..NODES).map(|i| self.url(i)).collect();
        let connect = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(2))
            .connect(urls);
        let client = tokio::time::timeout(Duration::from_secs(5), connect)
            .await
            .ok()?
            .ok()?;
        Some(
            async_nats::jetstream::context::ContextBuilder::new()
                .timeout(Duration::from_secs(3))
                .build(client),
        )
    }

    /// The node that leads `stream` (JetStream's stream info, `cluster.leader`), if any.
    pub async fn stream_leader(&self, stream: &str) -> Option<usize> {
        let js = self.jetstream().await?;
        let info = async {
            let mut s = js.get_stream(stream).await.ok()?;
            s.info().await.ok().cloned()
        };
        let info = tokio::time::timeout(Duration::from_secs(8), info)
            .await
            .ok()??;
        self.index_of(info.cluster?.leader.as_deref()?)
    }

    /// Wait until `stream` exists and has a leader.
    pub async fn wait_stream_leader(&self, stream: &str, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            if let Some(i) = self.stream_leader(stream).await {
                return i;
            }
            assert!(
                Instant::now() < deadline,
                "stream {stream} has no leader within {within:?}; logs in {}",
                self.logs.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Wait until every node runs and is healthy (`/healthz`: in contact with a meta leader,
    /// and its streams and consumers current), and all agree on the meta leader.
    pub async fn wait_healthy(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let mut unhealthy = Vec::new();
            for i in 0..NODES {
                if !self.is_running(i) {
                    unhealthy.push(format!("{} is not running", self.nodes[i].name));
                    continue;
                }
                match self.monitor(i, "/healthz").await {
                    Some(h) if h["status"] == "ok" => {}
                    h => unhealthy.push(format!("{}: {h:?}", self.nodes[i].name)),
                }
            }
            let views = self.meta_views().await;
            let leaders: BTreeSet<&Option<String>> = views.values().collect();
            if unhealthy.is_empty()
                && views.len() == NODES
                && leaders.len() == 1
                && leaders.iter().all(|l| l.is_some())
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the NATS cluster is not healthy within {within:?}: {unhealthy:?}, meta leaders \
                 {views:?}; logs in {}",
                self.logs.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn network(&mut self) -> &mut Network {
        self.network
            .as_mut()
            .expect("only a cluster started in network namespaces can be partitioned")
    }

    /// Cut node `i` off the other nodes: packets between it and them are dropped (a blackhole
    /// route each way), as a network partition would. Clients still reach every node.
    pub fn partition(&mut self, i: usize) {
        let hosts: Vec<String> = self.nodes.iter().map(|n| n.host.clone()).collect();
        let net = self.network();
        for j in (0..NODES).filter(|&j| j != i) {
            let pair = (i.min(j), i.max(j));
            if net.cut.insert(pair) {
                ip(&["-n", &net.nodes[i], "route", "add", "blackhole", &hosts[j]]);
                ip(&["-n", &net.nodes[j], "route", "add", "blackhole", &hosts[i]]);
            }
        }
    }

    /// Join node `i` to the other nodes again.
    pub fn heal(&mut self, i: usize) {
        let hosts: Vec<String> = self.nodes.iter().map(|n| n.host.clone()).collect();
        let net = self.network();
        for j in (0..NODES).filter(|&j| j != i) {
            if net.cut.remove(&(i.min(j), i.max(j))) {
                ip(&["-n", &net.nodes[i], "route", "del", "blackhole", &hosts[j]]);
                ip(&["-n", &net.nodes[j], "route", "del", "blackhole", &hosts[i]]);
            }
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..NODES {
            self.kill(i);
        }
        if let Some(net) = self.network.take() {
            teardown_network(&net.hub, &net.nodes, &net.root_link);
        }
        let _ = std::fs::remove_dir_all(&self.store);
    }
}

/// Run `ip` with `args`; panics with its error when it fails.
fn ip(args: &[&str]) {
    let out = Command::new(IP)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {IP}: {e}"));
    assert!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// Run `ip` with `args` and return what it printed (empty when it fails).
fn ip_output(args: &[&str]) -> String {
    Command::new(IP)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Delete what the netns layout created (errors ignored: parts may not exist).
fn teardown_network(hub: &str, nodes: &[String], root_link: &str) {
    let _ = Command::new(IP)
        .args(["link", "del", root_link])
        .stderr(Stdio::null())
        .status();
    for ns in nodes.iter().map(String::as_str).chain([hub]) {
        let _ = Command::new(IP)
            .args(["netns", "del", ns])
            .stderr(Stdio::null())
            .status();
    }
}

/// A /29 of 10.213.0.0/16: `.1` is the root namespace's, `.2` to `.4` the nodes'.
struct Subnet {
    base: [u8; 4],
}

impl Subnet {
    fn host(&self, n: usize) -> String {
        let [a, b, c, d] = self.base;
        format!("{a}.{b}.{c}.{}", d as usize + n)
    }
}

/// A /29 of 10.213.0.0/16 that no address or route of the root namespace overlaps, starting
/// from one picked by the process id (so that concurrent tests start apart).
fn unused_subnet() -> Subnet {
    let addresses = ip_output(&["-4", "-o", "addr", "show"]);
    let start = std::process::id() as usize * 7 + STARTED.load(Ordering::Relaxed) * 13;
    for k in 0..8192 {
        let index = (start + k) % 8192;
        let subnet = Subnet {
            base: [10, 213, (index / 32) as u8, (index % 32 * 8) as u8],
        };
        let cidr = format!("{}/29", subnet.host(0));
        let in_use = addresses
            .split_whitespace()
            .filter_map(|w| w.split_once('/').map(|(a, _)| a))
            .filter_map(|a| a.parse::<std::net::Ipv4Addr>().ok())
            .any(|a| a.octets()[..3] == subnet.base[..3] && a.octets()[3] & !7 == subnet.base[3]);
        // Routes inside the /29, or covering it (besides the default route).
        let routes = ip_output(&["-4", "route", "show", "table", "all", "root", &cidr])
            + &ip_output(&["-4", "route", "show", "table", "all", "match", &cidr]);
        let routed = routes
            .lines()
            .any(|l| !l.trim().is_empty() && !l.starts_with("default"));
        if !in_use && !routed {
            return subnet;
        }
    }
    panic!("no unused /29 in 10.213.0.0/16");
}

/// Delete the namespaces and links of clusters whose test process is gone (killed before its
/// Drop ran), and stop the nats-servers left running in them.
fn sweep_leftovers() {
    let alive = |pid: &str| std::path::Path::new("/proc").join(pid).exists();
    let owner = |name: &str, prefix: &str| -> Option<String> {
        let rest = name.strip_prefix(prefix)?;
        Some(rest.split('-').next()?.to_owned())
    };
    for line in ip_output(&["netns", "list"]).lines() {
        let Some(ns) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = owner(ns, NETNS_PREFIX) else {
            continue;
        };
        if alive(&pid) {
            continue;
        }
        for server in ip_output(&["netns", "pids", ns]).split_whitespace() {
            let comm = std::fs::read_to_string(format!("/proc/{server}/comm")).unwrap_or_default();
            if comm.trim() == "nats-server" {
                let _ = Command::new("kill").args(["-KILL", server]).status();
            }
        }
        eprintln!("deleting namespace {ns} left by process {pid}");
        let _ = Command::new(IP).args(["netns", "del", ns]).status();
    }
    for line in ip_output(&["-o", "link", "show"]).lines() {
        // "12: sgnc1234-0@if11: <...>"
        let Some(link) = line
            .split(':')
            .nth(1)
            .map(|l| l.trim().split('@').next().unwrap_or_default().to_owned())
        else {
            continue;
        };
        if let Some(pid) = owner(&link, LINK_PREFIX)
            && !alive(&pid)
        {
            eprintln!("deleting link {link} left by process {pid}");
            let _ = Command::new(IP).args(["link", "del", &link]).status();
        }
    }
}
