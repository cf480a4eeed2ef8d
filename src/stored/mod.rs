//! What the repository holds, on a floor of its own below the sources: the manifests' typed
//! details and positions, the captured-schema model and the change records' codec. Sources
//! write these types; restore, export, prune and drill read them without importing `source`.

pub mod blobs;
pub mod postgres;
pub mod sqlite;
