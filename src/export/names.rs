//! Names of the export's spool files and archive entries, derived from identifiers and keys
//! that the exporting operator does not control.
//!
//! A table may be called `../x`, `a/b` or hold a newline (PostgreSQL and SQLite accept any
//! quoted identifier), and an object key may hold control characters or empty segments. Joined
//! into a path as they are, such names would write a spool file outside the scratch directory,
//! or put an entry in the archive that climbs out of the directory it is unpacked in, or break
//! `SHA256SUMS` lines and terminals. So every name is percent-encoded (docs/FORMAT.md §9):
//! reversible, the same on every platform, and plain names stay as they are.

/// `name` as one safe path component: `%`, `/`, `\` and control characters (C0, DEL, and the
/// C1 range) written `%XX` per UTF-8 byte (uppercase hex); a name that is `.` or `..` written
/// `%2E` / `%2E%2E`. Any other character, including non-ASCII letters, is kept.
pub fn component(name: &str) -> String {
    match name {
        "." => return "%2E".into(),
        ".." => return "%2E%2E".into(),
        _ => {}
    }
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if c == '%' || c == '/' || c == '\\' || c.is_control() {
            let mut bytes = [0u8; 4];
            for b in c.encode_utf8(&mut bytes).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// An object key as a relative path: its segments kept as directories when every segment is
/// a usable name (not empty, not `.` or `..`), each segment encoded as a [`component`];
/// otherwise the whole key as one component (every `/` encoded), so nothing can climb out of
/// `files/` or collide with a directory.
pub fn key_path(key: &str) -> String {
    let usable = |s: &str| !s.is_empty() && s != "." && s != "..";
    if key.split('/').all(usable) {
        key.split('/').map(component).collect::<Vec<_>>().join("/")
    } else {
        component(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decode `%XX` escapes (the customer's side of [`component`] and [`key_path`]).
    fn decode(text: &str) -> String {
        let bytes = text.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' {
                out.push(u8::from_str_radix(&text[i + 1..i + 3], 16).unwrap());
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn identifiers_become_one_safe_component() {
        let cases = [
            ("contracts", "contracts"),
            ("public.plans", "public.plans"),
            ("Verträge", "Verträge"),
            ("../etc/passwd", "..%2Fetc%2Fpasswd"),
            ("a\\b", "a%5Cb"),
            ("line\nbreak\r", "line%0Abreak%0D"),
            ("\u{1b}[2J", "%1B[2J"),
            ("\u{85}next", "%C2%85next"),
            ("100%", "100%25"),
            (".", "%2E"),
            ("..", "%2E%2E"),
            ("...", "..."),
        ];
        for (name, encoded) in cases {
            assert_eq!(component(name), encoded, "{name:?}");
            assert_eq!(decode(encoded), name, "{encoded}");
            assert!(!encoded.contains('/') && !encoded.chars().any(char::is_control));
        }
    }

    #[test]
    fn keys_keep_their_directories_unless_a_segment_is_unusable() {
        let cases = [
            ("tenants/1/a.pdf", "tenants/1/a.pdf"),
            ("tenants/1/x\ny.pdf", "tenants/1/x%0Ay.pdf"),
            ("tenants/1/../2/a.pdf", "tenants%2F1%2F..%2F2%2Fa.pdf"),
            ("/abs", "%2Fabs"),
            ("dir/", "dir%2F"),
            ("a//b", "a%2F%2Fb"),
            ("./a", ".%2Fa"),
        ];
        for (key, path) in cases {
            assert_eq!(key_path(key), path, "{key:?}");
            assert_eq!(decode(path), key, "{path}");
            assert!(path
                .split('/')
                .all(|s| !s.is_empty() && s != "." && s != ".."));
        }
    }
}
