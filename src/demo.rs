//! stub
pub async fn run(_a: crate::cli::DemoArgs) -> std::process::ExitCode {
    unimplemented!()
}
