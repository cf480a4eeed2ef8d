//! Process-wide tuning of glibc's allocator, for the binary and the benchmarks to call once
//! at start.
//!
//! Every chunk read or written passes through a fresh buffer of up to a few MiB (a sealed
//! object, its plaintext). glibc's malloc serves each of those with its own `mmap` and returns
//! it with `munmap` on free, so every chunk costs a page fault per 4 KiB touched: in a 1 GB
//! PostgreSQL restore that was about 0.4 s of the client's 0.8 s of system time, on cores the
//! server needs. Raising the mapping threshold above the largest buffer keeps them in the heap,
//! where freed ones are reused: that restore's system time fell to 0.4-0.5 s, its resident
//! memory rose from about 110 MB to 175-195 MB.

/// Buffers below this come from the heap, not from a mapping of their own (32 MiB is the
/// most glibc accepts on 64-bit).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 32 << 20;

/// Free heap memory at the top is returned to the kernel once it exceeds this.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: libc::c_int = 256 << 20;

/// Keep multi-MiB buffers in the heap (glibc only; elsewhere nothing to do). Returns whether
/// the allocator took the settings.
pub fn tune() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes malloc's parameters; it is called before the runtime
        // starts any thread and takes plain integers.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_takes_the_settings() {
        assert!(super::tune());
    }
}
