//! AES-256-GCM STREAM over fixed-size segments (docs/FORMAT.md §2.3).
//!
//! [`Sealer`] is a `Write` adapter that encrypts whatever is written through it; [`Opener`] is a
//! `Read` adapter that yields only authenticated plaintext and reports end of stream only after
//! the final segment has been authenticated and nothing follows it. Both hold one segment in
//! memory, whatever the object size.

use std::io::{self, Read, Write};

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};

use super::OpenError;

pub const TAG_LEN: usize = 16;

fn nonce(counter: u64, last: bool) -> Nonce<aes_gcm::aead::consts::U12> {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&counter.to_be_bytes());
    n[11] = u8::from(last);
    n.into()
}

/// Encrypts a byte stream into sealed segments written to `inner`.
pub struct Sealer<W: Write> {
    inner: W,
    cipher: Aes256Gcm,
    aad: Vec<u8>,
    segment: usize,
    buf: Vec<u8>,
    counter: u64,
}

impl<W: Write> Sealer<W> {
    pub fn new(inner: W, key: &[u8; 32], aad: Vec<u8>, segment: usize) -> Self {
        Sealer {
            inner,
            cipher: Aes256Gcm::new_from_slice(key).expect("32-byte key"),
            aad,
            segment,
            buf: Vec::with_capacity(segment + TAG_LEN),
            counter: 0,
        }
    }

    fn seal_buffer(&mut self, last: bool) -> io::Result<()> {
        let tag = self
            .cipher
            .encrypt_inout_detached(
                &nonce(self.counter, last),
                &self.aad,
                self.buf.as_mut_slice().into(),
            )
            .map_err(|_| io::Error::other("aes-gcm refused to seal a segment"))?;
        self.buf.extend_from_slice(&tag);
        self.inner.write_all(&self.buf)?;
        self.buf.clear();
        self.counter += 1;
        Ok(())
    }

    /// Seal the final (short, possibly empty) segment and return the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.seal_buffer(true)?;
        self.inner.flush()?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for Sealer<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = self.segment - self.buf.len();
        let take = room.min(data.len());
        self.buf.extend_from_slice(&data[..take]);
        if self.buf.len() == self.segment {
            self.seal_buffer(false)?;
        }
        Ok(take)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Decrypts sealed segments from `inner`, yielding authenticated plaintext only.
pub struct Opener<R: Read> {
    inner: R,
    cipher: Aes256Gcm,
    aad: Vec<u8>,
    segment: usize,
    buf: Vec<u8>,
    pos: usize,
    counter: u64,
    done: bool,
}

impl<R: Read> Opener<R> {
    pub fn new(inner: R, key: &[u8; 32], aad: Vec<u8>, segment: usize) -> Self {
        Opener {
            inner,
            cipher: Aes256Gcm::new_from_slice(key).expect("32-byte key"),
            aad,
            segment,
            buf: Vec::with_capacity(segment + TAG_LEN),
            pos: 0,
            counter: 0,
            done: false,
        }
    }

    /// Read and authenticate the next segment into `buf`.
    fn next_segment(&mut self) -> Result<(), OpenError> {
        self.buf.resize(self.segment + TAG_LEN, 0);
        let got = read_full(&mut self.inner, &mut self.buf).map_err(OpenError::Io)?;
        if got < TAG_LEN {
            return Err(OpenError::Truncated);
        }
        let last = got < self.segment + TAG_LEN;
        self.buf.truncate(got);
        let split = got - TAG_LEN;
        let tag =
            Tag::<aes_gcm::aead::consts::U16>::try_from(&self.buf[split..]).expect("16-byte tag");
        let nonce = nonce(self.counter, last);
        self.cipher
            .decrypt_inout_detached(&nonce, &self.aad, (&mut self.buf[..split]).into(), &tag)
            .map_err(|_| OpenError::Authentication {
                segment: self.counter,
            })?;
        self.buf.truncate(split);
        self.pos = 0;
        self.counter += 1;
        if last {
            let mut probe = [0u8; 1];
            if read_full(&mut self.inner, &mut probe).map_err(OpenError::Io)? != 0 {
                return Err(OpenError::TrailingData);
            }
            self.done = true;
        }
        Ok(())
    }
}

impl<R: Read> Read for Opener<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.buf.len() {
            if self.done {
                return Ok(0);
            }
            self.next_segment().map_err(OpenError::into_io)?;
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Read until `buf` is full or the reader is exhausted; returns the bytes read.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}
