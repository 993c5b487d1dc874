//! Atomic file writes. (Stub: implemented by the material work.)
