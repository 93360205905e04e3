//! End to end: the dashboard (`svc-lb run --ui`) in real headless Chromium (Debian's
//! chromium package, driven over the DevTools pipe in real time): the page loads from the
//! agent, polls /api/state, and shows the Services by namespace with their backends' live
//! traffic share while traffic flows.
//!
//! Set SVC_LB_SCREENSHOT_DIR to keep the screenshot (`dashboard.png`) for a look.

use std::{
    fs,
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::Duration,
};

use svc_lb_tests::{
    agent::AgentGuard, browser::Browser, client, fixture, netns::Topology, views::http_get_path,
};

const UI: &str = "127.0.0.1:9964";

#[test]
fn dashboard_renders_live_in_chromium() {
    let (topo, dir) = fixture::standard();
    let mut agent = AgentGuard::start_with(&topo, &dir.path, &["--ui", UI]);
    fixture::wait_serving(&topo, &mut agent);

    // The JSON the page polls.
    let (status, json) = http_get_path(&topo.node, UI.parse().unwrap(), "/api/state").unwrap();
    assert_eq!(status, 200, "{json}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["namespaces"][0]["name"], "default");

    let mut browser = open_dashboard(&topo);
    let idle_updates = browser.eval("Number(document.body.dataset.updates)");

    // Traffic flows while the page watches: the shares become live (deltas between polls).
    let stop = AtomicBool::new(false);
    // Stops the traffic even when an assertion below fails (the scope waits for the thread).
    struct StopOnDrop<'a>(&'a AtomicBool);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let (dom, png, live_updates) = thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let _ = client::http_get(&topo.client, fixture::frontend());
                thread::sleep(Duration::from_millis(10));
            }
        });
        browser.wait_for(
            "[...document.querySelectorAll('th')].some(t => t.textContent === 'live share')",
            Duration::from_secs(10),
        );
        // Two more polls with traffic, so every backend had a chance to get connections.
        let start = browser
            .eval("Number(document.body.dataset.updates)")
            .as_u64()
            .unwrap();
        browser.wait_for(
            &format!("Number(document.body.dataset.updates) >= {}", start + 2),
            Duration::from_secs(10),
        );
        let dom = browser.eval("document.documentElement.outerHTML");
        let png = browser.screenshot(1280, 900);
        let updates = browser.eval("Number(document.body.dataset.updates)");
        stop.store(true, Ordering::Relaxed);
        (dom.as_str().unwrap().to_owned(), png, updates)
    });
    assert!(
        live_updates.as_u64() > idle_updates.as_u64(),
        "the page keeps polling: {idle_updates} -> {live_updates}"
    );
    for needle in [
        "namespace default",
        r#"data-service="default/frontend-svc""#,
        r#"data-service="default/web-service""#,
        r#"data-service="default/dns""#,
        "http://172.31.0.1:30080",
        "10.96.0.10:80/TCP",
        "live share",
        "pkt/s",
    ] {
        assert!(
            dom.contains(needle),
            "{needle:?} not in the rendered page:\n{dom}"
        );
    }
    // frontend-svc's three backends each get a visible live share, together ~100%.
    let card = &dom[dom.find(r#"data-service="default/frontend-svc""#).unwrap()..];
    let card = &card[..card
        .find(r#"data-service="default/web-service""#)
        .unwrap_or(card.len())];
    let shares: Vec<f64> = ["10.244.1.2:5000", "10.244.2.2:5000", "10.244.3.2:5000"]
        .iter()
        .map(|b| {
            attr_after(card, &format!(r#"data-backend="{b}""#), "data-share")
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("no share for {b} in:\n{card}"))
        })
        .collect();
    let total: f64 = shares.iter().sum();
    assert!((99.0..=101.0).contains(&total), "shares {shares:?}");
    assert!(
        shares.iter().all(|s| *s > 0.0),
        "every backend gets traffic: {shares:?}"
    );

    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "screenshot {} bytes",
        png.len()
    );
    if let Some(keep) = std::env::var_os("SVC_LB_SCREENSHOT_DIR") {
        fs::create_dir_all(&keep).unwrap();
        fs::write(Path::new(&keep).join("dashboard.png"), &png).unwrap();
    }
}

/// Chromium in the node namespace (the dashboard listens on its loopback), showing the
/// rendered dashboard. Browser startup is retried once: on a loaded machine Chromium has been
/// seen to stall before its first navigation (no request reached the agent), which says
/// nothing about the dashboard; both attempts' failures are reported.
fn open_dashboard(topo: &Topology) -> Browser {
    let mut failures = Vec::new();
    for attempt in 1..=2 {
        let profile = topo.dir.join(format!("chromium-profile-{attempt}"));
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut browser = Browser::launch(&topo.node, &profile);
            browser.navigate(&format!("http://{UI}/"));
            browser.wait_for(
                "document.querySelector('[data-service=\"default/frontend-svc\"]') !== null",
                Duration::from_secs(10),
            );
            browser
        }));
        match res {
            Ok(browser) => return browser,
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                eprintln!("chromium attempt {attempt} failed: {msg}");
                failures.push(msg);
            }
        }
    }
    panic!("chromium could not show the dashboard: {failures:#?}");
}

/// The value of `attr` in the first tag at or after `anchor`.
fn attr_after(dom: &str, anchor: &str, attr: &str) -> Option<String> {
    let rest = &dom[dom.find(anchor)?..];
    let start = rest.find(&format!("{attr}=\""))? + attr.len() + 2;
    let end = rest[start..].find('"')?;
    Some(rest[start..start + end].to_owned())
}
