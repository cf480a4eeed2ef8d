//! COPY text format, as snapshot table images store rows: one row per line, tab-separated,
//! `\N` for NULL, backslash escapes. A grouped snapshot's rows end with their tenant's text
//! while they are copied; it is split off before the row is stored.

/// A COPY row with the tenant's text as its last field: the row without it (newline kept)
/// into `row`, and the tenant (`None` for `\N`).
pub fn split_tenant(data: &[u8], row: &mut Vec<u8>) -> Option<String> {
    let line = data.strip_suffix(b"\n").unwrap_or(data);
    let (fields, tenant) = match line.iter().rposition(|&b| b == b'\t') {
        Some(tab) => (&line[..tab], &line[tab + 1..]),
        None => (&line[..0], line),
    };
    row.clear();
    row.extend_from_slice(fields);
    row.push(b'\n');
    (tenant != b"\\N").then(|| copy_unescape(tenant))
}

/// A COPY text field's value (its escapes decoded).
fn copy_unescape(field: &[u8]) -> String {
    let mut out = Vec::with_capacity(field.len());
    copy_unescape_into(field, &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// A COPY text field with its escapes decoded, into `out` (cleared first): `\b \f \n \r \t
/// \v`, octal `\ooo`, hex `\xhh`, and a backslash before any other byte stands for that byte.
pub fn copy_unescape_into(field: &[u8], out: &mut Vec<u8>) {
    out.clear();
    let mut i = 0;
    while let Some(at) = memchr::memchr(b'\\', &field[i..]) {
        out.extend_from_slice(&field[i..i + at]);
        i += at + 1;
        let Some(&c) = field.get(i) else {
            out.push(b'\\');
            return;
        };
        i += 1;
        match c {
            b'b' => out.push(8),
            b'f' => out.push(12),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(11),
            b'0'..=b'7' => {
                let mut v = u32::from(c - b'0');
                for _ in 0..2 {
                    match field.get(i) {
                        Some(&d @ b'0'..=b'7') => {
                            v = v * 8 + u32::from(d - b'0');
                            i += 1;
                        }
                        _ => break,
                    }
                }
                out.push(v as u8);
            }
            b'x' if field.get(i).is_some_and(u8::is_ascii_hexdigit) => {
                let mut v = 0u8;
                for _ in 0..2 {
                    match field.get(i).and_then(|&d| (d as char).to_digit(16)) {
                        Some(d) => {
                            v = v * 16 + d as u8;
                            i += 1;
                        }
                        None => break,
                    }
                }
                out.push(v);
            }
            other => out.push(other),
        }
    }
    out.extend_from_slice(&field[i..]);
}
