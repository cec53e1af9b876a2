//! A headless Chromium for the dashboard's tests, driven over WebDriver: `chromedriver` runs as a
//! child process of the test, on a port of its own, and one fantoccini session drives the
//! browser. Both go when the [`Browser`] does, also when the test fails.
//!
//! Chromium and chromedriver are Debian's (`/usr/bin/chromium`, `/usr/bin/chromedriver`;
//! `deploy/test` installs them, see `ensure_browser` in `deploy/lib/services.sh`);
//! `E2E_CHROMIUM` and `E2E_CHROMEDRIVER` name others.
//!
//! Waiting is on a condition with a deadline, as everywhere in the harness. A wait that times
//! out saves a screenshot of what the browser showed and names it in the failure.

use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};

/// The screenshots the README shows, written to `docs/screenshots/` too (see
/// [`Browser::screenshot`]).
pub const README_SHOTS: [&str; 3] = ["overview", "list", "detail"];

/// How often a wait looks again.
const POLL: Duration = Duration::from_millis(50);

fn chromium() -> PathBuf {
    std::env::var_os("E2E_CHROMIUM").map_or_else(|| "/usr/bin/chromium".into(), PathBuf::from)
}

fn chromedriver() -> PathBuf {
    std::env::var_os("E2E_CHROMEDRIVER")
        .map_or_else(|| "/usr/bin/chromedriver".into(), PathBuf::from)
}

/// The workspace's `target` directory (the test's executable is in `target/<profile>/deps`).
fn target_dir() -> PathBuf {
    std::env::current_exe()
        .expect("current exe")
        .ancestors()
        .nth(3)
        .expect("target dir")
        .to_path_buf()
}

/// Where the screenshots of a run go: `target/e2e-screenshots/`.
pub fn screenshot_dir() -> PathBuf {
    target_dir().join("e2e-screenshots")
}

/// A headless Chromium and the chromedriver that drives it.
pub struct Browser {
    /// `None` once [`Browser::close`] ended the session.
    client: Option<Client>,
    session: Option<String>,
    driver: Child,
    port: u16,
    log: PathBuf,
}

impl Browser {
    /// Start chromedriver (its log is `chromedriver.log` in `logs`, the app's log directory)
    /// and open a session of a headless Chromium, 1280×900.
    pub async fn start(logs: &Path) -> Browser {
        for path in [chromium(), chromedriver()] {
            assert!(
                path.exists(),
                "{} is missing: install Debian's chromium and chromium-driver \
                 (deploy/test does, see ensure_browser in deploy/lib/services.sh)",
                path.display()
            );
        }
        let log = logs.join("chromedriver.log");
        let (driver, port) = start_driver(&log).await;
        let mut browser = Browser {
            client: None,
            session: None,
            driver,
            port,
            log,
        };
        let mut capabilities = serde_json::Map::new();
        capabilities.insert("browserName".into(), json!("chrome"));
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium(),
                "args": [
                    "--headless=new",
                    // Root in a container has no user namespace to sandbox in.
                    "--no-sandbox",
                    "--disable-gpu",
                    "--window-size=1280,900",
                    // A container's /dev/shm is often 64 MB, which Chromium's renderers outgrow.
                    "--disable-dev-shm-usage",
                ],
            }),
        );
        let mut builder = ClientBuilder::new(HttpConnector::new());
        builder.capabilities(capabilities);
        let url = format!("http://127.0.0.1:{port}");
        let connect = builder.connect(&url);
        let client = match tokio::time::timeout(Duration::from_secs(60), connect).await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => panic!("no Chromium session: {e}; see {}", browser.log.display()),
            Err(_) => panic!(
                "Chromium did not start within 60 s; see {}",
                browser.log.display()
            ),
        };
        browser.session = client.session_id().await.ok().flatten();
        browser.client = Some(client);
        browser
    }

    fn client(&self) -> &Client {
        self.client.as_ref().expect("the browser session is open")
    }

    /// Load `url` (the browser follows redirects).
    pub async fn goto(&self, url: &str) {
        self.client()
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    }

    /// The page's URL now.
    pub async fn url(&self) -> reqwest::Url {
        self.client().current_url().await.expect("current URL")
    }

    /// Log in at `base`'s login page; returns once the browser has left it. Fails the test with
    /// the page's error when the login is refused.
    pub async fn login(&self, base: &str, user: &str, password: &str) {
        self.goto(&format!("{base}/dashboard/login")).await;
        self.submit_login(user, password).await;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if self.url().await.path() != "/dashboard/login" {
                return;
            }
            if let Some(error) = self.text_of("[data-testid=login-error]").await {
                panic!("login as {user} refused: {error}");
            }
            if Instant::now() > deadline {
                self.fail(&format!("login as {user}: still on the login page"))
                    .await;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Fill the login form on the page and send it.
    pub async fn submit_login(&self, user: &str, password: &str) {
        let form = self.wait_for("#login-form", Duration::from_secs(10)).await;
        self.fill_in(&form, "username", user).await;
        self.fill_in(&form, "password", password).await;
        self.click_submit(&form).await;
    }

    /// The element `selector` names, once it is there.
    pub async fn wait_for(&self, selector: &str, within: Duration) -> Element {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(e) = self.client().find(Locator::Css(selector)).await {
                return e;
            }
            if Instant::now() > deadline {
                self.fail(&format!("no {selector} within {within:?}")).await;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Wait until the text of `selector` contains `text`; returns the element's whole text,
    /// trimmed. A page whose `<main>` is swapped by a live update meanwhile is looked at again.
    pub async fn wait_for_text(&self, selector: &str, text: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        let mut seen = None;
        loop {
            if let Some(got) = self.text_of(selector).await {
                if got.contains(text) {
                    return got;
                }
                seen = Some(got);
            }
            if Instant::now() > deadline {
                self.fail(&format!(
                    "{selector} did not show {text:?} within {within:?}; it showed {seen:?}"
                ))
                .await;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The text of `selector`, trimmed; `None` when there is no such element (or it went
    /// stale while being read).
    pub async fn text_of(&self, selector: &str) -> Option<String> {
        let e = self.client().find(Locator::Css(selector)).await.ok()?;
        e.text().await.ok().map(|t| t.trim().to_owned())
    }

    /// Whether the page has an element `selector` names.
    pub async fn has(&self, selector: &str) -> bool {
        self.count(selector).await > 0
    }

    /// How many elements `selector` names.
    pub async fn count(&self, selector: &str) -> usize {
        self.client()
            .find_all(Locator::Css(selector))
            .await
            .map_or(0, |all| all.len())
    }

    /// The `attribute` of every element `selector` names, in document order.
    pub async fn attrs(&self, selector: &str, attribute: &str) -> Vec<String> {
        let mut out = Vec::new();
        for e in self
            .client()
            .find_all(Locator::Css(selector))
            .await
            .unwrap_or_default()
        {
            if let Ok(Some(v)) = e.attr(attribute).await {
                out.push(v);
            }
        }
        out
    }

    /// Type `value` into the field `name` of `form`, replacing what it held.
    pub async fn fill_in(&self, form: &Element, name: &str, value: &str) {
        let field = form
            .find(Locator::Css(&format!("[name={name}]")))
            .await
            .unwrap_or_else(|e| panic!("no field {name}: {e}"));
        field.clear().await.expect("clear a field");
        field.send_keys(value).await.expect("type into a field");
    }

    /// Choose the option `value` of the `<select>` `name` of `form`.
    pub async fn select(&self, form: &Element, name: &str, value: &str) {
        form.find(Locator::Css(&format!("select[name={name}]")))
            .await
            .unwrap_or_else(|e| panic!("no select {name}: {e}"))
            .select_by_value(value)
            .await
            .unwrap_or_else(|e| panic!("no option {value} of {name}: {e}"));
    }

    /// Press the submit button of `form`.
    pub async fn click_submit(&self, form: &Element) {
        form.find(Locator::Css("[type=submit]"))
            .await
            .expect("the form has a submit button")
            .click()
            .await
            .expect("press submit");
    }

    /// Click the element `selector` names, once it is there.
    pub async fn click(&self, selector: &str) {
        self.wait_for(selector, Duration::from_secs(10))
            .await
            .click()
            .await
            .unwrap_or_else(|e| panic!("click {selector}: {e}"));
    }

    /// Wait until the page's path is `path` (a navigation or redirect ended there).
    pub async fn wait_for_path(&self, path: &str, within: Duration) -> reqwest::Url {
        let deadline = Instant::now() + within;
        loop {
            let url = self.url().await;
            if url.path() == path {
                return url;
            }
            if Instant::now() > deadline {
                self.fail(&format!("not at {path} within {within:?}")).await;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Run `script` in the page and return what it returns.
    pub async fn execute(&self, script: &str) -> Value {
        self.client()
            .execute(script, Vec::new())
            .await
            .unwrap_or_else(|e| panic!("script {script}: {e}"))
    }

    /// The value of the cookie `name` (HttpOnly ones too: WebDriver sees them all).
    pub async fn cookie(&self, name: &str) -> Option<String> {
        self.client()
            .get_named_cookie(name)
            .await
            .ok()
            .map(|c| c.value().to_owned())
    }

    /// Save what the browser shows as `target/e2e-screenshots/{name}.png`. The README's shots
    /// ([`README_SHOTS`]) go to `docs/screenshots/{name}.png` too, when that file is not there
    /// yet or `UPDATE_SCREENSHOTS=1` asks for new ones: they are committed, and a test run
    /// should not leave the tree changed by nothing but the time on a page.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.client().screenshot().await.expect("a screenshot");
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir).expect("the screenshot directory");
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, &png).expect("write the screenshot");
        if README_SHOTS.contains(&name) {
            let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/screenshots");
            let committed = docs.join(format!("{name}.png"));
            if !committed.exists() || std::env::var_os("UPDATE_SCREENSHOTS").is_some() {
                std::fs::create_dir_all(&docs).expect("docs/screenshots");
                std::fs::write(&committed, &png).expect("write the README's screenshot");
            }
        }
        path
    }

    /// Fail the test with `what`, the page's URL and a screenshot of it.
    async fn fail(&self, what: &str) -> ! {
        let url = self
            .client()
            .current_url()
            .await
            .map_or_else(|e| format!("(no URL: {e})"), |u| u.to_string());
        let shot = format!(
            "failed-{}",
            &uuid::Uuid::now_v7().simple().to_string()[20..]
        );
        let path = self.screenshot(&shot).await;
        panic!("{what}\n  at {url}\n  screenshot {}", path.display());
    }

    /// End the session: Chromium quits; chromedriver stops when the `Browser` is dropped.
    pub async fn close(mut self) {
        if let Some(client) = self.client.take() {
            client.close().await.expect("close the browser session");
            self.session = None;
        }
    }
}

/// Start chromedriver on a free port and wait until it is ready. A port found free can be
/// taken before chromedriver binds it; then chromedriver exits and is started on another.
async fn start_driver(log: &Path) -> (Child, u16) {
    let http = crate::client(None);
    for _ in 0..10 {
        let port = crate::free_port();
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .expect("chromedriver's log");
        let mut child = Command::new(chromedriver())
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            // A process group of its own, so that Chromium (its child) goes with it.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromedriver().display()));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = http
                .get(format!("http://127.0.0.1:{port}/status"))
                .send()
                .await
                && let Ok(status) = r.json::<Value>().await
                && status["value"]["ready"] == true
                && matches!(child.try_wait(), Ok(None))
            {
                return (child, port);
            }
            if !matches!(child.try_wait(), Ok(None)) {
                break;
            }
            if Instant::now() > deadline {
                kill_group(&mut child);
                panic!("chromedriver not ready within 20 s; see {}", log.display());
            }
            tokio::time::sleep(POLL).await;
        }
    }
    panic!("chromedriver could not bind a port; see {}", log.display());
}

/// SIGKILL chromedriver's process group (it and the browser it started), then reap it.
fn kill_group(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .status();
    let _ = child.kill();
    let _ = child.wait();
}

/// `DELETE /session/{id}`, in blocking IO: drop cannot wait on the test's runtime. Chromium
/// quits before chromedriver answers.
fn delete_session(port: u16, session: &str) -> std::io::Result<()> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "DELETE /session/{session} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
         Connection: close\r\nContent-Length: 0\r\n\r\n"
    )?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)?;
    Ok(())
}

impl Drop for Browser {
    fn drop(&mut self) {
        // A test that failed did not close its session: end it, so that Chromium quits as it
        // would have; what is left of the process group is killed either way.
        if let Some(session) = self.session.take() {
            let _ = delete_session(self.port, &session);
        }
        kill_group(&mut self.driver);
    }
}
