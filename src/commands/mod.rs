//! Handlers of the one-shot subcommands: those that do a job and exit
//! rather than run a role (the roles are dispatched from [`crate::run`]).
//! They turn parsed [`crate::cli`] arguments into calls of the library, so
//! the library modules below them never import `cli`.

pub mod material;
