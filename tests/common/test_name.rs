//! `test_name!()`: the name of the test function it stands in, for the
//! opt-in skip line (`opt_in::enabled`), so a test does not write its own
//! name a second time as a string. Include it with
//! `#[macro_use] #[path = "common/test_name.rs"] mod test_name;`.

/// The name of the enclosing function: the last segment of the path of a
/// function item defined inside it.
macro_rules! test_name {
    () => {{
        fn here() {}
        let path = std::any::type_name_of_val(&here);
        let path = path.strip_suffix("::here").unwrap_or(path);
        path.rsplit("::").next().unwrap_or(path)
    }};
}
