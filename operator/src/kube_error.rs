//! One error for a failed API call, naming what was being done, shared by the operator's
//! controllers and the node-helper.

/// An API call that failed: what it was for, and the client's error.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct KubeError {
    pub what: String,
    #[source]
    pub source: kube::Error,
}

/// `map_err(kube_err("reading X"))?`: wraps a [`kube::Error`] with what was being done
/// (`?` turns it into any error that has `#[from] KubeError`).
pub fn kube_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> KubeError {
    let what = what.into();
    move |source| KubeError { what, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error(transparent)]
        Kube(#[from] KubeError),
    }

    #[test]
    fn names_what_was_being_done() {
        let e: Outer = kube_err("reading node m1")(kube::Error::LinesCodecMaxLineLengthExceeded).into();
        assert!(e.to_string().starts_with("reading node m1: "), "{e}");
    }
}
