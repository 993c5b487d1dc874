//! The gate's own pages: small, accessible HTML with no external assets
//! and no scripts, served with the strict [`CSP`] (only the inline style of
//! the page itself is allowed).

/// The Content-Security-Policy sent with every gate page: no scripts, no
/// frames, forms post only to this origin.
pub const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// HTML-escape text for element content and attribute values.
pub fn escape(text: &str) -> String {
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

const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:28rem;margin:3rem auto;padding:0 1rem;line-height:1.5}\
label{display:block;margin:.5rem 0 .25rem}input{font-size:1rem;padding:.4rem;width:100%;box-sizing:border-box}\
button{font-size:1rem;padding:.5rem 1rem;margin-top:.75rem}";

/// A whole page. `body` is trusted HTML built by the functions below.
fn page(title: &str, body: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<meta name=\"referrer\" content=\"same-origin\">\
<title>{t}</title><style>{STYLE}</style></head>\
<body><main><h1>{t}</h1>{body}</main></body></html>\n",
        t = escape(title)
    )
}

fn hidden(name: &str, value: &str) -> String {
    format!(
        "<input type=\"hidden\" name=\"{}\" value=\"{}\">",
        escape(name),
        escape(value)
    )
}

/// A note on what went wrong, announced to screen readers; empty without one.
fn alert(note: Option<&str>) -> String {
    note.map(|n| format!("<p role=\"alert\">{}</p>", escape(n)))
        .unwrap_or_default()
}

/// The sign-in form.
pub fn sign_in(action: &str, csrf: &str, next: &str, note: Option<&str>) -> String {
    let note = alert(note);
    page(
        "Sign in",
        &format!(
            "{note}<p>Enter your email address. If it may use this site, you will receive a sign-in link and a code.</p>\
<form method=\"post\" action=\"{a}\">{c}{n}\
<label for=\"email\">Email address</label>\
<input id=\"email\" name=\"email\" type=\"email\" autocomplete=\"email\" required autofocus>\
<button type=\"submit\">Send sign-in link</button></form>",
            a = escape(action),
            c = hidden("csrf", csrf),
            n = hidden("next", next),
        ),
    )
}

/// After a sign-in request: the same for every address.
pub fn check_mail(code_action: &str, csrf: &str, note: Option<&str>) -> String {
    let note = alert(note);
    page(
        "Check your mail",
        &format!(
            "{note}<p>If this address may use this site, a mail with a sign-in link and a 6-digit code is on its way. \
Open the link in this browser, or type the code here.</p>\
<form method=\"post\" action=\"{a}\">{c}\
<label for=\"code\">6-digit code</label>\
<input id=\"code\" name=\"code\" inputmode=\"numeric\" autocomplete=\"one-time-code\" pattern=\"[0-9 -]*\" required>\
<button type=\"submit\">Sign in</button></form>",
            a = escape(code_action),
            c = hidden("csrf", csrf),
        ),
    )
}

/// What a mailed link opens: a button that POSTs the token (mail scanners
/// only GET).
pub fn confirm_link(action: &str, csrf: &str, token: &str) -> String {
    page(
        "Sign in",
        &format!(
            "<p>Press the button to finish signing in.</p>\
<form method=\"post\" action=\"{a}\">{c}{t}<button type=\"submit\">Sign in</button></form>",
            a = escape(action),
            c = hidden("csrf", csrf),
            t = hidden("token", token),
        ),
    )
}

/// A message page with a link back to the start.
pub fn message(title: &str, text: &str, back: &str) -> String {
    page(
        title,
        &format!(
            "<p>{}</p><p><a href=\"{}\">Back to sign-in</a></p>",
            escape(text),
            escape(back)
        ),
    )
}

/// The logout form (signed-in users reach it at the gate's logout path).
pub fn logout(action: &str, csrf: &str, email: &str) -> String {
    page(
        "Sign out",
        &format!(
            "<p>Signed in as {e}.</p><form method=\"post\" action=\"{a}\">{c}<button type=\"submit\">Sign out</button></form>",
            e = escape(email),
            a = escape(action),
            c = hidden("csrf", csrf),
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_escaped() {
        let html = sign_in("/a", "c", "/x\"><script>", Some("<b>"));
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("&quot;&gt;&lt;script&gt;"));
        assert!(html.contains("&lt;b&gt;"));
        assert!(html.contains("<label for=\"email\">"));
    }
}
