//! Certificate material on disk. (Stub: implemented by the material work.)
