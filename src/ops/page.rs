//! The status page (`/` on the ops listener): server-rendered HTML that refreshes itself, with
//! the providers' and routes' circuits and figures, the last hour's deliveries by status and
//! reason with each reason's hint, the newest dead letters, and a search by tenant and account
//! that shows the account's diagnosis. No script, no front-end build.

use std::fmt::Write;
use std::time::Duration;

use jiff::Timestamp;

use super::recent::DeadLetter;
use crate::delivery::{BreakerSnapshot, Diagnosis, ProviderHealth};
use crate::domain::FailureReason;

/// How often the page reloads itself (not while it shows a diagnosis, which a support agent
/// reads at their own pace).
const REFRESH_SECONDS: u32 = 15;

/// What the page shows.
pub struct Page<'a> {
    /// The replica answering (worker name and host).
    pub replica: &'a str,
    /// Whether it consumes from the broker.
    pub broker_up: bool,
    /// When the page was made.
    pub now: Timestamp,
    /// The operator's view: providers, the last hour, dead letters. `None` when the caller's
    /// key may not see it (a tenant's read key, which may only diagnose).
    pub overview: Option<Overview>,
    /// The search form's values.
    pub tenant: &'a str,
    /// The account searched for.
    pub account: &'a str,
    /// The diagnosis of the account searched for, or why there is none.
    pub diagnosis: Option<Result<Diagnosis, String>>,
}

/// The operator's view of the gateway.
pub struct Overview {
    /// Every provider's circuits and figures.
    pub providers: Vec<ProviderHealth>,
    /// Deliveries the engine ended in the last hour by (status, reason), most first.
    pub last_hour: Vec<(String, String, u32)>,
    /// The newest dead letters, newest first.
    pub dead_letters: Vec<DeadLetter>,
}

/// Escapes text for HTML content and attribute values.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn ms(duration: Duration) -> String {
    format!("{:.0} ms", duration.as_secs_f64() * 1000.0)
}

fn ago(now: Timestamp, at: Timestamp) -> String {
    let seconds = (now.as_second() - at.as_second()).max(0);
    match seconds {
        0..60 => format!("{seconds} s ago"),
        60..3600 => format!("{} min ago", seconds / 60),
        _ => format!("{} h ago", seconds / 3600),
    }
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}\
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}\
table{border-collapse:collapse}td,th{padding:.25em .7em;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}\
.OPEN{background:#fdd}.HALF_OPEN{background:#ffd}.CLOSED{background:#dfd}.down{color:#b00;font-weight:bold}\
.route td:first-child{padding-left:2em}.fixes li{margin:.3em 0}small{color:#666}";

/// The page as HTML.
pub fn render(page: &Page<'_>) -> String {
    let mut html = String::with_capacity(16 * 1024);
    let refresh = if page.diagnosis.is_none() {
        format!("<meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">")
    } else {
        String::new()
    };
    let _ = write!(
        html,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">{refresh}\
         <title>otp-gateway status</title><style>{STYLE}</style></head><body>\
         <h1>otp-gateway</h1><p id=\"replica\">{} · broker: {} · {}</p>",
        esc(page.replica),
        if page.broker_up {
            "<span id=\"broker\">consuming</span>"
        } else {
            "<span id=\"broker\" class=\"down\">not consuming</span>"
        },
        page.now.strftime("%Y-%m-%d %H:%M:%S UTC"),
    );
    match &page.overview {
        Some(overview) => {
            providers(&mut html, overview, page.now);
            last_hour(&mut html, overview);
            dead_letters(&mut html, overview, page.now);
        }
        None => html.push_str(
            "<p><small>Providers, the last hour and dead letters need a key with the status or \
             admin scope.</small></p>",
        ),
    }
    search(&mut html, page);
    html.push_str("</body></html>\n");
    html
}

fn circuit_cells(html: &mut String, circuit: &BreakerSnapshot, now: Timestamp) {
    let state = circuit.state.as_str();
    let (p50, p99) = circuit
        .latency
        .map_or(("–".into(), "–".into()), |(p50, _, p99)| {
            (ms(p50), ms(p99))
        });
    let last_error = circuit
        .last_error
        .as_ref()
        .map_or(String::new(), |(error, at)| {
            format!("{} <small>({})</small>", esc(error), ago(now, *at))
        });
    let _ = write!(
        html,
        "<td class=\"circuit {state}\">{state}</td><td>{:.0}%</td><td>{}</td><td>{p50}</td>\
         <td>{p99}</td><td class=\"last-error\">{last_error}</td>",
        circuit.error_rate * 100.0,
        circuit.calls,
    );
}

fn providers(html: &mut String, overview: &Overview, now: Timestamp) {
    html.push_str(
        "<h2>Providers and routes</h2><table id=\"providers\"><tr><th>provider</th><th>kind</th>\
         <th>circuit</th><th>errors</th><th>calls</th><th>p50</th><th>p99</th><th>last error</th></tr>",
    );
    for provider in &overview.providers {
        let _ = write!(
            html,
            "<tr class=\"provider\" data-provider=\"{0}\" data-circuit=\"{1}\"><td>{0}</td><td>{2}</td>",
            esc(&provider.name),
            provider.circuit.state.as_str(),
            provider.kind,
        );
        circuit_cells(html, &provider.circuit, now);
        html.push_str("</tr>");
        for (route, channel, circuit) in &provider.routes {
            let _ = write!(
                html,
                "<tr class=\"route\" data-provider=\"{0}\" data-route=\"{1}\" data-circuit=\"{2}\">\
                 <td>{3} {1}</td><td></td>",
                esc(&provider.name),
                esc(route),
                circuit.state.as_str(),
                channel.as_str(),
            );
            circuit_cells(html, circuit, now);
            html.push_str("</tr>");
        }
    }
    html.push_str("</table>");
}

fn last_hour(html: &mut String, overview: &Overview) {
    let total: u32 = overview.last_hour.iter().map(|(_, _, n)| n).sum();
    let _ = write!(
        html,
        "<h2>Deliveries in the last hour</h2><p><small>{total} ended at this replica (as the \
         engine ended them: a later receipt may still settle a SENT one)</small></p>\
         <table id=\"reasons\"><tr><th>status</th><th>reason</th><th>deliveries</th><th>what to do</th></tr>"
    );
    for (status, reason, count) in &overview.last_hour {
        let hint = reason
            .parse::<FailureReason>()
            .map_or("", FailureReason::hint);
        let _ = write!(
            html,
            "<tr data-status=\"{0}\" data-reason=\"{1}\"><td>{0}</td><td>{1}</td>\
             <td class=\"count\">{count}</td><td>{2}</td></tr>",
            esc(status),
            esc(reason),
            esc(hint),
        );
    }
    html.push_str("</table>");
}

fn dead_letters(html: &mut String, overview: &Overview, now: Timestamp) {
    html.push_str(
        "<h2>Dead letters</h2><table id=\"dead-letters\"><tr><th>when</th><th>field</th>\
         <th>problem</th></tr>",
    );
    for letter in &overview.dead_letters {
        let _ = write!(
            html,
            "<tr data-field=\"{0}\"><td>{1}</td><td>{0}</td><td>{2}</td></tr>",
            esc(&letter.field),
            ago(now, letter.at),
            esc(&letter.problem),
        );
    }
    html.push_str(
        "</table><p><small>Each one is in the dead-letter queue with its reason in \
         <code>x-otp-error</code>.</small></p>",
    );
}

fn search(html: &mut String, page: &Page<'_>) {
    let _ = write!(
        html,
        "<h2>Why can't this user get a code?</h2><form method=\"get\" action=\"/\">\
         <label>tenant <input name=\"tenant\" value=\"{}\"></label> \
         <label>account <input name=\"account\" value=\"{}\" required></label> \
         <button type=\"submit\">Diagnose</button></form>",
        esc(page.tenant),
        esc(page.account),
    );
    match &page.diagnosis {
        None => {}
        Some(Err(refused)) => {
            let _ = write!(
                html,
                "<p id=\"diagnosis-error\" class=\"down\">{}</p>",
                esc(refused)
            );
        }
        Some(Ok(diagnosis)) => diagnosis_section(html, diagnosis, page.now),
    }
}

fn diagnosis_section(html: &mut String, diagnosis: &Diagnosis, now: Timestamp) {
    let _ = write!(
        html,
        "<section id=\"diagnosis\" data-tenant=\"{}\" data-account=\"{}\"><p class=\"summary\">{}</p>",
        esc(&diagnosis.tenant),
        esc(&diagnosis.account),
        esc(&diagnosis.summary),
    );
    if diagnosis.fixes.is_empty() {
        html.push_str(
            "<p class=\"no-fix\">Nothing to fix: the newest delivery reached the user.</p>",
        );
    } else {
        html.push_str("<h3>What to do</h3><ol class=\"fixes\">");
        for fix in &diagnosis.fixes {
            let _ = write!(
                html,
                "<li class=\"fix\" data-reason=\"{}\">{}</li>",
                fix.reason.map_or("", FailureReason::as_str),
                esc(&fix.text)
            );
        }
        html.push_str("</ol>");
    }
    if !diagnosis.targets.is_empty() {
        html.push_str(
            "<h3>Numbers and devices</h3><table id=\"targets\"><tr><th>number or device</th>\
             <th>last outcome</th><th>failed in a row</th><th>last success</th><th>failures</th>\
             <th>blocked</th></tr>",
        );
        for target in &diagnosis.targets {
            let name = match target.platform {
                Some(platform) => format!("{} ({})", target.target, platform.as_str()),
                None => target.target.clone(),
            };
            let failures: Vec<String> = target
                .failures
                .iter()
                .map(|f| {
                    let said = match (&f.provider, &f.provider_code) {
                        (Some(p), Some(c)) => format!(" ({p} {c})"),
                        (Some(p), None) => format!(" ({p})"),
                        _ => String::new(),
                    };
                    format!("{} × {}{said}", f.count, f.reason.as_str())
                })
                .collect();
            let blocks: Vec<String> = target
                .blocks
                .iter()
                .map(|b| {
                    format!(
                        "#{} {} since {}",
                        b.id,
                        b.source.as_str().to_ascii_lowercase().replace('_', " "),
                        b.created_at.strftime("%Y-%m-%d")
                    )
                })
                .collect();
            let _ = write!(
                html,
                "<tr class=\"target\" data-target=\"{}\"><td>{}</td><td>{} {} <small>({})</small></td>\
                 <td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&target.target),
                esc(&name),
                target.last_status.as_str(),
                target.last_reason.map_or("", FailureReason::as_str),
                ago(now, target.last_at),
                target.failures_in_a_row,
                target
                    .last_success
                    .map_or("none read".into(), |at| ago(now, at)),
                esc(&failures.join("; ")),
                esc(&blocks.join("; ")),
            );
        }
        html.push_str("</table>");
    }
    html.push_str("</section>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_the_visitor_typed_is_escaped() {
        let html = render(&Page {
            replica: "1-a on host",
            broker_up: false,
            now: Timestamp::UNIX_EPOCH,
            overview: None,
            tenant: "\"><script>alert(1)</script>",
            account: "a&b",
            diagnosis: Some(Err("<b>no</b>".into())),
        });
        assert!(
            !html.contains("<script>") && !html.contains("<b>no"),
            "{html}"
        );
        assert!(html.contains("&quot;&gt;&lt;script&gt;") && html.contains("a&amp;b"));
        assert!(html.contains(r#"class="down">not consuming"#));
        // A page showing a diagnosis does not reload under the reader.
        assert!(!html.contains("http-equiv=\"refresh\""));
    }
}
