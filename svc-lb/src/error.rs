//! The bottom layer: [`chain`], which formats an error's cause chain for logs. Each area keeps
//! its own error enum next to its code (one per area, so callers can match on what went
//! wrong; `main.rs` wraps them in anyhow), e.g. `MapsError` in `maps`, `NetifError` in `netif`.

use std::error::Error as StdError;

/// "outer: inner: innermost", for log lines (tracing records one string, not a chain). A
/// source whose text the outer message already ends with (errors that print their source
/// themselves) is not repeated.
pub fn chain(err: &dyn StdError) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let text = e.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use std::io;

    use thiserror::Error;

    use super::*;

    #[derive(Debug, Error)]
    #[error("cannot read {what}: {source}")]
    struct PrintsItsSource {
        what: &'static str,
        source: io::Error,
    }

    #[derive(Debug, Error)]
    #[error("sync failed")]
    struct Outer(#[source] PrintsItsSource);

    #[test]
    fn chain_joins_causes_without_repeating_them() {
        let e = Outer(PrintsItsSource {
            what: "dir",
            source: io::Error::new(io::ErrorKind::NotFound, "gone"),
        });
        assert_eq!(chain(&e), "sync failed: cannot read dir: gone");
    }
}
