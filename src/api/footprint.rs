//! What an ingest request costs in memory while the server holds it, so
//! that the one budget of `INGEST_HTTP_BUFFER_BYTES` counts it all.
//!
//! The raw body is counted as it arrives (by the HTTP layer). Parsing it
//! builds a tree of `serde_json::Value`s that can be many times larger than
//! the text: `[0,0,0,…]` spends two bytes of body on each element and 32
//! bytes of tree, more while its vector grows, plus a heap allocation for
//! the number's text (serde_json's `arbitrary_precision` keeps every number
//! as text). [`parsed_bound`] gives, from one scan of the text and before
//! anything is parsed, an upper bound of the most the parse and the parsed
//! events occupy at any moment; the caller reserves it first and refuses
//! the request when it does not fit. This module owns only the arithmetic,
//! not the budget.

/// Bytes one JSON value may take in its parent's storage at the peak of a
/// parse: a 32-byte `Value` in a vector that may be twice as large as its
/// contents, briefly three times while it grows (old and new buffers), and
/// four times for a single element (a vector's first allocation holds four).
const PER_VALUE: usize = 4 * std::mem::size_of::<serde_json::Value>();

/// Extra bytes of one object member: its key's `String` and its share of
/// the B-tree node that holds it (nodes are at least half full).
const PER_MEMBER: usize =
    2 * (std::mem::size_of::<String>() + std::mem::size_of::<serde_json::Value>());

/// Bytes of one non-empty object's first B-tree node, allocated whole (11
/// keys and values) however few members it holds.
const PER_OBJECT: usize =
    11 * (std::mem::size_of::<String>() + std::mem::size_of::<serde_json::Value>()) + 64;

/// Bytes of a string's contents beyond its text (allocator rounding).
const PER_STRING: usize = 16;

/// Bytes of one number beyond the copy of its text that the body accounts
/// for. serde_json keeps the text in a `String` that starts with room for
/// 16 bytes and doubles as it fills, and adds a sign to an exponent
/// (`1e5` is kept as `1e+5`): a number of `n` bytes of body holds at most
/// `max(16, 2 × (n + 1))` bytes, counted as `n` per number byte (see
/// [`parsed_bound`]) plus this, which includes allocator rounding.
const PER_NUMBER: usize = 16 + 2 + 16;

/// Bytes, per byte of the longest number, of the buffers that parsing one
/// number holds at once: serde_json scans it into a buffer (up to twice its
/// length), then parses that text again into a second one that grows the
/// same way, holding its old and new blocks while it grows. Only one
/// number is being parsed at a time.
const NUMBER_PARSE_FACTOR: usize = 5;

/// Bytes of one event beyond its values: the `NewEvent` it becomes, twice
/// (the batch's items and its events are both held while it converts).
const PER_EVENT: usize = 2 * std::mem::size_of::<crate::store::NewEvent>();

/// An upper bound of the memory that parsing `body` (a JSON text) into
/// `serde_json::Value`s and keeping the result takes at its peak, the text
/// itself not included. Linear in the body, computed without allocating.
pub fn parsed_bound(body: &[u8]) -> usize {
    let (mut values, mut members, mut strings, mut events) = (1usize, 0usize, 0usize, 1usize);
    // Objects with at least one member (an empty map allocates nothing).
    let (mut objects, mut opened_object) = (0usize, false);
    let (mut text, mut depth) = (crate::api::ingest::Strings::default(), 0usize);
    // Numbers, the bytes they span, and the longest one.
    let (mut numbers, mut number_bytes, mut longest) = (0usize, 0usize, 0usize);
    let (mut in_number, mut number_len) = (false, 0usize);
    for &b in body {
        if !text.outside(b) {
            continue;
        }
        // A number starts with a digit or a minus sign and runs on through
        // digits, points, exponents and signs.
        let starts = b == b'-' || b.is_ascii_digit();
        if starts || (in_number && matches!(b, b'.' | b'e' | b'E' | b'+')) {
            if !in_number {
                (in_number, number_len) = (true, 0);
                numbers += 1;
            }
            number_len += 1;
            number_bytes += 1;
            longest = longest.max(number_len);
            continue;
        }
        in_number = false;
        match b {
            b'"' => strings += 1,
            // Each element or member after the first, and each first one.
            b',' => {
                values += 1;
                // An item of a batch (a top-level array).
                if depth == 1 {
                    events += 1;
                }
            }
            b'[' | b'{' => {
                values += 1;
                depth += 1;
                opened_object = b == b'{';
            }
            b']' | b'}' => {
                opened_object = false;
                depth = depth.saturating_sub(1);
            }
            b':' => {
                members += 1;
                objects += usize::from(opened_object);
                opened_object = false;
            }
            _ => {}
        }
    }
    // String contents are never longer than their text in the body.
    body.len()
        .saturating_add(numbers.saturating_mul(PER_NUMBER))
        .saturating_add(number_bytes)
        .saturating_add(NUMBER_PARSE_FACTOR.saturating_mul(longest.saturating_add(2)))
        .saturating_add(events.saturating_mul(PER_EVENT))
        .saturating_add(values.saturating_mul(PER_VALUE))
        .saturating_add(members.saturating_mul(PER_MEMBER))
        .saturating_add(objects.saturating_mul(PER_OBJECT))
        .saturating_add(strings.saturating_mul(PER_STRING))
}

/// Keeps the C allocator from holding on to memory the process freed, on
/// glibc (musl's allocator returns it by itself). Request bodies and their
/// parsed events are large, short-lived and allocated on many threads: with
/// its defaults glibc raises its mmap threshold after the first large free,
/// so later bodies come from per-thread heaps (one per thread, up to eight
/// per core) that fragment and are not given back, and the resident size
/// grows well past what is live. Measured with 64 clients posting 5 MB
/// batches and a 256 MiB budget: a peak of 415 MB with glibc's defaults,
/// 285 MB with a fixed threshold and four heaps. A
/// variable the user set (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_ARENA_MAX`,
/// `GLIBC_TUNABLES`) is left as it is. The binary calls this once at start-up; a program
/// embedding the library decides for itself.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        // From glibc's malloc.h.
        const M_MMAP_THRESHOLD: i32 = -3;
        const M_ARENA_MAX: i32 = -8;
        // The user's own tuning of glibc's allocator wins.
        if std::env::var_os("GLIBC_TUNABLES").is_some() {
            return;
        }
        if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
            // Blocks of 128 KiB and more are mapped and unmapped on their own.
            // SAFETY: mallopt only sets a parameter of the allocator.
            unsafe { mallopt(M_MMAP_THRESHOLD, 128 * 1024) };
        }
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
            // SAFETY: as above.
            unsafe { mallopt(M_ARENA_MAX, 4) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parsed_bound;
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    /// Counts, per thread, the bytes live and the most live at once, so
    /// that a test measures what a parse really allocates.
    struct Counting;

    thread_local! {
        static LIVE: Cell<usize> = const { Cell::new(0) };
        static PEAK: Cell<usize> = const { Cell::new(0) };
    }

    fn add(bytes: usize) {
        LIVE.with(|live| {
            let now = live.get() + bytes;
            live.set(now);
            PEAK.with(|peak| peak.set(peak.get().max(now)));
        });
    }

    fn sub(bytes: usize) {
        LIVE.with(|live| live.set(live.get().saturating_sub(bytes)));
    }

    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            add(layout.size());
            unsafe { System.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            sub(layout.size());
            unsafe { System.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            // Old and new blocks may both be live while the data moves.
            add(new_size);
            let new = unsafe { System.realloc(ptr, layout, new_size) };
            sub(layout.size());
            new
        }
    }

    #[global_allocator]
    static ALLOCATOR: Counting = Counting;

    /// The peak of bytes live while `body` is parsed into an ingest body
    /// and the result is held, above what was live before.
    fn parse_peak(body: &[u8]) -> usize {
        let limits = crate::api::ingest::Limits {
            max_batch: 100_000,
            max_payload_bytes: usize::MAX,
            max_depth: 100,
        };
        let before = LIVE.with(Cell::get);
        PEAK.with(|peak| peak.set(before));
        let parsed = crate::api::ingest::parse(body, &limits).expect("valid body");
        let peak = PEAK.with(Cell::get) - before;
        drop(parsed);
        peak
    }

    #[test]
    fn the_bound_covers_what_parsing_really_allocates() {
        let numbers = format!("{{\"payload\":[{}0]}}", "0,".repeat(50_000));
        let members: String = (0..20_000).map(|i| format!("\"k{i}\":{i},")).collect();
        let object = format!("{{\"payload\":{{{}\"end\":1}}}}", members);
        let strings = format!(
            "[{}{{\"payload\":\"x\"}}]",
            "{\"payload\":\"a\",\"type\":\"t\",\"key\":\"k\"},".repeat(5_000)
        );
        let big = format!(
            "[{}{{\"payload\":1}}]",
            format!("{{\"payload\":\"{}\"}},", "x".repeat(5_000)).repeat(100)
        );
        let nested = format!("{{\"payload\":{}1{}}}", "[".repeat(90), "]".repeat(90));
        let empties = format!("{{\"payload\":[{}[]]}}", "[],{},\"\",".repeat(10_000));
        // Numbers beyond 64 bits, and any with a point or an exponent, are
        // kept as their text (serde_json's arbitrary_precision); an
        // exponent's sign is added (1e5 becomes 1e+5).
        let long_numbers = format!(
            "{{\"payload\":[{}0]}}",
            "123456789012345678901234567890,".repeat(20_000)
        );
        let decimals = format!("{{\"payload\":[{}0]}}", "1.5,-0.25,1e5,".repeat(20_000));
        let huge_number = format!("{{\"payload\":1{}}}", "0".repeat(100_000));
        let sizes: String = (0..2_000)
            .map(|i| format!("1{}.5,", "9".repeat(i % 200)))
            .collect();
        let sized_numbers = format!("{{\"payload\":[{sizes}0]}}");
        for (name, body) in [
            ("numbers", numbers),
            ("long numbers", long_numbers),
            ("decimals", decimals),
            ("a huge number", huge_number),
            ("numbers of every size", sized_numbers),
            ("members", object),
            ("small strings", strings),
            ("large strings", big),
            ("nested", nested),
            ("empty containers", empties),
        ] {
            let peak = parse_peak(body.as_bytes());
            let bound = parsed_bound(body.as_bytes());
            assert!(
                peak <= bound,
                "{name}: parsing took {peak} bytes, more than the bound {bound}"
            );
            // Not so loose that it refuses what would fit.
            assert!(
                bound <= 8 * peak.max(body.len()),
                "{name}: the bound {bound} is far above the {peak} bytes taken"
            );
        }
    }

    #[test]
    fn small_values_cost_far_more_than_their_text() {
        let body = format!("{{\"payload\":[{}0]}}", "0,".repeat(10_000));
        assert!(parsed_bound(body.as_bytes()) > 10 * body.len());
        let text = format!("{{\"payload\":\"{}\"}}", "x".repeat(10_000));
        assert!(parsed_bound(text.as_bytes()) < 3 * text.len());
        // A batch of large payloads costs not much more than its text.
        let item = format!("{{\"payload\":\"{}\"}}", "x".repeat(5_000));
        let batch = format!("[{}{item}]", format!("{item},").repeat(999));
        assert!(parsed_bound(batch.as_bytes()) < batch.len() * 7 / 5);
    }
}
