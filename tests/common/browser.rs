//! Looks at a report.html the way a person does: in a real headless
//! Chromium (Debian's `chromium`), at 1280x800 and at a phone's 390x844.
//! The screenshots are kept; what is where on the page is measured by the
//! browser's own layout (a probe script added to a copy of the page, its
//! answer read from `--dump-dom`).

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const FOLD: f64 = 800.0;

/// The browser's program: `chromium` (Debian), else `chromium-browser`.
pub fn chromium() -> &'static str {
    for name in ["chromium", "chromium-browser"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {name}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if found {
            return name;
        }
    }
    panic!(
        "the browser test needs chromium: `apt-get install chromium` (scripts/host-deps.sh --test)"
    )
}

fn headless(extra: &[&str]) -> Command {
    let mut c = Command::new(chromium());
    // --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--no-first-run",
        "--allow-file-access-from-files",
    ])
    .args(extra);
    c
}

/// Screenshots of `page` at a desktop and a phone width, into `shots` as
/// `<name>-1280.png` and `<name>-phone.png`; returns their paths.
pub fn screenshots(page: &Path, shots: &Path, name: &str) -> Vec<PathBuf> {
    std::fs::create_dir_all(shots).unwrap();
    let url = format!("file://{}", page.canonicalize().unwrap().display());
    let mut out = Vec::new();
    for (suffix, size) in [("1280", "1280,800"), ("phone", "390,844")] {
        let png = shots.join(format!("{name}-{suffix}.png"));
        let _ = std::fs::remove_file(&png);
        let run = headless(&[
            &format!("--window-size={size}"),
            &format!("--screenshot={}", png.display()),
            &url,
        ])
        .output()
        .expect("running chromium");
        assert!(
            png.metadata().is_ok_and(|m| m.len() > 10_000),
            "chromium wrote no screenshot {}: {}",
            png.display(),
            String::from_utf8_lossy(&run.stderr)
        );
        out.push(png);
    }
    out
}

/// What the browser laid out at 1280x800: the verdict, each failure's
/// name, message and first evidence block with their top edges, and the
/// timeline's rows with their drawn sizes.
pub fn layout(page: &Path) -> Value {
    const PROBE: &str = r#"<script>
(function () {
  const top = (el) => el ? el.getBoundingClientRect().top : null;
  const box = (el) => { const r = el.getBoundingClientRect(); return { top: r.top, height: r.height, width: r.width }; };
  const v = document.getElementById('verdict');
  const fails = Array.from(document.querySelectorAll('article.check.fail')).map((a) => ({
    name: a.querySelector('h3').textContent,
    top: top(a.querySelector('h3')),
    message_top: top(a.querySelector('.message')),
    evidence_top: top(a.querySelector('pre.evidence')),
    evidence: (a.querySelector('pre.evidence') || {}).textContent || null,
  }));
  const rows = (sel, key) => Array.from(document.querySelectorAll(sel)).map((g) => Object.assign({ name: g.dataset[key] }, box(g)));
  const out = {
    viewport: window.innerHeight,
    verdict: v ? { text: v.querySelector('h1').textContent, class: v.className, top: top(v) } : null,
    failures: fails,
    node_rows: rows('svg g.node-row', 'node'),
    layer_rows: rows('svg g.layer-row', 'layer'),
    failed_bars: document.querySelectorAll('svg rect.check-bar.fail').length,
    links: document.querySelectorAll('#artifacts a').length,
    external: Array.from(document.querySelectorAll('[src],link[href]')).map((e) => e.getAttribute('src') || e.getAttribute('href')),
  };
  const pre = document.createElement('pre');
  pre.id = 'layout-probe';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
})();
</script>"#;
    let html = std::fs::read_to_string(page).expect("report.html");
    let probed = page.with_file_name(".report-probe.html");
    std::fs::write(&probed, html.replace("</body>", &format!("{PROBE}</body>"))).unwrap();
    let url = format!("file://{}", probed.canonicalize().unwrap().display());
    let out = headless(&["--window-size=1280,800", "--dump-dom", &url])
        .output()
        .expect("running chromium");
    let _ = std::fs::remove_file(&probed);
    let dom = String::from_utf8_lossy(&out.stdout);
    let start = dom.find("<pre id=\"layout-probe\">").unwrap_or_else(|| {
        panic!(
            "no probe output; chromium said: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    }) + "<pre id=\"layout-probe\">".len();
    let end = start + dom[start..].find("</pre>").expect("probe end");
    let json = dom[start..end]
        .replace("&quot;", "\"")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&");
    serde_json::from_str(&json).unwrap_or_else(|e| panic!("probe JSON {e}: {json}"))
}

/// The checks a person relies on, for the report of the run in `dir`:
/// the verdict on top; for a failed run, the first failed check's name,
/// message and evidence above the fold; one drawn timeline row per node
/// and per layer; links to the files; nothing loaded from elsewhere.
/// Keeps the screenshots in `shots` and returns the layout.
pub fn assert_readable(dir: &Path, shots: &Path, name: &str) -> Value {
    let result: Value =
        serde_json::from_slice(&std::fs::read(dir.join("result.json")).unwrap()).unwrap();
    let page = dir.join("report.html");
    screenshots(&page, shots, name);
    let seen = layout(&page);
    eprintln!("{name}: layout {seen}");
    let status = result["status"].as_str().unwrap();
    let verdict = &seen["verdict"];
    assert!(
        verdict["text"]
            .as_str()
            .unwrap()
            .ends_with(&status.to_uppercase()),
        "the verdict says the status: {verdict}"
    );
    assert!(
        verdict["top"].as_f64().unwrap() < 100.0,
        "the verdict is on top"
    );
    let failed: Vec<&str> = result["layers"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|l| l["checks"].as_array().unwrap())
        .filter(|c| c["outcome"] == "fail")
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    let shown = seen["failures"].as_array().unwrap();
    let failed_steps = result["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["outcome"] == "fail" && s["name"] != "smoke")
        .count();
    assert_eq!(
        shown.len(),
        failed.len() + failed_steps,
        "every failure is shown"
    );
    if let Some(first) = failed.first() {
        let card = shown
            .iter()
            .find(|f| f["name"] == *first)
            .unwrap_or_else(|| panic!("{first} is not shown"));
        for edge in ["top", "message_top", "evidence_top"] {
            let y = card[edge].as_f64().unwrap_or(f64::MAX);
            assert!(y < FOLD, "{first}: its {edge} is at {y}, below the fold");
        }
    }
    let nodes = result["nodes"].as_object().unwrap();
    let rows = seen["node_rows"].as_array().unwrap();
    assert_eq!(rows.len(), nodes.len(), "one timeline row per node");
    for r in rows {
        assert!(nodes.contains_key(r["name"].as_str().unwrap()));
        assert!(r["width"].as_f64().unwrap() > 50.0, "row drawn: {r}");
    }
    let layers = result["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| !l["checks"].as_array().unwrap().is_empty())
        .count();
    assert_eq!(seen["layer_rows"].as_array().unwrap().len(), layers);
    assert_eq!(seen["failed_bars"].as_u64().unwrap() as usize, failed.len());
    assert!(seen["links"].as_u64().unwrap() >= 2, "artifact links");
    assert_eq!(seen["external"], serde_json::json!([]), "self-contained");
    seen
}
