//! Round trips and tamper detection of the object format.

use std::io::{Read, Write};

use proptest::prelude::*;
use rand::RngCore;

use super::*;

const S: usize = 1 << SEGMENT_LOG2;

fn keys() -> KeySet {
    MasterKey::from_bytes([42; 32]).derive()
}

fn zstd3() -> SealOptions {
    SealOptions {
        codec: Codec::Zstd,
        level: 3,
    }
}

fn plain() -> SealOptions {
    SealOptions {
        codec: Codec::None,
        level: 0,
    }
}

/// Deterministic data: half compressible text, half pseudo-random bytes.
fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..len)
        .map(|i| {
            if (i / 1000) % 2 == 0 {
                b"contract clause "[i % 16]
            } else {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            }
        })
        .collect()
}

fn stream_seal(keys: &KeySet, kind: Kind, name: &str, bytes: &[u8], o: SealOptions) -> Vec<u8> {
    let mut w = ObjectWriter::new(Vec::new(), keys, kind, name, o).unwrap();
    // Uneven write sizes exercise the segment buffering.
    for piece in bytes.chunks(7777) {
        w.write_all(piece).unwrap();
    }
    w.finish().unwrap()
}

#[test]
fn boundary_sizes_round_trip_both_ways() {
    let k = keys();
    for len in [0, 1, S - 1, S, S + 1, 2 * S - 1, 2 * S, 3 * S + 5] {
        let d = data(len, len as u64);
        for o in [plain(), zstd3()] {
            let sealed = seal(&k, Kind::Chunk, "chunks/x", &d, o);
            assert_eq!(
                open(&k, Kind::Chunk, "chunks/x", &sealed).unwrap(),
                d,
                "len {len}"
            );
            let streamed = stream_seal(&k, Kind::Chunk, "chunks/x", &d, o);
            assert_eq!(open(&k, Kind::Chunk, "chunks/x", &streamed).unwrap(), d);
        }
    }
}

#[test]
fn sixty_four_mib_streams_in_bounded_pieces() {
    let k = keys();
    let d = data(64 << 20, 9);
    let sealed = stream_seal(&k, Kind::Snapshot, "snapshots/big", &d, zstd3());
    let mut r = ObjectReader::new(&sealed[..], &k, Kind::Snapshot, "snapshots/big").unwrap();
    let mut buf = vec![0u8; 100_000];
    let mut offset = 0;
    loop {
        let n = r.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        assert_eq!(&buf[..n], &d[offset..offset + n]);
        offset += n;
    }
    assert_eq!(offset, d.len());
}

#[test]
fn incompressible_chunks_are_stored_plain() {
    let k = keys();
    let mut d = vec![0u8; 10_000];
    rand::rngs::OsRng.fill_bytes(&mut d);
    let sealed = seal(&k, Kind::Chunk, "c", &d, zstd3());
    assert_eq!(sealed[9], Codec::None as u8);
    assert_eq!(open(&k, Kind::Chunk, "c", &sealed).unwrap(), d);
}

fn is_auth_failure(e: &OpenError) -> bool {
    !matches!(e, OpenError::Io(_))
}

#[test]
fn every_flipped_byte_fails_to_open() {
    let k = keys();
    let d = data(2 * S + 100, 1);
    for o in [plain(), zstd3()] {
        let sealed = seal(&k, Kind::Chunk, "n", &d, o);
        // Every byte of a small object, and a stride through the big one.
        let small = seal(&k, Kind::Chunk, "n", b"hello", o);
        for i in 0..small.len() {
            let mut bad = small.clone();
            bad[i] ^= 0x01;
            let err = open(&k, Kind::Chunk, "n", &bad).unwrap_err();
            assert!(is_auth_failure(&err), "byte {i}: {err}");
        }
        for i in (0..sealed.len()).step_by(997) {
            let mut bad = sealed.clone();
            bad[i] ^= 0x80;
            assert!(open(&k, Kind::Chunk, "n", &bad).is_err(), "byte {i}");
        }
    }
}

#[test]
fn truncation_at_every_segment_boundary_fails() {
    let k = keys();
    let d = data(3 * S, 2);
    let sealed = seal(&k, Kind::Chunk, "n", &d, plain());
    let seg = S + segments::TAG_LEN;
    for cut in [
        0,
        HEADER_LEN,
        HEADER_LEN + seg,
        HEADER_LEN + 2 * seg,
        HEADER_LEN + 3 * seg,
    ] {
        let err = open(&k, Kind::Chunk, "n", &sealed[..cut]).unwrap_err();
        assert!(is_auth_failure(&err), "cut at {cut}: {err}");
    }
    // Cutting inside a segment or dropping the last byte fails too.
    assert!(open(&k, Kind::Chunk, "n", &sealed[..sealed.len() - 1]).is_err());
    // Appending anything fails.
    let mut longer = sealed.clone();
    longer.push(0);
    assert!(open(&k, Kind::Chunk, "n", &longer).is_err());
}

#[test]
fn reordered_segments_fail() {
    let k = keys();
    let d = data(3 * S + 10, 3);
    let sealed = seal(&k, Kind::Chunk, "n", &d, plain());
    let seg = S + segments::TAG_LEN;
    let mut swapped = sealed.clone();
    let (a, b) = (HEADER_LEN, HEADER_LEN + seg);
    let first = sealed[a..a + seg].to_vec();
    swapped.copy_within(b..b + seg, a);
    swapped[b..b + seg].copy_from_slice(&first);
    assert!(matches!(
        open(&k, Kind::Chunk, "n", &swapped),
        Err(OpenError::Authentication { segment: 0 })
    ));
}

#[test]
fn renamed_or_swapped_objects_fail() {
    let k = keys();
    let a = seal(&k, Kind::Chunk, "chunks/aa/a", b"first object", zstd3());
    let b = seal(&k, Kind::Chunk, "chunks/bb/b", b"second object", zstd3());
    assert!(matches!(
        open(&k, Kind::Chunk, "chunks/bb/b", &a),
        Err(OpenError::Authentication { .. })
    ));
    assert!(open(&k, Kind::Chunk, "chunks/aa/a", &b).is_err());
    // Same name, different kind: refused before decryption.
    assert!(matches!(
        open(&k, Kind::Snapshot, "chunks/aa/a", &a),
        Err(OpenError::WrongKind { .. })
    ));
}

#[test]
fn another_key_is_named_as_such() {
    let other = MasterKey::from_bytes([1; 32]).derive();
    let sealed = seal(&keys(), Kind::Chunk, "n", b"x", zstd3());
    assert!(matches!(
        open(&other, Kind::Chunk, "n", &sealed),
        Err(OpenError::UnknownKeyId { .. })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn round_trip_any_size(len in prop_oneof![0usize..600, (S - 600)..(S + 600), (2 * S - 50)..(4 * S + 50)],
                           seed in any::<u64>(), zstd in any::<bool>()) {
        let k = keys();
        let d = data(len, seed);
        let o = if zstd { zstd3() } else { plain() };
        let streamed = stream_seal(&k, Kind::Segment, "changelog/x", &d, o);
        prop_assert_eq!(open(&k, Kind::Segment, "changelog/x", &streamed).unwrap(), d.clone());
        let sealed = seal(&k, Kind::Segment, "changelog/x", &d, o);
        prop_assert_eq!(open(&k, Kind::Segment, "changelog/x", &sealed).unwrap(), d);
    }

    #[test]
    fn any_single_flip_fails(len in 0usize..(2 * S + 10), pos in any::<prop::sample::Index>(),
                             bit in 0u8..8, seed in any::<u64>()) {
        let k = keys();
        let sealed = seal(&k, Kind::Chunk, "n", &data(len, seed), zstd3());
        let mut bad = sealed.clone();
        let i = pos.index(bad.len());
        bad[i] ^= 1 << bit;
        prop_assert!(open(&k, Kind::Chunk, "n", &bad).is_err());
    }
}
