//! Secrets out of everything printed: URL passwords and secret options or query parameters
//! masked. A ground-floor module, so every layer (repository, connections, config) masks the
//! same way without importing the config.

/// What replaces a secret in anything printed.
pub const MASK: &str = "********";

/// Words that mark an option or query parameter as a secret.
const SECRET_WORDS: &[&str] = &[
    "secret",
    "password",
    "passwd",
    "key",
    "token",
    "sas",
    "credential",
    "signature",
];

/// Whether an option (or URL query parameter) named `key` holds a secret: its name contains
/// secret, password, key, token, sas, credential or signature (`access_key`, `account_key`,
/// `sas_token`...), or is `sig` (an Azure SAS signature). Case-insensitive.
pub fn is_secret_option(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    key == "sig" || SECRET_WORDS.iter().any(|word| key.contains(word))
}

/// `url` with its userinfo password and any secret query parameters replaced by `********`;
/// anything that is not a URL is returned unchanged. Use it on every URL that reaches a log line
/// or an error message.
///
/// `postgres://app:hunter2@db/app` → `postgres://app:********@db/app`;
/// `https://acct.blob.core.windows.net/c?sv=2022&sig=abc` → `...?sv=2022&sig=********`.
pub fn mask_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let authority_start = scheme_end + 3;
    let rest = &url[authority_start..];
    let mut authority_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_len];
    // An unencoded '/', '?' or '#' in a password ends the authority early: "user:pa/ss@host".
    // A ':' not followed by a port number means userinfo; mask up to the last '@' (over-masking
    // beats leaking).
    if !authority.contains('@') && !authority.starts_with('[') {
        let not_port = authority
            .split_once(':')
            .is_some_and(|(_, after)| !after.chars().all(|c| c.is_ascii_digit()));
        if let Some(at) = rest.rfind('@').filter(|_| not_port) {
            authority_len = rest[at..]
                .find(['/', '?', '#'])
                .map_or(rest.len(), |i| at + i);
        }
    }
    let authority = &rest[..authority_len];
    let mut out = String::with_capacity(url.len());
    out.push_str(&url[..authority_start]);
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            match userinfo.find(':') {
                Some(colon) => {
                    out.push_str(&userinfo[..=colon]);
                    out.push_str(MASK);
                }
                None => out.push_str(userinfo),
            }
            out.push_str(&authority[at..]);
        }
        None => out.push_str(authority),
    }
    let rest = &rest[authority_len..];
    let (before_fragment, fragment) = match rest.find('#') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match before_fragment.split_once('?') {
        Some((path, query)) => {
            out.push_str(path);
            out.push('?');
            out.push_str(&mask_query(query));
        }
        None => out.push_str(before_fragment),
    }
    out.push_str(fragment);
    out
}

fn mask_query(query: &str) -> String {
    query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _)) if is_secret_option(name) => format!("{name}={MASK}"),
            _ => pair.to_string(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_url_redacts_passwords_and_secret_parameters() {
        let cases = [
            (
                "postgres://user:pass@host:5432/db",
                "postgres://user:********@host:5432/db",
            ),
            ("postgres://user@host/db", "postgres://user@host/db"),
            (
                "postgresql://u:p%40ss@h/db?sslmode=require",
                "postgresql://u:********@h/db?sslmode=require",
            ),
            (
                "https://a.blob.core.windows.net/c?sv=1&sig=abc#f",
                "https://a.blob.core.windows.net/c?sv=1&sig=********#f",
            ),
            (
                "s3://bucket/prefix?token=t&x=1",
                "s3://bucket/prefix?token=********&x=1",
            ),
            ("s3://bucket/p@th", "s3://bucket/p@th"),
            ("file:///var/app.db", "file:///var/app.db"),
            ("/var/app.db", "/var/app.db"),
            ("not a url", "not a url"),
            ("postgres://u:pa/ss@h/db", "postgres://u:********@h/db"),
            (
                "postgres://u:pa?s#s@h/db?x=1",
                "postgres://u:********@h/db?x=1",
            ),
            ("postgres://u:p@ss@h/db", "postgres://u:********@h/db"),
            ("http://host:9000/a@b", "http://host:9000/a@b"),
            ("http://[::1]:9000/a@b", "http://[::1]:9000/a@b"),
            (
                "https://h/x?X-Amz-Signature=s&X-Amz-Security-Token=t",
                "https://h/x?X-Amz-Signature=********&X-Amz-Security-Token=********",
            ),
        ];
        for (url, want) in cases {
            assert_eq!(mask_url(url), want, "{url}");
        }
        assert!(is_secret_option("AWS_SECRET_ACCESS_KEY"));
        assert!(!is_secret_option("endpoint"));
    }
}
